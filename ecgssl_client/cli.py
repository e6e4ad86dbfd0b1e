"""``ecgssl``: the ECG SSL service from a terminal (jobs with live progress, models, datasets, embeddings,
predictions). Every command talks to the service over HTTP through ``ecgssl_client.Client``."""

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ecgssl_client.client import TERMINAL, ApiError, Client, EmbedResult, Failure, PredictResult
from ecgssl_client.outputs import OUTPUT_SUFFIXES, write_embeddings, write_predictions
from ecgssl_client.records import RecordError, find_records

# Markup off: the API's messages and names are printed as they are (markup=True where a style is wanted,
# its text escaped). Not a terminal (a pipe, a log): wide lines, so that tables and ids are not folded.
console = Console(soft_wrap=False, markup=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, markup=False)


class Failed(click.ClickException):
    """An error shown as one line on stderr, exit status 1 (an API refusal, an unreachable service)."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        err.print(f"[bold red]error:[/] {escape(self.message)}", highlight=False, markup=True)


def api_errors(command: Callable) -> Callable:
    """Run ``command``; the API's refusals, an unreachable service and unreadable paths become one line."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return command(*args, **kwargs)
        except ApiError as exc:
            hint = ""
            if exc.status_code == 401:
                hint = " (give --api-key or set ECGSSL_API_KEY)"
            raise Failed(f"{exc.detail}{hint} [HTTP {exc.status_code}]") from None
        except httpx.TransportError as exc:
            url = ctx.find_object(Client).url if ctx.find_object(Client) else "the service"
            raise Failed(
                f"cannot reach the service at {url} ({exc.__class__.__name__}: {exc}): start it (make run) "
                "or give --url / set ECGSSL_URL"
            ) from None
        except RecordError as exc:
            raise click.BadParameter(str(exc), param_hint="PATH") from None

    return run


def client() -> Client:
    return click.get_current_context().ensure_object(Client)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="""\b
Examples:
  ecgssl pretrain --dataset ptbxl-500 --epochs 5 --set record_limit=200 --follow
  ecgssl jobs --status running
  ecgssl embed ../shared/data/ptbxl-500/records500/00000 --model st_mem-tiny --out emb.npy
  ecgssl predict ../shared/data/ptb-diagnostic/s0010_re.hea
  ecgssl promote st_mem-tiny 2 --alias production

\b
Exit status: 0 done; 1 refused by the service (its message on one line), service unreachable, a followed
job that did not succeed, or records left out; 2 a wrong command line.""",
)
@click.option(
    "--url",
    envvar="ECGSSL_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The service (env ECGSSL_URL).",
)
@click.option(
    "--api-key", envvar="ECGSSL_API_KEY", help="Sent as 'Authorization: Bearer' (env ECGSSL_API_KEY)."
)
@click.version_option(package_name="ecgssl", prog_name="ecgssl")
@click.pass_context
def cli(ctx: click.Context, url: str, api_key: str | None) -> None:
    """Pretrain, evaluate and serve ECG encoders on an ECG SSL service."""
    ctx.obj = ctx.with_resource(Client(url, api_key or ""))


# jobs


def parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; a value is read as JSON where it is JSON (numbers, lists, true), else as text."""
    params: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"'{item}' is not key=value (e.g. folds=[1,2,3])", param_hint="--set")
        try:
            params[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            params[key.strip()] = text
    return params


def job_options(command: Callable) -> Callable:
    """What every job submission takes besides its own options: --set, --follow, --json."""
    command = click.option(
        "--json", "as_json", is_flag=True, help="Print the job (with --follow: the finished job) as JSON."
    )(command)
    command = click.option(
        "--follow", "-f", is_flag=True, help="Show live progress until the job ends, then a summary."
    )(command)
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Any other field of the job (repeatable); JSON values: folds=[1,2,3], mask_ratio=0.5.",
    )(command)


def submit(kind: str, params: dict[str, Any], sets: tuple[str, ...], follow: bool, as_json: bool) -> None:
    body = {k: v for k, v in params.items() if v is not None and v != ()} | parse_sets(sets)
    created = client().submit(kind, body)  # type: ignore[arg-type]
    job_id = str(created["job_id"])
    if not follow:
        if as_json:
            console.print_json(data=created)
        else:
            console.print(f"queued {kind} job {job_id}", highlight=False)
            console.print(f"follow it: ecgssl job {job_id[:8]} --follow", highlight=False)
        return
    err.print(f"queued {kind} job {job_id}", highlight=False)
    finish(follow_job(job_id), as_json)


@cli.command(
    epilog="""\b
