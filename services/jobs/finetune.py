"""Fine-tuning jobs (``POST /jobs/finetune``): adapt a registered encoder to a labelled dataset, evaluate
it, export it to ONNX, check parity, and register it as a new model version.

Methods (all train through the one training loop, ``services.training.loop.train``):

- ``linear_probe``: embeddings of every record computed once with the frozen encoder (3-crop mean), then a
  linear head (BCE per class) on them; exported as encoder + head -> (embedding, probabilities);
- ``finetune``: encoder + linear head all trained on random 9-s crops with ST-MEM's RandAugment (after
  standardisation), BCE; evaluated with 3-crop averaging of the probabilities;
- ``triplet``: the triplet-loss metric head of ``services.models.triplet`` (P x K batches), exported as the
  unit-norm embedding model;
- ``vqvae``: the token-level VQ-VAE of ``services.models.vqvae`` on the frozen encoder's per-lead patch tokens
  (ECG-JEPA's regrouped by ``LeadTokens``), with codebook usage and perplexity logged every epoch; exported
  as its embedding (mean of the record's quantised tokens).

Every method is then evaluated on the test split: kNN (train split as reference, thresholds tuned on val)
and clustering indices of its embeddings, and for the two diagnosis methods the head's macro/per-class
AUROC and macro F1 at thresholds tuned on the validation split; those thresholds are stored with the head.
The training-split embeddings and labels are kept as the version's kNN reference set
(``POST /predict?method=knn``).
"""

import copy
import logging
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.config import get_settings
from services.datasets.registry import dataset_for_job
from services.db.models import Job
from services.db.session import session_scope
from services.ecg.preprocess import InputSpec
from services.errors import ClientError
from services.evaluation.metrics import classification_result, crossfit_selected_auroc, knn_scores
from services.evaluation.plots import Caption, Figures, plot_history
from services.export.onnx import (
    HEAD_OUTPUTS,
    OUTPUT_NAME,
)
from services.jobs.downstream import (
    DOWNSTREAM_BETAS,
    BestEpoch,
    EpochLog,
    KeptWeights,
    LayerDecayLoss,
    WeightAverage,
    WeightInterpolation,
    classification_plots,
    clustering_protocol,
    fit_linear_head,
    history_plot,
    knn_protocol,
    save_reference,
    scores_auroc,
)
from services.jobs.labelled import (
    LabelledData,
    features_of,
    open_labelled,
    record_features,
    split_labels,
    torch_fn,
)
from services.jobs.params import PROBE_RECIPE, FinetuneParams
from services.jobs.runner import JobReporter, member_prefix, run_job
from services.jobs.store import artifacts_dir, job_dir, list_artifacts
from services.models.checkpoints import ENCODER_FILE, load_saved_encoder
from services.models.families import FAMILIES, size_of
from services.models.heads import DiagnosisModel, Embedder, EnsembleDiagnosis, LinearHead
from services.models.triplet import LabelledRecords, PKBatches, TripletModel
from services.models.vqvae import VqConfig, VqVae
from services.registry import register_model_version, resolve_model_version
from services.registry.publish import Published, publish
from services.training.augment import Augmented, RandAugment
from services.training.loop import CropDataset, TrainConfig, pick_device, train

log = logging.getLogger(__name__)

VAL_KNN_TRAIN_RECORDS = 1000  # per-epoch kNN check: at most this many training records as neighbours


def run_finetune_job(job_id: uuid.UUID, worker: str) -> str:
    """Run one fine-tuning job to its end and record the outcome (``services.jobs.runner.run_job``)."""
    return run_job(
        job_id, worker, lambda raw, reporter: finetune(job_id, FinetuneParams.model_validate(raw), reporter)
    )


@dataclass
class Base:
    """The registered version a job starts from, or (``ref`` None) a new encoder of a family."""

    ref: str | None
    name: str
    spec: InputSpec
    encoder_path: Path | None
    hybrid: bool


