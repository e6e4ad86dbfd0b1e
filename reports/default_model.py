"""Train the diagnosis model that ships in ``models/default`` (registered on the service's first start).

The recipe is the benchmark's best (``reports/benchmark.BEST``: a fine-tuning job with the family's default
recipe, pretraining first where it names a pretrained method), run through the service's own jobs on a
temporary embedded database, on ptbxl-500 (folds 1-8 train, 9 validates: best epoch and thresholds, 10
tests once). The files, the registry fields, the provenance (command, recipe, data, seed, time, machine,
commit) and the model card are written to ``--out``.

    .venv/bin/python reports/default_model.py [--seed 0] [--out models/default]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reports.benchmark import (  # noqa: E402
    BEST,
    LABELLED,
    ROWS_NOTE,
    environment,
    family_and_size,
    pretrained,
    run_job,
    table_commands,
    table_markdown,
    table_rows,
)

NAME = "ecg-diagnosis"


def card(manifest: dict, benchmark: str | None) -> str:
    """The model card from the provenance stored with the shipped model and the benchmark table."""
    test, records = manifest["test"], manifest["records"]
    per_class = ", ".join(f"{c} {v:.3f}" for c, v in test["auroc_per_class"].items())
    return f"""# Model card: {NAME}

**What it is.** A multi-label classifier of the 5 PTB-XL diagnostic superclasses (NORM, MI, STTC, CD, HYP)
from a 12-lead ECG; its embedding is its members' embeddings side by side. {manifest["description"]}

**Input.** 12 standard leads, any rate and length of at least 2.5 s (resampled to 100 Hz, band-passed
0.67-40 Hz; each 2.5-s window is standardised per lead inside the model, so millivolt records and records
z-scored per lead are read alike). `/predict` averages 3 crops of each 10-s segment.

**Training data.** PTB-XL records ecg_id 1-500 (`ptbxl-500`, the 488 with a superclass): folds 1-8 train
({records["train"]} records), fold 9 validates (best epoch, per-class thresholds at max F1;
{records["val"]} records), fold 10 tests ({records["test"]} records). PTB-XL: Wagner et al., Sci Data 2020,
CC BY 4.0. {manifest["pretraining"]}

**Recipe.** `{json.dumps(manifest["params"])}`, resolved to `{json.dumps(manifest["recipe"])}`.
Trained by `{manifest["command"]}` in {manifest["minutes"]:.1f} min on {manifest["machine"]}
({manifest["date"]}, commit {manifest["commit"]}).

**Figures.** Test fold 10 (66 records, read once): macro AUROC {test["macro_auroc"]:.3f} ({per_class}),
macro F1 {test["macro_f1"]:.3f}. 66 records overstate or understate held-out results by several hundredths;
the 10-fold cross-validation of the same recipe is the figure to trust:

{benchmark or "(run reports/benchmark.py for the cross-validated table)"}

**Intended use.** Research: a baseline and a starting point for ECG machine-learning work, a demonstration
of the service. **Not a medical device**: not validated for clinical use, not to be used for diagnosis or
treatment decisions.