Examples:
  ecgssl pretrain --dataset ptbxl-500 --epochs 2 --set record_limit=32 --batch-size 8 --follow
  ecgssl pretrain --dataset ptbxl-unlabelled --method simclr --set folds=[1,2,3,4,5,6,7,8]"""
)
@click.option("--dataset", required=True, help="A registered dataset's name, or a path under the data root.")
@click.option("--method", help="st_mem (default), ecg_jepa or simclr (`GET /methods` lists them).")
@click.option("--size", "model_size", help="tiny (default), small or base.")
@click.option("--epochs", type=int, help="Default: the method's recipe for the size.")
@click.option("--batch-size", type=int)
@click.option("--lr", "learning_rate", type=float, help="Peak learning rate.")
@click.option("--record-limit", type=int, help="Use at most this many records.")
@click.option("--name", "model_name", help="Registry name (default '<method>-<size>').")
@job_options
@api_errors
def pretrain(sets: tuple[str, ...], follow: bool, as_json: bool, **params: Any) -> None:
    """Queue a self-supervised pretraining job."""
    submit("pretrain", params, sets, follow, as_json)


@cli.command(
    epilog="""\b
Examples:
  ecgssl finetune --model st_mem-tiny --dataset ptbxl-500 --method linear_probe --follow
  ecgssl finetune --family resnet1d --dataset ptbxl-500 --method finetune --epochs 5"""
)
@click.option("--model", help="The base version: 'name@version', 'name@alias' or 'name'.")
@click.option("--family", help="Without --model: an encoder family trained from scratch (e.g. resnet1d).")
@click.option("--dataset", required=True, help="A labelled dataset: name or path under the data root.")
@click.option("--method", required=True, help="linear_probe, finetune, triplet or vqvae.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", "learning_rate", type=float)
@click.option("--record-limit", type=int)
@click.option("--name", "model_name", help="Registry name (default '<base>-<method>').")
@job_options
@api_errors
def finetune(sets: tuple[str, ...], follow: bool, as_json: bool, **params: Any) -> None:
    """Queue a fine-tuning job: a registered encoder adapted to a labelled dataset."""
    submit("finetune", params, sets, follow, as_json)


@cli.command(
    epilog="""\b
Examples:
  ecgssl evaluate --model st_mem-tiny --dataset ptbxl-500 --follow
  ecgssl evaluate --model st_mem-tiny@2 --dataset ptbxl-500 --protocol knn --set store_reference=true"""
)
@click.option("--model", required=True, help="'name@version', 'name@alias' or 'name'.")
@click.option("--dataset", required=True, help="A labelled dataset: name or path under the data root.")
@click.option(
    "--protocol",
    "protocols",
    multiple=True,
    type=click.Choice(["knn", "linear_probe", "clustering"]),
    help="Repeatable; default all three.",
)
@click.option("--record-limit", type=int)
@job_options
@api_errors
def evaluate(sets: tuple[str, ...], follow: bool, as_json: bool, **params: Any) -> None:
    """Queue an evaluation of a version's embeddings (kNN, linear probe, clustering)."""
    params["protocols"] = list(params["protocols"]) or None
    submit("evaluate", params, sets, follow, as_json)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


def number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def listed(values: dict[str, Any]) -> str:
    """'train_loss 1.032, val_loss 1.028': a metrics dict on one line."""
    return ", ".join(f"{k} {number(v)}" for k, v in values.items())