@dataclass
class Trained:
    """A method's outcome: what is exported (``outputs`` names its outputs), how to embed and score."""

    exported: nn.Module  # (B, C, L) -> embedding, or (embedding, probabilities)
    outputs: tuple[str, ...]
    embed: Callable[[torch.Tensor], torch.Tensor]  # (B, C, L) -> (B, E)
    encoder: nn.Module  # the encoder part, saved as encoder.pt
    history: list[dict[str, float]]
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None  # diagnosis methods
    features: dict[str, np.ndarray] | None = None  # linear probe: the frozen features, already computed
    extra: dict = field(default_factory=dict)  # method-specific results (e.g. codebook usage)


def finetune(job_id: uuid.UUID, params: FinetuneParams, reporter: JobReporter) -> dict:
    device = pick_device(get_settings().device)
    reporter.phase("opening the base model and the dataset")
    with session_scope() as s:
        job = s.get(Job, job_id)
        base = _base(s, params)
        row = job.dataset if job.dataset is not None else dataset_for_job(s, params.dataset)
    encoder, family = _encoder(base, params)
    recipe = {**params.recipe(family, size_of(FAMILIES[family], encoder.cfg)),
              "amp": FAMILIES[family].amp(device.type)}  # fmt: skip
    data = open_labelled(row, base.spec, params.record_limit, reporter, params.test_fold)
    folder, work = artifacts_dir(job_id), job_dir(job_id)
    reporter.phase(
        f"training ({params.method}) on {device.type}: {data.counts()['train']} records, "
        f"{data.counts()['val']} for validation"
    )
    trained = METHODS[params.method](
        encoder, family, data, params, recipe, device, work / "checkpoint.pt", reporter
    )
    reporter.check_cancel("after training")

    reporter.phase("evaluating on the test split")
    figures = Figures(folder)
    result, head, embeddings = _evaluate(trained, data, params, device, figures)
    result["recipe"], result["device"] = recipe, device.type  # (the model card shows both)
    result = _export_and_register(
        job_id, params, base, family, data, trained, result, head, embeddings, reporter
    )
    result["figures"] = figures.draw(result["model_version"])  # titled with the version just registered
    result["artifacts"] = list_artifacts(job_id)
    return result


def _base(session, params: FinetuneParams) -> Base:  # noqa: ANN001  (a SQLAlchemy session)
    if params.model is None:
        f = FAMILIES[params.family]
        spec = f.input_spec(f.sizes[params.model_size])
        return Base(None, f"{f.name}-{params.model_size}", spec, None, hybrid=False)
    version = resolve_model_version(session, params.model)
    return Base(
        ref=version.ref,
        name=version.model.name,
        spec=InputSpec.from_dict(version.input_spec),
        encoder_path=Path(version.onnx_path).with_name(ENCODER_FILE),
        hybrid=version.clinical_normaliser is not None,
    )


def _encoder(base: Base, params: FinetuneParams) -> tuple[nn.Module, str]:
    """(encoder, family name): the base version's weights, or a family's encoder at its initialisation.
    Seeds torch first, so that what is initialised after it (the encoder, a linear probe's head) follows from
    the job's seed, not from whatever the worker process ran before."""
    torch.manual_seed(params.seed)
    if base.encoder_path is not None:
        return load_saved_encoder(base.encoder_path)
    f = FAMILIES[params.family]
    return f.encoder_class(f.sizes[params.model_size]), f.name


# --------------------------------------------------------------------------------------------------
# the four methods


def _config(params: FinetuneParams, recipe: dict, batch_size: int | None = None) -> TrainConfig:
    return TrainConfig(
        amp=recipe["amp"],
        epochs=recipe["epochs"],
        batch_size=batch_size or recipe["batch_size"],
        learning_rate=recipe["learning_rate"],
        weight_decay=recipe["weight_decay"],
        betas=DOWNSTREAM_BETAS,
        warmup_epochs=recipe["warmup_epochs"],
        seed=params.seed,
        checkpoint_every=params.checkpoint_every,
    )


def _width(encoder: nn.Module) -> int:
    return int(encoder.cfg.width)


