"""Does self-supervised pretraining learn something useful? One command, a CPU budget, real data.

1. Pretrain the method's tiny (or other) model on ../shared/data/ptbxl-unlabelled (1,320 records) plus
   folds 1-8 of ../shared/data/ptbxl-500, the number of epochs fitted to ``--budget-min`` minutes. The
   model, its initialisation, masking and optimiser are those of a ``POST /jobs/pretrain`` job
   (``services.pretraining.build_objective``).
2. Embed every ptbxl-500 record with the frozen encoder (mean over sliding windows, as /embed does).
3. Linear probe (logistic regression per superclass, C chosen on fold 9), macro AUROC on fold 10, beside
   the same probe on the same encoder at its initialisation (random init, never trained), on the
   encoder's embedding followed by the record's clinical measurements (the hybrid model of the service:
   late fusion, normaliser fitted on folds 1-8), and on the clinical measurements alone.
4. ``--original-hybrid`` (ECG-JEPA): also pretrain, for the same budget, the prototype's early fusion:
   the 11 per-sample feature channels stacked beside the 8 leads as 19 tokeniser channels.

    .venv/bin/python reports/learning_check.py --method st_mem [--size tiny] [--budget-min 15]
    .venv/bin/python reports/learning_check.py --method ecg_jepa --original-hybrid

Recipes (lr, batch) were chosen on folds 1-9 only (out-of-fold probes over folds 1-9); fold 10 is read
once, for the table this writes.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.datasets.cache import preprocessed  # noqa: E402
from services.datasets.kinds import open_dataset  # noqa: E402
from services.datasets.ptbxl import SUPERCLASSES  # noqa: E402
from services.ecg.clinical import FeatureNormaliser, clinical_features_for, feature_channels  # noqa: E402
from services.ecg.preprocess import InputSpec, prepare_signal, preprocess, standardise  # noqa: E402
from services.evaluation.linear_probe import ProbeResult, linear_probe  # noqa: E402
from services.jobs import PretrainParams  # noqa: E402
from services.models import ecg_jepa  # noqa: E402
from services.pretraining import build_objective, input_spec  # noqa: E402
from services.training.loop import CropDataset, TrainConfig, train  # noqa: E402

DEFAULT_RECIPES = {  # chosen on folds 1-9 (see the module docstring): peak lr, batch
    "st_mem": (3e-3, 32),
    "ecg_jepa": (1e-3, 32),
}


@torch.no_grad()
def embed_all(encoder: torch.nn.Module, dataset, spec: InputSpec) -> np.ndarray:
    encoder.eval()
    out = [encoder(torch.from_numpy(preprocess(dataset.recording(i), spec))).mean(0).numpy() for i in
           range(len(dataset))]  # fmt: skip
    return np.stack(out)


class WithFeatureChannels(Dataset):
    """The prototype's early fusion: a standardised 8-lead window with its 11 feature channels below it
    (each channel z-scored with statistics of the pretraining set): (19, L)."""

    def __init__(self, signals: np.ndarray, channels: np.ndarray, mean: np.ndarray, std: np.ndarray):
        self.signals, self.channels, self.mean, self.std = signals, channels, mean, std

    def __len__(self) -> int:
        return len(self.signals)

    def __getitem__(self, i: int) -> torch.Tensor:
        ecg = standardise(np.asarray(self.signals[i], dtype=np.float32))
        extra = (self.channels[i] - self.mean) / self.std
        return torch.from_numpy(np.concatenate([ecg, extra.astype(np.float32)]))


def channels_of(signals: np.ndarray, fs: float) -> np.ndarray:
    return np.stack([feature_channels(np.asarray(s), fs) for s in signals])  # (N, 11, L)


def calibrated_epochs(
    model_factory, train_set: Dataset, batch: int, lr: float, budget_s: float, work: Path
) -> int:
    """Epochs that fit the budget: time 8 steps after 4 warm-up steps (first steps are slower)."""
    model = model_factory()
    subset = torch.utils.data.Subset(train_set, list(range(12 * batch)))
    cfg = TrainConfig(epochs=1, batch_size=batch, learning_rate=lr, checkpoint_every=10**6)
    times: list[float] = []
    started = [time.perf_counter()]

    def tick(p) -> None:
        now = time.perf_counter()
        times.append(now - started[0])
        started[0] = now

    train(
        model,
        subset,
        cfg,
        torch.device("cpu"),
        work / "calibration.pt",
        on_progress=tick,
        progress_interval_s=0,
    )
    (work / "calibration.pt").unlink(missing_ok=True)  # the next calibration must not resume from it
    per_step = float(np.mean(times[4:]))
    return max(1, int(budget_s / (per_step * (len(train_set) // batch))))


def pretrain(
    model: torch.nn.Module,
    train_set: Dataset,
    epochs: int,
    lr: float,
    batch: int,
    wd: float,
    seed: int,
    checkpoint: Path,
) -> tuple[float, float]:
    """Train; returns (minutes, final train loss)."""
    cfg = TrainConfig(epochs=epochs, batch_size=batch, learning_rate=lr, weight_decay=wd,
                      warmup_epochs=max(1, epochs // 20), seed=seed, checkpoint_every=10**6)  # fmt: skip

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs:
            print(f"  epoch {epoch}/{epochs} train_loss {metrics['train_loss']:.4f}", flush=True)

    started = time.perf_counter()
    result = train(model, train_set, cfg, torch.device("cpu"), checkpoint, on_epoch=report)
    return (time.perf_counter() - started) / 60, result.history[-1]["train_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--method", default="st_mem", choices=["st_mem", "ecg_jepa"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--budget-min", type=float, default=15.0, help="pretraining time budget (each model)")
    parser.add_argument("--epochs", type=int, help="fix the epochs instead of fitting them to the budget")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--original-hybrid", action="store_true", help="ECG-JEPA: also the 19-channel variant"
    )
    parser.add_argument("--out", help="markdown report (default reports/learning_check_<method>.md)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lr, batch = args.lr or DEFAULT_RECIPES[args.method][0], args.batch or DEFAULT_RECIPES[args.method][1]
    params = PretrainParams(dataset="-", method=args.method, model_size=args.size, seed=args.seed,
                            batch_size=batch, learning_rate=lr)  # fmt: skip
    spec = input_spec(params)
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="ecgssl-learning-check-"))
    budget_s = args.budget_min * 60

    labelled = open_dataset("ptbxl", data / "ptbxl-500", {})
    unlabelled = open_dataset("npz", data / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz", {})
    train_idx, val_idx, test_idx = (labelled.split(s) for s in ("train", "val", "test"))
    caches = [
        preprocessed(unlabelled, {"path": "unlabelled"}, spec, work / "cache"),
        preprocessed(labelled, {"path": "ptbxl-500"}, spec, work / "cache", indices=train_idx),
    ]
    pretrain_set = ConcatDataset(
        [CropDataset(c.signals, spec.samples, random_crop=True, seed=args.seed) for c in caches]
    )
    print(f"pretraining set: {len(pretrain_set)} records (ptbxl-unlabelled 1320 + ptbxl-500 folds 1-8)")

    epochs = args.epochs or calibrated_epochs(lambda: build_objective(params), pretrain_set, batch, lr,
                                              budget_s, work)  # fmt: skip
    print(f"{args.method} {args.size}: {epochs} epochs, batch {batch}, peak lr {lr:g}", flush=True)
    model = build_objective(params)
    random_encoder = build_objective(params).encoder  # the same initial weights, never trained
    minutes, final_loss = pretrain(model, pretrain_set, epochs, lr, batch, params.decay, args.seed,
                                   work / "checkpoint.pt")  # fmt: skip
    runs = [
        f"{args.method} `{args.size}`: {minutes:.1f} min, {epochs} epochs, final train loss {final_loss:.4f}"
    ]

    labels = labelled.labels
    features = {
        "pretrained": embed_all(model.encoder.float(), labelled, spec),
        "random init": embed_all(random_encoder, labelled, spec),
    }
    clinical = clinical_features_for(labelled, np.arange(len(labelled)), cache_dir=work / "clinical")
    fused = FeatureNormaliser.fit(clinical, rows=train_idx).transform_stacked(clinical)  # fitted on folds 1-8
    features["pretrained + clinical (hybrid: late fusion, ours)"] = np.concatenate(
        [features["pretrained"], fused], 1
    )
    features["clinical measurements alone"] = fused

    if args.original_hybrid:
        if args.method != "ecg_jepa":
            raise SystemExit("--original-hybrid is the prototype's ECG-JEPA variant: use --method ecg_jepa")
        print(
            "prototype's early fusion: computing the 11 feature channels of the pretraining set", flush=True
        )
        channels = [channels_of(c.signals, spec.fs) for c in caches]
        stacked = np.concatenate(channels)
        mean = stacked.mean(axis=(0, 2))[:, None]
        std = np.maximum(stacked.std(axis=(0, 2)), 1e-6)[:, None]
        early_set = ConcatDataset([WithFeatureChannels(c.signals, ch, mean, std)
                                   for c, ch in zip(caches, channels, strict=True)])  # fmt: skip
        torch.manual_seed(args.seed)
        cfg19 = dataclasses.replace(
            ecg_jepa.SIZES[args.size], num_leads=len(spec.leads) + channels[0].shape[1]
        )
        early = ecg_jepa.EcgJepa(cfg19, model.mask)
        # the same time budget: 19 channels make 950 tokens, so an epoch costs more than with 8 leads
        epochs19 = args.epochs or calibrated_epochs(lambda: ecg_jepa.EcgJepa(cfg19, model.mask), early_set,
                                                    batch, lr, budget_s, work)  # fmt: skip
        print(f"19-channel ECG-JEPA: {epochs19} epochs", flush=True)
        minutes19, loss19 = pretrain(early, early_set, epochs19, lr, batch, params.decay, args.seed,
                                     work / "checkpoint19.pt")  # fmt: skip
        runs.append(
            f"19-channel ECG-JEPA: {minutes19:.1f} min, {epochs19} epochs, final train loss {loss19:.4f}"
        )
        prepared = np.stack([prepare_signal(labelled.recording(i), spec) for i in range(len(labelled))])
        inputs = WithFeatureChannels(prepared, channels_of(prepared, spec.fs), mean, std)
        with torch.no_grad():
            early.encoder.eval()
            features["8 leads + 11 feature channels (prototype's early fusion)"] = np.stack(
                [early.encoder(inputs[i][None])[0].numpy() for i in range(len(inputs))]
            )

    rows: list[tuple[str, ProbeResult]] = []
    for name, x in features.items():
        probe = linear_probe(x, labels, train_idx, val_idx, test_idx, SUPERCLASSES)
        rows.append((name, probe))
        print(
            f"{name}: C={probe.c} val {probe.val_macro_auroc:.3f} test {probe.test_macro_auroc:.3f}",
            flush=True,
        )

    command = (
        f".venv/bin/python reports/learning_check.py --method {args.method} --size {args.size} "
        f"--budget-min {args.budget_min:g}"
        + (f" --threads {args.threads}" if args.threads else "")
        + (" --original-hybrid" if args.original_hybrid else "")
    )
    lines = [
        f"# Learning check: {args.method} pretraining vs random initialisation",
        "",
        f"Command: `{command}`",
        "",
        f"Pretrained on the CPU ({torch.get_num_threads()} threads) on {len(pretrain_set)} real records: "
        "ptbxl-unlabelled (1,320) + ptbxl-500 folds 1-8; batch "
        f"{batch}, peak lr {lr:g}, weight decay {params.decay:g}. " + "; ".join(runs) + ". Linear probe "
        "(logistic regression per superclass on standardised frozen embeddings; C chosen on fold 9) trained "
        f"on folds 1-8 ({len(train_idx)} records), reported once on fold 10 ({len(test_idx)} records). "
        "Clinical measurements: NeuroKit2 at each record's own rate, normalised on folds 1-8. "
        "Data: PTB-XL (Wagner et al. 2020, CC BY 4.0).",
        "",
        "| features | val macro AUROC (fold 9) | test macro AUROC (fold 10) | "
        + " | ".join(SUPERCLASSES)
        + " |",
        "|" + "---|" * (3 + len(SUPERCLASSES)),
    ]
    for name, probe in rows:
        per = " | ".join(f"{probe.test_auroc_per_class[c]:.3f}" for c in SUPERCLASSES)
        lines.append(f"| {name} | {probe.val_macro_auroc:.3f} | {probe.test_macro_auroc:.3f} | {per} |")
    out = Path(args.out or ROOT / "reports" / f"learning_check_{args.method}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
