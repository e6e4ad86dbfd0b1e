"""The prototype's research comparison, on our data and through the service's own jobs, in one command.

For each encoder (ST-MEM tiny and ECG-JEPA tiny, each pretrained here within ``--budget-min`` CPU minutes,
or a registered version given with ``--st-mem`` / ``--ecg-jepa``) and each variant:

- baseline: the frozen encoder's embedding;
- triplet: a ``POST /jobs/finetune`` triplet job (P x K batches, frozen encoder) -> its unit embedding;
- VQ-VAE: a ``POST /jobs/finetune`` vqvae job (token VQ-VAE on the frozen encoder) -> its embedding;
- hybrid: each of those embeddings followed by the record's clinical measurements (NeuroKit2; normaliser
  fitted on folds 1-8), the service's hybrid model (a version with a clinical normaliser);

one ``POST /jobs/evaluate`` job gives kNN (k=20, cosine) and linear-probe macro AUROC and macro F1 (thresholds
tuned on fold 9), and cluster indices with k-means ARI/NMI, on ../shared/data/ptbxl-500: folds 1-8 train,
9 validation, 10 test. Settings were chosen looking at fold 9 only (``--val-only`` prints no fold-10 figure);
fold 10 is read once, by the run that writes ``reports/compare.md`` and its plots in ``reports/compare/``.

Pretraining: as ``reports/learning_check.py`` (the job's model builder and training loop, ptbxl-unlabelled
1,320 records + ptbxl-500 folds 1-8, recipe lr 3e-3 / 1e-3, batch 32), epochs fitted to the budget, then
exported, parity-checked and registered like a pretraining job's encoder. Everything runs on a temporary
embedded database and artifact folder (``--work``), nothing touches the service's own.

    .venv/bin/python reports/compare.py                      # ~20 min on a 2-core CPU
    .venv/bin/python reports/compare.py --val-only --budget-min 1   # choosing settings: fold 9 only
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENCODERS = {"st_mem": "ST-MEM tiny", "ecg_jepa": "ECG-JEPA tiny"}
TRIPLET = {"embedding_dim": 64, "hidden_dim": 256, "margin": 0.2, "mining": "batch_all", "p": 5, "k": 8}
VQVAE = {"num_codes": 256, "code_dim": 32}
SETTINGS = {  # chosen on fold 9 (see the module docstring)
    "triplet": {"epochs": 5, "learning_rate": 1e-3, "batch_size": 1, "triplet": TRIPLET},
    "vqvae": {"epochs": 4, "learning_rate": 1e-3, "batch_size": 32, "vqvae": VQVAE},
    "evaluate": {"knn_k": 20, "knn_metric": "cosine", "probe_epochs": 100, "probe_learning_rate": 1e-2,
                 "probe_weight_decay": 1e-2},
}  # fmt: skip


def environment(work: Path, data: Path, device: str) -> None:
    """Point the service at a fresh embedded database and artifact folder (before importing it)."""
    os.environ.update(
        ECGSSL_DATABASE_URL=f"sqlite:///{work / 'compare.db'}",
        ECGSSL_BROKER_URL=f"sqla+sqlite:///{work / 'broker.db'}",
        ECGSSL_ARTIFACT_DIR=str(work / "artifacts"),
        ECGSSL_DATA_ROOT=str(data),
        ECGSSL_EXPORT_VARIANTS="none",
        ECGSSL_DEVICE=device,
    )
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def pretrain_and_register(
    method: str, budget_min: float, data: Path, work: Path, seed: int
) -> tuple[str, str]:
    """Pretrain the tiny model of ``method`` for about ``budget_min`` minutes; register it. (ref, note)."""
    import numpy as np
    from torch.utils.data import ConcatDataset

    from reports.learning_check import DEFAULT_RECIPES, calibrated_epochs, pretrain
    from services.datasets.cache import preprocessed
    from services.datasets.kinds import open_dataset
    from services.db.session import session_scope
    from services.export.onnx import export_checked, sha256_file
    from services.jobs import PretrainParams
    from services.models.checkpoints import ENCODER_FILE, save_encoder
    from services.pretraining import build_objective, input_spec
    from services.registry import register_model_version
    from services.training.loop import CropDataset

    lr, batch = DEFAULT_RECIPES[method]
    params = PretrainParams(dataset="-", method=method, model_size="tiny", seed=seed, batch_size=batch,
                            learning_rate=lr)  # fmt: skip
    spec = input_spec(params)
    labelled = open_dataset("ptbxl", data / "ptbxl-500", {})
    unlabelled = open_dataset("npz", data / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz", {})
    caches = [
        preprocessed(unlabelled, {"path": "unlabelled"}, spec, work / "pretrain-cache"),
        preprocessed(labelled, {"path": "ptbxl-500"}, spec, work / "pretrain-cache",
                     indices=labelled.split("train")),
    ]  # fmt: skip
    dataset = ConcatDataset(
        [CropDataset(c.signals, spec.samples, random_crop=True, seed=seed) for c in caches]
    )
    calibration = work / f"calibration-{method}"
    calibration.mkdir(parents=True, exist_ok=True)
    epochs = calibrated_epochs(
        lambda: build_objective(params), dataset, batch, lr, budget_min * 60, calibration
    )
    print(f"pretraining {ENCODERS[method]}: {epochs} epochs on {len(dataset)} records", flush=True)
    model = build_objective(params)
    minutes, loss = pretrain(model, dataset, epochs, lr, batch, params.decay, seed, work / f"{method}.pt")
    encoder = model.encoder.float().eval()
    check = CropDataset(caches[1].signals, spec.samples, random_crop=False, indices=np.arange(8))
    windows = np.stack([check[i].numpy() for i in range(len(check))])
    onnx_path = work / "artifacts" / "pretrained" / method / "encoder.onnx"
    parity = export_checked(encoder, windows, onnx_path)
    save_encoder(encoder, onnx_path.with_name(ENCODER_FILE))
    with session_scope() as s:
        version = register_model_version(
            s, name=f"compare-{method}", method=method, source_job_id=None, onnx_path=str(onnx_path),
            sha256=sha256_file(onnx_path), input_spec=spec.to_dict(), embedding_dim=encoder.cfg.width,
            parity_max_abs_diff=parity, metrics={"epochs": epochs, "train_loss": loss, "minutes": minutes},
        )  # fmt: skip
        ref = version.ref
    note = (
        f"{ENCODERS[method]} pretrained here for {minutes:.1f} min ({epochs} epochs, batch {batch}, peak lr "
        f"{lr:g}, final train loss {loss:.4f}) on {len(dataset)} records (ptbxl-unlabelled + ptbxl-500 "
        "folds 1-8)"
    )
    return ref, note


def run_job(kind: str, params) -> dict:  # noqa: ANN001  (FinetuneParams | EvaluateParams)
    """Queue-less: write the job row and run it as the worker would; its result (exit on failure)."""
    from services.dataset_registry import dataset_for_job
    from services.db.models import Job
    from services.db.session import session_scope
    from services.downstream.evaluate import run_evaluate_job
    from services.downstream.finetune import run_finetune_job
    from services.jobs import create_job

    with session_scope() as s:
        epochs = params.epochs if kind == "finetune" else params.probe_epochs
        job_id = create_job(s, kind, params, epochs=epochs, dataset=dataset_for_job(s, params.dataset)).id
    started = time.perf_counter()
    {"finetune": run_finetune_job, "evaluate": run_evaluate_job}[kind](job_id, worker="compare")
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job.status != "succeeded":
            raise SystemExit(f"{kind} job {job_id} {job.status}: {job.error}")
        metrics = {(m.epoch, m.name): m.value for m in job.metrics}
        return {
            "id": job_id,
            "result": job.result,
            "metrics": metrics,
            "seconds": time.perf_counter() - started,
        }


def hybrid_version(ref: str, dataset: str) -> str:
    """A version serving ``ref``'s ONNX graph with a clinical normaliser fitted on the training split: the
    service's hybrid model (its embedding is followed by the normalised measurements and missing flags)."""
    from services.config import get_settings
    from services.dataset_registry import dataset_for_job
    from services.db.session import session_scope
    from services.downstream.data import open_labelled
    from services.ecg.clinical import FeatureNormaliser, clinical_features_for
    from services.ecg.preprocess import InputSpec
    from services.job_runner import JobReporter
    from services.registry import register_model_version, resolve_model_version

    with session_scope() as s:
        base = resolve_model_version(s, ref)
        row = dataset_for_job(s, dataset)
        fields = {k: getattr(base, k) for k in ("onnx_path", "sha256", "input_spec", "embedding_dim",
                                                "parity_max_abs_diff")}  # fmt: skip
        method = base.model.method
    reporter = JobReporter(uuid.uuid4(), writes=False)
    data = open_labelled(row, InputSpec.from_dict(fields["input_spec"]), None, reporter)
    features = clinical_features_for(
        data.dataset, data.source_index, Path(get_settings().artifact_dir) / "cache", identity=data.identity
    )  # fmt: skip  (the cache the evaluate job reads)
    normaliser = FeatureNormaliser.fit(features, rows=data.records["train"]).to_dict()
    with session_scope() as s:
        name = f"{ref.split('@')[0]}-hybrid"
        version = register_model_version(
            s, name=name, method=method, source_job_id=None, clinical_normaliser=normaliser,
            metrics={"hybrid_of": ref},
            **{**fields, "embedding_dim": fields["embedding_dim"] + 2 * features.shape[1]},
        )  # fmt: skip
        return version.ref


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--encoders", default="st_mem,ecg_jepa", help="comma-separated: st_mem, ecg_jepa")
    parser.add_argument("--budget-min", type=float, default=3.0, help="pretraining minutes per encoder")
    parser.add_argument("--st-mem", help="a registered ST-MEM version to use instead (with --work on its db)")
    parser.add_argument("--ecg-jepa", help="a registered ECG-JEPA version to use instead")
    parser.add_argument("--work", help="working folder (default: a new temporary one, deleted at the end)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-only", action="store_true", help="print fold-9 figures only, write nothing")
    parser.add_argument("--epochs", type=int, help="override the triplet and VQ-VAE epochs (quick checks)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "compare.md"))
    args = parser.parse_args()

    started, load = time.perf_counter(), [os.getloadavg()[0]]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ecgssl-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    environment(work, Path(args.data), args.device)
    import torch

    from services.jobs import EvaluateParams, FinetuneParams

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs:
        SETTINGS["triplet"]["epochs"] = SETTINGS["vqvae"]["epochs"] = args.epochs
    dataset = "ptbxl-500"
    notes, rows, plots = [], [], []
    out_dir = Path(args.out).with_suffix("")
    if not args.val_only:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
    given = {"st_mem": args.st_mem, "ecg_jepa": args.ecg_jepa}
    for method in args.encoders.split(","):
        phase = time.perf_counter()
        if given[method]:
            ref, note = given[method], f"{ENCODERS[method]}: registered version {given[method]}"
        else:
            ref, note = pretrain_and_register(method, args.budget_min, Path(args.data), work, args.seed)
        notes.append(note)
        versions = {"baseline (frozen)": (ref, None)}
        for variant in ("triplet", "vqvae"):
            params = FinetuneParams(model=ref, dataset=dataset, method=variant, seed=args.seed,
                                    knn_k=SETTINGS["evaluate"]["knn_k"], **SETTINGS[variant])  # fmt: skip
            job = run_job("finetune", params)
            print(f"{method} {variant}: {job['seconds']:.0f} s, {job['result']['model_version']}", flush=True)
            versions[{"triplet": "triplet", "vqvae": "VQ-VAE"}[variant]] = (
                job["result"]["model_version"],
                job,
            )
        for variant, (version, _) in list(versions.items()):
            versions[f"{variant} + clinical (hybrid)"] = (hybrid_version(version, dataset), None)
        for variant, (version, trained) in versions.items():
            params = EvaluateParams(model=version, dataset=dataset, seed=args.seed, store_reference=False,
                                    **SETTINGS["evaluate"])  # fmt: skip
            job = run_job("evaluate", params)
            rows.append((ENCODERS[method], variant, job, trained))
            r = job["result"]
            val = f"kNN {fmt(r['knn']['val_macro_auroc'])} probe {fmt(r['linear_probe']['val_macro_auroc'])}"
            print(f"{method} {variant}: val AUROC {val} ({job['seconds']:.0f} s)", flush=True)
            if not args.val_only:
                slug = f"{method}_{variant.split(' ')[0].lower().replace('-', '')}" + (
                    "_hybrid" if "hybrid" in variant else ""
                )
                folder = work / "artifacts" / "jobs" / str(job["id"]) / "artifacts"
                for name in ("embedding_map.png", "roc_linear_probe.png"):
                    shutil.copy(folder / name, out_dir / f"{slug}_{name}")
                plots.append((f"{ENCODERS[method]}, {variant}", slug))
                if trained is not None and "hybrid" not in variant:
                    extra = "codebook.png" if "codebook" in trained["result"] else "history.png"
                    shutil.copy(work / "artifacts" / "jobs" / str(trained["id"]) / "artifacts" / extra,
                                out_dir / f"{slug}_train_{extra}")  # fmt: skip
        load.append(os.getloadavg()[0])
        print(f"{method}: {(time.perf_counter() - phase) / 60:.1f} min", flush=True)
    minutes = (time.perf_counter() - started) / 60
    if args.val_only:
        return

    lines = report(rows, notes, plots, args, minutes, out_dir, load)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def report(
    rows: list,
    notes: list[str],
    plots: list,
    args: argparse.Namespace,
    minutes: float,
    out_dir: Path,
    load: list[float],
) -> list[str]:
    import torch

    test, ev = rows[0][2]["result"]["records"], SETTINGS["evaluate"]
    lines = [
        "# Downstream comparison: baseline, triplet and VQ-VAE embeddings, with and without clinical data",
        "",
        f"Command: `.venv/bin/python reports/compare.py --budget-min {args.budget_min:g}` ({minutes:.1f} min "
        f"in all on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} torch threads; 1-min load average {min(load):.1f}-{max(load):.1f} at the "
        "start and after each encoder: other work shared the cores).",
        "",
        "Data: ../shared/data/ptbxl-500 (PTB-XL, Wagner et al. 2020, CC BY 4.0), 5 diagnostic superclasses "
        f"multi-label; folds 1-8 train ({test['train']} records), 9 validation ({test['val']}), 10 test "
        f"({test['test']}). Settings chosen on fold 9 only; fold 10 read once, for this table. "
        "A tiny budget: small models trained for minutes on a CPU, single runs, no confidence intervals "
        f"(with {test['test']} test records, differences below ~0.05 AUROC are noise).",
        "",
        *[f"- {n}." for n in notes],
        f"- triplet: `POST /jobs/finetune` method triplet, {SETTINGS['triplet']['epochs']} epochs, lr "
        f"{SETTINGS['triplet']['learning_rate']:g}, {TRIPLET}; frozen encoder.",
        f"- VQ-VAE: `POST /jobs/finetune` method vqvae, {SETTINGS['vqvae']['epochs']} epochs, lr "
        f"{SETTINGS['vqvae']['learning_rate']:g}, {VQVAE}; embedding: mean of the record's quantised tokens.",
        "- hybrid: the variant's embedding followed by 11 clinical measurements (NeuroKit2 at the record's "
        "rate: HR, SDNN, RMSSD, PR, QRS, QT, QTc, ST in II/V2/V5, QRS axis) and their 11 missing flags, "
        "normalised on folds 1-8 (a version with a clinical normaliser). The concatenation is not rescaled: "
        "next to a unit-norm triplet or VQ-VAE embedding these 22 values dominate kNN and cluster distances "
        "(the linear probe standardises every column).",
        f"- evaluation: `POST /jobs/evaluate`: embeddings = fp32 ONNX, mean over 3 crops (0, 125, 250); kNN "
        f"k={ev['knn_k']} cosine (votes); linear probe = linear head (BCE, AdamW lr "
        f"{ev['probe_learning_rate']:g}, wd {ev['probe_weight_decay']:g}, {ev['probe_epochs']} epochs) on "
        "standardised embeddings; F1 = macro F1 at per-class thresholds tuned on fold 9; cluster indices on "
        "L2-normalised test embeddings with the (rarest-first) single superclass as cluster, k-means "
        "(k = classes) ARI/NMI.",
        "",
        "| encoder | variant | dim | kNN AUROC | kNN F1 | probe AUROC | probe F1 | val kNN / probe AUROC | "
        "DBI ↓ | silhouette | CHI | k-means ARI | k-means NMI | codes used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for encoder, variant, job, trained in rows:
        r = job["result"]
        knn, probe, cl = r["knn"], r["linear_probe"], r["clustering"]
        codes = ""
        if trained is not None and "codebook" in trained["result"]:
            book = trained["result"]["codebook"]
            last = book["last_epoch"]
            codes = f"{last['codes_used']}/{book['num_codes']} (ppl {last['perplexity']:.0f})"
        cells = [
            encoder, variant, r["embedding_dim"], fmt(knn["macro_auroc"]), fmt(knn["macro_f1"]),
            fmt(probe["macro_auroc"]), fmt(probe["macro_f1"]),
            f"{fmt(knn['val_macro_auroc'])} / {fmt(probe['val_macro_auroc'])}",
            fmt(cl["davies_bouldin"], 2), fmt(cl["silhouette"]), fmt(cl["calinski_harabasz"], 1),
            fmt(cl["kmeans_ari"]), fmt(cl["kmeans_nmi"]), codes,
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Per-class test AUROC of the linear probe:", "",
              "| encoder | variant | " + " | ".join(rows[0][2]["result"]["class_names"]) + " |",
              "|---|---|" + "---|" * len(rows[0][2]["result"]["class_names"])]  # fmt: skip
    for encoder, variant, job, _ in rows:
        per = job["result"]["linear_probe"]["auroc_per_class"]
        lines.append(f"| {encoder} | {variant} | " + " | ".join(fmt(v) for v in per.values()) + " |")
    lines += [
        "",
        "## Plots",
        "",
        "t-SNE of the test embeddings by superclass, and ROC curves of the linear probe:",
        "",
    ]
    rel = out_dir.name
    for title, slug in plots:
        lines.append(
            f"**{title}**: ![map]({rel}/{slug}_embedding_map.png) ![roc]({rel}/{slug}_roc_linear_probe.png)"
        )
        for extra in sorted(out_dir.glob(f"{slug}_train_*.png")):
            lines.append(f"![training]({rel}/{extra.name})")
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