def _crops(data: LabelledData, split: str, random: bool, seed: int) -> CropDataset:
    return CropDataset(
        data.cache.signals, data.spec.samples, random_crop=random, seed=seed, indices=data.segments(split)
    )


def _labelled(data: LabelledData, split: str, signals: torch.utils.data.Dataset) -> LabelledRecords:
    return LabelledRecords(signals, data.segment_labels(data.segments(split)))


def _evaluating(model: nn.Module, fn: Callable[[], dict[str, float]]) -> Callable[[], dict[str, float]]:
    """``fn`` run with ``model`` in eval mode (the loop calls ``on_epoch`` in training mode)."""

    def run() -> dict[str, float]:
        model.eval()
        try:
            return fn()
        finally:
            model.train()

    return run


def _val_knn(data: LabelledData, embed: Callable, params: FinetuneParams, device: torch.device) -> dict:
    """Per-epoch check of an embedding model: macro AUROC on val of kNN among training records (centre
    crops: a third of the final evaluation's cost)."""
    fn = torch_fn(embed, device)
    train_records = data.records["train"][:VAL_KNN_TRAIN_RECORDS]
    train_x = features_of(data, fn, data.spec.samples, train_records, centre_only=True)
    val_x = features_of(data, fn, data.spec.samples, data.records["val"], centre_only=True)
    scores = knn_scores(train_x, data.labels[train_records], val_x, params.knn_k, params.knn_metric)
    return {"val_knn_macro_auroc": scores_auroc(data.labels[data.records["val"]], scores)}


def _linear_probe(
    encoder: nn.Module, family: str, data: LabelledData, params: FinetuneParams, recipe: dict,
    device: torch.device, checkpoint: Path, reporter: JobReporter,
) -> Trained:  # fmt: skip
    encoder.requires_grad_(False)
    head, history, features = _fit_probe(
        encoder, data, _config(params, recipe), device, checkpoint, reporter,
        "embedding every record once with the frozen encoder (3-crop mean)", epochs_reported=True,
    )  # fmt: skip
    model = DiagnosisModel(encoder.cpu(), head)
    return Trained(
        model, HEAD_OUTPUTS, encoder, encoder, history, probabilities=model.probabilities, features=features
    )


def _finetune(
    encoder: nn.Module, family: str, data: LabelledData, params: FinetuneParams, recipe: dict,
    device: torch.device, checkpoint: Path, reporter: JobReporter,
) -> Trained:  # fmt: skip
    """Encoder + linear head trained together; with ``ensemble`` K > 1, K such members (seeds seed..seed+K-1;
    a family trained from scratch is also initialised anew per member) served as one model."""
    initial = copy.deepcopy(encoder.state_dict())
    members, histories, extra, val_scores = [], [], {"members": []}, []
    for i in range(recipe["ensemble"]):
        torch.manual_seed(params.seed + i)
        if i and params.model is None:  # from scratch: each member its own initialisation
            encoder = FAMILIES[family].encoder_class(encoder.cfg)
        elif i:
            encoder = copy.deepcopy(encoder)
            encoder.load_state_dict(initial)
        suffix = "" if i == 0 else f"-{i + 1}"
        member_reporter = reporter if i == 0 else MemberReporter(reporter, member_prefix(i + 1))
        model, history, kept, scores = _finetune_one(
            encoder, family, data, params, recipe, device, checkpoint.with_name(f"checkpoint{suffix}.pt"),
            member_reporter, seed=params.seed + i,
        )  # fmt: skip
        members.append(model)
        histories.append(history)
        extra["members"].append(kept)
        val_scores.append(scores if params.keep_best else scores[-1:])
        reporter.check_cancel(f"after ensemble member {i + 1}")
    extra.update(extra["members"][0])
    if all(len(scores) for scores in val_scores):  # the figure to compare recipes by (validation only)
        val_labels = data.labels[data.records["val"]]
        extra["crossfit_val_macro_auroc"] = crossfit_selected_auroc(val_labels, val_scores)
    model = members[0] if len(members) == 1 else EnsembleDiagnosis(members)
    return Trained(model, HEAD_OUTPUTS, model.embed, members[0].encoder, histories[0], model.probabilities,
                   extra=extra)  # fmt: skip


