"""Model cards: what a registered version is, what it was trained on and how, how good it is, and what it is
for, as Markdown (``model_card``) or HTML (``card_html``), built from the version row, its job and metrics.

The shipped model (``services.registry.shipped``) keeps the card written with it
(``models/default/MODEL_CARD.md``, whose sections are these, from its stored provenance), followed by this
registration's parity and variants.
"""

import html
import json
from datetime import datetime

from markdown_it import MarkdownIt
from sqlalchemy.orm import Session

from services.db.models import Job, ModelVersion
from services.export.contract import PARITY_TOLERANCE
from services.export.variants import MIN_COSINE
from services.registry.shipped import MANIFEST, SHIPPED_DIR

INTENDED_USE = """## Intended use and limitations

**Intended use.** Research: ECG representation learning, a baseline and a starting point for further
training, and a demonstration of the service. **Not a medical device**: not validated for clinical use, not
to be used for diagnosis, screening or treatment decisions.

**Limitations.** The figures above come from the records listed under training data, on the splits named
there; small test folds overstate or understate held-out results by several hundredths. Populations,
devices, lead sets and sampling rates other than those of the training data are untested. A diagnosis
head knows only its classes: a record outside them gets probabilities that mean nothing. Signals are read
in millivolts and resampled to the model's input; records of a different kind (paediatric, exercise,
ambulatory) may embed far from anything the model saw.
"""


