"""Logs of the gateway and the worker: one configuration (text or JSON lines), request and job ids on every
record, third-party INFO chatter silenced, and the worker's one line per training epoch.

``ECGSSL_LOG_FORMAT=json`` writes one JSON object per line (python-json-logger) with ``time``, ``level``,
``logger``, ``message``, ``request_id`` (the gateway: the request's ``X-Request-ID``) and ``job_id`` (the
worker: the job its task runs). ``python -m api`` passes ``logging_config()`` to uvicorn; the worker installs
it from Celery's ``setup_logging`` signal (``worker/celery_app.py``).
"""

import logging
import logging.config
import os
import uuid
from contextvars import ContextVar

from services.config import get_settings

log = logging.getLogger("services.epochs")

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("job_id", default=None)

# packages whose INFO lines say nothing an operator needs (ONNX Runtime's quantiser writes one line per
# tensor through the root logger, matplotlib its font cache, numba its compilation passes)
QUIET_PACKAGES = ("onnxruntime", "onnx", "matplotlib", "numba", "PIL", "fontTools", "h5py")
_QUIET_PATHS = tuple(f"{os.sep}{name}{os.sep}" for name in QUIET_PACKAGES)
# the quantiser's 'Please consider to run pre-processing before quantization' (a WARNING, at every variant)
_QUANTISER_PATH = f"{os.sep}onnxruntime{os.sep}quantization{os.sep}"


class ContextIds(logging.Filter):
    """Adds ``request_id`` and ``job_id`` (None when there is none) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.job_id = JOB_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, whose ``%(ids)s`` is ' [request ..., job ...]' (empty without ids)."""

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"request {record.request_id}"] if getattr(record, "request_id", None) else []
        ids += [f"job {record.job_id}"] if getattr(record, "job_id", None) else []
        record.ids = f" [{', '.join(ids)}]" if ids else ""
        return super().format(record)


class QuietThirdParty(logging.Filter):
    """Drops INFO and DEBUG records of ``QUIET_PACKAGES`` whatever logger they come through (by the file
    that logged them, since some log through the root logger), and the quantiser's warnings below ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        path = record.pathname or ""
        if _QUANTISER_PATH in path:
            return False
        if record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] not in QUIET_PACKAGES and not any(p in path for p in _QUIET_PATHS)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(job_id)s"


def logging_config(level: str | int = "INFO", log_format: str | None = None) -> dict:
    """A ``logging.config.dictConfig`` for the root logger and uvicorn's loggers (one handler on stderr)."""
    log_format = log_format or get_settings().log_format
    if log_format == "json":
        formatter = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_FIELDS,
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    else:
        formatter = {"()": TextFormatter, "format": TEXT_FORMAT}
    level = logging.getLevelName(level) if isinstance(level, int) else level.upper()
    quiet = {name: {"level": "WARNING"} for name in QUIET_PACKAGES}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"ids": {"()": ContextIds}, "quiet": {"()": QuietThirdParty}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["ids", "quiet"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["default"]},
        "loggers": {
            **quiet,
            # uvicorn's own loggers through the root handler (its default config gives them their own)
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
        },
    }


def configure_logging(level: str | int = "INFO", log_format: str | None = None) -> None:
    logging.config.dictConfig(logging_config(level, log_format))


def new_request_id(given: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a plausible id (1-128 printable ASCII characters without
    spaces), else a new one (32 hex digits)."""
    if given and len(given) <= 128 and given.isascii() and given.isprintable() and " " not in given:
        return given
    return uuid.uuid4().hex


def log_epoch(job_id: object, kind: str, epoch: int, epochs: int | None, metrics: dict[str, float]) -> None:
    """The worker's one INFO line per training epoch (and its duration in the epoch histogram): job, epoch
    of epochs, train loss, the validation figures, seconds and samples/s. ``metrics``: the loop's epoch
    metrics (with ``epoch_s``; an ensemble member's names carry its prefix, e.g. ``member2_``)."""
    from services.observability.metrics import EPOCH_SECONDS

    def pick(suffix: str) -> tuple[str, float] | None:
        return next(((k, v) for k, v in metrics.items() if k.endswith(suffix)), None)

    train_loss, seconds, rate = pick("train_loss"), pick("epoch_s"), pick("samples_per_s")
    member = train_loss[0].removesuffix("train_loss").rstrip("_") if train_loss else ""
    validation = ", ".join(
        f"{k.removeprefix(member + '_') if member else k} {v:.4f}"
        for k, v in metrics.items()
        if k.removeprefix(f"{member}_").startswith("val_")
    )
    parts = [f"job {job_id}", f"{kind}{f' ({member})' if member else ''}", f"epoch {epoch}/{epochs or '?'}"]
    if train_loss:
        parts.append(f"train_loss {train_loss[1]:.4f}")
    parts.append(validation or "no validation")
    if seconds:
        parts.append(f"{seconds[1]:.1f} s")
        EPOCH_SECONDS.labels(kind=kind).observe(seconds[1])
    if rate:
        parts.append(f"{rate[1]:.1f} samples/s")
    log.info(" | ".join(parts))