class MemberReporter:
    """A job reporter for ensemble member k: its epoch metrics are written with a prefix (member2_...)."""

    def __init__(self, reporter: JobReporter, prefix: str):
        self.reporter, self.prefix = reporter, prefix

    def epoch_metrics(self, epoch: int, metrics: dict[str, float]) -> None:
        self.reporter.epoch_metrics(epoch, metrics, prefix=self.prefix)

    def resumed_from(self, epoch: int) -> list[dict[str, float]]:
        return self.reporter.resumed_from(epoch, prefix=self.prefix)

    def __getattr__(self, name: str):  # noqa: ANN204  (progress, should_cancel, ...)
        return getattr(self.reporter, name)


def _finetune_one(
    encoder: nn.Module, family: str, data: LabelledData, params: FinetuneParams, recipe: dict,
    device: torch.device, checkpoint: Path, reporter: JobReporter, seed: int,
) -> tuple[DiagnosisModel, list[dict[str, float]], dict, np.ndarray]:  # fmt: skip
    """One member: the model (its best validation epoch's weights with ``keep_best``), its history, what
    was kept, and its validation scores at each epoch this run scored, (E, val records, classes)."""
    head, probe = LinearHead(_width(encoder), len(data.class_names)), {}
    if recipe["probe_first"]:
        head, probe = _probe_head(encoder, data, params, recipe, device, checkpoint, reporter)
    model = DiagnosisModel(encoder, head)
    windows = _crops(data, "train", random=True, seed=seed)
    if recipe["augment"]:
        windows = Augmented(windows, RandAugment(), seed=seed)
    val_labels = data.labels[data.records["val"]]
    best = BestEpoch(checkpoint.with_name(checkpoint.name.replace("checkpoint", "best")), "val_macro_auroc")
    val_scores: list[np.ndarray] = []  # per epoch, (val records, classes)

    def val_auroc() -> dict[str, float]:
        probs = features_of(
            data, torch_fn(model.probabilities, device), data.spec.samples, data.records["val"]
        )
        val_scores.append(probs)
        return {"val_macro_auroc": scores_auroc(val_labels, probs)}

    blocks = FAMILIES[family].blocks(encoder)
    # what each epoch validates and the job keeps: the weights, their moving average, or WiSE-FT's
    # interpolation from LP-FT's start (the pretrained encoder with the probe's head, before any step)
    average: KeptWeights | None = None
    if recipe["ema_decay"]:
        average = WeightAverage(model, recipe["ema_decay"])
    elif recipe["wise_ft"] < 1:
        average = WeightInterpolation(model, recipe["wise_ft"])
    objective = LayerDecayLoss(model, blocks, recipe["layer_decay"], average)
    log = EpochLog(reporter, _evaluating(model, val_auroc))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        with average.swapped_in() if average is not None else nullcontext():  # validate what is kept
            log(epoch, metrics)
            best.update(model, epoch, log.history[-1])

    config = replace(_config(params, recipe), seed=seed)
    _train(objective, _labelled(data, "train", windows), config, device, checkpoint,
           _labelled(data, "val", _crops(data, "val", False, seed)), log, reporter, on_epoch)  # fmt: skip
    kept = {"best_epoch": best.epoch, "best_val_macro_auroc": best.value, "kept": "last epoch", **probe}
    if params.keep_best and best.restore(model):
        kept["kept"] = f"best validation epoch ({best.epoch} of {recipe['epochs']})"
    elif average is not None:
        model.load_state_dict(average.average)
    if average is not None:
        kept["kept"] += f", {average.description}"
    return model.cpu().eval(), log.history, kept, np.array(val_scores)


