"""Bad request bodies and path parameters get a 4xx naming the problem, never a 500 (issue 13, items 4 and 6).

The twelve 500s an outside tester found (control characters in path fields, ids out of type or range,
non-finite numbers), the inputs that were wrongly accepted (an empty dataset path, a seed of 10**30), and
what the API discloses: dataset paths relative to the data root, job errors as one-line messages (the
traceback stays in the worker log). The upload cases (a WFDB header's fs, /embed/batch with no readable
record) are in tests/test_bad_input.py.
"""

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from services.config import get_settings

FINETUNE = {"family": "resnet1d", "method": "linear_probe", "dataset": "ptbxl-500"}
EVALUATE = {"model": "no-such-model@1", "dataset": "ptbxl-500"}


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    """The app with server errors answered as 500s (not raised into the test), to assert there are none."""
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def detail_text(response) -> str:  # noqa: ANN001
    """The 4xx's message(s): a string, or the validation errors' locations and messages."""
    detail = response.json()["detail"]
    if isinstance(detail, str):
        return detail
    return " | ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in detail)


def raw_json(text: str) -> dict:
    """Keyword arguments posting ``text`` as a JSON body exactly as written (NaN, Infinity)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def jobs_count(api: TestClient) -> int:
    return len(api.get("/jobs", params={"limit": 500}).json()["jobs"])


# (method, url, request keyword arguments, status, what the message must contain)
CASES: dict[str, tuple[str, str, dict, int, list[str]]] = {
    "NUL in POST /datasets path": (
        "POST",
        "/datasets",
        {"json": {"name": "nul", "kind": "ptbxl", "path": "ptbxl-500\x00"}},
        422,
        ["path", "control character", "U+0000"],
    ),
    "NUL in a pretraining dataset path": (
        "POST",
        "/jobs/pretrain",
        {"json": {"dataset": "ptbxl-500\x00/x"}},
        422,
        ["dataset", "control character"],
    ),
    "NUL in a pretraining dataset list entry": (
        "POST",
        "/jobs/pretrain",
        {"json": {"dataset": [{"dataset": "ptbxl-500"}, {"dataset": "a\x00b"}]}},
        422,
        ["dataset.list.1.dataset", "control character"],
    ),
    "NUL in a finetune dataset path": (
        "POST",
        "/jobs/finetune",
        {"json": {**FINETUNE, "dataset": "ptbxl-500\x00"}},
        422,
        ["dataset", "control character"],
    ),
    "NUL in a model-import path": (
        "POST",
        "/models/import",
        {"json": {"format": "st_mem", "path": "ckpt\x00.pth", "name": "imported"}},
        422,
        ["path", "control character"],
    ),
    "newline in a dataset path": (
        "POST",
        "/datasets",
        {"json": {"name": "nl", "kind": "ptbxl", "path": "ptbxl-500\n"}},
        422,
        ["path", "U+000A"],
    ),
    "GET /datasets/² (a digit that is no integer)": (
        "GET",
        "/datasets/²",
        {},
        404,
        ["'²' is not registered"],
    ),
    "NUL in GET /datasets/{name}": ("GET", "/datasets/a%00b", {}, 422, ["dataset name", "U+0000"]),
    "NUL in GET /models/{name}": ("GET", "/models/a%00b", {}, 404, ["is not registered"]),
    "NUL in GET /models/{name}/aliases": ("GET", "/models/x@%00/aliases", {}, 404, ["is not registered"]),
    "GET /datasets/ with 5000 nines": (
        "GET",
        "/datasets/" + "9" * 5000,
        {},
        422,
        ["dataset id", "1 to 2147483647"],
    ),
    "GET /datasets/99999999999999999999": (
        "GET",
        "/datasets/99999999999999999999",
        {},
        422,
        ["dataset id 99999999999999999999", "1 to 2147483647"],
    ),
    "Infinity in pretrain warmup_epochs": (
        "POST",
        "/jobs/pretrain",
        raw_json('{"dataset": "ptbxl-500", "warmup_epochs": Infinity}'),
        422,
        ["warmup_epochs", "finite number"],
    ),
    "Infinity in finetune warmup_epochs": (
        "POST",
        "/jobs/finetune",
        raw_json(
            '{"family": "resnet1d", "method": "linear_probe", "dataset": "ptbxl-500", '
            '"warmup_epochs": Infinity}'
        ),
        422,
        ["warmup_epochs", "finite number"],
    ),
    "Infinity in vqvae.dead_threshold": (
        "POST",
        "/jobs/finetune",
        raw_json(
            '{"family": "st_mem", "method": "vqvae", "dataset": "ptbxl-500", '
            '"vqvae": {"dead_threshold": Infinity}}'
        ),
        422,
        ["vqvae.dead_threshold", "finite number"],
    ),
    "NaN in pretrain learning_rate": (
        "POST",
        "/jobs/pretrain",
        raw_json('{"dataset": "ptbxl-500", "learning_rate": NaN}'),
        422,
        ["learning_rate", "finite number"],
    ),
    "NaN in finetune learning_rate": (
        "POST",
        "/jobs/finetune",
        raw_json(
            '{"family": "resnet1d", "method": "linear_probe", "dataset": "ptbxl-500", "learning_rate": NaN}'
        ),
        422,
        ["learning_rate", "finite number"],
    ),
    "-Infinity in evaluate probe_learning_rate": (
        "POST",
        "/jobs/evaluate",
        raw_json('{"model": "m@1", "dataset": "ptbxl-500", "probe_learning_rate": -Infinity}'),
        422,
        ["probe_learning_rate", "finite number"],
    ),
    # wrongly accepted before
    "empty pretraining dataset": (
        "POST",
        "/jobs/pretrain",
        {"json": {"dataset": ""}},
        422,
        ["dataset", "empty"],
    ),
    "blank finetune dataset": (
        "POST",
        "/jobs/finetune",
        {"json": {**FINETUNE, "dataset": "  "}},
        422,
        ["dataset", "empty"],
    ),
    "empty evaluate dataset": (
        "POST",
        "/jobs/evaluate",
        {"json": {**EVALUATE, "dataset": ""}},
        422,
        ["dataset", "empty"],
    ),
    "the data root itself as a pretraining dataset": (
        "POST",
        "/jobs/pretrain",
        {"json": {"dataset": "."}},
        422,
        ["'.' is the data root itself", "a dataset folder or file under it"],
    ),
    "the data root itself registered": (
        "POST",
        "/datasets",
        {"json": {"name": "root", "kind": "wfdb_folder", "path": "./"}},
        422,
        ["is the data root itself"],
    ),
    "seed 10**30 (pretrain)": (
        "POST",
        "/jobs/pretrain",
        {"json": {"dataset": "ptbxl-500", "seed": 10**30}},
        422,
        ["seed", "less than or equal to 4294967295"],
    ),
    "seed 10**30 (finetune)": (
        "POST",
        "/jobs/finetune",
        {"json": {**FINETUNE, "seed": 10**30}},
        422,
        ["seed", "less than or equal to 4294967295"],
    ),
    "seed 2**32 (evaluate)": (
        "POST",
        "/jobs/evaluate",
        {"json": {**EVALUATE, "seed": 2**32}},
        422,
        ["seed", "less than or equal to 4294967295"],
    ),
    "embedding export with an unknown model": (
        "POST",
        "/jobs/embed",
        {"json": {"dataset": "ptbxl-500", "model": "no-such-model"}},
        404,
        ["'no-such-model' is not registered"],
    ),
    "embedding export with fold 11": (
        "POST",
        "/jobs/embed",
        {"json": {"dataset": "ptbxl-500", "model": "no-such-model", "folds": [11]}},
        422,
        ["folds", "strat_fold values 1-10"],
    ),
    "embedding export with record_limit 0 and an unknown precision": (
        "POST",
        "/jobs/embed",
        {"json": {"dataset": "ptbxl-500", "model": "m", "record_limit": 0, "precision": "int4"}},
        422,
        ["record_limit", "greater than or equal to 1", "precision", "'fp32'"],
    ),
    "embedding export without a model": (
        "POST",
        "/jobs/embed",
        {"json": {"dataset": "ptbxl-500"}},
        422,
        ["body.model", "Field required"],
    ),
    "an integer of 5000 digits in a JSON body": (
        "POST",
        "/jobs/pretrain",
        raw_json('{"dataset": "ptbxl-500", "seed": ' + "9" * 5000 + "}"),
        400,  # Python's JSON parser refuses integers over 4300 digits; FastAPI answers its generic 400
        ["error parsing the body"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_requests_get_a_4xx_naming_the_problem(api: TestClient, case: str) -> None:
    method, url, kwargs, status, expected = CASES[case]
    datasets_before, jobs_before = len(api.get("/datasets").json()["datasets"]), jobs_count(api)
    response = api.request(method, url, **kwargs)
    assert response.status_code == status, f"{case}: {response.status_code} {response.text[:500]}"
    message = detail_text(response)
    for part in expected:
        assert part in message, f"{case}: {part!r} not in {message!r}"
    assert len(api.get("/datasets").json()["datasets"]) == datasets_before, "a refused dataset was stored"
    assert jobs_count(api) == jobs_before, "a refused job was stored"


def test_the_422_echoes_non_finite_inputs_as_strings(api: TestClient) -> None:
    """The validation answer keeps FastAPI's detail array; a NaN / Infinity input is echoed as a string."""
    response = api.post(
        "/jobs/pretrain", **raw_json('{"dataset": "d", "learning_rate": NaN, "mask_ratio": -Infinity}')
    )
    assert response.status_code == 422, response.text
    errors = {e["loc"][-1]: e for e in response.json()["detail"]}
    assert errors["learning_rate"]["input"] == "NaN" and errors["learning_rate"]["type"] == "finite_number"
    assert errors["mask_ratio"]["input"] == "-Infinity"
    assert errors["learning_rate"]["loc"] == ["body", "learning_rate"]


