"""Self-training (``POST /jobs/finetune`` with ``unlabelled``): the trained model labels an unlabelled set,
students train on both and are served; the requests it refuses."""

import uuid
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from services.db.models import ModelVersion
from services.db.session import session_scope
from services.jobs.runner import metric_prefix
from services.jobs.store import job_dir
from tests.test_downstream import finished, post_job

UNLABELLED = "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz"
CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")


def test_self_training_labels_the_unlabelled_records_and_serves_the_students(
    client: TestClient, data_dir: Path
) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "finetune",
            "record_limit": 100, "epochs": 2, "ensemble": 2, "seed": 5, "unlabelled": UNLABELLED}  # fmt: skip
    job = finished(client, post_job(client, "finetune", body))
    result = job["result"]
    st = result["self_training"]
    unlabelled = np.load(data_dir / UNLABELLED)["signals"]
    assert st["unlabelled_records"] == st["unlabelled_segments"] == len(unlabelled) == 1320  # 10-s records
    # the teacher's mean probability per class: real probabilities, NORM the commonest in PTB-XL
    assert set(st["soft_label_mean"]) == set(CLASSES)
    assert all(0.0 < p < 1.0 for p in st["soft_label_mean"].values())
    assert st["soft_label_mean"]["NORM"] == max(st["soft_label_mean"].values())
    assert len(st["teacher"]["members"]) == 2 and 0.0 <= st["teacher"]["crossfit_val_macro_auroc"] <= 1.0
    assert len(result["members"]) == 2 and 0.0 <= result["crossfit_val_macro_auroc"] <= 1.0  # the students'
    names = {name for m in job["metrics"] for name in m["values"]}
    assert {"val_macro_auroc", "member2_val_macro_auroc", "student1_val_macro_auroc",
            "student2_val_macro_auroc"} <= names  # fmt: skip

    # what is served is the students (their kept epochs' weights), not the teacher
    with session_scope() as s:
        version = s.query(ModelVersion).filter_by(source_job_id=uuid.UUID(job["id"])).one()
        folder = Path(version.onnx_path).parent
    served = torch.load(folder / "downstream.pt", weights_only=True)["state_dict"]
    work = job_dir(uuid.UUID(job["id"]))
    for k, (student, teacher) in enumerate(
        [("best-student1.pt", "best.pt"), ("best-student2.pt", "best-2.pt")]
    ):
        kept = {
            f"members.{k}.{n}": v
            for n, v in torch.load(work / student, weights_only=True)["state_dict"].items()
        }
        was = {
            f"members.{k}.{n}": v
            for n, v in torch.load(work / teacher, weights_only=True)["state_dict"].items()
        }
        assert all(torch.equal(served[n], v) for n, v in kept.items())
        assert not all(torch.equal(served[n], v) for n, v in was.items())


def test_a_student_member_metrics_are_resumed_by_their_own_prefix() -> None:
    assert metric_prefix("student2_val_macro_auroc") == "student2_"
    assert metric_prefix("member3_train_loss") == "member3_"
    assert metric_prefix("val_macro_auroc") == ""


def test_self_training_on_the_labelled_dataset_itself_is_a_422_naming_both(client: TestClient) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "finetune",
            "epochs": 1, "unlabelled": "ptbxl-500"}  # fmt: skip
    response = client.post("/jobs/finetune", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "'unlabelled' ('ptbxl-500') is the same data as 'dataset'" in detail
    assert "validation and test records" in detail


def test_self_training_of_a_linear_probe_is_a_422_naming_the_field(client: TestClient) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "linear_probe",
            "unlabelled": UNLABELLED}  # fmt: skip
    response = client.post("/jobs/finetune", json=body)
    assert response.status_code == 422, response.text
    assert "'unlabelled' (self-training) goes with method 'finetune' only" in str(response.json())


def test_self_training_on_a_missing_unlabelled_path_is_a_4xx_and_queues_nothing(client: TestClient) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "finetune",
            "unlabelled": "no-such-folder/none.npz"}  # fmt: skip
    before = client.get("/jobs?limit=500").json()
    response = client.post("/jobs/finetune", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert "no-such-folder/none.npz" in str(response.json())
    assert client.get("/jobs?limit=500").json() == before
