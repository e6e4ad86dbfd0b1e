"""The OpenAPI document tells the truth (issue 13, item 5): schemathesis fuzzes the real server, and the bugs
it found stay fixed.

The fuzzing: ``schemathesis run`` (its CLI, as CI tools run it) sends generated requests, valid and invalid,
to every operation of the document that the real server (``python -m api``: uvicorn) serves, and checks each
answer: no server error, a documented status, content type, headers and body, invalid data refused, a 405
with the right ``Allow`` for an undeclared method, and (API key configured) no mutating route served without
the key or with a wrong one. ``positive_data_acceptance`` is left out: data the schema allows is refused where
what it names does not exist on this server (a dataset path, an ECG that is not one), a 422 by design.

The server runs on a fresh PostgreSQL database and a Redis index of its own, without a worker (a job it
queues stays queued: no fuzz case trains anything), and on an empty data root (no generated or example path
can register a real dataset or import a checkpoint: those are quick 422s). A tiny model is registered under
the name the document's examples use (st_mem-tiny, versions 1 and 2), so that the model routes answer 200s
too. Two runs: with no API key configured, and with one (sent with every request, to the mutating routes: the
ones it guards).

Bounded and reproducible: the document's examples, the coverage phase's boundary cases, and MAX_EXAMPLES
generated cases per operation, from a fixed seed, one request at a time.
"""

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, fresh_postgres_url, fresh_redis_url, needs_servers

MAX_EXAMPLES = 10
SEED = 13
API_KEY = "fuzz-key"
EXAMPLE_MODEL = "st_mem-tiny"  # the model name of the document's examples
HAS_SCHEMATHESIS = importlib.util.find_spec("schemathesis") is not None

# Every check schemathesis has but positive_data_acceptance (see above); per operation, what is allowed, and
# why (in the file, not on the command line, whose checks override the per-operation settings).
CONFIG = """
[checks]
positive_data_acceptance.enabled = false

# GET /health answers 503 (documented, HealthOut) while no worker is live: here, always.
[[operations]]
include-path = "/health"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

# '/models/{name}' also matches '/models/import': GET on it asks for a model named 'import' (a 404 here), so
# the path takes GET and POST though the document lists POST alone there.
[[operations]]
include-path = "/models/import"
checks.unsupported_method.enabled = false
checks.allow_header_conformance.enabled = false
"""


