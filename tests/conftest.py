"""Test set-up on the machine's real PostgreSQL and Redis, and the real ECGs in ../shared/data.

Before any service module reads its settings, the whole test run is pointed at a fresh PostgreSQL
database (dropped at the end) and its own Redis database index; every test that needs more isolation
(the end-to-end runs) makes its own database with ``fresh_postgres_url``.
"""

import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
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
