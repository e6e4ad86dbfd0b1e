"""Serving: registry and aliases, hot swap under concurrent requests, variants and providers, micro-batching
and several records a request, on real PTB-XL records (in-process app, real PostgreSQL).

No timing is asserted here (speed is bench/serve.py's business); concurrency is made deterministic by
holding a session run until the other requests are queued.
"""

import inspect
import io
import logging
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient

from services.config import get_settings
from services.db.session import session_scope
from services.ecg.preprocess import InputSpec, preprocess
from services.ecg.readers import read_wfdb
from services.errors import ClientError
from services.export.onnx import OUTPUT_NAME
from services.export.variants import MIN_COSINE, make_variants
from services.inference import sessions as sessions_module
from services.inference.batching import MicroBatcher
from services.inference.sessions import (
    SESSIONS,
    LoadedModel,
    ServedModel,
    plan_session,
    resolve_served,
)
from services.models.st_mem import SIZES, StMemEncoder
from services.registry import register_model_version
from services.registry.publish import publish
from tests.conftest import needs_servers

RECORDS = [f"ptbxl-500/records500/00000/{i:05d}_hr" for i in range(1, 6)]
SPEC = InputSpec()


def wfdb_files(record: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", (record.with_suffix(s).name, record.with_suffix(s).read_bytes())) for s in (".hea", ".dat")
    ]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def expected_embedding(encoder: torch.nn.Module, header: Path) -> np.ndarray:
    windows = preprocess(read_wfdb(header), SPEC)
    with torch.no_grad():
        return encoder(torch.from_numpy(windows)).mean(0).numpy()


class TwoVersions:
    """A model with two registered tiny versions of different weights (v1: seed 0, v2: seed 1)."""

    def __init__(self, name: str, encoders: list[StMemEncoder], version_ids: list[int]):
        self.name = name
        self.encoders = encoders
        self.version_ids = version_ids


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> TwoVersions:
    name = f"serve-{uuid.uuid4().hex[:6]}"
    windows = preprocess(read_wfdb(data_dir / f"{RECORDS[0]}.hea"), SPEC)
    encoders, ids = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        encoder = StMemEncoder(SIZES["tiny"]).eval()
        path = tmp_path_factory.mktemp(f"v{seed}") / "encoder.onnx"
        with session_scope() as s:
            version = publish(
                encoder,
                windows,
                path,
                SPEC,
                lambda published, seed=seed: register_model_version(
                    s,
                    name=name,
                    method="st_mem",
                    source_job_id=None,
                    metrics={"seed": seed},
                    **published.fields(),
                ),
            )
            ids.append(version.id)
        encoders.append(encoder)
    return TwoVersions(name, encoders, ids)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[LoadedModel], bool]], "Gate"]]:
    """Hold session runs of the chosen LoadedModels until released (monkeypatched ``LoadedModel.run``)."""
    gates: list[Gate] = []
    original = LoadedModel.run

    def gated(self: LoadedModel, windows: np.ndarray, outputs=(OUTPUT_NAME,)) -> list[np.ndarray]:
        for g in gates:
            if g.applies(self) and not g.released.is_set():
                g.held_rows = len(windows)
                g.held.set()
                assert g.released.wait(60), "gate never released"
        return original(self, windows, outputs)

    monkeypatch.setattr(LoadedModel, "run", gated)

    def make(applies: Callable[[LoadedModel], bool]) -> Gate:
        g = Gate(applies)
        gates.append(g)
        return g

    yield make
    for g in gates:
        g.released.set()


class Gate:
    def __init__(self, applies: Callable[[LoadedModel], bool]):
        self.applies = applies
        self.held = threading.Event()
        self.released = threading.Event()
        self.held_rows = 0  # rows of the run being held


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------------
# registry: versions, variants, aliases


