"""Thin routers, and batch limits that count records.

- The routers (``api/routers/*.py``, read with ``ast``) hold no SQL (no sqlalchemy import, no ``select(``,
  no query on a session) and import no other router; the upload form and the database session are declared
  once, in ``api/deps.py``; services build no HTTP (no fastapi/starlette import, no status code, no
  ``Server-Timing`` header).
- The per-request cap of POST /embed/batch counts records, not files: a zip of 70 WFDB records is 70 records,
  refused as a whole with 413 over the cap, served with 70 results under it; POST /embed and /predict with a
  zip of several records say to use POST /embed/batch (or that they take one record); a zip expanding past
  the upload limit fails the whole batch. On real PTB-XL records (../shared/data).
"""

import ast
import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.db.session import session_scope
from services.registry.shipped import FILES, MANIFEST, SHIPPED_DIR, register_shipped_model
from tests.conftest import ROOT, fresh_postgres_url
from tests.live import base_env, migrated, start_service, stop_service
from tests.test_readers import zip_of

ROUTERS = sorted((ROOT / "api" / "routers").glob("*.py"))
SESSION_QUERIES = {
    "execute",
    "scalars",
    "scalar",
    "query",
    "get",
    "add",
    "add_all",
    "delete",
    "merge",
    "flush",
}
RECORDS_100HZ = "ptbxl-500/records100/00000"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def _called(tree: ast.Module) -> list[tuple[str | None, str, int]]:
    """(receiver name or None, function name, line) of every call."""
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            calls.append((None, func.id, node.lineno))
        elif isinstance(func, ast.Attribute):
            receiver = func.value.id if isinstance(func.value, ast.Name) else None
            calls.append((receiver, func.attr, node.lineno))
    return calls


def test_the_routers_are_found() -> None:
    names = {path.stem for path in ROUTERS}
    assert {"datasets", "embed", "jobs", "models", "predict", "health"} <= names, names


@pytest.mark.parametrize("path", ROUTERS, ids=lambda p: p.name)
def test_a_router_holds_no_sql(path: Path) -> None:
    tree = _tree(path)
    sql_imports = [m for m in _imported_modules(tree) if m.split(".")[0] == "sqlalchemy"]
    assert not sql_imports, f"{path.name} imports {sql_imports}: queries belong in services"
    for receiver, name, line in _called(tree):
        assert name not in ("select", "text"), f"{path.name}:{line} builds SQL ({name}(...))"
        assert not (receiver in ("session", "s", "db") and name in SESSION_QUERIES), (
            f"{path.name}:{line} queries the session ({receiver}.{name}): call a services function"
        )


@pytest.mark.parametrize("path", ROUTERS, ids=lambda p: p.name)
def test_a_router_imports_no_other_router(path: Path) -> None:
    imported = _imported_modules(_tree(path))
    others = [m for m in imported if m.startswith(("api.routers", ".")) and m.rstrip(".") != ""]
    assert not others, f"{path.name} imports {others}: shared code belongs in api/deps.py or services"


@pytest.mark.parametrize("path", ROUTERS, ids=lambda p: p.name)
def test_request_dependencies_are_declared_once_in_deps(path: Path) -> None:
    """The upload form (File/Form parameters) and the database session come from ``api/deps.py``."""
    tree = _tree(path)
    for _receiver, name, line in _called(tree):
        assert name not in ("File", "Form"), f"{path.name}:{line} declares an upload field: use api.deps"
    assert "db_session" not in path.read_text(), f"{path.name}: use api.deps.SessionDep"


@pytest.mark.parametrize("path", ROUTERS, ids=lambda p: p.name)
def test_a_router_leaves_the_transaction_to_its_session(path: Path) -> None:
    """``SessionDep`` commits when the route returns, before the answer (test_openapi_fuzz checks when)."""
    for _receiver, name, line in _called(_tree(path)):
        assert name not in ("commit", "rollback"), f"{path.name}:{line} ends the transaction itself"


