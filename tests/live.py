"""A live service for end-to-end tests: the api (uvicorn) and a Celery worker as real subprocesses on a real
database and broker, started as docker-compose.yml and the README start them. Test modules import the
fixtures they use (``from tests.live import production_service``)."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import DATA, ROOT, fresh_postgres_url, fresh_redis_url

WORKER_COMMAND = [
    sys.executable,
    "-m",
    "celery",
    "-A",
    "worker.celery_app",
    "worker",
    "-Q",
    "gpu",
    "-c",
    "1",
    "--prefetch-multiplier",
    "1",
    "-n",
    "e2e@%h",
    "-l",
    "info",
]  # fmt: skip, as in docker-compose.yml
TINY_JOB = {"dataset": "ptbxl-500", "epochs": 2, "record_limit": 32, "batch_size": 8, "learning_rate": 1e-3}


@dataclass
class Service:
    url: str
    database_url: str
    broker_url: str
    processes: list[subprocess.Popen]
    logs: list[Path]
    env: dict[str, str] | None = None
    embedded: bool = False  # SQLite + Celery's SQLAlchemy transport

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(
    env: dict[str, str],
    commands: list[list[str]],
    tmp: Path,
    ready: Callable[[httpx.Response], bool] = lambda health: health.status_code == 200,
) -> Service:
    """Start ``commands`` (the api first) and wait until ``ready(GET /health)``: by default healthy
    (database, broker and a worker heartbeat)."""
    port = free_port()
    logs, processes = [], []
    for i, command in enumerate(commands):
        command = [part.replace("{port}", str(port)) for part in command]
        log = tmp / f"process{i}.log"
        logs.append(log)
        processes.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    service = Service(
        f"http://127.0.0.1:{port}", env["ECGSSL_DATABASE_URL"], env["ECGSSL_BROKER_URL"], processes, logs, env
    )
    deadline = time.monotonic() + 120
    with service.client() as client:
        while time.monotonic() < deadline:
            for p in processes:
                if p.poll() is not None:
                    stop_service(service)
                    pytest.fail(f"a service process exited early:\n{dump_logs(service)}")
            try:
                if ready(client.get("/health")):
                    return service
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    stop_service(service)
    pytest.fail(f"the service did not become healthy in 120 s:\n{dump_logs(service)}")


def stop_service(service: Service) -> None:
    for p in service.processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in service.processes:
        stop_process(p)


def stop_process(p: subprocess.Popen) -> None:
    """SIGTERM to its process group (a warm shutdown), SIGKILL after 30 s."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def dump_logs(service: Service) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in service.logs)


def base_env(tmp: Path, database_url: str, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGSSL_")}
    env.update(
        ECGSSL_DATABASE_URL=database_url,
        ECGSSL_BROKER_URL=broker_url,
        ECGSSL_ARTIFACT_DIR=str(tmp / "artifacts"),
        ECGSSL_DATA_ROOT=str(DATA),
        ECGSSL_WORKER_HEARTBEAT_S="1",
        ECGSSL_WORKER_STALE_S="6",
        PYTHONUNBUFFERED="1",
    )
    return env


def migrated(env: dict[str, str]) -> dict[str, str]:
    """``env`` once its database is migrated (alembic upgrade head, as the compose 'migrate' service)."""
    migrate = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, capture_output=True
    )
    assert migrate.returncode == 0, migrate.stderr.decode()
    return env


@pytest.fixture(scope="module")
def production_service(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Service]:
    """api (uvicorn) + a prefork Celery worker on the machine's PostgreSQL and Redis."""
    tmp = tmp_path_factory.mktemp("prod")
    env = migrated(base_env(tmp, fresh_postgres_url(), fresh_redis_url()))
    py = sys.executable
    service = start_service(
        env,
        [[py, "-m", "api", "--host", "127.0.0.1", "--port", "{port}", "--no-migrate"], WORKER_COMMAND],
        tmp,
    )
    yield service
    stop_service(service)


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Service]:
    """The README's run command (`python -m api --with-worker`) on SQLite and the SQLAlchemy broker."""
    tmp = tmp_path_factory.mktemp("embedded")
    env = base_env(tmp, f"sqlite:///{tmp / 'ecgssl.db'}", f"sqla+sqlite:///{tmp / 'broker.db'}")
    service = start_service(env, [[sys.executable, "-m", "api", "--port", "{port}", "--with-worker"]], tmp)
    yield service
    stop_service(service)


def wait_for(client: httpx.Client, job_id: str, done: Callable[[dict], bool], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout_s} s; last state: {job}")