**Limitations.** Trained on 353 records of the oldest PTB-XL block (1984-87, two device types): HYP is rare
(40 records in all) and its figures are the least certain; other populations, devices and paediatric ECGs
are untested. It knows 5 coarse superclasses only; a record outside them gets probabilities that mean
nothing. Thresholds come from 81 validation records. The cross-validated figures are means over 10 folds
of about 49 records; the spread between folds (the table's sd) and between runs of one recipe (a
SimCLR-pretrained ensemble read 0.886, 0.867 and 0.870 over three pretraining runs,
`reports/cnn_pretraining_runs.md`) is as large as most differences between the lines.
"""


# the benchmark lines a reader of this model's card compares it with: the recipe it was trained by, its parts
# (the SimCLR encoder frozen and fine-tuned once) and the baselines beside it
CARD_LINES = (
    "best",
    "supervised",
    "supervised-tiny",
    "ensemble-tiny",
    "clinical",
    "random-resnet1d",
    "simclr-probe",
    "simclr-knn",
    "simclr-finetune",
)


def benchmark_table() -> str | None:
    """The rows of ``CARD_LINES`` from ``reports/benchmark.md``, with the commands of the runs that ran any of
    them (the full table, with the transformer families and recipe searches, stays in that file)."""
    path = ROOT / "reports" / "benchmark.md"
    if not path.is_file():
        return None
    text = path.read_text()
    rows = {name: row for name, row in table_rows(text).items() if name in CARD_LINES}
    ran = [
        command
        for command in table_commands(text)
        if set(command.split("--lines ", 1)[-1].split(" ", 1)[0].split(",")) & set(rows)
    ]
    head = table_markdown([]).splitlines()
    rest = "Every other line (ST-MEM, ECG-JEPA, the base CNN, recipe searches): `reports/benchmark.md`."
    return "\n".join([ROWS_NOTE, *ran, "", *head, *rows.values(), "", rest])


def remake_card(folder: Path) -> None:
    """Rewrite the model card from the stored provenance (e.g. after a new benchmark run)."""
    provenance = json.loads((folder / "version.json").read_text())["provenance"]
    (folder / "MODEL_CARD.md").write_text(card(provenance, benchmark_table()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "models" / "default"))
    parser.add_argument("--work", help="working folder (default: a new temporary one)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--card-only", action="store_true", help="only rewrite the card of --out")
    args = parser.parse_args()
    if args.card_only:
        return remake_card(Path(args.out))
    args.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ecgssl-default-model-"))
    args.work.mkdir(parents=True, exist_ok=True)
    environment(args.work, Path(args.data), 0)
    os.environ["ECGSSL_EXPORT_VARIANTS"] = "none"  # made where it is registered

    from services.db.session import session_scope
    from services.jobs.params import FinetuneParams
    from services.registry import resolve_model_version
    from services.registry.shipped import export_version
    from services.training.loop import machine_description

    started = time.perf_counter()
    fields = dict(BEST)
    pretraining = "No pretraining: trained from scratch."
    if "model" in fields:
        made = pretrained(fields["model"], None, args.work)
        fields["model"] = made["version"]
        p = made["params"]
        pretraining = (
            f"Encoder pretrained by a {p['method']} {p['model_size']} job on ptbxl-unlabelled (1,320 other "
            f"PTB-XL records): {p['epochs']} epochs, batch {p['batch_size']}, lr {p['learning_rate']:g}, "
            f"{made['seconds'] / 60:.1f} min (not in the minutes below)."
        )
    params = FinetuneParams(dataset=LABELLED, seed=args.seed, model_name=NAME, **fields)
    out = run_job("finetune", params)
    minutes = (time.perf_counter() - started) / 60
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = out["result"]
    method = BEST.get("model", "").partition(":")[0]  # "<method>" or "<method>:<size>"
    family, size = family_and_size(BEST)
    trained = f"pretrained by {method} and fine-tuned" if "model" in BEST else "trained from scratch"
    provenance = {
        "command": " ".join(["reports/default_model.py", *sys.argv[1:]]),
        "params": params.model_dump(mode="json", exclude_defaults=True),
        "recipe": result["recipe"],
        "description": f"{result['recipe'].get('ensemble', 1)} {family} {size} encoder(s) {trained} with the "
        "family's default recipe, their probabilities averaged.",
        "pretraining": pretraining,
        "data": "ptbxl-500: folds 1-8 train, 9 validation, 10 test",
        "records": result["records"],
        "test": {k: result["test"][k] for k in ("macro_auroc", "auroc_per_class", "macro_f1")},
        "seed": args.seed,
        "minutes": round(minutes, 1),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip(),
    }
    with session_scope() as s:
        folder = export_version(resolve_model_version(s, out["version"]), Path(args.out), provenance,
                                card(provenance, benchmark_table()))  # fmt: skip
    print(
        f"{out['version']}: test macro AUROC {out['result']['test']['macro_auroc']:.3f}, written to {folder} "
        f"in {minutes:.1f} min"
    )


if __name__ == "__main__":
    main()