def test_a_valid_seed_at_the_top_of_its_range_is_taken(api: TestClient) -> None:
    created = api.post("/jobs/pretrain", json={"dataset": "ptbxl-500", "seed": 2**32 - 1, "epochs": 1})
    assert created.status_code == 202, created.text
    api.post(f"/jobs/{created.json()['job_id']}/cancel")


# --------------------------------------------------------------------------------------------------
# item 6: no disclosure


def test_dataset_paths_are_shown_relative_to_the_data_root(api: TestClient) -> None:
    created = api.post("/datasets", json={"name": "relative-npz", "kind": "npz",
                                          "path": str(get_settings().data_root / "ptbxl-unlabelled" /
                                                      "ptbxl_unlabelled_250hz.npz")})  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.json()["path"] == "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"
    listed = {d["name"]: d for d in api.get("/datasets").json()["datasets"]}
    assert listed["relative-npz"]["path"] == "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"
    assert (
        api.get(f"/datasets/{created.json()['id']}").json()["path"]
        == "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"
    )
    root = str(Path(get_settings().data_root).resolve())
    assert root not in api.get("/datasets").text


def _failing_job(body) -> tuple[str, str]:  # noqa: ANN001
    """Run a queued job whose body is ``body``; (its stored error, the job's id)."""
    from services.db.models import Job
    from services.db.session import session_scope
    from services.jobs.runner import run_job

    class Nothing(BaseModel):
        pass

    with session_scope() as s:
        from services.jobs.store import create_job

        job_id = create_job(s, "pretrain", Nothing(), epochs=1).id
    assert run_job(job_id, "test-worker", body) == "failed"
    with session_scope() as s:
        return s.get(Job, job_id).error, str(job_id)


