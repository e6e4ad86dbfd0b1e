"""One benchmark: 10-fold cross-validation over the 488 labelled records of ptbxl-500, every line through the
functions the service's jobs call.

Each of the 10 ``strat_fold``s is the test fold once, the next fold validates (thresholds, the best epoch,
the probe's C), the other eight train (``FinetuneParams.test_fold``). Pretraining never sees ptbxl-500: each
self-supervised method is pretrained once, by a real pretraining job (``services.jobs.pretrain``, the method's
default recipe) on ptbxl-unlabelled (1,320 records), and that encoder serves all ten folds. Every other line
is a real fine-tuning job (``services.jobs.finetune``: train, evaluate, export to ONNX, parity, register)
run by the benchmark's own processes on a temporary embedded database, except the clinical-features
baseline (the service's NeuroKit2 measurements, ``services.ecg.clinical``, with scikit-learn's logistic
regression).

Lines (``--lines``, comma-separated names, or ``all``; default the core lines, ``core_lines()``: the
baselines, every method's probe, kNN and fine-tune at its default size, and ``best``):
    supervised        1-D ResNet (resnet1d_wang) trained from scratch: the field's strong simple baseline
    supervised-tiny   the same at the tiny size (the network the SimCLR line pretrains)
    ensemble-<size>   several 1-D ResNets from scratch, their probabilities averaged (one served model)
    clinical          clinical measurements + logistic regression (C on the validation fold)
    random-<family>   that family's encoder at its random initialisation + linear probe (random-resnet1d-base:
                      the base size)
    <method>-probe    the pretrained encoder, frozen, + linear probe (and its kNN, k=20 cosine, in one job);
                      <method>-<size>-probe etc.: a further size (``MORE_SSL``)
    <line>-probe40    random-<family> or <method>, the probe head trained 40 epochs (``PROBE_EPOCHS_SEARCH``)
    <method>-finetune the pretrained encoder fine-tuned with the family's default recipe
    best              the service's best default diagnosis recipe (see ``BEST``)
    and the recipe-search lines (``all`` runs them too): simclr-finetune-lr1e-2, -lr3e-3, -lr1e-3, -lr3e-4
    (and simclr-base-finetune-lr<lr>), simclr-finetune-ld0.5, -ld0.7, -noprobe, -lpft-ld0.7, simclr-ensemble,
    ensemble5-tiny, ensemble-base, and <line>-aug
    (supervised, supervised-tiny, ensemble-tiny, simclr-finetune with ST-MEM's RandAugment on the training
    windows),
    supervised-, supervised-tiny-, ensemble-tiny-, simclr-finetune- and simclr-base-finetune-ema<decay> (the
    weights' moving average kept, ``EMA_SEARCH``), simclr-finetune-wise<a> (WiSE-FT's interpolation kept,
    ``WISE_SEARCH``), supervised-tiny-<change> (``SCRATCH_SEARCH``) and simclr-finetune-<change>
    (``PRETRAINED_SEARCH``)

It prints, per line, the mean and standard deviation over the test folds of the macro AUROC (and the
validation folds' means: at the kept epoch, and for fine-tuning lines the cross-fit figure, which is the one
to choose fine-tuning recipes by), and the per-class means; writes a Markdown table (``--out``). Each job's
output is kept in ``--work``, so an interrupted run resumes; a kept job runs again when the recipe its
parameters resolve to has changed (a family's new default). Jobs run ``--processes`` at a time (default 2),
each process with its share of the cores as torch threads (``--threads``): the encoders' pretraining first,
then the lines fold after fold (``run_all``); ``--processes 1`` runs one job after the other in this
process. A job's figures depend on the torch threads it ran with (it repeats exactly on one CPU with the
same number), so compare lines within one run or with ``--paired``.

    .venv/bin/python reports/benchmark.py                  # the core lines, 10 folds
    .venv/bin/python reports/benchmark.py --lines all      # every line, the recipe searches too
    .venv/bin/python reports/benchmark.py --quick          # folds 1-3, 10 pretraining epochs
    .venv/bin/python reports/benchmark.py --lines supervised,simclr-finetune --folds 1,2 --work /tmp/b
    .venv/bin/python reports/benchmark.py --lines supervised-tiny,simclr-finetune --paired supervised-tiny
                                                           # + differences fold by fold, with standard errors
    .venv/bin/python reports/benchmark.py --lines supervised,best --seed 0,1,2 --paired supervised
                                                           # each fold the mean over 3 fine-tuning seeds
    .venv/bin/python reports/benchmark.py --lines supervised-tiny,simclr-finetune --pretrain-seed 0,1,2
                                                           # each fold of simclr-finetune the mean over three
                                                           # encoders, pretrained at seeds 0, 1 and 2
"""

