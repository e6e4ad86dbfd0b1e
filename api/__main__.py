"""``python -m api``: migrate the database, start the gateway (and, with --with-worker, one worker)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import uvicorn
from alembic import command
from alembic.config import Config

from services.config import get_settings

ROOT = Path(__file__).resolve().parents[1]


def migrate() -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


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
    Path(settings.artifact_dir).mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        migrate()
    worker = None
    if args.with_worker:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1",
             "--prefetch-multiplier", "1", "-l", "info", "-P", "solo"],
            env=os.environ.copy(),
        )  # fmt: skip
    print(f"ECG SSL service: http://{args.host}:{args.port}  (API docs: http://{args.host}:{args.port}/docs)")
    print(f"database {settings.database_url} | broker {settings.broker_url} | data root {settings.data_root}")
    try:
        uvicorn.run("api.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


if __name__ == "__main__":
    main()