def test_registration_makes_a_checked_int8_variant(client: TestClient, two_versions: TwoVersions) -> None:
    body = client.get(f"/models/{two_versions.name}/versions/1").json()
    assert body["ref"] == f"{two_versions.name}@1" and body["input_spec"]["fs"] == 250
    assert body["metrics"] == {"seed": 0} and body["source_job_id"] is None
    assert body["parity_max_abs_diff"] < 1e-4 and len(body["sha256"]) == 64
    fp32, int8 = body["variants"]["fp32"], body["variants"]["int8"]
    assert fp32["status"] == "reference" and fp32["sha256"] == body["sha256"]
    assert int8["status"] == "passed" and int8["cosine_min"] >= MIN_COSINE and int8["threshold"] == MIN_COSINE
    assert len(int8["check_records"]) == 8 and int8["check_records"][0].startswith("ptbxl-500/records500")
    assert int8["checked_on"] == "CPUExecutionProvider" and len(int8["sha256"]) == 64
    assert int8["bytes"] < fp32["bytes"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # this machine
        assert "fp16" not in body["variants"]  # made by default only where CUDA can serve it
        assert body["serving"]["variant"] == "int8" and body["serving"]["device"] == "cpu"


def test_aliases_choose_what_a_reference_serves(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    name = two_versions.name
    files = wfdb_files(data_dir / RECORDS[0])

    def served(ref: str) -> int:
        response = client.post("/embed", params={"model": ref}, files=files)
        assert response.status_code == 200, response.text
        return response.json()["version"]

    # the first version got 'production' when it was registered; version 2, registered after, did not
    assert client.get(f"/models/{name}").json()["aliases"] == {"production": 1}
    assert served(name) == 1 and served(f"{name}@production") == 1 and served(f"{name}@2") == 2
    put = client.put(f"/models/{name}/aliases/production", json={"version": 1})
    assert put.status_code == 200, put.text
    assert (
        put.json()["version"] == 1
        and put.json()["ref"] == f"{name}@1"
        and put.json()["previous_version"] == 1
    )
    assert client.put(f"/models/{name}/aliases/staging", json={"version": 2}).status_code == 200
    assert served(f"{name}@staging") == 2 and served(name) == 1

    listed = {m["name"]: m for m in client.get("/models").json()["models"]}[name]
    assert listed["aliases"] == {"production": 1, "staging": 2}
    assert [v["aliases"] for v in listed["versions"]] == [["production"], ["staging"]]
    assert client.get(f"/models/{name}").json()["aliases"] == {"production": 1, "staging": 2}
    assert client.get(f"/models/{name}/aliases/staging").json()["version"] == 2
    assert [a["alias"] for a in client.get(f"/models/{name}/aliases").json()["aliases"]] == [
        "production",
        "staging",
    ]

    moved = client.put(f"/models/{name}/aliases/production", json={"version": 2})
    assert moved.json()["version"] == 2 and moved.json()["previous_version"] == 1
    assert served(name) == 2
    assert client.delete(f"/models/{name}/aliases/staging").status_code == 204
    assert client.get(f"/models/{name}/aliases/staging").status_code == 404
    assert client.put(f"/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    assert served(name) == 1


def test_a_new_version_does_not_change_what_the_name_serves(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    """A third version of a model with a 'production' alias (as a second pretraining job of the same name
    registers it): the bare name and the default keep serving the promoted version until it is promoted."""
    from services.db.models import ModelVersion

    name = f"stable-{uuid.uuid4().hex[:6]}"
    files = wfdb_files(data_dir / RECORDS[0])

    def served(ref: str) -> int:
        response = client.post("/embed", params={"model": ref}, files=files)
        assert response.status_code == 200, response.text
        return response.json()["version"]

    def register(version_id: int) -> int:
        with session_scope() as s:  # the two test versions' files again, under a new name
            row = s.get(ModelVersion, version_id)
            return register_model_version(
                s, name=name, method="st_mem", source_job_id=None, onnx_path=row.onnx_path, sha256=row.sha256,
                input_spec=row.input_spec, embedding_dim=row.embedding_dim,
                parity_max_abs_diff=row.parity_max_abs_diff, metrics=row.metrics, variants=row.variants,
            ).version  # fmt: skip

    assert register(two_versions.version_ids[0]) == 1
    assert client.get(f"/models/{name}").json()["aliases"] == {"production": 1}  # the first version's
    assert served(name) == 1
    assert register(two_versions.version_ids[1]) == 2
    assert served(name) == 1 and client.get(f"/models/{name}").json()["aliases"] == {"production": 1}
    assert client.put(f"/models/{name}/aliases/production", json={"version": 2}).status_code == 200
    assert served(name) == 2  # promoted explicitly
    assert register(two_versions.version_ids[0]) == 3
    assert served(name) == 2 and client.get(f"/models/{name}").json()["aliases"] == {"production": 2}


def test_a_bare_name_without_production_alias_is_refused_naming_the_fix(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    """Never 'the newest version': with its 'production' alias removed, the bare name serves nothing (404
    saying how to promote one), while its pinned versions still serve."""
    name = two_versions.name
    files = wfdb_files(data_dir / RECORDS[0])
    assert client.delete(f"/models/{name}/aliases/production").status_code == 204
    try:
        refused = client.post("/embed", params={"model": name}, files=files)
        assert refused.status_code == 404, refused.text
        detail = refused.json()["detail"]
        assert "no 'production' alias" in detail and f"PUT /models/{name}/aliases/production" in detail
        assert "its versions: 1, 2" in detail
        assert client.post("/embed", params={"model": f"{name}@2"}, files=files).json()["version"] == 2
    finally:
        assert client.put(f"/models/{name}/aliases/production", json={"version": 1}).status_code == 200


def test_default_model_serves_its_production_alias(
    client: TestClient, two_versions: TwoVersions, data_dir: Path, settings_env: pytest.MonkeyPatch
) -> None:
    name = two_versions.name
    files = wfdb_files(data_dir / RECORDS[0])
    settings_env.setenv("ECGSSL_DEFAULT_MODEL", name)
    assert client.put(f"/models/{name}/aliases/production", json={"version": 2}).status_code == 200
    try:
        response = client.post("/embed", files=files)
        assert response.status_code == 200 and response.json()["model"] == name
        assert response.json()["version"] == 2
        settings_env.setenv("ECGSSL_DEFAULT_MODEL", f"{name}@1")  # or a pinned version
        assert client.post("/embed", files=files).json()["version"] == 1
    finally:
        client.put(f"/models/{name}/aliases/production", json={"version": 1})


def test_without_a_default_model_setting_the_shipped_or_first_model_serves_its_production_alias(
    client: TestClient,
    two_versions: TwoVersions,
    data_dir: Path,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """ECGSSL_DEFAULT_MODEL unset, on a database of its own: a request naming no model gets the first model
    registered (its 'production' alias), whatever is registered after it; once the shipped model is
    registered (as on first start), the shipped model. Never the newest model or version."""
    import subprocess
    import sys

    from services.db.models import ModelVersion
    from services.registry.shipped import register_shipped_model

    with session_scope() as s:  # the two test versions' files, read from the run's database
        rows = [s.get(ModelVersion, version_id) for version_id in two_versions.version_ids]
        fields = [
            dict(
                method="st_mem", source_job_id=None, onnx_path=r.onnx_path, sha256=r.sha256,
                input_spec=r.input_spec, embedding_dim=r.embedding_dim,
                parity_max_abs_diff=r.parity_max_abs_diff, metrics=r.metrics, variants=r.variants,
            )
            for r in rows
        ]  # fmt: skip
    settings_env.delenv("ECGSSL_DEFAULT_MODEL", raising=False)
    settings_env.setenv("ECGSSL_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    settings_env.setenv("ECGSSL_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=root, check=True, capture_output=True
    )
    files = wfdb_files(data_dir / RECORDS[0])

    def default() -> tuple[str, int]:
        response = client.post("/embed", files=files)
        assert response.status_code == 200, response.text
        return response.json()["model"], response.json()["version"]

    refused = client.post("/embed", files=files)
    assert refused.status_code == 404 and "no model is registered yet" in refused.json()["detail"]
    with session_scope() as s:
        register_model_version(s, name="first", **fields[0])
    assert default() == ("first", 1)
    with session_scope() as s:  # a newer version, and a newer model
        register_model_version(s, name="first", **fields[1])
        register_model_version(s, name="second", **fields[1])
    assert default() == ("first", 1)
    assert client.put("/models/first/aliases/production", json={"version": 2}).status_code == 200
    assert default() == ("first", 2)  # promoted
    with session_scope() as s:
        shipped = register_shipped_model(s)
        assert shipped is not None
        shipped_name = shipped.model.name
    assert default() == (shipped_name, 1)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "expected"),
    [
        ("put", "/models/{name}/aliases/Prod!", {"version": 1}, 422, "lower-case letters"),
        ("put", "/models/{name}/aliases/9lives", {"version": 1}, 422, "starting with a letter"),
        ("put", "/models/{name}/aliases/latest", {"version": 1}, 422, "reserved"),
        ("put", "/models/{name}/aliases/production", {"version": 9}, 422, "no version 9 to point alias"),
        ("put", "/models/{name}/aliases/production", {"version": 0}, 422, "greater than or equal to 1"),
        ("put", "/models/{name}/aliases/production", {}, 422, "version"),
        ("put", "/models/{name}/aliases/production", {"version": 1, "x": 1}, 422, "extra"),
        (
            "put",
            "/models/no-such-model/aliases/production",
            {"version": 1},
            404,
            "'no-such-model' is not registered",
        ),
        ("get", "/models/{name}/aliases/canary", None, 404, "has no alias 'canary'"),
        ("delete", "/models/{name}/aliases/canary", None, 404, "has no alias 'canary'"),
        ("get", "/models/{name}/versions/99", None, 404, "has no version 99 (its versions: 1, 2)"),
        ("get", "/models/{name}/versions/one", None, 422, "version"),
        ("get", "/models/no-such-model", None, 404, "not registered"),
    ],
)
def test_bad_registry_requests_get_4xx_naming_the_problem(
    client: TestClient,
    two_versions: TwoVersions,
    method: str,
    path: str,
    body: dict | None,
    status: int,
    expected: str,
) -> None:
    kwargs = {"json": body} if body is not None else {}
    response = client.request(method.upper(), path.format(name=two_versions.name), **kwargs)
    assert response.status_code == status, response.text
    assert expected in response.text


@pytest.mark.parametrize(
    ("ref", "status", "expected"),
    [
        ("{name}@", 422, "is not valid: expected 'name', 'name@version'"),
        ("@1", 422, "is not valid"),
        ("{name}@1@2", 422, "neither a version nor an alias"),
        ("{name}@staging", 422, "'staging' is neither a version nor an alias"),
        ("{name}@Prod", 422, "must be a number"),
        ("{name}@\u00b2", 422, "must be a number"),  # '²'.isdigit() is True but int('²') fails
        ("{name}@\u0661", 422, "must be a number"),  # an Arabic-Indic one: not read as version 1
        ("{name}@" + "9" * 40, 404, "has no version 9999"),
        ("{name}@" + "9" * 5000, 422, "neither a version nor an alias"),  # int() refuses over 4300 digits
        ("bad name", 422, "is not valid"),
        ("{name}@99", 404, "has no version 99"),
        ("other-{name}", 404, "is not registered"),
    ],
)
def test_bad_model_references_get_4xx(
    client: TestClient, two_versions: TwoVersions, data_dir: Path, ref: str, status: int, expected: str
) -> None:
    response = client.post(
        "/embed",
        params={"model": ref.format(name=two_versions.name)},
        files=wfdb_files(data_dir / RECORDS[0]),
    )
    assert response.status_code == status, response.text
    assert expected in response.json()["detail"]


@needs_servers
def test_concurrent_puts_creating_the_same_alias_both_succeed(
    client: TestClient, two_versions: TwoVersions
) -> None:
    """Request A has created name@race (not committed yet) when request B, which found no such alias, creates
    it too: B waits for A in PostgreSQL, then moves A's alias (last writer wins) instead of failing on the
    unique constraint with a 500."""
    from sqlalchemy import text

    from services import registry
    from services.db.session import get_engine

    name = two_versions.name

    def waiting_for_a_lock() -> int:
        with get_engine().connect() as connection:
            return connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar_one()

    try:
        with ThreadPoolExecutor(1) as pool, session_scope() as a:
            registry.set_alias(a, name, "race", 1)  # A: inserted, not committed
            b = pool.submit(client.put, f"/models/{name}/aliases/race", json={"version": 2})
            wait_for(lambda: b.done() or waiting_for_a_lock() > 0, "request B to wait for A's insert")
            a.commit()
            response = b.result(60)
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 2 and response.json()["previous_version"] == 1
        assert client.get(f"/models/{name}/aliases/race").json()["version"] == 2
    finally:
        with session_scope() as s:
            if any(alias.name == "race" for alias in registry.get_model(s, name).aliases):
                registry.delete_alias(s, name, "race")


def test_alias_changes_need_the_api_key(
    client: TestClient, two_versions: TwoVersions, settings_env: pytest.MonkeyPatch
) -> None:
    from api.deps import require_api_key

    assert inspect.iscoroutinefunction(require_api_key)  # no blocking I/O: no thread-pool hop per request
    settings_env.setenv("ECGSSL_API_KEY", "s3cret")
    path = f"/models/{two_versions.name}/aliases/production"
    assert client.put(path, json={"version": 1}).status_code == 401
    assert client.delete(path).status_code == 401
    ok = client.put(path, json={"version": 1}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get(path).status_code == 200  # reading stays open
    client.put(path, json={"version": 1}, headers={"Authorization": "Bearer s3cret"})


# --------------------------------------------------------------------------------------------------
# hot swap


def test_promotion_swaps_sessions_while_requests_in_flight_finish_on_the_old_one(
    client: TestClient, two_versions: TwoVersions, data_dir: Path, gate: Callable
) -> None:
    name, (v1, v2) = two_versions.name, two_versions.version_ids
    header = data_dir / f"{RECORDS[1]}.hea"
    files = wfdb_files(header.with_suffix(""))
    params = {"model": name, "precision": "fp32"}
    assert client.put(f"/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    for version_id in (v1, v2):  # what earlier tests loaded (other precisions, pinned references)
        SESSIONS.retire_version(version_id)
    try:
        assert client.post("/embed", params=params, files=files).json()["version"] == 1  # v1 loaded
        hold = gate(lambda loaded: loaded.version_id == v1)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.post, "/embed", params=params, files=files)
            assert hold.held.wait(60), "the first request never reached its session run"
            (old_session,) = SESSIONS.loaded(v1)
            assert old_session.refs == 1

            promoted = client.put(f"/models/{name}/aliases/production", json={"version": 2})
            assert promoted.status_code == 200 and promoted.json()["previous_version"] == 1
            assert v1 not in SESSIONS and v2 in SESSIONS  # swapped in the cache, no restart
            assert not old_session.closed  # still serving the request in flight

            later = client.post("/embed", params=params, files=files)  # while the first is held
            assert later.status_code == 200 and later.json()["version"] == 2
            assert in_flight.running() or not in_flight.done()

            hold.released.set()
            first = in_flight.result(timeout=60)
        assert first.status_code == 200 and first.json()["version"] == 1
        np.testing.assert_allclose(
            first.json()["embedding"], expected_embedding(two_versions.encoders[0], header), atol=1e-4
        )
        np.testing.assert_allclose(
            later.json()["embedding"], expected_embedding(two_versions.encoders[1], header), atol=1e-4
        )
        assert old_session.closed and old_session.refs == 0 and old_session.session is None
        assert v1 not in SESSIONS
    finally:
        client.put(f"/models/{name}/aliases/production", json={"version": 1})


def test_a_moved_alias_is_followed_by_a_process_that_did_not_move_it(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    """Another API process moved the alias (here: straight in the database): the next request here follows
    it, and the version it no longer serves is released."""
    from services import registry

    name, (v1, v2) = two_versions.name, two_versions.version_ids
    files = wfdb_files(data_dir / RECORDS[0])
    params = {"model": f"{name}@canary", "precision": "fp32"}
    with session_scope() as s:
        registry.set_alias(s, name, "canary", 1)
    try:
        for version_id in (v1, v2):  # what earlier tests loaded (other precisions, pinned references)
            SESSIONS.retire_version(version_id)
        assert client.post("/embed", params=params, files=files).json()["version"] == 1
        assert v1 in SESSIONS
        with session_scope() as s:
            registry.set_alias(s, name, "canary", 2)
        assert client.post("/embed", params=params, files=files).json()["version"] == 2
        assert v1 not in SESSIONS and v2 in SESSIONS
    finally:
        with session_scope() as s:
            registry.delete_alias(s, name, "canary")


def test_a_version_promoted_away_between_look_up_and_lease_is_served_but_not_cached(
    client: TestClient, two_versions: TwoVersions
) -> None:
    """The request looked up name@production (v1), then the alias moved to v2 before its lease: it finishes
    on v1, whose session is closed when it ends instead of staying cached as if it were live."""
    name, (v1, v2) = two_versions.name, two_versions.version_ids
    assert client.put(f"/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    try:
        SESSIONS.retire_version(v1)
        with session_scope() as s:
            served = resolve_served(s, f"{name}@production")  # the request's look-up
        assert served.version_id == v1 and v1 not in SESSIONS
        moved = client.put(f"/models/{name}/aliases/production", json={"version": 2})  # then the promotion
        assert moved.status_code == 200 and moved.json()["previous_version"] == 1
        windows = np.random.default_rng(3).standard_normal((1, 12, SPEC.samples)).astype(np.float32)
        with SESSIONS.lease(served, "fp32") as loaded:  # then its lease
            assert loaded.version_id == v1 and v1 not in SESSIONS
            (got,) = loaded.infer(windows)
        assert loaded.closed and v1 not in SESSIONS
        with torch.no_grad():
            np.testing.assert_allclose(
                got, two_versions.encoders[0](torch.from_numpy(windows)).numpy(), atol=1e-4
            )
        with session_scope() as s:  # a look-up after the promotion is served by v2 and cached
            served = resolve_served(s, f"{name}@production")
        with SESSIONS.lease(served, "fp32") as loaded:
            assert loaded.version_id == v2
        assert v2 in SESSIONS and not loaded.closed
    finally:
        client.put(f"/models/{name}/aliases/production", json={"version": 1})


def test_a_look_up_noted_after_a_later_one_does_not_move_the_reference_back(
    two_versions: TwoVersions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request A reads name@canary (v1); the alias moves to v2 (another process); request B reads v2 and
    notes it; A notes last. A must not retire v2 nor make v1 the remembered, cached version."""
    from services import registry

    name, (v1, v2) = two_versions.name, two_versions.version_ids
    ref = f"{name}@canary"
    with session_scope() as s:
        registry.set_alias(s, name, "canary", 1)
    try:
        for version_id in (v1, v2):
            SESSIONS.retire_version(version_id)
        with session_scope() as s:  # the process has served name@canary = v1 before
            served = resolve_served(s, ref)
        with SESSIONS.lease(served, "fp32"):
            pass
        assert v1 in SESSIONS

        read, proceed = threading.Event(), threading.Event()
        original = sessions_module.resolve_reference
        main = threading.current_thread()

        def held_after_reading(session, reference):  # noqa: ANN001, ANN202
            resolution = original(session, reference)
            if threading.current_thread() is not main:  # request A: held between reading and noting
                read.set()
                assert proceed.wait(60)
            return resolution

        monkeypatch.setattr(sessions_module, "resolve_reference", held_after_reading)

        def request_a() -> ServedModel:
            with session_scope() as s:
                return resolve_served(s, ref)

        with ThreadPoolExecutor(1) as pool:
            a = pool.submit(request_a)
            assert read.wait(60)
            with session_scope() as s:  # another process moves the alias
                registry.set_alias(s, name, "canary", 2)
            with session_scope() as s:  # request B
                served_b = resolve_served(s, ref)
            with SESSIONS.lease(served_b, "fp32") as loaded_b:
                assert loaded_b.version_id == v2
            assert v2 in SESSIONS and v1 not in SESSIONS
            proceed.set()
            served_a = a.result(60)
        assert served_a.version_id == v1
        assert v2 in SESSIONS and not loaded_b.closed  # A's late note did not retire v2
        with SESSIONS.lease(served_a, "fp32") as loaded_a:  # A is still served, by v1, uncached
            assert loaded_a.version_id == v1
        assert loaded_a.closed and v1 not in SESSIONS
        with session_scope() as s:  # the reference is still remembered as v2: nothing is retired
            assert resolve_served(s, ref).version_id == v2
        assert v2 in SESSIONS and not loaded_b.closed
    finally:
        with session_scope() as s:
            registry.delete_alias(s, name, "canary")


# --------------------------------------------------------------------------------------------------
# variants and providers


def test_precision_per_request_and_int8_close_to_fp32(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    ref = f"{two_versions.name}@1"
    files = wfdb_files(data_dir / RECORDS[2])
    fp32 = client.post("/embed", params={"model": ref, "precision": "fp32"}, files=files)
    int8 = client.post("/embed", params={"model": ref}, files=files)  # auto: int8 on the CPU
    assert fp32.json()["variant"] == "fp32" and int8.json()["variant"] == "int8"
    assert int8.json()["provider"] == "CPUExecutionProvider"
    assert cosine(np.array(fp32.json()["embedding"]), np.array(int8.json()["embedding"])) >= MIN_COSINE
    assert "session;dur=" in int8.headers["server-timing"]
    refused = client.post("/embed", params={"model": ref, "precision": "fp16"}, files=files)
    assert refused.status_code == 422 and "fp16" in refused.json()["detail"]
    assert "fp32 always can" in refused.json()["detail"]


def _served(two_versions: TwoVersions, variants: dict | None = None) -> ServedModel:
    with session_scope() as s:
        from services.db.models import ModelVersion

        version = s.get(ModelVersion, two_versions.version_ids[0])
        served = ServedModel.from_version(version)
    if variants is None:
        return served
    return ServedModel(**{**served.__dict__, "variants": variants})


def test_provider_choice_picks_cuda_and_fp16_when_onnx_runtime_has_cuda(
    two_versions: TwoVersions, listed_cuda: pytest.MonkeyPatch
) -> None:
    served = _served(two_versions)
    fp16 = make_variants(Path(served.onnx_path), served.spec, which=["fp16"])["fp16"]
    assert fp16["status"] == "passed" and fp16["cosine_min"] >= MIN_COSINE  # checked on the CPU here
    variants = {**served.variants, "fp16": fp16}
    with_fp16 = ServedModel(**{**served.__dict__, "variants": variants})

    plan = plan_session(with_fp16, "auto")
    assert (plan.variant, plan.device) == ("fp16", "cuda")
    assert plan_session(served, "auto").variant == "fp32"  # no fp16 variant: fp32 on CUDA
    assert plan_session(served, "auto").device == "cuda"
    assert plan_session(with_fp16, "int8").device == "cpu"  # the quantised graph runs on the CPU provider
    assert plan_session(with_fp16, "auto", device="cpu").variant == "int8"


@pytest.fixture
def listed_cuda(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """ONNX Runtime lists CUDA (it cannot start here: a CPU-only build), and no CUDA start has failed yet in
    this process (the remembered failure is restored afterwards)."""
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(sessions_module, "_cuda_failure", None, raising=False)
    return monkeypatch


def test_cuda_that_does_not_start_falls_back_to_the_cpu_provider_with_a_log(
    two_versions: TwoVersions, listed_cuda: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime lists CUDA but the session cannot use it (a CPU-only build here): logged, CPU serves."""
    served = _served(two_versions)
    SESSIONS.retire_version(served.version_id)
    windows = np.random.default_rng(0).standard_normal((2, 12, SPEC.samples)).astype(np.float32)
    with (
        caplog.at_level(logging.WARNING, logger="services.inference.sessions"),
        SESSIONS.lease(served, "fp32") as loaded,
    ):
        assert loaded.provider == "CPUExecutionProvider" and loaded.plan.device == "cpu"
        (got,) = loaded.infer(windows)
    assert any("did not start" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        expected = two_versions.encoders[0](torch.from_numpy(windows)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    SESSIONS.retire_version(served.version_id)


def test_cuda_that_does_not_start_is_tried_once_per_process(
    two_versions: TwoVersions, listed_cuda: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After one failed CUDA start later requests plan the CPU provider at once: they hit the cached CPU
    session (no new CUDA attempt, no new warning), whichever precision they ask for."""
    served = _served(two_versions)
    SESSIONS.retire_version(served.version_id)
    loads: list[tuple[str, str]] = []
    original = sessions_module._load

    def counted(model: ServedModel, plan: sessions_module.SessionPlan) -> ort.InferenceSession:
        loads.append((plan.variant, plan.device))
        return original(model, plan)

    listed_cuda.setattr(sessions_module, "_load", counted)
    windows = np.random.default_rng(0).standard_normal((1, 12, SPEC.samples)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="services.inference.sessions"):
        for _ in range(3):
            with SESSIONS.lease(served, "fp32") as loaded:
                assert loaded.provider == "CPUExecutionProvider" and loaded.plan.device == "cpu"
                loaded.infer(windows)
        plan = plan_session(served, "fp32")
    assert loads == [("fp32", "cuda"), ("fp32", "cpu")]  # one CUDA attempt, then the CPU session serves
    assert (plan.device, plan.variant) == ("cpu", "fp32") and "did not start" in plan.reason
    warnings = [r.getMessage() for r in caplog.records if "did not start" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert len([e for e in SESSIONS.loaded(served.version_id)]) == 1
    SESSIONS.retire_version(served.version_id)


def test_asking_for_cuda_without_it_logs_the_fall_back(
    two_versions: TwoVersions, settings_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings_env.setenv("ECGSSL_SERVE_DEVICE", "cuda")
    sessions_module._logged.clear()
    with caplog.at_level(logging.WARNING, logger="services.inference.sessions"):
        plan = plan_session(_served(two_versions))
    assert plan.device == "cpu" and plan.variant == "int8"
    assert any("no CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


def test_variant_that_failed_or_was_not_checked_is_not_served(
    two_versions: TwoVersions, tmp_path: Path, settings_env: pytest.MonkeyPatch
) -> None:
    served = _served(two_versions)
    unchecked = make_variants(Path(served.onnx_path), served.spec, which=["int8"], data_root=tmp_path)
    assert unchecked["int8"]["status"] == "unchecked" and "no PTB-XL record" in unchecked["int8"]["reason"]
    model = ServedModel(**{**served.__dict__, "variants": unchecked})
    assert plan_session(model, "auto").variant == "fp32"

    failed = {**served.variants, "int8": {**served.variants["int8"], "status": "failed", "cosine_min": 0.99}}
    model = ServedModel(**{**served.__dict__, "variants": failed})
    assert plan_session(model, "auto").variant == "fp32"
    assert plan_session(model, "int8").variant == "fp32"  # the setting falls back, logged
    told = r"is failed: int8: lowest cosine to the fp32 embedding over 8 check windows 0\.9900, below the"
    with pytest.raises(ClientError, match=told + r" required 0\.999 for every window"):
        plan_session(model, "int8", strict=True)  # a request that asked for it is told why
    settings_env.setenv("ECGSSL_SERVE_PRECISION", "fp32")
    get_settings.cache_clear()
    assert plan_session(_served(two_versions)).variant == "fp32"


def test_infer_is_the_api_for_other_outputs_and_refuses_unknown_ones(two_versions: TwoVersions) -> None:
    served = _served(two_versions)
    windows = np.random.default_rng(1).standard_normal((3, 12, SPEC.samples)).astype(np.float32)
    with SESSIONS.lease(served, "fp32") as loaded:
        (out,) = loaded.infer(windows, (OUTPUT_NAME,))
    with torch.no_grad():
        np.testing.assert_allclose(
            out, two_versions.encoders[0](torch.from_numpy(windows)).numpy(), atol=1e-4
        )
    with (
        SESSIONS.lease(served, "fp32") as loaded,
        pytest.raises(ClientError, match="has no output probabilities"),
    ):
        loaded.infer(windows, ("probabilities",))


# --------------------------------------------------------------------------------------------------
# micro-batching


def test_micro_batcher_gathers_waiting_items_and_isolates_a_bad_one() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        calls.append(len(x))
        if len(calls) == 1:
            started.set()
            release.wait(30)
        if np.isnan(x).any():
            raise ValueError("NaN in the batch")
        return [x.reshape(len(x), -1).sum(axis=1) * 2]

    batcher = MicroBatcher(run, max_batch=64, max_wait_s=0.0, name="test")
    rng = np.random.default_rng(0)
    items = [rng.standard_normal((i + 1, 2, 3)).astype(np.float32) for i in range(6)]
    first = batcher.submit(items[0])
    assert started.wait(30)
    bad = batcher.submit(np.full((1, 2, 3), np.nan, np.float32))
    rest = [batcher.submit(item) for item in items[1:]]
    wait_for(lambda: batcher.pending() == 6, "the queued items")
    release.set()
    for item, future in zip(items, [first, *rest], strict=True):
        (out,), timing = future.result(30)
        np.testing.assert_allclose(out, item.reshape(len(item), -1).sum(axis=1) * 2, rtol=1e-5)
        assert timing.run_s >= 0 and timing.batch_rows == len(item)  # the shared run failed: run alone
    with pytest.raises(ValueError, match="NaN"):
        bad.result(30)
    rows = [len(i) for i in items[1:]]
    assert calls == [1, 1 + sum(rows), 1, *rows]  # held run; the 6 waiting as one (fails); one by one
    assert list(batcher.recent_batches)[:2] == [1, 6]
    batcher.close()
    batcher.join(10)


@pytest.mark.parametrize(("max_batch", "expected_runs"), [(64, [12]), (4, [3, 4, 2, 3])])
def test_micro_batcher_gathers_concurrent_submissions_into_runs_of_at_most_max_batch(
    max_batch: int, expected_runs: list[int]
) -> None:
    """Six submissions (1, 2, 3, 1, 2, 3 rows) from six requests that hold the session: with room for all
    they share one run; with max_batch 4 no run exceeds 4 rows (an item that does not fit waits for the next
    run), and each caller gets exactly its own rows back."""
    runs: list[int] = []
    sizes = [1, 2, 3, 1, 2, 3]
    done: list[Future] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        runs.append(len(x))
        return [x.reshape(len(x), -1).sum(axis=1) * 2]

    # max_wait is long: a run waits for requests that hold the session (not for the clock) and then goes
    holders = lambda: len(sizes) - sum(f.done() for f in done)  # noqa: E731
    batcher = MicroBatcher(run, max_batch=max_batch, max_wait_s=60.0, name="test", waiters=holders)
    rng = np.random.default_rng(4)
    items = [rng.standard_normal((k, 2, 3)).astype(np.float32) for k in sizes]
    for item in items:
        done.append(batcher.submit(item))
    results = [future.result(30) for future in done]
    for item, ((out,), timing) in zip(items, results, strict=True):
        np.testing.assert_allclose(out, item.reshape(len(item), -1).sum(axis=1) * 2, rtol=1e-5)
        assert timing.batch_rows <= max_batch
    assert runs == expected_runs and len(runs) < len(items) and max(runs) <= max_batch
    assert len({timing.run_id for _, timing in results}) == len(expected_runs)
    batcher.close()
    batcher.join(10)


def test_micro_batcher_waits_only_for_requests_that_hold_the_session() -> None:
    calls: list[int] = []
    holders = [1]

    def run(x: np.ndarray) -> list[np.ndarray]:
        calls.append(len(x))
        return [x * 2]

    # max_wait is 60 s: a request alone must not wait for it (the result comes long before)
    batcher = MicroBatcher(run, max_batch=64, max_wait_s=60.0, name="test", waiters=lambda: holders[0])
    (out,), _ = batcher.submit(np.ones((2, 3), np.float32)).result(timeout=30)
    assert calls == [2] and (out == 2).all()
    # three requests hold the session: the run waits for the other two to submit, then takes all three
    holders[0] = 3
    first = batcher.submit(np.ones((1, 3), np.float32))
    time.sleep(0.05)
    others = [batcher.submit(np.full((k, 3), k, np.float32)) for k in (2, 3)]
    for k, future in zip((1, 2, 3), [first, *others], strict=True):
        (out,), timing = future.result(timeout=30)
        assert out.shape == (k, 3) and timing.batch_rows == 6
    assert calls == [2, 6]
    batcher.close()
    batcher.join(10)


def test_concurrent_embed_requests_share_runs_and_get_their_own_results(
    client: TestClient, two_versions: TwoVersions, data_dir: Path, gate: Callable
) -> None:
    ref = f"{two_versions.name}@1"
    params = {"model": ref, "precision": "fp32"}
    alone = {}
    for record in RECORDS:
        response = client.post("/embed", params=params, files=wfdb_files(data_dir / record))
        assert response.status_code == 200
        alone[record] = np.array(response.json()["embedding"])
    (loaded,) = [e for e in SESSIONS.loaded(two_versions.version_ids[0]) if e.variant == "fp32"]
    batcher = loaded.batcher()
    runs_before = batcher.runs

    flat = np.zeros((12, 5000), np.float32)  # a bad record: refused on its own
    hold = gate(lambda e: e is loaded)
    with ThreadPoolExecutor(len(RECORDS) + 1) as pool:
        futures = [
            pool.submit(client.post, "/embed", params=params, files=wfdb_files(data_dir / r)) for r in RECORDS
        ]
        bad = pool.submit(
            client.post,
            "/embed",
            params=params,
            files=[("files", ("flat.npy", npy_bytes(flat)))],
            data={"fs": "500"},
        )
        try:
            assert hold.held.wait(60)
            # the held run has the request(s) that came first (2 windows each: a request that submits
            # within the batcher's max wait joins it); the others queue behind it
            wait_for(
                lambda: hold.held_rows // 2 + batcher.pending() == len(RECORDS), "the other requests to queue"
            )
            in_held_run = hold.held_rows // 2
        finally:
            hold.released.set()
        responses = [f.result(60) for f in futures]
        refused = bad.result(60)
    assert refused.status_code == 422 and "flat" in refused.json()["detail"]
    for record, response in zip(RECORDS, responses, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["embedding"], alone[record], atol=1e-5)
    waiting = len(RECORDS) - in_held_run
    runs = [in_held_run, waiting] if waiting else [in_held_run]  # the held run, then all the waiting in one
    assert batcher.runs - runs_before == len(runs) and list(batcher.recent_batches)[-len(runs) :] == runs


def test_a_failing_item_in_a_shared_run_fails_only_its_own_caller(
    two_versions: TwoVersions, gate: Callable
) -> None:
    served = _served(two_versions)
    rng = np.random.default_rng(2)
    good = [rng.standard_normal((2, 12, SPEC.samples)).astype(np.float32) for _ in range(3)]
    with SESSIONS.lease(served, "fp32") as loaded:
        hold = gate(lambda e: e is loaded)
        first = loaded.submit(good[0])
        assert hold.held.wait(60)
        bad = loaded.submit(rng.standard_normal((1, 12, SPEC.samples - 5)).astype(np.float32))
        rest = [loaded.submit(g) for g in good[1:]]
        wait_for(lambda: loaded.batcher().pending() == 3, "the queued items")
        hold.released.set()
        outs = [first.result()[0], *(r.result()[0] for r in rest)]
        with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
            bad.result()
    with torch.no_grad():
        for windows, out in zip(good, outs, strict=True):
            np.testing.assert_allclose(
                out, two_versions.encoders[0](torch.from_numpy(windows)).numpy(), atol=1e-4
            )


def test_a_submission_over_max_batch_is_split_into_runs_of_at_most_max_batch(
    two_versions: TwoVersions, settings_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = _served(two_versions)
    settings_env.setenv("ECGSSL_SERVE_MAX_BATCH", "4")
    SESSIONS.retire_version(served.version_id)  # a session whose batchers take the setting
    rows_per_run: list[int] = []
    original = LoadedModel.run

    def run(self: LoadedModel, windows: np.ndarray, outputs=(OUTPUT_NAME,)) -> list[np.ndarray]:
        rows_per_run.append(len(windows))
        return original(self, windows, outputs)

    monkeypatch.setattr(LoadedModel, "run", run)
    windows = np.random.default_rng(5).standard_normal((10, 12, SPEC.samples)).astype(np.float32)
    try:
        with SESSIONS.lease(served, "fp32") as loaded:
            (out,) = loaded.infer(windows)
    finally:
        SESSIONS.retire_version(served.version_id)
    assert sorted(rows_per_run, reverse=True) == [4, 4, 2] and out.shape == (10, SIZES["tiny"].width)
    with torch.no_grad():
        np.testing.assert_allclose(
            out, two_versions.encoders[0](torch.from_numpy(windows)).numpy(), atol=1e-4
        )


def test_a_record_that_fails_inside_a_shared_run_fails_only_its_own_result(
    two_versions: TwoVersions, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three records of one request share a session run; the run fails on the middle one's windows (a
    record that passed every check before the batcher): that record alone gets an error, in its place."""
    from services.ecg.preprocess import model_recording
    from services.inference.embed import Embedded, embed_recordings

    served = _served(two_versions)
    recordings = [read_wfdb(data_dir / f"{record}.hea") for record in RECORDS[:3]]
    poison = preprocess(model_recording(recordings[1], SPEC, reject_flat=True), SPEC)[0]
    held, release = threading.Event(), threading.Event()
    rows_per_run: list[int] = []
    original = LoadedModel.run

    def run(self: LoadedModel, windows: np.ndarray, outputs=(OUTPUT_NAME,)) -> list[np.ndarray]:
        rows_per_run.append(len(windows))
        if not held.is_set():  # the first run is held until the three records are queued behind it
            held.set()
            assert release.wait(60)
        if any(np.array_equal(window, poison) for window in windows):
            raise RuntimeError("the session cannot run this record")
        return original(self, windows, outputs)

    monkeypatch.setattr(LoadedModel, "run", run)
    blocker = np.zeros((1, 12, SPEC.samples), np.float32)
    with SESSIONS.lease(served, "fp32") as loaded, ThreadPoolExecutor(1) as pool:
        first = loaded.submit(blocker)
        assert held.wait(60)
        results = pool.submit(embed_recordings, loaded, recordings)
        wait_for(lambda: loaded.batcher().pending() == 3, "the three records to queue")
        release.set()
        first.result()
        results = results.result(60)
        alone = [embed_recordings(loaded, [r])[0] for r in (recordings[0], recordings[2])]
    assert rows_per_run[:2] == [1, 6]  # the held run; the three records (2 windows each) as one run
    assert isinstance(results[0], Embedded) and isinstance(results[2], Embedded)
    assert isinstance(results[1], ClientError) and "could not run on this record" in str(results[1])
    assert "cannot run this record" in str(results[1])
    np.testing.assert_allclose(results[0].vector, alone[0].vector, atol=1e-5)
    np.testing.assert_allclose(results[2].vector, alone[1].vector, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# several records a request


def test_embed_batch_answers_one_result_per_record_in_order(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    ref = f"{two_versions.name}@1"
    params = {"model": ref, "precision": "fp32"}
    singles = {
        r: np.array(client.post("/embed", params=params, files=wfdb_files(data_dir / r)).json()["embedding"])
        for r in RECORDS[:4]
    }
    third = read_wfdb(data_dir / f"{RECORDS[2]}.hea")
    files = [
        *wfdb_files(data_dir / RECORDS[0]),
        ("files", ("orphan.dat", b"\x00" * 64)),  # a signal file no header names
        *wfdb_files(data_dir / RECORDS[1])[::-1],  # the .dat before its .hea: grouped by record all the same
        ("files", ("third.npy", npy_bytes(third.signal))),  # fs from the form
        ("files", (Path(RECORDS[3]).name + ".hea", (data_dir / f"{RECORDS[3]}.hea").read_bytes())),  # no .dat
        ("files", ("flat.npy", npy_bytes(np.zeros((12, 5000), np.float32)))),
    ]
    response = client.post("/embed/batch", params=params, files=files, data={"fs": "500"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == two_versions.name and body["version"] == 1 and body["variant"] == "fp32"
    results = body["records"]
    assert [r["source"] for r in results] == [
        "00001_hr.hea",
        "orphan.dat",
        "00002_hr.hea",
        "third.npy",
        "00004_hr.hea",
        "flat.npy",
    ]
    assert [r["ok"] for r in results] == [True, False, True, True, False, False]
    assert [r["index"] for r in results] == list(range(6))
    np.testing.assert_allclose(results[0]["embedding"], singles[RECORDS[0]], atol=1e-5)
    np.testing.assert_allclose(results[2]["embedding"], singles[RECORDS[1]], atol=1e-5)
    np.testing.assert_allclose(results[3]["embedding"], singles[RECORDS[2]], atol=1e-5)
    assert results[3]["record"]["fs"] == 500 and results[3]["record"]["windows"] == 2
    assert results[1]["status_code"] == 422 and "no uploaded WFDB header names" in results[1]["error"]
    assert results[4]["status_code"] == 422 and "00004_hr.dat" in results[4]["error"]
    assert "flat" in results[5]["error"] and results[5]["embedding"] is None


def test_embed_batch_reads_zips_of_several_records(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    params = {"model": f"{two_versions.name}@1", "precision": "fp32"}
    members = {}
    for folder, record in (("a", RECORDS[0]), ("b", RECORDS[1]), ("b", RECORDS[4])):
        for suffix in (".hea", ".dat"):
            members[f"{folder}/{Path(record).name}{suffix}"] = (data_dir / f"{record}{suffix}").read_bytes()
    upload = [
        ("files", ("first.zip", zip_of(members))),
        ("files", ("second.zip", zip_of({"x/00003_hr.hea": (data_dir / f"{RECORDS[2]}.hea").read_bytes()}))),
        ("files", ("broken.zip", b"not a zip at all")),
    ]
    body = client.post("/embed/batch", params=params, files=upload).json()
    sources = [r["source"] for r in body["records"]]
    assert sources == [
        "first.zip:a/00001_hr.hea",
        "first.zip:b/00002_hr.hea",
        "first.zip:b/00005_hr.hea",
        "second.zip:x/00003_hr.hea",
        "broken.zip",
    ]
    assert [r["ok"] for r in body["records"]] == [True, True, True, False, False]
    single = client.post("/embed", params=params, files=wfdb_files(data_dir / RECORDS[4])).json()
    np.testing.assert_allclose(body["records"][2]["embedding"], single["embedding"], atol=1e-5)
    assert "not a valid .zip" in body["records"][4]["error"]


def test_embed_batch_limits_and_single_embed_points_to_it(
    client: TestClient, two_versions: TwoVersions, data_dir: Path, settings_env: pytest.MonkeyPatch
) -> None:
    params = {"model": f"{two_versions.name}@1"}
    files = [f for r in RECORDS[:3] for f in wfdb_files(data_dir / r)]
    settings_env.setenv("ECGSSL_SERVE_MAX_RECORDS", "2")
    refused = client.post("/embed/batch", params=params, files=files)
    assert refused.status_code == 413 and "3 records" in refused.json()["detail"]
    assert "ECGSSL_SERVE_MAX_RECORDS" in refused.json()["detail"]
    several = client.post("/embed", params=params, files=files)
    assert several.status_code == 422 and "POST /embed/batch" in several.json()["detail"]
    unknown = client.post("/embed/batch", params={"model": "no-such-model"}, files=files)
    assert unknown.status_code == 404


def test_the_leads_field_names_the_rows_for_one_record_and_for_several(
    client: TestClient, two_versions: TwoVersions, data_dir: Path
) -> None:
    """``leads`` (comma-separated, spaces allowed) orders the rows of .npy records, on /embed and on
    /embed/batch."""
    params = {"model": f"{two_versions.name}@1", "precision": "fp32"}
    recording = read_wfdb(data_dir / f"{RECORDS[0]}.hea")
    reference = client.post("/embed", params=params, files=wfdb_files(data_dir / RECORDS[0])).json()
    reversed_rows = npy_bytes(recording.signal[::-1].copy())
    form = {"fs": "500", "leads": " , ".join(recording.lead_names[::-1])}
    single = client.post("/embed", params=params, files=[("files", ("r.npy", reversed_rows))], data=form)
    assert single.status_code == 200, single.text
    files = [("files", ("a.npy", reversed_rows)), ("files", ("b.npy", reversed_rows))]
    several = client.post("/embed/batch", params=params, files=files, data=form)
    assert several.status_code == 200, several.text
    for embedding in [single.json()["embedding"], *(r["embedding"] for r in several.json()["records"])]:
        np.testing.assert_allclose(embedding, reference["embedding"], atol=1e-5)


def test_bench_summary_claims_int8_only_when_its_variant_passed() -> None:
    from bench.serve import summary_lines

    rates = {1: {"PyTorch eager fp32": 10.0, "ONNX Runtime fp32": 15.0, "ONNX Runtime int8": 32.0}}
    passed = summary_lines(rates, {"status": "passed", "cosine_min": 0.9995})
    assert passed == [
        "  batch  1: int8 3.20x, ONNX Runtime fp32 1.50x PyTorch eager (int8 variant passed, cosine to fp32 "
        "min 0.9995)"
    ]
    for status in ("failed", "unchecked"):
        (line,) = summary_lines(rates, {"status": status, "cosine_min": 0.98 if status == "failed" else None})
        assert f"int8 variant {status}" in line and "not counted against the int8 target" in line
        assert not line.startswith("  batch  1: int8")
    (line,) = summary_lines({1: {k: v for k, v in rates[1].items() if "int8" not in k}}, {"status": "error"})
    assert "int8 variant error" in line and "not measured" in line


def test_predict_gives_a_record_whose_run_fails_its_own_422_error(data_dir: Path) -> None:
    """/predict as /embed: a run that fails on one record (isolated by the batcher) fails that record alone,
    as a client error naming it, in its place; the others get their probabilities."""
    from types import SimpleNamespace

    from services.inference.predict import Classifier, Predicted, predict_recordings

    class Run:
        def __init__(self, windows: np.ndarray, fails: bool):
            self.windows, self.fails = windows, fails

        def result(self, timing=None) -> list[np.ndarray]:
            if self.fails:
                raise RuntimeError("the session cannot run this record")
            return [np.full((len(self.windows), 5), 0.25, np.float32)]

    submitted: list[Run] = []

    def submit(windows: np.ndarray, outputs=()) -> Run:
        submitted.append(Run(windows, fails=len(submitted) == 1))
        return submitted[-1]

    loaded = SimpleNamespace(model=SimpleNamespace(spec=SPEC), submit=submit)
    recordings = [read_wfdb(data_dir / f"{record}.hea") for record in RECORDS[:3]]
    how = Classifier("head", ("NORM", "MI", "STTC", "CD", "HYP"), (0.5,) * 5)
    results = predict_recordings(loaded, recordings, how)
    assert isinstance(results[0], Predicted) and isinstance(results[2], Predicted)
    assert results[0].windows == 3
    assert isinstance(results[1], ClientError) and "could not run on this record" in str(results[1])
    assert "00002_hr" in str(results[1]) and "cannot run this record" in str(results[1])