import argparse
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABELLED = "ptbxl-500"
UNLABELLED = "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"
CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
SSL = {"st_mem": "tiny", "ecg_jepa": "tiny", "simclr": "tiny"}  # pretraining method -> its lines' size
MORE_SSL = {"simclr": ("base",)}  # further sizes, as lines "<method>-<size>-..." (model "<method>:<size>")
RANDOM = {"resnet1d": "tiny", "st_mem": "tiny", "ecg_jepa": "tiny"}  # family -> size
MORE_RANDOM = {"resnet1d": ("base",)}  # further sizes at random init, as lines "random-<family>-<size>"
PROBE_EPOCHS_SEARCH = (40,)  # probe heads trained longer than the job's default: lines "<line>-probe<epochs>"


def environment(work: Path, data: Path, threads: int) -> None:
    """Point the service at an embedded database and artifact folder under ``work`` (before importing it)."""
    os.environ.update(
        ECGSSL_DATABASE_URL=f"sqlite:///{work / 'benchmark.db'}",
        ECGSSL_BROKER_URL=f"sqla+sqlite:///{work / 'broker.db'}",
        ECGSSL_ARTIFACT_DIR=str(work / "artifacts"),
        ECGSSL_DATA_ROOT=str(data),
        ECGSSL_EXPORT_VARIANTS="none",
        ECGSSL_DEVICE="cpu",
    )
    import torch
    from alembic import command
    from alembic.config import Config

    if threads:
        torch.set_num_threads(threads)
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


class Busy(Exception):
    """What a unit of a run makes (an encoder, a job's output) is being made by another of its processes."""


@contextmanager
def claimed(made: Path) -> Iterator[None]:
    """Hold the lock of the file ``made`` while making it (``Busy`` if another process holds it), so that two
    processes of a run never make one thing twice; the lock goes with its process, whatever ends it."""
    with made.with_suffix(".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(made.name) from None
        yield


def made_once(
    path: Path, make: Callable[[], dict], fresh: Callable[[dict], bool] = lambda kept: True
) -> dict:
    """What ``path`` keeps (when there and ``fresh``), else ``make()`` it under the path's lock (``claimed``:
    once across a run's processes) and keep it, written whole (another process may read it outside the lock).
    """

    def kept() -> dict | None:
        value = json.loads(path.read_text()) if path.is_file() else None
        return value if value is not None and fresh(value) else None

    if (value := kept()) is None:
        with claimed(path):
            if kept() is None:  # (not made meanwhile by another process)
                partial = path.with_suffix(".partial")
                partial.write_text(json.dumps(make()))
                os.replace(partial, path)
        value = json.loads(path.read_text())
    return value


def run_job(kind: str, params) -> dict:  # noqa: ANN001  (PretrainParams | FinetuneParams)
    """Queue-less: write the job row and run it as the worker would; its row's result (exit on failure)."""
    from services.datasets.registry import dataset_for_job
    from services.db.models import Job
    from services.db.session import session_scope
    from services.jobs.finetune import run_finetune_job
    from services.jobs.pretrain import run_pretrain_job
    from services.jobs.store import create_job

    with session_scope() as s:
        row = dataset_for_job(s, params.dataset)
        job_id = create_job(s, kind, params, epochs=params.epochs or 0, dataset=row).id
    started = time.perf_counter()
    {"pretrain": run_pretrain_job, "finetune": run_finetune_job}[kind](job_id, worker="benchmark")
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job.status != "succeeded":
            raise SystemExit(f"{kind} job {job_id} {job.status}: {job.error}")
        return {
            "result": job.result or {},
            "version": job.model_version.ref if job.model_version else None,
            "seconds": time.perf_counter() - started,
        }


def pretrained(model: str, epochs: int | None, work: Path, seed: int = 0) -> dict:
    """The encoder ``model`` ("<method>" at its ``SSL`` size, or "<method>:<size>") pretrained on
    ptbxl-unlabelled with ``seed`` (made once per ``work`` and seed): its registered version, minutes and
    pretraining params."""
    method, _, size = model.partition(":")
    size = size or SSL[method]
    suffix = ("" if size == SSL[method] else f"-{size}") + (f"-seed{seed}" if seed else "")
    known = work / f"pretrained-{method}{suffix}.json"
    return made_once(known, lambda: _pretrain(method, size, epochs, seed))


def _pretrain(method: str, size: str, epochs: int | None, seed: int) -> dict:
    """Run the pretraining job: its registered version, seconds and parameters."""
    from services.jobs.params import PretrainParams

    params = PretrainParams(
        dataset=UNLABELLED,
        method=method,
        model_size=size,
        epochs=epochs,
        seed=seed,
        model_name=f"bench-{method}-{size}",
    )
    print(
        f"pretraining {method} {size} on ptbxl-unlabelled: {params.epochs} epochs, batch "
        f"{params.batch_size}, lr {params.learning_rate:g}, seed {seed}",
        flush=True,
    )
    out = run_job("pretrain", params)
    print(f"  {out['version']} in {out['seconds'] / 60:.1f} min", flush=True)
    return {"version": out["version"], "seconds": out["seconds"], "params": params.model_dump(mode="json")}


def shared_job(params, work: Path, recipe: dict) -> dict:  # noqa: ANN001  (FinetuneParams)
    """A fine-tuning job's output, run once per distinct parameters in ``work``: run again when the recipe
    the parameters resolve to now (``recipe``: a family's defaults may have changed) is not the one it ran."""
    key = hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:16]
    return made_once(
        work / f"job-{key}.json",
        lambda: run_job("finetune", params),
        fresh=lambda ran: {k: ran["result"].get("recipe", {}).get(k) for k in recipe} == recipe,
    )