def test_a_crashed_job_shows_a_one_line_error_and_logs_the_traceback(
    api: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    root = Path(get_settings().data_root).resolve()

    def body(params: dict, reporter: object) -> None:
        (root / "ptbxl-500" / "no-such-file.npy").open()

    with caplog.at_level(logging.ERROR, logger="services.jobs.runner"):
        error, job_id = _failing_job(body)
    assert "\n" not in error and "Traceback" not in error, error
    assert str(root) not in error and "/work" not in error, error
    assert error.startswith("FileNotFoundError: ") and "ptbxl-500/no-such-file.npy" in error, error
    assert "worker log" in error
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert job_id in logged and "Traceback" in logged and str(root) in logged  # the full story, in the log

    shown = api.get(f"/jobs/{job_id}").json()["error"]
    assert shown == error


def test_a_job_refused_by_the_worker_shows_a_one_line_error(api: TestClient) -> None:
    from services.jobs.pretrain import PretrainParams

    def body(params: dict, reporter: object) -> None:
        PretrainParams.model_validate({"dataset": "x", "epochs": 0, "seed": -1})

    error, _ = _failing_job(body)
    assert "\n" not in error, error
    assert "epochs" in error and "seed" in error and "greater than or equal to" in error, error


def test_a_job_error_never_carries_an_absolute_path() -> None:
    from services.jobs.runner import public_error

    settings = get_settings()
    artifacts = Path(settings.artifact_dir).resolve()
    exc = OSError(f"cannot write {artifacts}/jobs/abc/x.pt (see /usr/lib/python3/site.py): disk full")
    assert public_error(exc) == (
        "OSError: cannot write <artifacts>/jobs/abc/x.pt (see site.py): disk full "
        "(the worker log has the traceback)"
    )
    assert (
        public_error(RuntimeError("two\nlines"))
        == "RuntimeError: two lines (the worker log has the traceback)"
    )
    assert len(public_error(RuntimeError("x" * 5000))) == 500
    root = Path(settings.data_root).resolve()
    assert public_error(RuntimeError(f"{root} or {root}/a/b.npy, not {root}x/c.npy")) == (
        "RuntimeError: . or a/b.npy, not c.npy (the worker log has the traceback)"
    )