def test_services_build_no_http() -> None:
    """Services raise ``services.errors`` kinds; status codes and headers are the API's."""
    for path in sorted((ROOT / "services").rglob("*.py")):
        tree = _tree(path)
        web = [m for m in _imported_modules(tree) if m.split(".")[0] in ("fastapi", "starlette")]
        assert not web, f"{path.relative_to(ROOT)} imports {web}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id if isinstance(t, ast.Name) else getattr(t, "attr", None) for t in targets]
                assert "status_code" not in names, f"{path.relative_to(ROOT)}:{node.lineno} sets a status"
        headers = [
            n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "Server-Timing"
        ]
        assert not headers, f"{path.relative_to(ROOT)}:{headers} writes the Server-Timing header"


# --------------------------------------------------------------------------------------------------
# batch limits on real records


@pytest.fixture(scope="module")
def tiny_model(registered_tiny_model: tuple) -> str:
    return registered_tiny_model[0]


@pytest.fixture(scope="module")
def diagnosis_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped diagnosis model (models/default) registered under a name of this module's own."""
    folder = tmp_path_factory.mktemp("diagnosis")
    for name in FILES:
        shutil.copyfile(SHIPPED_DIR / name, folder / name)
    manifest = json.loads((SHIPPED_DIR / MANIFEST).read_text())
    manifest["name"] = f"test-diagnosis-{uuid.uuid4().hex[:6]}"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with session_scope() as session:
        return register_shipped_model(session, folder).ref


@pytest.fixture(scope="module")
def headers(data_dir: Path) -> list[Path]:
    """The .hea files of the first 70 PTB-XL records at 100 Hz (10 s, 12 leads each)."""
    found = sorted((data_dir / RECORDS_100HZ).glob("*_lr.hea"))[:70]
    assert len(found) == 70
    return found


def record_members(headers: list[Path], folder: str = "scan") -> dict[str, bytes]:
    """Each record's .hea and .dat, one subfolder per record: two zip members per record."""
    return {
        f"{folder}/{h.stem}/{p.name}": p.read_bytes() for h in headers for p in (h, h.with_suffix(".dat"))
    }


def wfdb_files(header: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in (header, header.with_suffix(".dat"))]


def test_a_zip_of_70_records_counts_70_against_the_records_cap(
    client: TestClient, tiny_model: str, headers: list[Path], settings_env: pytest.MonkeyPatch
) -> None:
    upload = [("files", ("scan.zip", zip_of(record_members(headers))))]  # 140 files, 70 records
    settings_env.setenv("ECGSSL_SERVE_MAX_RECORDS", "64")
    refused = client.post("/embed/batch", params={"model": tiny_model}, files=upload)
    assert refused.status_code == 413, refused.text
    detail = refused.json()["detail"]
    assert "holds 70 records; at most 64" in detail, detail
    assert "several requests" in detail and "ECGSSL_SERVE_MAX_RECORDS" in detail, detail

    settings_env.setenv("ECGSSL_SERVE_MAX_RECORDS", "70")
    exact = {"model": tiny_model, "precision": "fp32"}  # int8 scales depend on the batch
    served = client.post("/embed/batch", params=exact, files=upload)
    assert served.status_code == 200, served.text
    records = served.json()["records"]
    assert [r["source"] for r in records] == [f"scan.zip:scan/{h.stem}/{h.name}" for h in headers]
    assert all(r["ok"] and r["record"]["fs"] == 100 and r["record"]["duration_s"] == 10 for r in records)
    single = client.post("/embed", params=exact, files=wfdb_files(headers[69])).json()
    assert records[69]["embedding"] == pytest.approx(single["embedding"], abs=1e-5)