def follow_job(job_id: str) -> dict:
    """Follow the job until it ends: a live bar (epoch, loss, ETA) on a terminal; otherwise a line per
    status, epoch and phase as the poll sees them, and each finished epoch's metrics. Ctrl-C stops following
    (the job goes on)."""
    state: dict = {}
    try:
        if console.is_terminal:
            columns = (
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("[dim]{task.fields[phase]}"),
            )
            with Progress(*columns, console=console, transient=False) as bar:
                task = bar.add_task("queued", total=None, loss="-", eta="-", phase="")
                for state in client().follow(job_id):
                    p = state["progress"]
                    bar.update(
                        task,
                        description=f"{state['status']} epoch {p['epoch']}/{p['epochs']}",
                        total=p["total_steps"] or None,
                        completed=p["step"],
                        loss=number(p["last_loss"]) if p["last_loss"] is not None else "-",
                        eta=duration(p["eta_s"]),
                        phase=escape(p["phase"] or ""),
                    )
        else:
            said, epochs_shown = None, 0
            for state in client().follow(job_id):
                p = state["progress"]
                line = f"{state['status']}: epoch {p['epoch']}/{p['epochs']}"
                if p["last_loss"] is not None:
                    line += f", step {p['step']}/{p['total_steps']}, loss {number(p['last_loss'])}"
                    line += f", ETA {duration(p['eta_s'])}"
                line += f" ({p['phase']})" if p["phase"] else ""
                key = (state["status"], p["epoch"], p["phase"])
                if key != said:
                    said = key
                    console.print(line, highlight=False)
                # every finished epoch as the job records it: a poll can miss an epoch shorter than its
                # interval, the metrics cannot (a job resumed from a checkpoint drops the later epochs' rows,
                # so their re-runs print again)
                for m in state["metrics"][epochs_shown:]:
                    done = f"epoch {m['epoch']}/{p['epochs']} done: {listed(m['values'])}"
                    console.print(done, highlight=False)
                epochs_shown = len(state["metrics"])
    except KeyboardInterrupt:
        err.print(f"stopped following; the job goes on: ecgssl job {job_id[:8]}, ecgssl cancel {job_id[:8]}")
        raise SystemExit(130) from None
    return state


def headline(result: dict | None) -> dict[str, list[tuple[str, Any]]]:
    """The scalar figures of a job's result by section ('test': [('macro_auroc', 0.79), ...]; '' for its own
    scalars), leaving out per-class tables, thresholds and lists."""
    sections: dict[str, list[tuple[str, Any]]] = {}
    for key, value in (result or {}).items():
        if isinstance(value, dict):
            figures = [
                (k, v)
                for k, v in value.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and not k.endswith("per_class")
            ]
            if figures:
                sections[key] = figures
        elif isinstance(value, int | float) and not isinstance(value, bool):
            sections.setdefault("", []).append((key, value))
    return sections


def finish(state: dict, as_json: bool) -> None:
    """The finished job's summary (or JSON); exit 1 when it failed or was cancelled."""
    if as_json:
        console.print_json(data=state)
    else:
        show_summary(state)
    if state["status"] != "succeeded":
        raise SystemExit(1)


