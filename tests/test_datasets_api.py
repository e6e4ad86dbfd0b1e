"""Registering datasets over HTTP, and pretraining jobs that use them (real data, real PostgreSQL)."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def ptbxl_100(client: TestClient) -> dict:
    body = {
        "name": "ptbxl-500-at-100hz",
        "kind": "ptbxl",
        "path": "ptbxl-500",
        "options": {"sampling_rate": 100},
    }
    response = client.post("/datasets", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_register_ptbxl_returns_its_summary(client: TestClient, ptbxl_100: dict) -> None:
    summary = ptbxl_100["summary"]
    assert summary["records"] == 500
    assert summary["label_counts"] == {"NORM": 297, "MI": 73, "STTC": 96, "CD": 78, "HYP": 40}
    assert summary["unlabelled"] == 12
    assert summary["sampling_rates"] == {"100": 500}
    assert summary["folds"]["10"] == 66 and sum(summary["folds"].values()) == 500
    assert ptbxl_100["path"] == "ptbxl-500"  # relative to the data root: no server path is shown

    listed = client.get("/datasets").json()["datasets"]
    assert any(d["name"] == "ptbxl-500-at-100hz" for d in listed)
    assert client.get(f"/datasets/{ptbxl_100['id']}").json()["name"] == "ptbxl-500-at-100hz"
    assert client.get("/datasets/ptbxl-500-at-100hz").json()["id"] == ptbxl_100["id"]
    again = client.post(
        "/datasets", json={"name": "ptbxl-500-at-100hz", "kind": "ptbxl", "path": "ptbxl-500"}
    )
    assert again.status_code == 409 and "already registered" in again.json()["detail"]


def test_register_npz_and_synthetic(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    npz = client.post(
        "/datasets",
        json={"name": "unlabelled", "kind": "npz", "path": "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"},
    )
    assert npz.status_code == 201, npz.text
    assert npz.json()["summary"]["records"] == 1320 and npz.json()["summary"]["label_counts"] == {}

    synthetic = client.post(
        "/datasets", json={"name": "synthetic-8", "kind": "synthetic", "options": {"n": 8}}
    )
    assert synthetic.status_code == 201, synthetic.text
    assert synthetic.json()["path"] is None and synthetic.json()["summary"]["records"] == 8


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"name": "x", "kind": "edf_folder", "path": "ptbxl-500"}, 422, "kind"),
        ({"name": "x", "kind": "ptbxl", "path": "../../etc"}, 422, "outside the data root"),
        ({"name": "x", "kind": "ptbxl", "path": "nothing-here"}, 422, "does not exist"),
        ({"name": "x", "kind": "ptbxl"}, 422, "needs 'path'"),
        (
            {"name": "x", "kind": "ptbxl", "path": "ptbxl-500", "options": {"sampling_rate": 250}},
            422,
            "sampling_rate",
        ),
        ({"name": "x", "kind": "ptbxl", "path": "ptbxl-500", "options": {"bogus": 1}}, 422, "bogus"),
        ({"name": "x", "kind": "ptbxl", "path": "ptbxl-unlabelled"}, 422, "ptbxl_database.csv"),
        ({"name": "x", "kind": "synthetic", "path": "ptbxl-500"}, 422, "takes no path"),
        ({"name": "x", "kind": "synthetic", "options": {"n": 0}}, 422, "n"),
        ({"name": "bad name!", "kind": "ptbxl", "path": "ptbxl-500"}, 422, "name"),
        ({"name": "x", "kind": "ptbxl", "path": "ptbxl-500", "extra": True}, 422, "extra"),
    ],
)
def test_bad_dataset_registrations(client: TestClient, body: dict, status: int, expected: str) -> None:
    before = len(client.get("/datasets").json()["datasets"])
    response = client.post("/datasets", json=body)
    assert response.status_code == status, response.text
    assert expected in response.text
    assert len(client.get("/datasets").json()["datasets"]) == before


def test_unknown_dataset_is_404(client: TestClient) -> None:
    assert client.get("/datasets/999999").status_code == 404
    assert client.get("/datasets/no-such-name").status_code == 404


def test_pretrain_on_a_registered_dataset(client: TestClient, ptbxl_100: dict) -> None:
    created = client.post(
        "/jobs/pretrain", json={"dataset": "ptbxl-500-at-100hz", "epochs": 1, "folds": [1, 2]}
    )
    assert created.status_code == 202, created.text
    job = client.get(f"/jobs/{created.json()['job_id']}").json()
    assert job["dataset"] == "ptbxl-500-at-100hz"
    client.post(f"/jobs/{job['id']}/cancel")


def test_pretrain_folds_must_fit_the_dataset(client: TestClient) -> None:
    no_folds = client.post("/jobs/pretrain", json={"dataset": "ptbxl-unlabelled", "folds": [1]})
    assert no_folds.status_code == 422 and "has no folds" in no_folds.json()["detail"]


# --------------------------------------------------------------------------------------------------
# pretraining on several datasets in one job (the job itself runs in tests/test_e2e.py)

UNLABELLED_NPZ = "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"


def test_pretrain_on_a_list_of_datasets_is_queued_with_each_entry(client: TestClient) -> None:
    body = {
        "dataset": [
            {"dataset": UNLABELLED_NPZ, "record_limit": 40},
            {"dataset": "ptbxl-500", "folds": [1, 2], "record_limit": 30},
            "ptbxl-500-at-100hz-list",
        ],
        "epochs": 1,
    }
    registered = client.post(
        "/datasets",
        json={
            "name": "ptbxl-500-at-100hz-list",
            "kind": "ptbxl",
            "path": "ptbxl-500",
            "options": {"sampling_rate": 100},
        },
    )
    assert registered.status_code == 201, registered.text
    created = client.post("/jobs/pretrain", json=body)
    assert created.status_code == 202, created.text
    job = client.get(f"/jobs/{created.json()['job_id']}").json()
    assert job["dataset"] == UNLABELLED_NPZ  # the job row keeps the first entry's dataset
    assert job["params"]["dataset"][2] == {
        "dataset": "ptbxl-500-at-100hz-list",
        "folds": None,
        "record_limit": None,
    }
    asked = [(d["name"], d["folds"], d["record_limit"], d["records"]) for d in job["datasets"]]
    assert asked == [
        (UNLABELLED_NPZ, None, 40, None),  # counted once the worker has prepared them
        ("ptbxl-500", [1, 2], 30, None),
        ("ptbxl-500-at-100hz-list", None, None, None),
    ]
    assert job["datasets"][0]["kind"] == "npz"
    client.post(f"/jobs/{job['id']}/cancel")

    single = client.post("/jobs/pretrain", json={"dataset": "ptbxl-500", "folds": [1], "record_limit": 8})
    assert single.status_code == 202, single.text  # one dataset as before, job-wide folds and record_limit
    job = client.get(f"/jobs/{single.json()['job_id']}").json()
    assert job["datasets"] == [
        {"name": "ptbxl-500", "kind": "ptbxl", "folds": [1], "record_limit": 8, "records": None,
         "segments": None, "train_segments": None, "val_segments": None, "skipped": None}
    ]  # fmt: skip
    client.post(f"/jobs/{job['id']}/cancel")


@pytest.mark.parametrize(
    ("dataset", "extra", "status", "expected"),
    [
        ([], {}, 422, "'dataset' is an empty list"),
        (["ptbxl-500", "no-such-dataset"], {}, 422, "dataset[1] 'no-such-dataset': "),
        (["ptbxl-500", "../../etc"], {}, 422, "outside the data root"),
        (
            [{"dataset": UNLABELLED_NPZ, "folds": [1, 2]}],
            {},
            422,
            f"dataset[0] '{UNLABELLED_NPZ}': 'folds' was",
        ),
        ([{"dataset": "ptbxl-500", "folds": [11]}], {}, 422, "strat_fold values 1-10"),
        ([{"dataset": "ptbxl-500", "record_limit": 1}], {}, 422, "record_limit"),
        ([{"dataset": "ptbxl-500", "limit": 5}], {}, 422, "limit"),
        (["ptbxl-500", UNLABELLED_NPZ], {"folds": [1]}, 422, "give 'folds' per entry"),
        (["ptbxl-500", UNLABELLED_NPZ], {"record_limit": 9}, 422, "give 'record_limit' per entry"),
        (["ptbxl-500", UNLABELLED_NPZ, "ptbxl-500"], {}, 422, "dataset[2] 'ptbxl-500' repeats dataset[0]"),
        (
            [UNLABELLED_NPZ, "./ptbxl-unlabelled/../" + UNLABELLED_NPZ],
            {},
            422,
            "is the same data as dataset[0]",
        ),
    ],
)
def test_bad_dataset_lists_get_4xx_naming_the_entry(
    client: TestClient, dataset: list, extra: dict, status: int, expected: str
) -> None:
    before = len(client.get("/jobs", params={"limit": 500}).json()["jobs"])
    response = client.post("/jobs/pretrain", json={"dataset": dataset, "epochs": 1, **extra})
    assert response.status_code == status, response.text
    assert expected in response.text, response.text
    assert len(client.get("/jobs", params={"limit": 500}).json()["jobs"]) == before, (
        "a rejected job was stored"
    )