def _probe_head(
    encoder: nn.Module, data: LabelledData, params: FinetuneParams, recipe: dict, device: torch.device,
    checkpoint: Path, reporter: JobReporter,
) -> tuple[LinearHead, dict[str, float]]:  # fmt: skip
    """LP-FT's first stage (Kumar et al. 2022): a linear head fitted on the frozen encoder's record features
    with the linear_probe job's recipe, so that fine-tuning starts from a head that already fits instead of
    pushing a random head's gradients into the pretrained features; with the probe's validation figure."""
    head, history, _ = _fit_probe(
        encoder, data, _config(params, {**recipe, **PROBE_RECIPE}), device,
        checkpoint.with_name(checkpoint.name.replace("checkpoint", "probe-head")), reporter,
        "probe first: a linear head on the frozen encoder's features", epochs_reported=False,
    )  # fmt: skip
    encoder.train()
    return head.train(), {"probe_val_macro_auroc": history[-1]["val_macro_auroc"]}


def _fit_probe(
    encoder: nn.Module, data: LabelledData, config: TrainConfig, device: torch.device, checkpoint: Path,
    reporter: JobReporter, phase: str, epochs_reported: bool,
) -> tuple[LinearHead, list[dict[str, float]], dict[str, np.ndarray]]:  # fmt: skip
    """A linear head on the encoder's record features (eval mode, 3-crop mean): the head, its history and
    the features. ``epochs_reported``: the head's epochs are the job's (a linear_probe job), else not
    written (LP-FT's first stage, before the job's own epochs)."""
    reporter.phase(phase)
    encoder.eval().to(device)
    features = record_features(data, torch_fn(encoder, device), data.spec.samples)
    reporter.check_cancel("after embedding the records")
    head, history = fit_linear_head(
        features, split_labels(data), config, device, checkpoint, reporter if epochs_reported else None
    )
    return head, history, features


def _triplet(
    encoder: nn.Module, family: str, data: LabelledData, params: FinetuneParams, recipe: dict,
    device: torch.device, checkpoint: Path, reporter: JobReporter,
) -> Trained:  # fmt: skip
    o = params.triplet
    model = TripletModel(
        encoder, _width(encoder), o.embedding_dim, o.hidden_dim, o.margin, o.mining,
        trainable_blocks=o.unfreeze_blocks,
    )  # fmt: skip
    try:
        train_set = PKBatches(_labelled(data, "train", _crops(data, "train", True, params.seed)), o.p, o.k,
                              seed=params.seed)  # fmt: skip
    except ValueError as exc:
        raise ClientError(f"method triplet: the training split cannot make P x K batches: {exc}") from None
    try:  # a fixed validation draw (epoch 0) for val_loss, where the split allows P x K batches
        val_set = PKBatches(_labelled(data, "val", _crops(data, "val", False, params.seed)), o.p, o.k,
                            seed=params.seed)  # fmt: skip
    except ValueError:
        val_set = None
    log = EpochLog(reporter, _evaluating(model, lambda: _val_knn(data, model.embed, params, device)))
    _train(
        model, train_set, _config(params, recipe, batch_size=1), device, checkpoint, val_set, log, reporter
    )
    model = model.cpu().eval()
    extra = {"triplet": o.model_dump(), "batches_per_epoch": len(train_set), "batch_records": o.p * o.k}
    return Trained(Embedder(model), (OUTPUT_NAME,), model.embed, model.encoder, log.history, extra=extra)


