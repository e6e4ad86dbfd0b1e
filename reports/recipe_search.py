"""Choose a learning-check recipe without the test fold: out-of-fold linear probes over folds 1-9.

Pretrains the job's model (``services.pretraining.build_objective``) on ptbxl-unlabelled + ptbxl-500
folds 1-8 for ``--epochs`` and, at the epochs in ``--evals``, embeds the 434 records of folds 1-9 and
fits a logistic regression per superclass 9 times (each fold 1-9 held out once), printing the pooled
macro AUROC for C in 0.01, 0.1, 1. Fold 10 is never read. The README's recipe figures come from it:

    .venv/bin/python reports/recipe_search.py --method st_mem --lr 3e-3 --epochs 30 --evals 10,20,30
    .venv/bin/python reports/recipe_search.py --method ecg_jepa --lr 1e-3 --epochs 12 --evals 4,8,12 \
        [--patch-init-std 0.02] [--ema-start 0.9995] [--jepa-mask random] [--config depth=4]

For ECG-JEPA it also prints, at each probe, the share of the target encoder's (layer-normed) token
variance that is across records rather than across positions: near 0 the targets are predictable from
position alone (the collapse of the tiny model at W_P std 0.02, ``services/models/ecg_jepa.py``).
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import ConcatDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.datasets.cache import preprocessed  # noqa: E402
from services.datasets.kinds import open_dataset  # noqa: E402
from services.ecg.preprocess import preprocess  # noqa: E402
from services.evaluation.linear_probe import macro_auroc  # noqa: E402
from services.jobs import PretrainParams  # noqa: E402
from services.models import ecg_jepa  # noqa: E402
from services.pretraining import build_objective, input_spec  # noqa: E402
from services.training.loop import CropDataset, TrainConfig, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--method", default="st_mem", choices=["st_mem", "ecg_jepa"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--jepa-mask", default="block", choices=["block", "random"])
    parser.add_argument("--evals", default="5,10,20", help="epochs after which to probe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--patch-init-std", type=float, help="ECG-JEPA: W_P's init std (default: the size's)")
    parser.add_argument("--ema-start", type=float, default=0.996, help="ECG-JEPA: EMA momentum at step 0")
    parser.add_argument(
        "--config", default="", help="ECG-JEPA: config overrides, e.g. depth=4,predictor_depth=3"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = PretrainParams(dataset="-", method=args.method, model_size=args.size, batch_size=args.batch,
                            learning_rate=args.lr, jepa_masking={"kind": args.jepa_mask})  # fmt: skip
    spec = input_spec(params)
    data, work = Path(args.data), Path(tempfile.mkdtemp(prefix="ecgssl-recipe-"))
    labelled = open_dataset("ptbxl", data / "ptbxl-500", {})
    unlabelled = open_dataset("npz", data / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz", {})
    caches = [
        preprocessed(unlabelled, {"path": "unlabelled"}, spec, work / "cache"),
        preprocessed(labelled, {"path": "ptbxl-500"}, spec, work / "cache", indices=labelled.split("train")),
    ]
    train_set = ConcatDataset([CropDataset(c.signals, spec.samples, random_crop=True) for c in caches])
    dev = np.nonzero(np.isin(labelled.folds, range(1, 10)))[0]  # folds 1-9 only
    windows = [torch.from_numpy(preprocess(labelled.recording(int(i)), spec)) for i in dev]
    labels, folds = labelled.labels[dev], labelled.folds[dev]

    @torch.no_grad()
    def embed(encoder: torch.nn.Module) -> np.ndarray:
        was = encoder.training
        encoder.eval()
        out = np.stack([encoder(w).mean(0).numpy() for w in windows])
        encoder.train(was)
        return out

    def out_of_fold(x: np.ndarray) -> dict[float, float]:
        result = {}
        for c in (0.01, 0.1, 1.0):
            scores = np.zeros(labels.shape)
            for fold in range(1, 10):
                held, fit = folds == fold, folds != fold
                scaler = StandardScaler().fit(x[fit])
                for k in range(labels.shape[1]):
                    model = LogisticRegression(C=c, max_iter=2000).fit(
                        scaler.transform(x[fit]), labels[fit, k]
                    )
                    scores[held, k] = model.decision_function(scaler.transform(x[held]))
            result[c] = round(macro_auroc(labels, scores)[0], 3)
        return result

    def build() -> torch.nn.Module:
        """The job's model, or for ECG-JEPA the job's model with the knobs above changed."""
        model = build_objective(params)
        if args.method != "ecg_jepa":
            return model
        cfg = ecg_jepa.SIZES[args.size]
        for item in filter(None, args.config.split(",")):
            key, value = item.split("=")
            cfg = dataclasses.replace(cfg, **{key: type(getattr(cfg, key))(value)})
        if args.patch_init_std is not None:
            cfg = dataclasses.replace(cfg, patch_init_std=args.patch_init_std)
        torch.manual_seed(params.seed)
        return ecg_jepa.EcgJepa(cfg, model.mask, (args.ema_start, 1.0))

    def across_records(model: torch.nn.Module) -> str:
        if args.method != "ecg_jepa":
            return ""
        target = model.target_encoder
        was = target.training
        with torch.no_grad():
            target.eval()
            tokens = torch.stack([target.forward_tokens(w[:1])[0] for w in windows[:64]])  # (64, C*p, D)
            target.train(was)
        tokens = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:])
        share = tokens.var(0).mean() / tokens.reshape(-1, tokens.shape[-1]).var(0).mean()
        return f" target variance across records {float(share):.3f}"

    model = build()
    print("random init OOF macro AUROC:", out_of_fold(embed(build().encoder)), across_records(model),
          flush=True)  # fmt: skip
    evals, started = {int(e) for e in args.evals.split(",")}, time.perf_counter()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch in evals:
            minutes = (time.perf_counter() - started) / 60
            loss = metrics["train_loss"]
            print(f"epoch {epoch} ({minutes:.1f} min) loss {loss:.4f}{across_records(model)} "
                  f"OOF macro AUROC {out_of_fold(embed(model.encoder))}", flush=True)  # fmt: skip

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, learning_rate=args.lr,
                         weight_decay=params.decay, warmup_epochs=max(1, args.epochs // 20),
                         checkpoint_every=10**6)  # fmt: skip
    train(model, train_set, config, torch.device("cpu"), work / "checkpoint.pt", on_epoch=on_epoch)


if __name__ == "__main__":
    main()