def family_and_size(fields: dict) -> tuple[str, str]:
    """The family and size a line's fields (or ``BEST``) train: a pretrained "<method>[:<size>]"'s (its
    ``SSL`` size by default), else the given family at its given size."""
    from services.models.families import family as family_named

    method, _, size = fields.get("model", "").partition(":")
    return family_named(fields.get("family") or method).name, fields.get("model_size") or size or SSL[method]


class FinetuneLine:
    """A line that runs one fine-tuning job per fold (``fields``: the job's parameters; a "model" names a
    method, pretrained first) and reads its test (and kNN) figures."""

    def __init__(self, **fields) -> None:  # noqa: ANN003
        self.fields = fields

    @property
    def encoder(self) -> str | None:
        """The pretrained encoder ("<method>[:<size>]") its jobs start from, if any."""
        return self.fields.get("model")

    def __call__(self, fold: int, args: argparse.Namespace) -> dict:
        from services.jobs.params import FinetuneParams

        given = {
            k: (
                pretrained(v, args.pretrain_epochs, args.work, args.pretrain_seed)["version"]
                if k == "model"
                else v
            )
            for k, v in self.fields.items()
            if k != "read"
        }
        params = FinetuneParams(dataset=LABELLED, test_fold=fold, seed=args.seed, **given)
        recipe = params.recipe(*family_and_size(self.fields))  # what the job runs with now
        out = shared_job(params, args.work, recipe)  # e.g. a probe line and its kNN line read one job
        read = self.fields.get("read", "test")
        scores = out["result"][read]
        return {
            "macro_auroc": scores["macro_auroc"],
            "per_class": scores["auroc_per_class"],
            # the validation figure of the head the job trained (a kNN line has none of its own)
            "val_macro_auroc": None
            if read == "knn"
            else out["result"].get("test", {}).get("val_macro_auroc"),
            # a fine-tuning job's epoch chosen on half the validation records, read on the other half
            "crossfit_val_macro_auroc": None
            if read == "knn"
            else out["result"].get("crossfit_val_macro_auroc"),
            "seconds": out["seconds"],
            "recipe": out["result"].get("recipe"),
        }


def clinical_line(fold: int, args: argparse.Namespace) -> dict:
    """The service's clinical measurements (normalised on the training folds, missing flags) + logistic
    regression per class, C in 0.01 / 0.1 / 1 chosen by the validation fold's macro AUROC."""
    return made_once(args.work / f"clinical-fold{fold}.json", lambda: _clinical(fold))  # kept like a job's