def _vqvae(
    encoder: nn.Module, family: str, data: LabelledData, params: FinetuneParams, recipe: dict,
    device: torch.device, checkpoint: Path, reporter: JobReporter,
) -> Trained:  # fmt: skip
    if FAMILIES[family].tokens is None:
        raise ClientError(
            f"method vqvae quantises per-lead patch tokens, which a {family} encoder does not have: use a "
            f"transformer family ({', '.join(n for n, f in FAMILIES.items() if f.tokens is not None)})"
        )
    tokens = FAMILIES[family].tokens(encoder)  # per-lead patch tokens (B, C, N, D)
    o = params.vqvae
    cfg = VqConfig(**o.model_dump())
    model = VqVae(tokens, _width(encoder), encoder.cfg.patch_size, cfg)
    usage: list[dict] = []

    def epoch_metrics() -> dict[str, float]:
        stats = model.pop_usage()  # training assignments of this epoch
        usage.append(stats)
        return {
            "codes_used": stats["codes_used"],
            "code_usage": stats["usage"],
            "perplexity": stats["perplexity"],
            **_val_knn(data, model.embed, params, device),
        }

    log = EpochLog(reporter, _evaluating(model, epoch_metrics))
    _train(model, _crops(data, "train", True, params.seed), _config(params, recipe), device, checkpoint,
           _crops(data, "val", False, params.seed), log, reporter)  # fmt: skip
    model = model.cpu().eval()
    extra = {"codebook": {"num_codes": o.num_codes, "code_dim": o.code_dim, "last_epoch": usage[-1] if usage
                          else None, "per_epoch": usage}}  # fmt: skip
    return Trained(Embedder(model), (OUTPUT_NAME,), model.embed, encoder, log.history, extra=extra)


