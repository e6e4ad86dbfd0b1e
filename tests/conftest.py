"""Test set-up on the machine's real PostgreSQL and Redis, and the real ECGs in ../shared/data.

Before any service module reads its settings, the whole test run is pointed at a fresh PostgreSQL
database (dropped at the end) and its own Redis database index; every test that needs more isolation
(the end-to-end runs) makes its own database with ``fresh_postgres_url``.
"""

import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import redis

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CHECKPOINT_KEYS = ROOT.parent / "shared" / "reference" / "checkpoint-keys.txt"
PG_ADMIN = os.environ.get("ECGSSL_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("ECGSSL_TEST_REDIS", "redis://127.0.0.1:6379")

_created_databases: list[str] = []
_tmp = Path(tempfile.mkdtemp(prefix="ecgssl-tests-"))


def fresh_postgres_url() -> str:
    """Create an empty PostgreSQL database for one test (or run) and return its SQLAlchemy URL."""
    name = f"ecgssl_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _created_databases.append(name)
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


_redis_db = random.randint(1, 15)  # concurrent local runs rarely share an index


def fresh_redis_url() -> str:
    """A Redis database index of its own (1-15), emptied first."""
    global _redis_db
    _redis_db = _redis_db % 15 + 1
    url = f"{REDIS_BASE}/{_redis_db}"
    redis.Redis.from_url(url).flushdb()
    return url


def _servers_reachable() -> str | None:
    """None when PostgreSQL and Redis answer, else why not."""
    try:
        psycopg.connect(PG_ADMIN, connect_timeout=5).close()
        redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=5).ping()
    except Exception as exc:
        return f"PostgreSQL ({PG_ADMIN}) and Redis ({REDIS_BASE}) are not both reachable: {exc}"
    return None


SERVERS_MISSING: str | None = None

needs_servers = pytest.mark.skipif(
    "config.SERVERS_MISSING is not None", reason="needs PostgreSQL and Redis on this machine"
)


