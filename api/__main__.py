"""``python -m api``: migrate the database, start the gateway (and, with --with-worker, one worker)."""

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import uvicorn
from alembic import command
from alembic.config import Config

from services.config import get_settings
from services.observability.logs import configure_logging, logging_config

ROOT = Path(__file__).resolve().parents[1]


def migrate() -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


WORKER_GRACE_S = 5.0  # a worker still busy this long after its warm shutdown began is killed


def _exit_on(signum: int, _frame: object) -> None:
    """SIGTERM (and SIGINT once uvicorn has handed it back) leaves ``main`` through its ``finally``."""
    raise SystemExit(128 + signum)


def stop_worker(worker: subprocess.Popen) -> None:
    """Stop the embedded worker without waiting for its job. SIGTERM first (Celery's warm shutdown): an idle
    worker exits at once and forgets its heartbeat. One still running a job after ``WORKER_GRACE_S`` is
    killed, as in a crash (Celery's cold shutdown cannot stop a task of the solo pool): the job stays
    ``running``, its task unacknowledged (acks late), on a worker that no longer beats; the next worker to
    start re-queues it once that worker counts as gone (``ECGSSL_WORKER_STALE_S``), and it resumes from its
    last checkpoint."""
    if worker.poll() is None:
        worker.terminate()
    try:
        worker.wait(timeout=WORKER_GRACE_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--with-worker", action="store_true", help="also start one Celery worker (embedded mode)"
    )
    parser.add_argument("--no-migrate", action="store_true", help="skip 'alembic upgrade head'")
    args = parser.parse_args()

    settings = get_settings()
    configure_logging()
    Path(settings.artifact_dir).mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        migrate()
    # uvicorn answers SIGTERM and SIGINT with a graceful shutdown, then raises the signal again: with these
    # handlers that ends in the ``finally`` below (with the default SIGTERM action it would kill this process
    # on the spot and leave the worker running, adopted by init)
    signal.signal(signal.SIGTERM, _exit_on)
    signal.signal(signal.SIGINT, _exit_on)
    print(f"ECG SSL service: http://{args.host}:{args.port}  (API docs: http://{args.host}:{args.port}/docs)")
    print(f"database {settings.database_url} | broker {settings.broker_url} | data root {settings.data_root}")
    worker = None
    try:
        if args.with_worker:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1",
                 "--prefetch-multiplier", "1", "-l", "info", "-P", "solo"],
                env=os.environ.copy(),
            )  # fmt: skip
        uvicorn.run(
            "api.main:app", host=args.host, port=args.port, log_level="info", log_config=logging_config()
        )
    finally:
        if worker is not None:
            stop_worker(worker)


if __name__ == "__main__":
    main()