def _clinical(fold: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    from services.config import get_settings
    from services.datasets.registry import dataset_for_job
    from services.db.session import session_scope
    from services.ecg.clinical import FeatureNormaliser, clinical_features_for
    from services.evaluation.linear_probe import macro_auroc
    from services.jobs.labelled import open_labelled
    from services.jobs.runner import JobReporter
    from services.models.resnet1d import INPUT_SPEC

    class OutsideAJob(JobReporter):
        """The line runs outside any job: nothing is written, and there is no job row to poll for a cancel
        (while it builds the preprocessed cache, which no job of the run may have built yet)."""

        def should_cancel(self) -> bool:
            return False

    started = time.perf_counter()
    with session_scope() as s:
        row = dataset_for_job(s, LABELLED)
        data = open_labelled(row, INPUT_SPEC, None, OutsideAJob(uuid.uuid4(), writes=False), test_fold=fold)
    raw = clinical_features_for(
        data.dataset, data.source_index, Path(get_settings().artifact_dir) / "cache", identity=data.identity
    )
    normaliser = FeatureNormaliser.fit(raw, rows=data.records["train"])
    x = normaliser.transform_stacked(raw)
    split = {s: (x[data.records[s]], data.labels[data.records[s]]) for s in ("train", "val", "test")}

    def fit(c: float) -> Callable[[np.ndarray], np.ndarray]:
        models = [
            LogisticRegression(C=c, max_iter=2000).fit(split["train"][0], split["train"][1][:, k])
            for k in range(len(CLASSES))
        ]
        return lambda z: np.stack([m.predict_proba(z)[:, 1] for m in models], axis=1)

    val = {c: macro_auroc(split["val"][1], fit(c)(split["val"][0]))[0] for c in (0.01, 0.1, 1.0)}
    c = max(val, key=val.get)
    value, per_class = macro_auroc(split["test"][1], fit(c)(split["test"][0]))
    result = {
        "macro_auroc": value,
        "per_class": dict(zip(CLASSES, map(float, per_class), strict=True)),
        "val_macro_auroc": val[c],
        "seconds": time.perf_counter() - started,
        "recipe": {"C": c},
    }
    return result


# changes to the tiny CNN's recipe from scratch, searched on the validation folds: "supervised-tiny-<key>"
SCRATCH_SEARCH = {
    "ep60": ("60 epochs", {"epochs": 60}),
    "wd0.1": ("weight decay 0.1", {"weight_decay": 0.1}),
    "lr3e-3": ("lr 3e-3", {"learning_rate": 3e-3}),
    "lr3e-2": ("lr 3e-2", {"learning_rate": 3e-2}),
    "bs32": ("batch 32 (lr 5e-3)", {"batch_size": 32}),
}

# changes to the pretrained tiny CNN's fine-tuning recipe, searched the same way: "simclr-finetune-<key>"
PRETRAINED_SEARCH = {
    "ep60": ("60 epochs", {"epochs": 60}),
    "bs32": ("batch 32 (lr 5e-4)", {"batch_size": 32}),
}

EMA_SEARCH = (0.9, 0.97)  # decays of the weights' moving average searched on the validation folds
WISE_SEARCH = (0.5, 0.7)  # WiSE-FT's share of the fine-tuned weights, searched on the validation folds

# The service's best default diagnosis recipe, chosen by the 10-fold cross-fit validation mean (the epoch
# chosen and read on different halves of each validation fold): 3 tiny 1-D ResNets from scratch 0.873, against
# 0.870 for 3 SimCLR-pretrained ones (LP-FT at lr 1e-3) and 0.867 / 0.863 for one network with / without
# pretraining (reports/benchmark.md); 5 tiny networks read 0.875 (+0.003 ± 0.002 paired), inside the noise for
# 5/3 of the cost, so three; ensembles of the base network were left out: three would not ship in a few MB.
# Since the tiny recipe from scratch keeps the weights' moving average (scratch_ema_decay), it reads 0.880.
# A fine-tuning job with these fields (the family's default recipe for the rest; a "model" would name
# a method pretrained first on ptbxl-unlabelled); reports/default_model.py trains the shipped model by it.
BEST = {"family": "resnet1d", "model_size": "tiny", "method": "finetune", "ensemble": 3}


def lines() -> dict[str, tuple[str, Callable]]:
    table: dict[str, tuple[str, Callable]] = {
        "supervised": (  # the field's recipe (Strodthoff et al.), without the service's moving average
            "1-D ResNet from scratch (supervised baseline)",
            FinetuneLine(family="resnet1d", model_size="base", method="finetune", ema_decay=0.0),
        ),
        "supervised-tiny": (
            "1-D ResNet tiny from scratch (the SSL CNN's network)",
            FinetuneLine(family="resnet1d", model_size="tiny", method="finetune"),
        ),
        "ensemble-tiny": (
            "3 x 1-D ResNet tiny from scratch, averaged",
            FinetuneLine(family="resnet1d", model_size="tiny", method="finetune", ensemble=3),
        ),
        "ensemble5-tiny": (
            "5 x 1-D ResNet tiny from scratch, averaged (recipe search)",
            FinetuneLine(family="resnet1d", model_size="tiny", method="finetune", ensemble=5),
        ),
        "ensemble-base": (
            "3 x 1-D ResNet (resnet1d_wang) from scratch, averaged",
            FinetuneLine(family="resnet1d", model_size="base", method="finetune", ensemble=3),
        ),
        "clinical": ("clinical measurements + logistic regression", clinical_line),
    }
    randoms = [(family, size, f"random-{family}") for family, size in RANDOM.items()]
    randoms += [(f, s, f"random-{f}-{s}") for f, sizes in MORE_RANDOM.items() for s in sizes]
    encoders = [(method, size, method, method) for method, size in SSL.items()]
    encoders += [(m, s, f"{m}-{s}", f"{m}:{s}") for m, sizes in MORE_SSL.items() for s in sizes]
    for epochs in (None, *PROBE_EPOCHS_SEARCH):  # the job's default probe length, then the searched ones
        longer = "" if epochs is None else f", {epochs} epochs (recipe search)"
        for family, size, name in randoms:
            table[name if epochs is None else f"{name}-probe{epochs}"] = (
                f"{family} {size} at random init + linear probe{longer}",
                FinetuneLine(family=family, model_size=size, method="linear_probe", epochs=epochs),
            )
        for method, size, name, model in encoders:
            table[f"{name}-probe{epochs or ''}"] = (
                f"{method} {size} pretrained, frozen + linear probe{longer}",
                FinetuneLine(model=model, method="linear_probe", epochs=epochs),
            )
    for method, size, name, model in encoders:
        table[f"{name}-knn"] = (
            f"{method} {size} pretrained, frozen + kNN (k=20, cosine)",
            FinetuneLine(model=model, method="linear_probe", read="knn"),
        )
        table[f"{name}-finetune"] = (
            f"{method} {size} pretrained, fine-tuned (default recipe)",
            FinetuneLine(model=model, method="finetune"),
        )
    simclr_encoders = [(size, name, model) for method, size, name, model in encoders if method == "simclr"]
    for size, name, model in simclr_encoders:  # each size's lr search
        for lr in ("1e-2", "3e-3", "1e-3", "3e-4"):
            table[f"{name}-finetune-lr{lr}"] = (
                f"simclr {size} pretrained, fine-tuned at lr {lr} (recipe search)",
                FinetuneLine(model=model, method="finetune", learning_rate=float(lr)),
            )
    for decay in (0.5, 0.7):
        table[f"simclr-finetune-ld{decay}"] = (
            f"simclr tiny pretrained, fine-tuned with layer-wise lr decay {decay} (recipe search)",
            FinetuneLine(model="simclr", method="finetune", layer_decay=decay),
        )
    table["simclr-finetune-noprobe"] = (
        "simclr tiny pretrained, fine-tuned without LP-FT (recipe search)",
        FinetuneLine(model="simclr", method="finetune", probe_first=False),
    )
    table["simclr-finetune-lpft-ld0.7"] = (
        "simclr tiny pretrained, LP-FT with layer-wise lr decay 0.7 (recipe search)",
        FinetuneLine(model="simclr", method="finetune", probe_first=True, layer_decay=0.7),
    )
    for alpha in WISE_SEARCH:
        table[f"simclr-finetune-wise{alpha}"] = (
            f"simclr tiny pretrained, LP-FT, WiSE-FT weights at {alpha} (recipe search)",
            FinetuneLine(model="simclr", method="finetune", wise_ft=alpha),
        )
    table["simclr-ensemble"] = (
        "3 x simclr tiny pretrained, fine-tuned, averaged (recipe search)",
        FinetuneLine(model="simclr", method="finetune", ensemble=3),
    )
    # ST-MEM's RandAugment on the CNN's training windows (the recipe's default is without)
    for name in ("supervised", "supervised-tiny", "ensemble-tiny", "simclr-finetune"):
        description, line = table[name]
        table[f"{name}-aug"] = (
            f"{description}, with RandAugment (recipe search)",
            FinetuneLine(**line.fields, augment=True),
        )
    # one change each to the tiny network from scratch (lr 1e-2, batch 64, 30 epochs, weight decay 1e-2) and
    # to the pretrained one's LP-FT (lr 1e-3, batch 64, 30 epochs)
    for base, described, search in (
        ("supervised-tiny", "1-D ResNet tiny from scratch", SCRATCH_SEARCH),
        ("simclr-finetune", "simclr tiny pretrained, fine-tuned", PRETRAINED_SEARCH),
    ):
        for suffix, (change, given) in search.items():
            table[f"{base}-{suffix}"] = (
                f"{described}, {change} (recipe search)",
                FinetuneLine(**table[base][1].fields, **given),
            )
    # the kept weights an exponential moving average of the trained ones (the family's default from scratch
    # since it was searched here, so the tiny network's lines now repeat supervised-tiny and ensemble-tiny)
    simclr_finetunes = [f"{name}-finetune" for _, name, _ in simclr_encoders]
    for name in ("supervised", "supervised-tiny", "ensemble-tiny", *simclr_finetunes):
        description, line = table[name]
        for decay in EMA_SEARCH:
            table[f"{name}-ema{decay}"] = (
                f"{description}, weights' moving average at decay {decay} (recipe search)",
                FinetuneLine(**{**line.fields, "ema_decay": decay}),
            )
    described = ", ".join(f"{k} {v}" for k, v in BEST.items())
    table["best"] = (f"the service's best default recipe ({described})", FinetuneLine(**BEST))
    return table


def core_lines() -> list[str]:
    """The lines a default run prints: the supervised baselines from scratch, the clinical features, each
    family at random init + probe, each method's probe, kNN and fine-tune at its ``SSL`` size, and ``best``
    (not the recipe searches, the further sizes or the longer probes)."""
    baselines = ["supervised", "supervised-tiny", "ensemble-tiny", "clinical"]
    randoms = [f"random-{family}" for family in RANDOM]
    methods = [f"{method}-{line}" for method in SSL for line in ("probe", "knn", "finetune")]
    return [*baselines, *randoms, *methods, "best"]


@dataclass(frozen=True)
class Unit:
    """One piece of a run: an encoder's pretraining (``line`` None), or a line on one test fold, which needs
    its ``encoder`` (if any) pretrained first, with one fine-tuning ``seed``."""

    line: str | None
    fold: int = 0
    encoder: str | None = None
    seed: int = 0  # the fine-tuning job's
    pretrain_seed: int = 0  # the encoder's pretraining job's


def run_unit(unit: Unit, args: argparse.Namespace) -> dict:
    """Run ``unit`` here: the encoder's pretraining record, or the line's figures on its fold."""
    if unit.line is None:
        return pretrained(unit.encoder, args.pretrain_epochs, args.work, unit.pretrain_seed)
    given = {**vars(args), "seed": unit.seed, "pretrain_seed": unit.pretrain_seed}
    return lines()[unit.line][1](unit.fold, argparse.Namespace(**given))


def report(unit: Unit, r: dict) -> None:
    """Print a line's figures on one fold as they come."""
    val, crossfit = (r.get(k) or float("nan") for k in ("val_macro_auroc", "crossfit_val_macro_auroc"))
    seed = f" seed {unit.seed}" if unit.seed else ""
    seed += f" pretraining seed {unit.pretrain_seed}" if unit.pretrain_seed else ""
    print(
        f"  fold {unit.fold} {unit.line}{seed}: test {r['macro_auroc']:.3f}, val {val:.3f}, val cross-fit "
        f"{crossfit:.3f} ({r['seconds']:.0f} s)",
        flush=True,
    )


def _start_process(args: argparse.Namespace) -> None:
    """A new process of the run: the same embedded database, artifacts and torch threads as the others."""
    environment(args.work, Path(args.data), args.threads)
    logging.basicConfig(level=logging.WARNING)


def run_all(chosen: list[str], folds: list[int], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every chosen line on every fold at every fine-tuning seed (``args.seeds``) and, for a line that starts
    from a pretrained encoder, every pretraining seed (``args.pretrain_seeds``: one encoder each); each
    line's results in fold order, each fold's the mean over its runs (``averaged_over_seeds``).

    ``--processes 1``: one unit after the other in this process, fold after fold (an interrupted run has
    every line on the same folds). More: that many processes of ``--threads`` torch threads each take the
    next unit that can start: the encoders' pretraining first, in the methods' order (the longest first),
    then the lines fold after fold, each once its encoder is there. A unit whose job another process is
    running (a probe line and its kNN line read one job) waits and is tried again (``Busy``)."""
    available = lines()
    encoder_of = {name: getattr(available[name][1], "encoder", None) for name in chosen}  # (clinical: none)
    encoders = dict.fromkeys(e for e in encoder_of.values() if e)
    units = [Unit(None, encoder=e, pretrain_seed=p) for e in encoders for p in args.pretrain_seeds]
    pretrained_first = len(units)
    units += [
        Unit(name, f, encoder_of[name], s, p)
        for p in args.pretrain_seeds
        for s in args.seeds
        for f in folds
        for name in chosen
        if encoder_of[name] or p == args.pretrain_seeds[0]  # (a line without an encoder runs once)
    ]
    # (pretraining seed, seed, fold) -> figures
    results: dict[str, dict[tuple[int, int, int], dict]] = {name: {} for name in chosen}

    def by_fold() -> dict[str, list[dict]]:
        return {
            name: [averaged_over_seeds([r for k, r in sorted(runs.items()) if k[2] == f]) for f in folds]
            for name, runs in results.items()
        }

    if args.processes == 1:
        for unit in units[pretrained_first:]:  # (an encoder is pretrained by its first line)
            results[unit.line][unit.pretrain_seed, unit.seed, unit.fold] = r = run_unit(unit, args)
            report(unit, r)
        return by_fold()

    made: set[tuple[str, int]] = set()  # (encoder, pretraining seed)

    def can_start(unit: Unit) -> bool:
        """An encoder's pretraining, or a line whose encoder (if it has one) is made at its seed."""
        return unit.line is None or unit.encoder is None or (unit.encoder, unit.pretrain_seed) in made

    retry_at: dict[Unit, float] = {}
    running: dict[Future, Unit] = {}
    spawn = multiprocessing.get_context("spawn")  # (not fork: the parent has torch's threads)
    with ProcessPoolExecutor(args.processes, spawn, initializer=_start_process, initargs=(args,)) as pool:
        while units or running:
            now = time.monotonic()
            ready = [u for u in units if can_start(u)]
            for unit in [u for u in ready if retry_at.get(u, 0) <= now][: args.processes - len(running)]:
                units.remove(unit)
                running[pool.submit(run_unit, unit, args)] = unit
            finished, _ = wait(running, timeout=2, return_when=FIRST_COMPLETED)
            for future in finished:
                unit = running.pop(future)
                try:
                    r = future.result()
                except Busy:
                    units.append(unit)
                    retry_at[unit] = time.monotonic() + 5
                    continue
                if unit.line is None:
                    made.add((unit.encoder, unit.pretrain_seed))
                else:
                    results[unit.line][unit.pretrain_seed, unit.seed, unit.fold] = r
                    report(unit, r)
    return by_fold()


def pretraining_seeds(seeds: list[int]) -> str:
    """The command line's note of the pretraining seeds ("" for the default, 0)."""
    if seeds == [0]:
        return ""
    if len(seeds) == 1:
        return f", pretraining seed {seeds[0]}"
    return f", pretraining seeds {seeds} (each fold of a pretrained line their mean)"


def averaged_over_seeds(runs: list[dict]) -> dict:
    """One line's figures on one fold at several seeds (fine-tuning, pretraining) as one: the mean of each
    figure (a figure missing at any seed stays missing), the seconds of them all."""
    if len(runs) == 1:
        return runs[0]

    def mean(key: str) -> float | None:
        values = [r.get(key) for r in runs]
        return None if None in values else float(np.mean(values))

    return {
        "macro_auroc": mean("macro_auroc"),
        "per_class": {c: float(np.mean([r["per_class"][c] for r in runs])) for c in runs[0]["per_class"]},
        "val_macro_auroc": mean("val_macro_auroc"),
        "crossfit_val_macro_auroc": mean("crossfit_val_macro_auroc"),
        "seconds": sum(r["seconds"] for r in runs),
        "recipe": runs[0].get("recipe"),
    }


def summary(name: str, description: str, runs: list[dict]) -> dict:
    test = np.array([r["macro_auroc"] for r in runs])
    val = np.array([r["val_macro_auroc"] for r in runs if r.get("val_macro_auroc") is not None])
    crossfit = [r.get("crossfit_val_macro_auroc") for r in runs]
    per_class = {c: float(np.nanmean([r["per_class"][c] for r in runs])) for c in CLASSES}
    return {
        "line": name,
        "description": description,
        "folds": len(runs),
        "mean": float(test.mean()),
        "std": float(test.std()),
        "val_mean": float(val.mean()) if len(val) else None,
        "crossfit_mean": float(np.mean(crossfit)) if None not in crossfit else None,  # only over every fold
        "per_class": per_class,
        "minutes": sum(r["seconds"] for r in runs) / 60,
    }


TABLE_HEAD = (
    "| line | folds | test macro AUROC (mean ± sd) | val mean | val cross-fit | "
    + " | ".join(CLASSES)
    + " | min |"
)


def table_markdown(rows: list[dict]) -> str:
    """The table: per line, test mean ± sd, the validation means (at the kept epoch; and for fine-tuning, the
    cross-fit figure: ``crossfit_selected_auroc``), per-class test means and minutes."""
    out = [TABLE_HEAD, "|" + "---|" * (6 + len(CLASSES))]
    for r in rows:
        val, crossfit = (
            "" if r.get(key) is None else f"{r[key]:.3f}" for key in ("val_mean", "crossfit_mean")
        )
        out.append(
            f"| {r['description']} (`{r['line']}`) | {r['folds']} | {r['mean']:.3f} ± {r['std']:.3f} | "
            f"{val} | {crossfit} | "
            + " | ".join(f"{r['per_class'][c]:.3f}" for c in CLASSES)
            + f" | {r['minutes']:.1f} |"
        )
    return "\n".join(out)


def paired_markdown(reference: str, runs: dict[str, list[dict]]) -> str:
    """Each line against ``reference`` fold by fold (the same test and validation folds): the mean
    difference of the test macro AUROC ± its standard error (sd / sqrt(folds)), the folds where the line is
    higher, and the same difference of the cross-fit validation figure where both lines have it."""

    def differences(name: str, key: str) -> np.ndarray | None:
        pairs = [(r.get(key), b.get(key)) for r, b in zip(runs[name], runs[reference], strict=True)]
        return None if any(None in p for p in pairs) else np.array([a - b for a, b in pairs])

    def mean_se(d: np.ndarray | None) -> str:
        return "" if d is None else f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}"

    out = [
        f"| line | test minus `{reference}` (mean ± se) | folds higher | val cross-fit minus `{reference}` |",
        "|---|---|---|---|",
    ]
    for name in runs:
        if name == reference or len(runs[name]) != len(runs[reference]) or len(runs[name]) < 2:
            continue
        test = differences(name, "macro_auroc")
        out.append(
            f"| `{name}` | {mean_se(test)} | {int((test > 0).sum())} of {len(test)} | "
            f"{mean_se(differences(name, 'crossfit_val_macro_auroc'))} |"
        )
    return "\n".join(out)


ROWS_NOTE = "Each row is from the last of these runs that ran its line:"


def table_rows(text: str) -> dict[str, str]:
    """The rows of a table this script wrote (in Markdown ``text``), by line name, in their order; a row
    written before the cross-fit column gets it empty."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and "(`" in line]
    columns = TABLE_HEAD.count("|")
    rows = [row if row.count("|") == columns else _with_empty_crossfit(row) for row in rows]
    return {line.rsplit("(`", 1)[1].split("`)", 1)[0]: line for line in rows}


def _with_empty_crossfit(row: str) -> str:
    cells = row.split(" | ")  # "| description", folds, test, val mean, NORM ..., "min |"
    return " | ".join([*cells[:4], "", *cells[4:]])


def table_commands(text: str) -> list[str]:
    """The ``Command: ...`` lines of a table this script wrote: the runs its rows come from."""
    return [line for line in text.splitlines() if line.startswith("Command: ")]


def merged_table(previous: str, command: str, rows: list[dict]) -> str:
    """``previous`` (a table this script wrote) with this run's rows in place of the same lines' rows (new
    lines appended) and this run's command added to its list: one table grown over several runs."""
    fresh = {r["line"]: line for r, line in zip(rows, table_markdown(rows).splitlines()[2:], strict=True)}
    merged = [fresh.pop(name, line) for name, line in table_rows(previous).items()] + list(fresh.values())
    head = table_markdown([]).splitlines()
    return "\n".join([ROWS_NOTE, *table_commands(previous), command, "", *head, *merged])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", help="comma-separated line names, or all (default: the core lines)")
    parser.add_argument("--folds", default="1,2,3,4,5,6,7,8,9,10", help="test folds")
    parser.add_argument("--quick", action="store_true", help="folds 1-3 and 10 pretraining epochs")
    parser.add_argument("--pretrain-epochs", type=int, help="override the methods' default epochs")
    parser.add_argument("--work", help="working folder (kept: resumes; default a new temporary one)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument(
        "--processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="jobs run at once, each in its own process (default 2, or 1 on one core; 1: one after the "
        "other in this process)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0: the cores shared out)"
    )
    parser.add_argument(
        "--seed",
        default="0",
        help="the fine-tuning jobs' seed, or several (0,1,2): each line runs at each, and each fold reads "
        "the mean over them (pretraining has its own, --pretrain-seed)",
    )
    parser.add_argument(
        "--pretrain-seed",
        default="0",
        help="the pretraining jobs' seed (default 0, as the jobs): another seed, another pretraining run; "
        "or several (0,1,2): each encoder pretrained at each, and each fold of a line that starts from one "
        "reads the mean over them",
    )
    parser.add_argument("--out", help="write the Markdown table here (e.g. reports/benchmark.md)")
    parser.add_argument(
        "--paired", metavar="LINE", help="also print each line's fold-by-fold difference from this line"
    )
    parser.add_argument(
        "--merge", action="store_true", help="keep --out's rows of the lines not run now (one growing table)"
    )
    args = parser.parse_args()
    folds = [1, 2, 3] if args.quick else [int(f) for f in args.folds.split(",")]
    for option in ("seed", "pretrain_seed"):
        given = getattr(args, option)
        try:
            setattr(args, f"{option}s", [int(s) for s in given.split(",")])
        except ValueError:
            flag = "--" + option.replace("_", "-")
            raise SystemExit(f"{flag} {given}: a seed or comma-separated seeds, e.g. 0 or 0,1,2") from None
    if args.quick and args.pretrain_epochs is None:
        args.pretrain_epochs = 10
    args.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ecgssl-benchmark-"))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.processes < 1:
        raise SystemExit(f"--processes {args.processes}: at least 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)
    environment(args.work, Path(args.data), args.threads)
    logging.basicConfig(level=logging.WARNING)
    available = lines()
    chosen = list(available) if args.lines == "all" else args.lines.split(",") if args.lines else core_lines()
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise SystemExit(f"unknown line(s) {unknown}: one of {', '.join(available)}")
    if args.paired and args.paired not in chosen:
        raise SystemExit(f"--paired {args.paired}: not one of this run's lines ({', '.join(chosen)})")

    started = time.perf_counter()
    runs = run_all(chosen, folds, args)
    rows = [summary(name, available[name][0], runs[name]) for name in chosen]
    for r in rows:
        print(
            f"{r['line']:<18} {r['mean']:.3f} ± {r['std']:.3f} ({r['folds']} folds, "
            f"val {'n/a' if r['val_mean'] is None else format(r['val_mean'], '.3f')}, cross-fit "
            f"{'n/a' if r['crossfit_mean'] is None else format(r['crossfit_mean'], '.3f')}) "
            + " ".join(f"{c} {r['per_class'][c]:.3f}" for c in CLASSES),
            flush=True,
        )

    minutes = (time.perf_counter() - started) / 60
    from services.training.loop import machine_description

    machine = machine_description()
    command = (
        f"Command: `.venv/bin/python reports/benchmark.py {' '.join(sys.argv[1:])}`; {machine}; "
        f"{minutes:.1f} min this run (cached lines not re-run); folds {folds}, "
        f"{f'seed {args.seeds[0]}' if len(args.seeds) == 1 else f'seeds {args.seeds} (each fold their mean)'}"
        f"{pretraining_seeds(args.pretrain_seeds)}."
    )
    if args.merge and args.out and Path(args.out).is_file():
        text = merged_table(Path(args.out).read_text(), command, rows)
    else:
        text = "\n".join([command, "", table_markdown(rows)])
    if args.paired:
        print("\n" + paired_markdown(args.paired, runs))
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