def show_summary(state: dict) -> None:
    took = None
    if state.get("started_at") and state.get("finished_at"):
        took = (
            datetime.fromisoformat(state["finished_at"]) - datetime.fromisoformat(state["started_at"])
        ).total_seconds()
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(state["status"], "white")
    console.print(
        f"[bold {colour}]{state['status']}[/]: {state['kind']} job {state['id']}"
        + (f" in {duration(took)}" if took is not None else ""),
        highlight=False,
        markup=True,
    )
    if state.get("error"):
        console.print(f"error: {state['error']}", highlight=False)
    if state.get("dataset"):
        console.print(f"dataset: {state['dataset']}", highlight=False)
    if state.get("model_version"):
        console.print(f"model version: {state['model_version']}", highlight=False)
        try:
            name, version = state["model_version"].rsplit("@", 1)
            v = client().version(name, int(version))
            console.print(
                f"  embedding {v['embedding_dim']}-d, ONNX parity {v['parity_max_abs_diff']:.2g}, variants "
                + ", ".join(f"{k} {e['status']}" for k, e in v["variants"].items())
                + (f", aliases {', '.join(v['aliases'])}" if v["aliases"] else ""),
                highlight=False,
            )
        except (ApiError, ValueError):
            pass
    if state.get("metrics"):
        last = state["metrics"][-1]
        console.print(f"epoch {last['epoch']}: {listed(last['values'])}", highlight=False)
    for section, figures in headline(state.get("result")).items():
        console.print(f"{section or 'result'}: {listed(dict(figures))}", highlight=False)
    if state.get("artifacts"):
        console.print(f"artifacts: {', '.join(state['artifacts'])}", highlight=False)