def _code(text: object) -> str:
    """``text`` as an inline code span, safe in a table cell (no backtick, pipes escaped)."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def _number(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "-"


def _folds(folds: list[int] | dict | None) -> str:
    if not folds:
        return "all"
    numbers = sorted(int(f) for f in folds)
    return ", ".join(str(n) for n in numbers)


def _model_table(version: ModelVersion, job: Job | None) -> str:
    spec, metrics = version.input_spec or {}, version.metrics or {}
    leads = spec.get("leads") or []
    seconds = spec.get("samples", 0) / spec["fs"] if spec.get("fs") else None
    size = metrics.get("model_size") or (job.params.get("model_size") if job is not None else None)
    rows = [
        ("method", _code(version.model.method)),
        ("size", _code(size) if size else "-"),
        ("encoder family", _code(metrics["encoder_family"]) if metrics.get("encoder_family") else "-"),
        ("base model", _code(metrics["base_model"]) if metrics.get("base_model") else "-"),
        ("embedding", f"{version.embedding_dim} dimensions"),
        (
            "input",
            f"{len(leads)} leads ({', '.join(leads)}), {spec.get('fs', '-')} Hz, {spec.get('samples', '-')} "
            f"samples" + (f" ({seconds:g} s windows)" if seconds else ""),
        ),
        (
            "source",
            f"job {_code(job.id)} ({job.kind})" if job is not None else "no job (imported or shipped)",
        ),
        ("registered", _when(version.created_at)),
        ("aliases", ", ".join(_code(a.name) for a in version.aliases) or "none"),
    ]
    if version.head:
        classes = version.head.get("class_names") or []
        rows.append(("diagnosis head", f"{len(classes)} classes: {', '.join(_code(c) for c in classes)}"))
    if version.clinical_normaliser:
        rows.append(("clinical features", ", ".join(_code(n) for n in version.clinical_normaliser["names"])))
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows) + "\n"


def _data_section(version: ModelVersion, job: Job | None) -> str:
    metrics = version.metrics or {}
    if job is None:
        return "## Training data\n\nNone recorded: the version was imported from a published checkpoint.\n"
    if job.kind == "pretrain":
        used = metrics.get("datasets") or (job.result or {}).get("datasets") or []
        rows = "\n".join(
            f"| {_code(d.get('name'))} | {d.get('kind') or '-'} | {_folds(d.get('folds'))} | "
            f"{d.get('record_limit') or '-'} | {d.get('records', '-')} | {d.get('segments', '-')} | "
            f"{d.get('skipped', '-')} |"
            for d in used
        )
        return (
            "## Training data\n\nSelf-supervised pretraining (no labels used).\n\n"
            "| dataset | kind | folds | record limit | records used | 10-s segments | skipped |\n"
            f"|---|---|---|---|---|---|---|\n{rows}\n"
        )
    dataset = job.dataset
    summary = (dataset.summary or {}) if dataset is not None else {}
    folds = summary.get("folds") or {}
    split = metrics.get("records") or (job.result or {}).get("records") or {}
    test_fold = job.params.get("test_fold")
    lines = [
        f"Labelled dataset {_code(dataset.name if dataset is not None else job.params.get('dataset'))}"
        + (f" ({dataset.kind}, {summary.get('records', '-')} records" if dataset is not None else "")
        + (f", folds {_folds(folds)})" if folds else ")" if dataset is not None else ""),
        "",
        "| split | folds | records |",
        "|---|---|---|",
    ]
    test, val = (10, 9) if test_fold is None else (test_fold, test_fold % 10 + 1)
    train = "the other eight" if test_fold else "1-8"
    for name, fold in (("train", train), ("validation", val), ("test", test)):
        key = "val" if name == "validation" else name
        lines.append(f"| {name} | {fold} | {split.get(key, '-')} |")
    if job.params.get("record_limit"):
        lines.append(f"\nOnly the dataset's first {job.params['record_limit']} records were used.")
    return "## Training data\n\n" + "\n".join(lines) + "\n"


def _recipe_section(job: Job | None) -> str:
    if job is None:
        return ""
    params = json.dumps(job.params, indent=1)
    text = f"## Recipe\n\nThe job's parameters, as it ran them:\n\n```json\n{params}\n```\n"
    recipe = (job.result or {}).get("recipe")
    if recipe:
        text += f"\nResolved training recipe:\n\n```json\n{json.dumps(recipe, indent=1)}\n```\n"
    return text


def _run_section(version: ModelVersion, job: Job | None) -> str:
    if job is None:
        return ""
    result, metrics = job.result or {}, version.metrics or {}
    minutes = (
        (job.finished_at - job.started_at).total_seconds() / 60
        if job.started_at is not None and job.finished_at is not None
        else None
    )
    device = result.get("device")
    rows = [
        ("job", f"{_code(job.id)} ({job.kind}, {job.status})"),
        ("worker", _code(job.worker) if job.worker else "-"),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("training time", f"{minutes:.1f} min" if minutes is not None else "still running"),
        ("device", _code(device) if device else "not recorded by this job"),
        ("epochs", str(job.epochs or "-")),
    ]
    if metrics.get("resumed_from_epoch"):
        rows.append(("resumed from epoch", str(metrics["resumed_from_epoch"])))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Training run\n\n| | |\n|---|---|\n{table}\n"


def _per_class(scores: dict | None) -> str:
    if not scores:
        return ""
    return " (" + ", ".join(f"{name} {_number(value)}" for name, value in scores.items()) + ")"


def _metrics_section(version: ModelVersion, job: Job | None) -> str:
    metrics, result = version.metrics or {}, (job.result if job is not None else None) or {}
    lines = []
    if "test_macro_auroc" in metrics:
        per_class = (result.get("test") or {}).get("auroc_per_class")
        lines.append(
            f"- test macro AUROC **{_number(metrics['test_macro_auroc'])}**{_per_class(per_class)}, "
            f"macro F1 {_number(metrics.get('test_macro_f1'))}"
        )
    if "val_macro_auroc" in metrics:
        lines.append(f"- validation macro AUROC {_number(metrics['val_macro_auroc'])} (last epoch)")
    if "knn_test_macro_auroc" in metrics:
        per_class = (result.get("knn") or {}).get("auroc_per_class")
        k = (job.params.get("knn_k") if job is not None else None) or 20
        lines.append(
            f"- kNN (k={k}) test macro AUROC {_number(metrics['knn_test_macro_auroc'])}"
            f"{_per_class(per_class)}, macro F1 {_number(metrics.get('knn_test_macro_f1'))}"
        )
    for name in ("train_loss", "val_loss"):
        if name in metrics:
            lines.append(f"- final {name.replace('_', ' ')} {_number(metrics[name], 4)}")
    if not lines:
        lines.append("- none recorded")
    if "test_macro_auroc" not in metrics and "knn_test_macro_auroc" not in metrics:
        lines.append(
            "- no diagnosis figure: an evaluation job (`POST /jobs/evaluate`: kNN, linear probe, clustering) "
            "measures how well its embeddings separate the diagnoses"
        )
    return "## Metrics\n\n" + "\n".join(lines) + "\n"


def _export_section(version: ModelVersion) -> str:
    name, number = version.model.name, version.version
    lines = [
        f"fp32 ONNX sha256 {_code(version.sha256)}; PyTorch vs ONNX Runtime on real windows: max abs "
        f"difference {version.parity_max_abs_diff:.2e} (bound {PARITY_TOLERANCE:g}, "
        f"{'passed' if version.parity_max_abs_diff <= PARITY_TOLERANCE else 'over the bound'}).",
        "",
        f"| variant | status | cosine to fp32, min (bound >= {MIN_COSINE}) | max abs difference | checked on "
        "| bytes | sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, entry in (version.variants or {}).items():
        reason = entry.get("reason") or entry.get("error")
        status = entry.get("status", "-") + (f": {reason}" if reason else "")
        lines.append(
            f"| {variant} | {_code(status) if reason else status} | {_number(entry.get('cosine_min'), 6)} | "
            f"{_number(entry.get('max_abs_diff'), 6)} | {entry.get('checked_on', '-')} | "
            f"{entry.get('bytes', '-')} | {_code(entry['sha256'][:16]) if entry.get('sha256') else '-'} |"
        )
    lines += [
        "",
        f"Download: `GET /models/{name}/versions/{number}/onnx` (fp32), `?variant=int8` or `?variant=fp16` "
        "where made; the answer carries the file's sha256.",
    ]
    return "## Export: parity and variants\n\n" + "\n".join(lines) + "\n"


def _shipped_card(version: ModelVersion) -> str | None:
    """The card written with the shipped model, when ``version`` is that model (same sha256)."""
    manifest_path, card_path = SHIPPED_DIR / MANIFEST, SHIPPED_DIR / "MODEL_CARD.md"
    if "shipped" not in (version.metrics or {}) or not card_path.is_file() or not manifest_path.is_file():
        return None
    if json.loads(manifest_path.read_text()).get("sha256") != version.sha256:
        return None
    return card_path.read_text()


def model_card(session: Session, version: ModelVersion) -> str:
    """The Markdown model card of ``version``."""
    shipped = _shipped_card(version)
    if shipped is not None:
        return (
            f"{shipped.rstrip()}\n\n## This registration: {version.ref}\n\n"
            f"{_model_table(version, None)}\n{_export_section(version)}"
        )
    job = session.get(Job, version.source_job_id) if version.source_job_id is not None else None
    kind = {"pretrain": "self-supervised encoder", "finetune": "fine-tuned model"}.get(
        job.kind if job is not None else "", "imported encoder"
    )
    what = "diagnosis model" if version.head else kind
    sections = [
        f"# Model card: {version.ref}\n\n{version.model.method} {what}, version {version.version} of "
        f"{_code(version.model.name)}.\n",
        "## Model\n\n" + _model_table(version, job),
        _data_section(version, job),
        _recipe_section(job),
        _run_section(version, job),
        _metrics_section(version, job),
        _export_section(version),
        INTENDED_USE,
    ]
    return "\n".join(s for s in sections if s)


_RENDERER = MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML in the text is escaped


def card_html(markdown: str, title: str) -> str:
    """A Markdown card as a standalone HTML page (HTML in the Markdown is shown as text, not interpreted)."""
    body = _RENDERER.render(markdown)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
        "code{background:#f4f4f4}</style></head>\n"
        f"<body>\n{body}</body></html>\n"
    )