def _train(
    model: nn.Module,
    train_set: torch.utils.data.Dataset,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint: Path,
    val_set: torch.utils.data.Dataset | None,
    log: EpochLog,
    reporter: JobReporter,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> None:
    """Train through the loop; ``log`` records the epochs (``on_epoch``, when given, instead: it calls
    ``log`` itself) and restarts its history when training resumes from a checkpoint."""
    train(
        model, train_set, cfg, device, checkpoint_path=checkpoint, val_set=val_set,
        on_progress=reporter.progress, on_epoch=on_epoch or log, should_cancel=reporter.should_cancel,
        on_resume=log.resumed,
    )  # fmt: skip


METHODS = {"linear_probe": _linear_probe, "finetune": _finetune, "triplet": _triplet, "vqvae": _vqvae}


# --------------------------------------------------------------------------------------------------
# evaluation, export, registration


def _evaluate(
    trained: Trained, data: LabelledData, params: FinetuneParams, device: torch.device, figures: Figures
) -> tuple[dict, dict | None, dict[str, np.ndarray]]:
    """(result, head entry or None, embeddings per split) on the test split; its plots planned on
    ``figures`` (drawn once the version is registered)."""
    window, names = data.spec.samples, data.class_names
    labels = split_labels(data)
    trained.exported.to(device).eval()
    embeddings = trained.features or record_features(data, torch_fn(trained.embed, device), window)
    result: dict = {"artifacts": []}
    result["knn"], plots = knn_protocol(embeddings, labels, names, params.knn_k, params.knn_metric, figures)
    result["artifacts"] += plots
    result["clustering"], plots = clustering_protocol(
        embeddings["test"], labels["test"], names, figures, params.seed, params.map_method, params.method
    )
    result["artifacts"] += plots
    head = None
    if trained.probabilities is not None:
        probs = record_features(data, torch_fn(trained.probabilities, device), window, splits=("val", "test"))
        scores = classification_result(
            params.method, labels["val"], probs["val"], labels["test"], probs["test"], names,
            {"test_time": "3-crop mean of the probabilities"},
        )  # fmt: skip
        result["test"] = {**scores.to_dict(), "val_macro_auroc": scores_auroc(labels["val"], probs["val"])}
        result["artifacts"] += classification_plots(
            params.method, f"{params.method} (diagnosis head)", scores, labels["test"], probs["test"], figures
        )
        head = {
            "task": "multi-label diagnosis",
            "method": params.method,
            "class_names": list(names),
            "thresholds": [result["test"]["thresholds"][c] for c in names],
            "activation": "sigmoid",
            "output": "probabilities",
            "thresholds_from": "validation split: per class, the threshold of maximal F1",
            "dataset": data.name,
            "test_macro_auroc": result["test"]["macro_auroc"],
            "test_macro_f1": result["test"]["macro_f1"],
        }
    history = [
        {k: v for k, v in row.items() if k not in ("codes_used", "perplexity")} for row in trained.history
    ]
    records = data.counts()
    history_file = f"history_{params.method}.png"
    result["artifacts"] += history_plot(history, figures, history_file, params.method, records)
    if "codebook" in trained.extra:
        keep = ("epoch", "train_loss", "val_loss", "codes_used", "perplexity")  # losses left, usage right
        codebook = [{k: v for k, v in row.items() if k in keep} for row in trained.history]
        num_codes = trained.extra["codebook"]["num_codes"]
        last = codebook[-1] if codebook else {}
        used, perplexity = last.get("codes_used", float("nan")), last.get("perplexity", float("nan"))
        headline = f"last epoch: {used:.0f} of {num_codes} codes used, perplexity {perplexity:.3f}"
        caption = Caption(params.method, f"train {records['train']} records", headline)
        result["artifacts"].append(figures.add(
            "codebook.png", "Loss and codebook usage", caption,
            lambda path, title: plot_history(codebook, path, title=title),
        ))  # fmt: skip
    trained.exported.cpu()
    return result, head, embeddings


def _export_and_register(
    job_id: uuid.UUID,
    params: FinetuneParams,
    base: Base,
    family: str,
    data: LabelledData,
    trained: Trained,
    result: dict,
    head: dict | None,
    embeddings: dict[str, np.ndarray],
    reporter: JobReporter,
) -> dict:
    """Save the model's weights and kNN reference, then publish it (``services.registry.publish``: export,
    parity, variants, head checks), its registration atomic with a last cancel check. A job that had
    registered before its worker died keeps that version (nothing written again). Returns the job's
    result."""
    registered = reporter.registered_version()
    if registered is not None:
        reporter.phase(f"registered as {registered.ref} before the task was delivered again")
        ref, parity = registered.ref, registered.parity_max_abs_diff
    else:
        work = job_dir(job_id)
        work.mkdir(parents=True, exist_ok=True)
        exported = trained.exported.cpu().float().eval()
        weights = {"method": params.method, "params": params.model_dump(mode="json")}
        torch.save({**weights, "state_dict": exported.state_dict()}, work / "downstream.pt")
        reference = save_reference(
            work / "knn_reference.npz", embeddings["train"], data.labels[data.records["train"]],
            data.cache.record_ids[data.records["train"]], data.class_names, result["knn"], data.name, job_id,
        )  # fmt: skip
        final = {k: v for k, v in (trained.history[-1] if trained.history else {}).items() if k != "epoch"}
        summary = {f"knn_test_{k}": result["knn"][k] for k in ("macro_auroc", "macro_f1")}
        if head is not None:
            summary.update({f"test_{k}": head[f"test_{k}"] for k in ("macro_auroc", "macro_f1")})
        metrics = {**final, **summary, "base_model": base.ref, "encoder_family": family, "dataset": data.name,
                   "records": data.counts()}  # fmt: skip
        check = _crops(data, "val", random=False, seed=params.seed)
        windows = np.stack(
            [check[i].numpy() for i in range(min(8, len(check)))]
        )  # real records, centre crops

        def register(published: Published) -> tuple[str, float]:
            ref = reporter.register_unless_cancelled(
                lambda s: register_model_version(
                    s,
                    name=params.registry_name(base.name),
                    method=params.method,
                    source_job_id=job_id,
                    **published.fields(),
                    metrics=metrics,
                    head=head,
                    knn_reference=reference,
                )  # fmt: skip
            )
            return ref, published.parity_max_abs_diff

        ref, parity = publish(
            exported, windows, work / "model.onnx", base.spec, register,
            outputs=trained.outputs, encoder=trained.encoder, steps=reporter,
        )  # fmt: skip
    result.update(
        method=params.method,
        base_model=base.ref,
        model_version=ref,
        dataset=data.name,
        records=data.counts(),
        class_names=list(data.class_names),
        parity_max_abs_diff=parity,
        clinical_features_used=False,  # a hybrid base's measurements are not part of the fine-tuned model
        base_is_hybrid=base.hybrid,
        **trained.extra,
    )
    result["artifacts"] = list_artifacts(job_id)
    return result