@cli.command()
@click.option(
    "--status",
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    help="Only these.",
)
@click.option("--kind", type=click.Choice(["pretrain", "finetune", "evaluate"]), help="Only this kind.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@api_errors
def jobs(status: str | None, kind: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first.

    \b
    Example:
      ecgssl jobs --status succeeded --kind pretrain
    """
    found = client().jobs(status=status, kind=kind, limit=limit)
    if as_json:
        console.print_json(data=found)
        return
    table = Table("id", "kind", "status", "progress", "loss", "model version", "created", box=None)
    for j in found:
        p = j["progress"]
        table.add_row(
            j["id"],
            j["kind"],
            j["status"],
            f"epoch {p['epoch']}/{p['epochs']}",
            number(p["last_loss"]) if p["last_loss"] is not None else "-",
            j["model_version"] or "-",
            j["created_at"][:19].replace("T", " "),
        )
    console.print(table if found else "no jobs")


@cli.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Show live progress until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@api_errors
def job(job_id: str, follow: bool, as_json: bool) -> None:
    """A job: status, progress, per-epoch metrics, result (JOB_ID: the id or its first characters). With
    --follow, the exit status is 1 when the job ends other than succeeded.

    \b
    Example:
      ecgssl job 5b7e8bcd --follow
    """
    state = follow_job(job_id) if follow else client().job(job_id)
    if as_json:
        console.print_json(data=state)
        return
    if not follow and state["status"] not in TERMINAL:
        p = state["progress"]
        console.print(
            f"{state['status']}: {state['kind']} job {state['id']}, epoch {p['epoch']}/{p['epochs']}"
            f", step {p['step']}/{p['total_steps']}, ETA {duration(p['eta_s'])}"
            + (f" ({p['phase']})" if p["phase"] else ""),
            highlight=False,
        )
    else:
        show_summary(state)
    if len(state.get("metrics", [])) > 1:
        names = sorted({k for m in state["metrics"] for k in m["values"]})
        table = Table("epoch", *names, box=None)
        for m in state["metrics"]:
            table.add_row(str(m["epoch"]), *(number(m["values"].get(n, "")) for n in names))
        console.print(table)
    if follow and state["status"] != "succeeded":
        raise SystemExit(1)


@cli.command()
@click.argument("job_id")
@api_errors
def cancel(job_id: str) -> None:
    """Cancel a queued or running job (a running one stops before its next step)."""
    state = client().cancel(job_id)
    console.print(f"{state['status']}: {state['kind']} job {state['id']} (cancel requested)", highlight=False)


# models and datasets


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@api_errors
def models(name: str | None, as_json: bool) -> None:
    """Registered models with their aliases; with NAME, that model's versions.

    \b
    Examples:
      ecgssl models
      ecgssl models st_mem-tiny
    """
    if name is None:
        found = client().models()
        if as_json:
            console.print_json(data=found)
            return
        table = Table("name", "method", "versions", "newest", "aliases", box=None)
        for m in found:
            aliases = ", ".join(f"{a}->{v}" for a, v in m["aliases"].items())
            newest = max((v["version"] for v in m["versions"]), default=None)
            table.add_row(m["name"], m["method"], str(len(m["versions"])), str(newest), aliases or "-")
        console.print(table if found else "no models")
        return
    model = client().model(name)
    if as_json:
        console.print_json(data=model)
        return
    table = Table("version", "aliases", "dim", "parity", "variants", "source job", "created", box=None)
    for v in model["versions"]:
        table.add_row(
            v["ref"],
            ", ".join(v["aliases"]) or "-",
            str(v["embedding_dim"]),
            f"{v['parity_max_abs_diff']:.2g}",
            ", ".join(f"{k} {e['status']}" for k, e in v["variants"].items()) or "-",
            str(v["source_job_id"] or "-"),
            v["created_at"][:19].replace("T", " "),
        )
    console.print(table)


@cli.command()
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@click.option("--alias", default="production", show_default=True, help="The alias to point at VERSION.")
@api_errors
def promote(name: str, version: int, alias: str) -> None:
    """Point an alias of model NAME at VERSION: requests for NAME@ALIAS (NAME alone for production) are
    served by it from now on.

    \b
    Example:
      ecgssl promote st_mem-tiny 2 --alias production
    """
    moved = client().promote(name, version, alias)
    was = moved.get("previous_version")
    console.print(
        f"{moved['model']}@{moved['alias']} -> version {moved['version']}"
        + (f" (was {was})" if was is not None else " (new alias)"),
        highlight=False,
    )


@cli.group()
def datasets() -> None:
    """Registered datasets: list, add."""


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@api_errors
def datasets_list(as_json: bool) -> None:
    """Registered datasets with their record counts and labels."""
    found = client().datasets()
    if as_json:
        console.print_json(data=found)
        return
    table = Table("id", "name", "kind", "path", "records", "labels", box=None)
    for d in found:
        summary = d.get("summary") or {}
        labels = summary.get("label_counts") or {}
        table.add_row(
            str(d["id"]),
            d["name"],
            d["kind"],
            d["path"] or "-",
            str(summary.get("records", "-")),
            ", ".join(f"{k} {v}" for k, v in labels.items()) or "-",
        )
    console.print(table if found else "no datasets")


@datasets.command("add")
@click.argument("name")
@click.option("--kind", required=True, help="ptbxl, wfdb_folder, npz, cinc or synthetic.")
@click.option("--path", help="Folder or file under the service's data root (not for synthetic).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="e.g. sampling_rate=500.")
@click.option("--json", "as_json", is_flag=True, help="Print the registered dataset as JSON.")
@api_errors
def datasets_add(name: str, kind: str, path: str | None, options: tuple[str, ...], as_json: bool) -> None:
    """Register a dataset (validated and summarised by the service).

    \b
    Example:
      ecgssl datasets add ptbxl-100hz --kind ptbxl --path ptbxl-500 --option sampling_rate=100
    """
    row = client().add_dataset(name, kind, path, parse_sets(options))
    if as_json:
        console.print_json(data=row)
        return
    summary = row.get("summary") or {}
    console.print(
        f"registered dataset {row['name']} (id {row['id']}, {row['kind']}): "
        f"{summary.get('records', '?')} records",
        highlight=False,
    )


# inference


def inference_options(command: Callable) -> Callable:
    for option in reversed(
        [
            click.option("--model", help="'name@version', 'name@alias' or 'name'; default: the service's."),
            click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), help="ONNX variant."),
            click.option("--fs", type=float, help="Sampling rate (Hz) of .npy/.csv records without one."),
            click.option("--leads", help="Comma-separated lead names of .npy/.npz/.csv/.json records."),
            click.option("--pad", is_flag=True, default=None, help="Zero-pad records shorter than a window."),
        ]
    ):
        command = option(command)
    return command


@contextmanager
def records_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar of ``total`` records on stderr (nothing when stderr is not a terminal)."""
    columns = (
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def report_failures(failures: list[Failure], done: int) -> None:
    for f in failures:
        err.print(
            f"[yellow]skipped[/] {escape(f.id)}: {escape(f.error)} [HTTP {f.status_code}]",
            highlight=False,
            markup=True,
        )
    if failures:
        err.print(f"{done} record(s) done, {len(failures)} could not be read (listed above)", highlight=False)


@cli.command(
    epilog="""\b
Examples:
  ecgssl embed ../shared/data/ptbxl-500/records500/00000 --model st_mem-tiny --out emb.npy
  ecgssl embed ecgs.zip s0010_re.hea --out emb.parquet
  ecgssl embed folder/ --out emb.csv --batch-records 8"""
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="FILE.npy (+ FILE.ids.json: ids and model), FILE.parquet or FILE.csv (id, e0, e1, ...).",
)
@inference_options
@click.option(
    "--windowing", type=click.Choice(["sliding", "center"]), help="Longer records: mean of windows or a crop."
)
@click.option(
    "--batch-records", type=click.IntRange(1), default=32, show_default=True, help="Records a request."
)
@click.option(
    "--batch-mb", type=click.FloatRange(0.01), default=16.0, show_default=True, help="MB of files a request."
)
@api_errors
def embed(
    paths: tuple[Path, ...], out: Path, model: str | None, batch_records: int, batch_mb: float, **options: Any
) -> None:
    """Embed the ECG records in PATHS (files, folders, zips: every record in them) and write the embeddings.

    Records are sent in batches (smaller ones when the service says a batch is over its limits). Records the
    service cannot read are listed and left out; the exit status is 1 when any was left out.
    """
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.BadParameter(
            f"'{out}': the file must end in {', '.join(OUTPUT_SUFFIXES)}", param_hint="--out"
        )
    records = find_records(paths)
    with records_bar(len(records), "embedding") as advance:
        result: EmbedResult = client().embed(
            records,
            model,
            batch_records=batch_records,
            batch_bytes=int(batch_mb * 1024 * 1024),
            progress=advance,
            **options,
        )
    written = write_embeddings(out, result)
    report_failures(result.failures, len(result.ids))
    console.print(
        f"{len(result.ids)} embeddings ({result.embeddings.shape[1]}-d, {result.model}) -> "
        + ", ".join(str(p) for p in written),
        highlight=False,
    )
    if result.failures:
        raise SystemExit(1)


@cli.command(
    epilog="""\b
Examples:
  ecgssl predict ../shared/data/ptb-diagnostic/s0010_re.hea
  ecgssl predict ../shared/data/ptbxl-500/records500/00000 --out predictions.csv"""
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="FILE.csv or FILE.json; default: a table."
)
@inference_options
@click.option("--method", type=click.Choice(["head", "knn"]), help="Default: the model's head, else kNN.")
@api_errors
def predict(
    paths: tuple[Path, ...], out: Path | None, model: str | None, method: str | None, **options: Any
) -> None:
    """Diagnosis probabilities and labels of the ECG records in PATHS (files, folders, zips)."""
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise click.BadParameter(f"'{out}': the file must end in .csv or .json", param_hint="--out")
    records = find_records(paths)
    with records_bar(len(records), "predicting") as advance:
        result: PredictResult = client().predict(records, model, method=method, progress=advance, **options)
    if out is not None:
        write_predictions(out, result.predictions)
        console.print(f"{len(result.predictions)} predictions -> {out}", highlight=False)
    else:
        classes = result.predictions[0]["classes"]
        first = result.predictions[0]
        table = Table("record", "labels", *classes, box=None, title=f"{first['model']}@{first['version']}")
        for p in result.predictions:
            table.add_row(
                p["id"], ", ".join(p["labels"]) or "-", *(f"{p['probabilities'][c]:.3f}" for c in classes)
            )
        console.print(table)
    report_failures(result.failures, len(result.predictions))
    if result.failures:
        raise SystemExit(1)


def main() -> None:
    cli(prog_name="ecgssl", auto_envvar_prefix=None)


if __name__ == "__main__":
    main()