@dataclass
class Server:
    url: str
    database_url: str
    api_key: str | None
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, api_key: str | None) -> Server:
    data_root = tmp / "data"
    data_root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGSSL_")}
    env.update(
        ECGSSL_DATABASE_URL=fresh_postgres_url(),
        ECGSSL_BROKER_URL=fresh_redis_url(),
        ECGSSL_ARTIFACT_DIR=str(tmp / "artifacts"),
        ECGSSL_DATA_ROOT=str(data_root),
        ECGSSL_SHIP_DEFAULT_MODEL="false",
        PYTHONUNBUFFERED="1",
    )
    if api_key:
        env["ECGSSL_API_KEY"] = api_key
    port = free_port()
    log = tmp / "api.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", str(port)],  # migrates, then serves
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", env["ECGSSL_DATABASE_URL"], api_key, process, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the API exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/openapi.json", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(server)
    pytest.fail(f"the API did not answer in 90 s:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def register_example_model(database_url: str, ref: str) -> None:
    """Versions 1 and 2 of EXAMPLE_MODEL (1 its 'production') in the server's database: the files of the tiny
    test model, which the test run's database has."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from services.db.session import session_scope
    from services.registry import register_model_version, resolve_model_version, set_alias

    with session_scope() as s:
        v = resolve_model_version(s, ref)
        fields = dict(
            method=v.model.method,
            source_job_id=None,
            onnx_path=v.onnx_path,
            sha256=v.sha256,
            input_spec=v.input_spec,
            embedding_dim=v.embedding_dim,
            parity_max_abs_diff=v.parity_max_abs_diff,
            metrics={},
            variants=v.variants,
        )
    engine = create_engine(database_url)
    with Session(engine) as s:
        for _ in range(2):
            register_model_version(s, name=EXAMPLE_MODEL, **fields)
        set_alias(s, EXAMPLE_MODEL, "production", 1)
        s.commit()
    engine.dispose()


@pytest.fixture(params=["no API key", "API key"])
def fuzz_server(
    request: pytest.FixtureRequest, tmp_path: Path, registered_tiny_model: tuple
) -> Iterator[Server]:
    server = start_server(tmp_path, API_KEY if request.param == "API key" else None)
    try:
        register_example_model(server.database_url, registered_tiny_model[0])
        yield server
    finally:
        stop_server(server)


def run_schemathesis(server: Server, workdir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """``schemathesis run`` against the server: its output, and its JSON report."""
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    report = workdir / "report.json"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{server.url}/openapi.json",
        "--phases=examples,coverage,fuzzing",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--workers=1",
        "--generation-database=none",
        "--request-timeout=30",
        "--report=json",
        f"--report-json-path={report}",
    ]
    if server.api_key:  # the routes the key guards: the mutating ones (reading stays open)
        command += ["--header", f"Authorization: Bearer {server.api_key}", "--exclude-method=GET"]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    return done, json.loads(report.read_text()) if report.is_file() else {}


@needs_servers
@pytest.mark.skipif(not HAS_SCHEMATHESIS, reason="schemathesis is not installed (pip install -e '.[dev]')")
def test_fuzzing_finds_no_server_error_and_nothing_undocumented(fuzz_server: Server, tmp_path: Path) -> None:
    done, report = run_schemathesis(fuzz_server, tmp_path)
    output = (done.stdout + done.stderr)[-12000:]
    assert done.returncode == 0, output
    operations = 12 if fuzz_server.api_key else 26
    assert report["operations"]["tested"] == report["operations"]["selected"] == operations, output
    assert report["failures"] == [] and report["errors"] == [], output
    assert report["test_cases"]["generated"] > operations * MAX_EXAMPLES, output
    assert "Traceback" not in fuzz_server.log.read_text(), fuzz_server.log.read_text()[-4000:]
    print(
        f"schemathesis ({'API key' if fuzz_server.api_key else 'no API key'}): {report['test_cases']} "
        f"over {report['operations']['tested']} operations in {report['running_time']:.1f} s"
    )


# --------------------------------------------------------------------------------------------------
# The document itself, and what the fuzzing found (in-process: quick)


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    """The app with server errors answered as 500s (not raised into the test), to assert there are none."""
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_documented(api: TestClient, method: str, path: str, response: httpx.Response) -> None:
    """The answer's status is documented for the operation, and its body, content type and headers are."""
    schemathesis = pytest.importorskip("schemathesis")
    operation = schemathesis.openapi.from_dict(api.app.openapi())[path][method]
    documented = operation.definition.raw["responses"]
    assert str(response.status_code) in documented, f"{response.status_code} not in {sorted(documented)}"
    operation.validate_response(response)  # raises, naming what does not conform


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_the_document_is_valid_openapi(
    api: TestClient, settings_env: pytest.MonkeyPatch, api_key: str | None
) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    if api_key:
        settings_env.setenv("ECGSSL_API_KEY", api_key)
    document = api.get("/openapi.json").json()
    validator.validate(document)
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's: detail a list only
    guarded = document["paths"]["/jobs/pretrain"]["post"]["security"]
    # without a key the service takes requests without one: the document says so
    assert guarded == ([{"HTTPBearer": []}] if api_key else [{}, {"HTTPBearer": []}])
    assert "security" not in document["paths"]["/jobs"]["get"]


def test_a_body_that_is_not_utf8_is_a_documented_400(api: TestClient) -> None:
    """Found by the fuzzing: FastAPI answers 400 to a JSON body it cannot decode; no route documented it."""
    response = api.post("/jobs/pretrain", content=b"\xff[", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert_documented(api, "POST", "/jobs/pretrain", response)
    for path, operations in api.app.openapi()["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                assert "400" in operation["responses"], f"{method.upper()} {path}"


def test_get_on_a_post_only_path_is_a_405_not_a_malformed_job_id(api: TestClient) -> None:
    """Found by the fuzzing: GET /jobs/pretrain was read as the job 'pretrain' (a 422: not a UUID)."""
    for kind in ("pretrain", "finetune", "evaluate"):
        response = api.get(f"/jobs/{kind}")
        assert response.status_code == 405 and response.headers["allow"] == "POST", response.text
    assert api.get("/jobs/not-a-uuid").status_code == 404  # only a UUID names a job
    assert api.get(f"/jobs/{uuid.uuid4()}").json()["detail"].endswith("does not exist")


def test_a_405_allows_every_method_of_the_path(api: TestClient) -> None:
    """Found by the fuzzing: Starlette's 405 named the methods of the first route of the path only."""
    assert api.options("/datasets").headers["allow"] == "GET, POST"
    assert api.patch("/models/a/aliases/b").headers["allow"] == "GET, PUT, DELETE"
    response = api.delete("/health")
    assert response.status_code == 405 and response.headers["allow"] == "GET"


def test_error_answers_are_documented_with_their_real_bodies(
    api: TestClient, settings_env: pytest.MonkeyPatch
) -> None:
    cases = [  # (method, path in the document, url, request arguments, status)
        ("POST", "/jobs/pretrain", "/jobs/pretrain", {"json": {"dataset": "d", "learning_rate": -1}}, 422),
        ("POST", "/jobs/pretrain", "/jobs/pretrain", {"json": {"dataset": "no-such-dataset"}}, 422),
        ("GET", "/jobs/{job_id}", f"/jobs/{uuid.uuid4()}", {}, 404),
        ("POST", "/jobs/{job_id}/cancel", f"/jobs/{uuid.uuid4()}/cancel", {}, 404),
        ("GET", "/jobs", "/jobs?limit=0", {}, 422),
        ("GET", "/datasets/{dataset_id}", "/datasets/99999999999999999999", {}, 422),
        ("GET", "/datasets/{dataset_id}", "/datasets/no-such-dataset", {}, 404),
        ("GET", "/models/{name}", "/models/no-such-model", {}, 404),
        ("GET", "/models/{name}/aliases/{alias}", "/models/m/aliases/Not-An-Alias", {}, 404),
        ("POST", "/embed", "/embed?model=no-such-model", {"files": {"files": ("a.npy", b"x")}}, 404),
        (
            "POST",
            "/embed",
            "/embed",
            {"content": b"x", "headers": {"content-type": "multipart/form-data"}},  # no boundary
            400,
        ),
        ("POST", "/predict", "/predict?precision=fp64", {"files": {"files": ("a.npy", b"x")}}, 422),
    ]
    for method, path, url, kwargs, status in cases:
        response = api.request(method, url, **kwargs)
        assert response.status_code == status, (url, response.text)
        assert_documented(api, method, path, response)
    health = api.get("/health")  # 503 (no live worker) or 200: both documented, as HealthOut
    assert_documented(api, "GET", "/health", health)
    settings_env.setenv("ECGSSL_API_KEY", "s3cret")
    refused = api.post("/jobs/pretrain", json={"dataset": "d"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert_documented(api, "POST", "/jobs/pretrain", refused)


def test_ids_out_of_range_are_a_4xx(api: TestClient) -> None:
    """Integers past the 32-bit columns never reach PostgreSQL ('integer out of range' was a 500)."""
    assert api.get("/datasets/99999999999999999999").status_code == 422
    assert api.get("/datasets/2147483648").status_code == 422
    assert api.get("/models/m/versions/2147483648").status_code == 422
    assert api.put("/models/m/aliases/a", json={"version": 2**31}).status_code == 422
    too_long = api.get("/datasets/" + "a" * 201)
    assert too_long.status_code == 422 and "over 200 characters" in too_long.json()["detail"]


def test_the_dataset_reference_rule_is_the_documented_one(api: TestClient) -> None:
    """GET /datasets/{dataset_id}: what the document allows, the route looks up (200 or 404); what it does
    not, the route refuses (422). (A name of digits and spaces, such as '1 2', is the exception:
    the document refuses it, the route looks it up.)"""
    jsonschema = pytest.importorskip("jsonschema")
    (parameter,) = api.app.openapi()["paths"]["/datasets/{dataset_id}"]["get"]["parameters"]
    samples = ["1", "2147483647", "ptbxl-500", "-1", "a b", "²", "Zürich", "x" * 200, "0", "2147483648",
               "9" * 30, "x" * 201, " ", "a\x00b", "a\x1fb", "a\x85b"]  # fmt: skip
    for text in samples:
        valid = jsonschema.Draft202012Validator(parameter["schema"]).is_valid(
            int(text) if text.isascii() and text.isdigit() else text
        )
        status = api.get("/datasets/" + quote(text, safe="")).status_code
        assert status in ((200, 404) if valid else (422,)), (text, status)


def answer_and_state_at_answer(
    api: TestClient, method: str, path: str, body: dict | None, state: Callable[[], object]
) -> tuple[int, object]:
    """Call the app over ASGI; return the status and ``state()`` as seen the moment the answer starts (a real
    server's client may act on the answer from then on)."""
    payload = json.dumps(body).encode() if body is not None else b""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    seen: dict[str, object] = {}

    async def receive() -> dict:
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            seen["status"], seen["state"] = message["status"], state()

    asyncio.run(api.app(scope, receive, send))
    return seen["status"], seen["state"]


def test_a_write_is_committed_before_its_answer(api: TestClient) -> None:
    """Found by the fuzzing: the request's session committed after the answer was sent, so a client acting on
    a 201 at once could miss the row, and registering the same name again right away was a 500 (its check ran
    before the first commit, its insert after)."""
    from sqlalchemy import select

    from services.db.models import Dataset, Job, JobStatus
    from services.db.session import session_scope

    name = f"synthetic-{uuid.uuid4().hex[:8]}"

    def dataset_row() -> int | None:
        with session_scope() as s:
            return s.scalar(select(Dataset.id).where(Dataset.name == name))

    body = {"name": name, "kind": "synthetic", "options": {"n": 4}}
    status, row = answer_and_state_at_answer(api, "POST", "/datasets", body, dataset_row)
    assert status == 201 and row is not None
    assert api.post("/datasets", json=body).status_code == 409

    with session_scope() as s:
        job = Job(kind="evaluate", status=JobStatus.queued, params={}, epochs=0)
        s.add(job)
        s.flush()
        job_id = job.id

    def job_status() -> str:
        with session_scope() as s:
            return s.get(Job, job_id).status

    status, state = answer_and_state_at_answer(api, "POST", f"/jobs/{job_id}/cancel", None, job_status)
    assert status == 200 and state == JobStatus.cancelled


@needs_servers
def test_registering_a_name_another_request_is_registering_is_a_409() -> None:
    """Two registrations of one name at once: the second's check runs before the first commits, its insert
    after (a unique violation: was a 500)."""
    from sqlalchemy.orm import Session

    from services.datasets.registry import DatasetRequest, register_dataset
    from services.db.session import get_engine
    from services.errors import ConflictError

    request = DatasetRequest(name=f"race-{uuid.uuid4().hex[:8]}", kind="synthetic", options={"n": 4})
    outcome: list[object] = []

    def second() -> None:
        with Session(get_engine()) as s:
            try:
                register_dataset(s, request)
                s.commit()
                outcome.append("registered")
            except Exception as exc:  # noqa: BLE001  (the outcome is the assertion)
                outcome.append(exc)

    with Session(get_engine()) as first:
        register_dataset(first, request)  # inserted, not committed
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)  # the second has checked the name (free) and waits on the first's insert
        first.commit()
        thread.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], ConflictError), outcome