def test_records_are_counted_across_files_and_zips(
    client: TestClient, tiny_model: str, headers: list[Path], settings_env: pytest.MonkeyPatch
) -> None:
    """Two WFDB records sent as files and two in a zip are four records: over a cap of 3, the request is
    refused as a whole, never answered 200 with an error inside."""
    upload = [*wfdb_files(headers[0]), *wfdb_files(headers[1])]
    upload.append(("files", ("two.zip", zip_of(record_members(headers[2:4])))))
    settings_env.setenv("ECGSSL_SERVE_MAX_RECORDS", "3")
    refused = client.post("/embed/batch", params={"model": tiny_model}, files=upload)
    assert refused.status_code == 413, refused.text
    assert "holds 4 records; at most 3" in refused.json()["detail"]
    settings_env.setenv("ECGSSL_SERVE_MAX_RECORDS", "4")
    served = client.post("/embed/batch", params={"model": tiny_model}, files=upload)
    assert served.status_code == 200, served.text
    assert [r["ok"] for r in served.json()["records"]] == [True] * 4


def test_single_record_routes_refuse_a_zip_of_several_records(
    client: TestClient, tiny_model: str, diagnosis_model: str, headers: list[Path]
) -> None:
    big = [("files", ("scan.zip", zip_of(record_members(headers))))]
    refused = client.post("/embed", params={"model": tiny_model}, files=big)
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "the upload holds 70 records" in detail and "POST /embed/batch takes several" in detail, detail
    assert "scan.zip:scan/00001_lr/00001_lr.hea" in detail and "and 65 more" in detail, detail

    two = [("files", ("two.zip", zip_of(record_members(headers[:2]))))]
    refused = client.post("/embed", params={"model": tiny_model}, files=two)
    assert refused.status_code == 422 and "POST /embed/batch" in refused.json()["detail"], refused.text

    predicted = client.post("/predict", params={"model": diagnosis_model}, files=wfdb_files(headers[0]))
    assert predicted.status_code == 200, predicted.text
    refused = client.post("/predict", params={"model": diagnosis_model}, files=two)
    assert refused.status_code == 422, refused.text
    assert "the upload holds 2 records" in refused.json()["detail"]
    assert "POST /predict takes one record" in refused.json()["detail"]


def test_a_zip_expanding_past_the_upload_limit_fails_the_whole_batch(
    client: TestClient, tiny_model: str, headers: list[Path], settings_env: pytest.MonkeyPatch
) -> None:
    """A readable record beside a zip that expands past ECGSSL_UPLOAD_MAX_BYTES: 413 for the request (the
    limit is the request's), not a 200 carrying the zip's error."""
    archive = zip_of(record_members(headers[1:9]))
    expanded = sum(len(v) for v in record_members(headers[1:9]).values())
    good = wfdb_files(headers[0])
    body = len(archive) + sum(len(content) for _, (_, content) in good)
    limit = body + 20_000  # room for the multipart framing
    assert limit < expanded, (limit, expanded)
    settings_env.setenv("ECGSSL_UPLOAD_MAX_BYTES", str(limit))
    refused = client.post(
        "/embed/batch", params={"model": tiny_model}, files=[*good, ("files", ("eight.zip", archive))]
    )
    assert refused.status_code == 413, refused.text
    assert f"expands to more than the upload limit of {limit} bytes" in refused.json()["detail"]


def test_a_job_the_broker_cannot_take_is_a_503_and_recorded_as_failed(tmp_path: Path, data_dir: Path) -> None:
    """``worker.tasks.enqueue`` on a real API process whose broker is unreachable: the job is committed,
    the broker refuses it, the job is recorded as failed and the API answers 503 saying to retry (the
    mapping of ``UnavailableError``)."""
    env = migrated(base_env(tmp_path, fresh_postgres_url(), "redis://127.0.0.1:1/0"))
    env["ECGSSL_SHIP_DEFAULT_MODEL"] = "false"
    command = [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", "{port}", "--no-migrate"]
    service = start_service(env, [command], tmp_path, ready=lambda health: health.status_code == 503)
    try:
        with service.client() as api:
            response = api.post(
                "/jobs/pretrain", json={"dataset": "ptbxl-500", "epochs": 1, "record_limit": 8}
            )
            assert response.status_code == 503, response.text
            assert response.json()["detail"].startswith("broker unavailable"), response.text
            (job,) = api.get("/jobs").json()["jobs"]
            assert job["status"] == "failed", job
            assert job["error"].startswith("could not queue the job: broker unavailable"), job
    finally:
        stop_service(service)