def pytest_configure(config: pytest.Config) -> None:
    global SERVERS_MISSING
    SERVERS_MISSING = _servers_reachable()
    config.SERVERS_MISSING = SERVERS_MISSING  # read by the needs_servers marker
    if SERVERS_MISSING and os.environ.get("CI"):
        raise pytest.UsageError(f"{SERVERS_MISSING}\n.ci/run starts them; CI never runs without them")
    if SERVERS_MISSING:
        # A machine with only Python: everything runs on the embedded default; the tests that are about
        # PostgreSQL or Redis themselves are skipped, and the terminal summary says so.
        os.environ["ECGSSL_DATABASE_URL"] = f"sqlite:///{_tmp / 'ecgssl.db'}"
        os.environ["ECGSSL_BROKER_URL"] = f"sqla+sqlite:///{_tmp / 'broker.db'}"
    else:
        os.environ["ECGSSL_DATABASE_URL"] = fresh_postgres_url()
        os.environ["ECGSSL_BROKER_URL"] = fresh_redis_url()
    os.environ["ECGSSL_ARTIFACT_DIR"] = str(_tmp / "artifacts")
    os.environ["ECGSSL_DATA_ROOT"] = str(DATA)
    os.environ.pop("ECGSSL_API_KEY", None)
    os.environ.pop("ECGSSL_DEFAULT_MODEL", None)
    os.environ["ECGSSL_SHIP_DEFAULT_MODEL"] = "false"  # tests that need the shipped model register it
    from alembic import command
    from alembic.config import Config

    alembic_config = Config(str(ROOT / "alembic.ini"))
    alembic_config.attributes["configure_logger"] = False
    command.upgrade(alembic_config, "head")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if SERVERS_MISSING:
        terminalreporter.write_line(
            f"NOTE: ran on the embedded default only; {SERVERS_MISSING}. The PostgreSQL/Redis tests were "
            "skipped: start both (see README) for the full suite.",
            yellow=True,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _created_databases:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for name in _created_databases:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    shutil.rmtree(_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "ptbxl-500" / "ptbxl_database.csv").is_file():
        pytest.skip(f"the real ECGs of ../shared/data are not at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def ptbxl_dir(data_dir: Path) -> Path:
    return data_dir / "ptbxl-500"


@pytest.fixture(scope="session")
def ptb_record(data_dir: Path) -> Path:
    """The 1000 Hz, 15-channel PTB Diagnostic record (its .hea path)."""
    return data_dir / "ptb-diagnostic" / "s0010_re.hea"


@pytest.fixture
def tmp_artifacts() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ecgssl-art-", dir=_tmp))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def client() -> Iterator["TestClient"]:
    """The FastAPI app in-process, on this run's PostgreSQL and Redis."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


class SettingsEnv:
    """A monkeypatch whose setenv/delenv also drop the cached settings, so that the next ``get_settings()``
    reads them, whatever read the settings before (a database session reads them too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self._monkeypatch = monkeypatch

    def setenv(self, name: str, value: str, prepend: str | None = None) -> None:
        from services.config import get_settings

        self._monkeypatch.setenv(name, value, prepend)
        get_settings.cache_clear()

    def delenv(self, name: str, raising: bool = True) -> None:
        from services.config import get_settings

        self._monkeypatch.delenv(name, raising)
        get_settings.cache_clear()

    def __getattr__(self, name: str):  # noqa: ANN204  (setattr, undo, ...)
        return getattr(self._monkeypatch, name)


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[SettingsEnv]:
    """Change ECGSSL_* settings for one test; the cached settings are rebuilt on every change and after."""
    from services.config import get_settings

    get_settings.cache_clear()
    yield SettingsEnv(monkeypatch)
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def registered_tiny_model(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple:
    """A tiny random-weight ST-MEM encoder exported to ONNX and registered: (name@version, encoder)."""
    import torch

    from services.db.session import session_scope
    from services.ecg.preprocess import InputSpec, preprocess
    from services.ecg.readers import read_wfdb
    from services.models.st_mem import SIZES, StMemEncoder
    from services.registry import register_model_version
    from services.registry.publish import publish

    torch.manual_seed(0)
    encoder = StMemEncoder(SIZES["tiny"]).eval()
    spec = InputSpec()
    windows = preprocess(read_wfdb(data_dir / "ptbxl-500/records500/00000/00001_hr.hea"), spec)
    path = tmp_path_factory.mktemp("model") / "encoder.onnx"
    with session_scope() as s:
        version = publish(
            encoder,
            windows,
            path,
            spec,
            lambda published: register_model_version(
                s,
                name=f"test-tiny-{uuid.uuid4().hex[:6]}",
                method="st_mem",
                source_job_id=None,
                metrics={},
                **published.fields(),
            ),
        )
        return version.ref, encoder


# the official checkpoints' parameter names and shapes (../shared/reference/checkpoint-keys.txt)


def parse_reference(path: Path) -> dict[str, dict]:
    """Sections of checkpoint-keys.txt: {title: {entry, tensors, elements, listed {name: shape}, last}}."""
    sections: dict[str, dict] = {}
    current: dict | None = None
    head = re.compile(r"### (.+?) checkpoint \['(\w+)'\] \(.*\): (\d+) tensors, ([\d,]+) elements")
    row = re.compile(r"\s+([\w.]+)\s+\(([\d, ]*)\)\s*$")
    more = re.compile(r"\s+\.\.\. \((\d+) more; last: ([\w.]+) \(([\d, ]*)\)\)")

    def shape(text: str) -> tuple[int, ...]:
        return tuple(int(d) for d in text.replace(" ", "").split(",") if d)

    for line in path.read_text().splitlines():
        if m := head.match(line):
            current = sections[m.group(1)] = {
                "entry": m.group(2),
                "tensors": int(m.group(3)),
                "elements": int(m.group(4).replace(",", "")),
                "listed": {},
            }
        elif current is not None and (m := more.match(line)):
            current["more"], current["last"] = int(m.group(1)), (m.group(2), shape(m.group(3)))
        elif current is not None and (m := row.match(line)):
            current["listed"][m.group(1)] = shape(m.group(2))
    return sections


def checkpoint_key_sections() -> dict[str, dict]:
    """``parse_reference`` of the shared listing; the calling test is skipped when it is missing."""
    if not CHECKPOINT_KEYS.is_file():
        pytest.skip(f"no reference key list at {CHECKPOINT_KEYS}")
    return parse_reference(CHECKPOINT_KEYS)


# The live-service fixtures (api + worker subprocesses), for every test module that needs them.
from tests.live import embedded_service, production_service  # noqa: E402, F401
