"""Downstream: RandAugment ops and 3-crop evaluation (unit), then every job method end to end on real
PTB-XL records with a tiny ST-MEM: POST through the API, the job run as the worker runs it, its result,
PNG artifacts and registered version, and /predict (head and kNN) against PyTorch."""

import io
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from services.config import get_settings
from services.db.models import Job, ModelVersion
from services.db.session import session_scope
from services.ecg.preprocess import InputSpec, Reading, prepare_signal, preprocess, three_crop_starts
from services.ecg.readers import read_wfdb
from services.evaluation.metrics import tune_thresholds
from services.inference.embed import SESSIONS, ServedModel, embed_recordings
from services.jobs.downstream import fit_linear_head, head_scores
from services.jobs.labelled import crops, features_of, open_labelled, three_crop, torch_fn
from services.jobs.runner import JobReporter
from services.models.checkpoints import load_saved_encoder
from services.models.heads import DiagnosisModel, LinearHead
from services.registry import resolve_model_version
from services.training import augment
from services.training.augment import Augmented, RandAugment
from services.training.loop import TrainConfig
from tests.test_api import queued_tasks, wfdb_files

RECORD = "ptbxl-500/records500/00000/00010_hr"  # ecg_id 10, strat_fold 9 (validation split)
PNG = b"\x89PNG\r\n\x1a\n"
L = 2250


def _window(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((12, L)).astype(np.float32) + 1.0  # no zeros


# --------------------------------------------------------------------------------------------------
# RandAugment ops (methods.md 1.1, level 10)


def test_shift_moves_the_signal_by_at_most_30_percent_with_zero_fill() -> None:
    x = _window()
    for seed in range(20):
        y = augment.shift(x, np.random.default_rng(seed))
        zero_cols = np.flatnonzero((y == 0).all(axis=0))
        n = len(zero_cols)
        assert n <= 0.3 * L
        if n and zero_cols[0] == 0:  # shifted right: y[:, n:] = x[:, :-n]
            np.testing.assert_array_equal(y[:, n:], x[:, : L - n])
        elif n:  # shifted left
            assert zero_cols[-1] == L - 1
            np.testing.assert_array_equal(y[:, : L - n], x[:, n:])
        else:
            np.testing.assert_array_equal(y, x)


def test_cutout_zeroes_one_contiguous_span_of_every_lead() -> None:
    x = _window()
    spans = []
    for seed in range(20):
        y = augment.cutout(x, np.random.default_rng(seed))
        changed = np.flatnonzero((y != x).any(axis=0))
        if len(changed):
            assert (y[:, changed] == 0).all()  # all leads zero there
            assert changed[-1] - changed[0] + 1 == len(changed)  # one contiguous span
        assert len(changed) <= 0.3 * L
        np.testing.assert_array_equal(np.delete(y, changed, axis=1), np.delete(x, changed, axis=1))
        spans.append(len(changed))
    assert max(spans) > 0.15 * L  # the span is U(0, 0.3) L, not a fixed small one


def test_drop_zeroes_random_time_indices_in_every_lead() -> None:
    x = _window()
    y = augment.drop(x, np.random.default_rng(3))
    dropped = np.flatnonzero((y == 0).all(axis=0))
    assert 0 < len(dropped) <= 0.3 * L
    assert np.diff(dropped).max() > 1  # scattered indices, not a span
    assert ((y == 0).any(axis=0) == (y == 0).all(axis=0)).all()  # the same indices in every lead
    np.testing.assert_array_equal(np.delete(y, dropped, axis=1), np.delete(x, dropped, axis=1))


def test_flip_negates_and_erase_zeroes_one_lead() -> None:
    x = _window()
    np.testing.assert_array_equal(augment.flip(x, np.random.default_rng(0)), -x)
    y = augment.erase(x, np.random.default_rng(1))
    erased = np.flatnonzero((y == 0).all(axis=1))
    assert len(erased) == 1
    np.testing.assert_array_equal(np.delete(y, erased, axis=0), np.delete(x, erased, axis=0))


def test_sine_adds_two_cycles_of_amplitude_0_3() -> None:
    x = _window()
    added = augment.sine(x, np.random.default_rng(0)) - x
    np.testing.assert_allclose(added, added[:1].repeat(12, axis=0), atol=1e-6)  # the same in every lead
    expected = 0.3 * np.sin(2 * np.pi * np.arange(L) / L / 0.5)
    np.testing.assert_allclose(added[0], expected, atol=1e-5)
    assert np.abs(added).max() == pytest.approx(0.3, abs=1e-4)
    assert (np.diff(added[0][1:] > 0) != 0).sum() == 3  # 2 cycles: 3 sign changes after t = 0


def test_partial_sine_and_white_noise_touch_one_span_only() -> None:
    x = _window()
    sine = 0.3 * np.sin(2 * np.pi * np.arange(L) / L / 0.5)
    for seed in range(10):
        added = augment.partial_sine(x, np.random.default_rng(seed)) - x
        where = np.flatnonzero(np.abs(added).max(axis=0) > 1e-6)
        if len(where):
            span = np.arange(where[0], where[-1] + 1)
            assert len(span) <= 0.3 * L
            np.testing.assert_allclose(
                added[:, span], np.broadcast_to(sine[span], (12, len(span))), atol=1e-5
            )
    noisy = []
    for seed in range(10):
        added = augment.partial_white_noise(x, np.random.default_rng(seed)) - x
        where = np.flatnonzero((added != 0).any(axis=0))
        if len(where):
            assert where[-1] - where[0] + 1 == len(where) <= 0.3 * L
            noisy.append(added[:, where])
    values = np.concatenate([n.ravel() for n in noisy])
    assert values.std() == pytest.approx(0.3, rel=0.05)  # 0.3 N(0, 1)
    assert abs(values.mean()) < 0.02


def test_randaugment_draws_two_different_ops_each_with_probability_half(monkeypatch) -> None:
    calls: list[list[str]] = []

    def recorder(name: str):
        def op(x: np.ndarray, rng: np.random.Generator, level: float = 10) -> np.ndarray:
            calls[-1].append(name)
            return x + 1

        return op

    monkeypatch.setattr(augment, "OPS", {name: recorder(name) for name in "abc"})
    policy = RandAugment(ops=("a", "b", "c"))
    for seed in range(3000):
        calls.append([])
        policy(np.zeros((2, 10), np.float32), np.random.default_rng(seed))
    assert all(len(c) == len(set(c)) <= 2 for c in calls)  # two ops drawn without replacement
    applied = np.array([len(c) for c in calls])
    assert applied.mean() == pytest.approx(1.0, abs=0.05)  # 2 ops x p 0.5
    assert (applied == 0).mean() == pytest.approx(0.25, abs=0.03)
    per_op = {name: sum(name in c for c in calls) / len(calls) for name in "abc"}
    assert all(v == pytest.approx(2 / 3 * 0.5, abs=0.04) for v in per_op.values()), per_op


def test_augmented_dataset_is_reproducible_per_epoch_and_changes_between_epochs() -> None:
    windows = torch.from_numpy(np.stack([_window(i) for i in range(4)]))
    data = Augmented(windows, RandAugment(p=1.0), seed=7)
    first = [data[i] for i in range(4)]
    assert all(torch.equal(a, data[i]) for i, a in enumerate(first))
    assert any(not torch.equal(a, windows[i]) for i, a in enumerate(first))
    data.set_epoch(1)
    assert any(not torch.equal(a, data[i]) for i, a in enumerate(first))


# --------------------------------------------------------------------------------------------------
# 3-crop test-time averaging (methods.md 1.4)


def test_three_crops_start_at_0_125_250_and_are_averaged() -> None:
    assert three_crop_starts(2500, 2250) == [0, 125, 250]
    assert three_crop_starts(2500, 2500) == [0]
    ramp = np.tile(np.arange(2500, dtype=np.float32), (2, 12, 1))  # (segments, leads, samples)
    ramp[1] *= 2
    c = crops(ramp, 0, 2250)
    assert c.shape == (3, 12, 2250)
    # each crop standardised on its own: a ramp crop standardises to the same values wherever it starts,
    # so compare the raw starts through a function that sees them: the mean of the first sample
    seen: list[np.ndarray] = []

    def fn(windows: np.ndarray) -> np.ndarray:
        seen.append(windows)
        return windows[:, 0, :5]  # (B, 5)

    out = three_crop(fn, ramp, np.array([0, 1]), 2250)
    windows = np.concatenate(seen)
    assert windows.shape == (6, 12, 2250)
    np.testing.assert_allclose(out, windows[:, 0, :5].reshape(2, 3, 5).mean(axis=1), rtol=1e-6)
    raw = [np.arange(s, s + 2250, dtype=np.float32) for s in (0, 125, 250)]
    for got, start_values in zip(windows[:3], raw, strict=True):
        standard = (start_values - start_values.mean()) / start_values.std()
        np.testing.assert_allclose(got[0], standard, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# the linear head's standardisation


def test_a_column_constant_in_training_is_not_blown_up_at_val_or_serve(tmp_path: Path) -> None:
    # e.g. a hybrid version's missing-measurement flag, 0 on every training record and 1 at val/serve
    rng = np.random.default_rng(0)
    train_x = rng.standard_normal((64, 8)).astype(np.float32)
    train_x[:, 7] = 0.0
    val_x = rng.standard_normal((16, 8)).astype(np.float32)
    labels = (rng.random((80, 5)) < 0.3).astype(np.float32)
    cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-2, warmup_epochs=0, amp=False)
    head, _ = fit_linear_head(
        {"train": train_x, "val": val_x}, {"train": labels[:64], "val": labels[64:]},
        cfg, torch.device("cpu"), tmp_path / "head.pt",
    )  # fmt: skip
    assert head.std[7].item() == 1.0  # std 1 where the training std is below 1e-6 (as StandardScaler)
    np.testing.assert_allclose(head.std[:7].numpy(), train_x[:, :7].std(0), rtol=1e-5)
    flagged = val_x.copy()
    flagged[:, 7] = 1.0
    # the flag moves the logits by one weight (|w| < 1 at initialisation, untrained: the column was 0),
    # not by 1e6 weights: the sigmoid is not saturated
    shift = head_scores(head, flagged) - head_scores(head, val_x)
    assert np.abs(shift).max() < 0.3, shift
    assert (np.abs(head_scores(head, flagged) - 0.5) < 0.49).all()


# --------------------------------------------------------------------------------------------------
# jobs end to end


def run_job(job_id: str) -> Job:
    """Run a queued job as the worker would (the task's services function) and return its row."""
    from services.jobs.evaluate import run_evaluate_job
    from services.jobs.finetune import run_finetune_job
    from services.jobs.pretrain import run_pretrain_job

    with session_scope() as s:
        kind = s.get(Job, uuid.UUID(job_id)).kind
    runner = {"pretrain": run_pretrain_job, "finetune": run_finetune_job, "evaluate": run_evaluate_job}[kind]
    runner(uuid.UUID(job_id), worker="test-worker")
    with session_scope() as s:
        return s.get(Job, uuid.UUID(job_id))


def post_job(client: TestClient, kind: str, body: dict) -> str:
    response = client.post(f"/jobs/{kind}", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert (f"ecgssl.{kind}", [job_id]) in queued_tasks(get_settings().broker_url)
    return job_id


def finished(client: TestClient, job_id: str) -> dict:
    job = run_job(job_id)
    assert job.status == "succeeded", job.error
    return client.get(f"/jobs/{job_id}").json()


def assert_pngs(client: TestClient, job: dict, expected: set[str]) -> None:
    """The job's PNGs are there, and each names (in its drawn title, stored in the file) the model version,
    the split with its size and a headline figure; probe and kNN figures say which they are."""
    assert expected <= set(job["artifacts"]), job["artifacts"]
    assert set(job["result"]["artifacts"]) == set(job["artifacts"])
    titles = job["result"]["figures"]
    assert set(titles) == set(job["artifacts"])
    model = job["result"]["model_version"]
    for name in job["artifacts"]:
        response = client.get(f"/jobs/{job['id']}/artifacts/{name}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content.startswith(PNG)
        with Image.open(io.BytesIO(response.content)) as drawn:
            assert drawn.text["Title"] == titles[name]
        image = Image.open(io.BytesIO(response.content))
        image.verify()
        assert image.size[0] > 300 and image.size[1] > 300
        what, rest = titles[name].split("\n")
        assert what.endswith(f" on {model}"), titles[name]
        assert re.search(r"\d+ records \| .*\d\.\d{3}", rest), titles[name]  # split size | headline figure
        if name.endswith("_knn.png"):
            assert ": kNN (k=" in what, titles[name]
        if "linear_probe" in name:
            assert ": linear probe" in what or ": linear_probe" in what, titles[name]


def upload(data_dir: Path) -> list:
    record = data_dir / RECORD
    return [
        ("files", (record.with_suffix(s).name, record.with_suffix(s).read_bytes())) for s in (".hea", ".dat")
    ]


@pytest.fixture(scope="module")
def base(client: TestClient) -> str:
    """A tiny ST-MEM pretrained for one epoch on 40 records by a real pretraining job: its 'name@version'."""
    job_id = post_job(client, "pretrain", {
        "dataset": "ptbxl-500", "epochs": 1, "record_limit": 40, "batch_size": 16, "learning_rate": 1e-3,
        "model_name": f"base-{uuid.uuid4().hex[:6]}",
    })  # fmt: skip
    return finished(client, job_id)["model_version"]


COMMON = {"dataset": "ptbxl-500", "record_limit": 100, "epochs": 2, "batch_size": 16, "knn_k": 5}


def test_evaluate_job_scores_protocols_stores_a_reference_and_serves_knn_predictions(
    client: TestClient, base: str, data_dir: Path
) -> None:
    body = {"model": base, "dataset": "ptbxl-500", "record_limit": 100, "knn_k": 5, "probe_epochs": 3,
            "map_method": "pca"}  # fmt: skip
    cached_before = list(SESSIONS._entries)
    job = finished(client, post_job(client, "evaluate", body))
    assert list(SESSIONS._entries) == cached_before  # the job's session closed with it (workers keep none)
    result = job["result"]
    assert job["kind"] == "evaluate" and result["records"] == {"train": 67, "val": 21, "test": 12}
    assert result["model_version"] == base and result["embedding_dim"] == 64
    for protocol in ("knn", "linear_probe"):
        scores = result[protocol]
        assert 0 <= scores["macro_auroc"] <= 1 and 0 <= scores["macro_f1"] <= 1
        assert scores["n_records"] == 12 and set(scores["thresholds"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    clusters = result["clustering"]
    assert (
        clusters["n_records"] <= 12 and -1 <= clusters["kmeans_ari"] <= 1 and 0 <= clusters["kmeans_nmi"] <= 1
    )
    assert clusters["davies_bouldin"] > 0 and -1 <= clusters["silhouette"] <= 1
    # the linear probe trained through the loop: one metrics row per epoch
    assert [m["epoch"] for m in job["metrics"]] == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_macro_auroc"} <= set(job["metrics"][-1]["values"])
    assert_pngs(client, job, {"roc_knn.png", "confusion_knn.png", "roc_linear_probe.png", "embedding_map.png",
                              "confusion_linear_probe.png", "history_linear_probe.png"})  # fmt: skip

    # the training embeddings became the base model's kNN reference set
    name, version = base.split("@")
    listed = client.get(f"/models/{name}/versions/{version}").json()
    assert listed["knn_reference"]["records"] == 67 and listed["knn_reference"]["k"] == 5
    assert "file" not in listed["knn_reference"]  # the artifact path stays internal
    response = client.post(f"/predict?model={base}", files=upload(data_dir))
    assert response.status_code == 200, response.text
    prediction = response.json()
    assert prediction["method"] == "knn" and prediction["knn"]["reference_records"] == 67
    probabilities = np.array(list(prediction["probabilities"].values()))
    np.testing.assert_allclose(probabilities * 5, np.round(probabilities * 5), atol=1e-6)  # votes of 5
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    for cls, p in prediction["probabilities"].items():
        threshold = prediction["thresholds"][cls]
        assert (cls in prediction["labels"]) == (threshold is not None and p >= threshold)
    assert prediction["record"]["windows"] == 3  # the 10-s record's 3 crops, as the reference was embedded

    # /predict?method=knn embeds a record as the job embedded its reference set (fp32 ONNX, 3 crops of
    # each 10-s segment): a training record uploaded comes out as its stored reference row
    with session_scope() as s:
        served = ServedModel.from_version(resolve_model_version(s, base))
    with np.load(served.knn_reference["file"]) as stored:
        reference, record_id = stored["embeddings"], str(stored["record_ids"][0])
    record = read_wfdb(data_dir / f"ptbxl-500/records500/00000/{int(record_id):05d}_hr.hea")
    with SESSIONS.lease(served, "fp32", strict=True) as loaded:
        (embedded,) = embed_recordings(loaded, [record], Reading("three_crop"))
        (sliding,) = embed_recordings(loaded, [record], Reading("sliding"))
    np.testing.assert_allclose(embedded.vector, reference[0], atol=1e-5)
    assert embedded.windows == 3 and np.abs(sliding.vector - reference[0]).max() > 1e-4  # a real check


@pytest.mark.parametrize("kind", ["finetune", "evaluate"])
def test_a_linear_probe_follows_from_the_job_seed_not_from_what_the_worker_ran_before(
    client: TestClient, base: str, kind: str
) -> None:
    # the same job twice, each after the worker process's torch RNG was left in a different state: the
    # probe head's initialisation, so every epoch's figures, come out the same
    body = {"model": base, "dataset": "ptbxl-500", "record_limit": 100, "knn_k": 5}
    body |= (
        {"method": "linear_probe", "epochs": 3}
        if kind == "finetune"
        else {"probe_epochs": 3, "store_reference": False}
    )
    runs = []
    for state in (1, 2):
        torch.manual_seed(state)
        job = finished(client, post_job(client, kind, body))
        probe = job["result"]["test" if kind == "finetune" else "linear_probe"]
        learnt = [
            {k: m["values"][k] for k in ("train_loss", "val_loss", "val_macro_auroc")} for m in job["metrics"]
        ]
        runs.append((learnt, probe["auroc_per_class"]))
    assert len(runs[0][0]) == 3 and any(v is not None for v in runs[0][1].values())
    assert runs[0] == runs[1], runs


def test_evaluate_job_on_a_test_split_of_one_class_reports_why_there_are_no_cluster_indices(
    client: TestClient, base: str
) -> None:
    # ptbxl-500's first 20 records: 14 train, 5 val and 1 test record (NORM): cluster indices are undefined
    # there, but the kNN and linear-probe results still come back
    body = {"model": base, "dataset": "ptbxl-500", "record_limit": 20, "knn_k": 5, "probe_epochs": 2,
            "store_reference": False}  # fmt: skip
    job = finished(client, post_job(client, "evaluate", body))
    result = job["result"]
    assert result["records"] == {"train": 14, "val": 5, "test": 1}
    clusters = result["clustering"]
    assert clusters["n_records"] == 1 and clusters["n_classes"] == 1
    for index in ("davies_bouldin", "silhouette", "calinski_harabasz", "kmeans_ari", "kmeans_nmi"):
        assert clusters[index] is None, index
    assert "at least 2 classes" in clusters["undefined_reason"]
    assert "at least 2 records" in clusters["embedding_map_skipped"]
    assert "embedding_map.png" not in job["artifacts"] and "roc_knn.png" in job["artifacts"]
    assert 0 <= result["knn"]["macro_f1"] <= 1 and 0 <= result["linear_probe"]["macro_f1"] <= 1


def registered_diagnosis_model(version: ModelVersion) -> DiagnosisModel:
    """The registered diagnosis model rebuilt in PyTorch from its saved weights."""
    folder = Path(version.onnx_path).parent
    encoder, _ = load_saved_encoder(folder / "encoder.pt")
    model = DiagnosisModel(encoder, LinearHead(64, 5))
    model.load_state_dict(torch.load(folder / "downstream.pt", weights_only=True)["state_dict"])
    return model.eval()


@dataclass
class JobEvaluation:
    """What the job's evaluation computes, recomputed from the registered model: per-class max-F1
    thresholds tuned on val and on test, and the val and test records' probabilities by record id."""

    thresholds: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]


def job_evaluation(version: ModelVersion, job_id: str) -> JobEvaluation:
    """Recomputed as the job does it: the job's dataset and splits, each record's cached 10-s segments
    through 3 crops (``features_of``), with the PyTorch model rebuilt from the saved weights."""
    with session_scope() as s:
        job = s.get(Job, uuid.UUID(job_id))
        data = open_labelled(
            job.dataset, InputSpec.from_dict(version.input_spec), job.params["record_limit"],
            JobReporter(job.id, writes=False),
        )  # fmt: skip
    fn = torch_fn(registered_diagnosis_model(version).probabilities, torch.device("cpu"))
    probs = {
        split: features_of(data, fn, data.spec.samples, data.records[split]) for split in ("val", "test")
    }
    ids = {split: data.cache.record_ids[data.records[split]].tolist() for split in probs}
    return JobEvaluation(
        {split: tune_thresholds(data.labels[data.records[split]], p) for split, p in probs.items()},
        {i: p for split in probs for i, p in zip(ids[split], probs[split], strict=True)},
    )


def ptb_probabilities(version: ModelVersion, ptb_record: Path) -> np.ndarray:
    """The PTB record (1000 Hz, 38.4 s) read as evaluation reads a cached record: the prepared signal cut
    into 10-s segments (3 here, the last 8.4 s dropped), 3 crops of each (``crops``), the mean."""
    spec = InputSpec.from_dict(version.input_spec)
    x = prepare_signal(read_wfdb(ptb_record), spec)  # (12, 9600) at 250 Hz
    segments = np.stack([x[:, i * 2500 : (i + 1) * 2500] for i in range(x.shape[1] // 2500)])
    assert segments.shape == (3, 12, 2500)
    windows = np.concatenate([crops(segments, i, spec.samples) for i in range(3)])  # (9, 12, 2250)
    with torch.no_grad():
        return registered_diagnosis_model(version)(torch.from_numpy(windows))[1].numpy().mean(axis=0)


@pytest.mark.parametrize("method", ["linear_probe", "finetune"])
def test_diagnosis_job_registers_a_head_that_predicts_as_it_was_evaluated(
    client: TestClient, base: str, data_dir: Path, ptb_record: Path, method: str
) -> None:
    lr = 1e-2 if method == "linear_probe" else 1e-3
    job = finished(client, post_job(client, "finetune", {**COMMON, "model": base, "method": method,
                                                         "learning_rate": lr}))  # fmt: skip
    result = job["result"]
    assert result["method"] == method and result["base_model"] == base
    test = result["test"]
    assert test["protocol"] == method and 0 <= test["macro_auroc"] <= 1 and 0 <= test["macro_f1"] <= 1
    assert set(test["auroc_per_class"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert result["knn"]["n_records"] == 12 and "kmeans_ari" in result["clustering"]
    assert result["parity_max_abs_diff"] < 1e-3
    epochs = {m["epoch"]: m["values"] for m in job["metrics"]}
    assert sorted(epochs) == [1, 2] and all(
        "val_macro_auroc" in v and "train_loss" in v for v in epochs.values()
    )
    assert_pngs(client, job, {f"roc_{method}.png", f"confusion_{method}.png", "roc_knn.png",
                              f"history_{method}.png", "embedding_map.png"})  # fmt: skip

    ref = job["model_version"]
    assert ref == result["model_version"] and ref.split("@")[0] == f"{base.split('@')[0]}-{method}"
    with session_scope() as s:
        version = s.query(ModelVersion).filter_by(source_job_id=uuid.UUID(job["id"])).one()
        head, int8 = version.head, version.variants["int8"]
        evaluated = job_evaluation(version, job["id"])
        expected = evaluated.probabilities["10"]  # RECORD (ecg_id 10), a validation record
        expected_ptb = ptb_probabilities(version, ptb_record)
    assert head["class_names"] == ["NORM", "MI", "STTC", "CD", "HYP"] and head["output"] == "probabilities"
    # the stored thresholds are those that maximise F1 on the validation fold's probabilities, not the test
    # fold's (which differ here, so the check can tell them apart); None = never predicted (no positive)
    stored = np.array([np.inf if t is None else t for t in head["thresholds"]])
    np.testing.assert_allclose(stored, evaluated.thresholds["val"], rtol=1e-4)
    assert not np.allclose(stored, evaluated.thresholds["test"], rtol=1e-4), (stored, evaluated.thresholds)
    assert head["thresholds"] == [test["thresholds"][c] for c in head["class_names"]]  # and reported so

    response = client.post(f"/predict?model={ref}&precision=fp32", files=upload(data_dir))
    assert response.status_code == 200, response.text
    prediction = response.json()
    assert prediction["method"] == "head" and prediction["version"] == int(ref.split("@")[1])
    # read as evaluation read it: the 10-s record's 3 crops; the probabilities those the job computed for
    # this record when it tuned the thresholds (ONNX head == PyTorch, independent sigmoids)
    assert prediction["record"]["windows"] == 3 and prediction["variant"] == "fp32"
    got = np.array([prediction["probabilities"][c] for c in head["class_names"]])
    assert ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # a 38.4-s 1000 Hz record with 15 channels: 3 crops of each of its three 10-s segments, averaged
    ptb = client.post(
        f"/predict?model={ref}&precision=fp32", files=wfdb_files(ptb_record, ".hea", ".dat", ".xyz")
    )
    assert ptb.status_code == 200, ptb.text
    assert ptb.json()["record"]["windows"] == 9 and len(ptb.json()["record"]["channels"]) == 15
    got_ptb = np.array([ptb.json()["probabilities"][c] for c in head["class_names"]])
    np.testing.assert_allclose(got_ptb, expected_ptb, atol=1e-4)
    sliding = client.post(f"/predict?model={ref}&windowing=sliding", files=upload(data_dir))
    assert sliding.status_code == 422 and "three_crop" in sliding.text
    for cls, p in prediction["probabilities"].items():
        threshold = prediction["thresholds"][cls]
        assert (cls in prediction["labels"]) == (threshold is not None and p >= threshold)
    # the int8 variant serves (default precision on the CPU) only if its probabilities passed their check too
    assert (int8["status"] == "passed") == (int8["probabilities_max_abs_diff"] <= 0.01), int8
    name, number = ref.split("@")
    shown = client.get(f"/models/{name}/versions/{number}").json()["variants"]["int8"]
    assert shown["probabilities_max_abs_diff"] == pytest.approx(int8["probabilities_max_abs_diff"])
    served = client.post(f"/predict?model={ref}", files=upload(data_dir)).json()
    assert served["variant"] == ("int8" if int8["status"] == "passed" else "fp32")
    served_p = np.array([served["probabilities"][c] for c in head["class_names"]])
    np.testing.assert_allclose(served_p, expected, atol=0.03 if served["variant"] == "int8" else 1e-4)
    # the same record, kNN against the training embeddings the job stored
    knn = client.post(f"/predict?model={ref}&method=knn", files=upload(data_dir))
    assert knn.status_code == 200 and knn.json()["knn"]["reference_records"] == 67
    assert knn.json()["record"]["windows"] == 3  # embedded as the reference set was: 3 crops


def test_triplet_job_registers_a_unit_embedding_model_with_a_knn_predictor(
    client: TestClient, base: str, data_dir: Path
) -> None:
    body = {
        **COMMON,
        "model": base,
        "method": "triplet",
        "learning_rate": 1e-3,
        "triplet": {"embedding_dim": 16, "p": 3, "k": 4, "mining": "semi_hard", "unfreeze_blocks": 1},
    }
    job = finished(client, post_job(client, "finetune", body))  # fmt: skip
    result = job["result"]
    assert result["triplet"]["mining"] == "semi_hard" and result["batch_records"] == 12
    assert "test" not in result and 0 <= result["knn"]["macro_auroc"] <= 1
    assert all("val_knn_macro_auroc" in m["values"] for m in job["metrics"])
    assert_pngs(client, job, {"roc_knn.png", "confusion_knn.png", "embedding_map.png", "history_triplet.png"})
    ref = job["model_version"]
    embedded = client.post(f"/embed?model={ref}&precision=fp32", files=upload(data_dir)).json()
    assert embedded["dimension"] == 16
    # mean of two unit window embeddings: norm <= 1, and close to 1 when the windows agree
    assert 0.5 < np.linalg.norm(embedded["embedding"]) <= 1 + 1e-5
    no_head = client.post(f"/predict?model={ref}&method=head", files=upload(data_dir))
    assert no_head.status_code == 409 and "no diagnosis head" in no_head.json()["detail"]
    prediction = client.post(f"/predict?model={ref}", files=upload(data_dir)).json()
    assert prediction["method"] == "knn" and len(prediction["probabilities"]) == 5


def test_vqvae_job_keeps_its_codebook_in_use(client: TestClient, base: str, data_dir: Path) -> None:
    body = {**COMMON, "model": base, "method": "vqvae", "learning_rate": 1e-3,
            "vqvae": {"num_codes": 64, "code_dim": 16}}  # fmt: skip
    job = finished(client, post_job(client, "finetune", body))
    per_epoch = [m["values"] for m in job["metrics"]]
    assert len(per_epoch) == 2
    for values in per_epoch:  # logged every epoch; not collapsed to one code
        assert values["codes_used"] > 16 and values["perplexity"] > 8 and 0 < values["code_usage"] <= 1
    codebook = job["result"]["codebook"]
    assert codebook["num_codes"] == 64 and codebook["last_epoch"]["codes_used"] == per_epoch[-1]["codes_used"]
    assert_pngs(client, job, {"codebook.png", "roc_knn.png", "embedding_map.png", "history_vqvae.png"})
    embedded = client.post(f"/embed?model={job['model_version']}", files=upload(data_dir)).json()
    assert embedded["dimension"] == 16


# --------------------------------------------------------------------------------------------------
# the envelope and bad input


def test_cancelled_and_duplicate_deliveries_do_not_run(client: TestClient, base: str) -> None:
    from services.jobs.workers import beat, forget

    job_id = post_job(client, "finetune", {**COMMON, "model": base, "method": "linear_probe"})
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert run_job(job_id).status == "cancelled"
    job_id = post_job(client, "evaluate", {"model": base, "dataset": "ptbxl-500", "protocols": ["knn"]})
    beat("other@worker")
    try:
        with session_scope() as s:
            job = s.get(Job, uuid.UUID(job_id))
            job.status, job.worker = "running", "other@worker"
        assert run_job(job_id).status == "running"  # a duplicate delivery: left to the live worker
    finally:
        forget("other@worker")


def test_bad_requests_get_4xx_naming_the_problem(
    client: TestClient, base: str, registered_tiny_model: tuple, data_dir: Path
) -> None:
    unlabelled = client.post(
        "/jobs/finetune",
        json={
            "model": base,
            "dataset": "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz",
            "method": "linear_probe",
        },
    )
    assert unlabelled.status_code == 422 and "has no labels" in unlabelled.json()["detail"]
    wrong_method = client.post(
        "/jobs/finetune", json={"model": base, "dataset": "ptbxl-500", "method": "svm"}
    )
    assert wrong_method.status_code == 422 and "method" in wrong_method.text
    unknown = client.post(
        "/jobs/finetune", json={"model": "nope@1", "dataset": "ptbxl-500", "method": "triplet"}
    )
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    mixed = client.post(
        "/jobs/finetune",
        json={"model": base, "dataset": "ptbxl-500", "method": "finetune", "vqvae": {"num_codes": 8}},
    )
    assert mixed.status_code == 422 and "vqvae" in mixed.text
    protocols = client.post(
        "/jobs/evaluate", json={"model": base, "dataset": "ptbxl-500", "protocols": ["svm"]}
    )
    assert protocols.status_code == 422 and "protocols" in protocols.text
    # a plain encoder without head or reference set cannot predict: 409 and what to do
    plain, _ = registered_tiny_model
    refused = client.post(f"/predict?model={plain}", files=upload(data_dir))
    assert refused.status_code == 409
    assert (
        "POST /jobs/finetune" in refused.json()["detail"]
        and "POST /jobs/evaluate" in refused.json()["detail"]
    )
    no_reference = client.post(f"/predict?model={plain}&method=knn", files=upload(data_dir))
    assert no_reference.status_code == 409 and "no kNN reference set" in no_reference.json()["detail"]
    bogus = client.post(f"/predict?model={base}&method=svm", files=upload(data_dir))
    assert bogus.status_code == 422 and "method" in bogus.text
    # artifacts: unknown job, unknown name, traversal
    assert client.get(f"/jobs/{uuid.uuid4()}/artifacts/roc_knn.png").status_code == 404
    job_id = post_job(client, "evaluate", {"model": base, "dataset": "ptbxl-500", "protocols": ["knn"]})
    for name in ("roc_knn.png", "..%2F..%2Fjob.png", "%2Fetc%2Fpasswd", "checkpoint.pt"):
        assert client.get(f"/jobs/{job_id}/artifacts/{name}").status_code == 404, name


def test_vqvae_runs_on_an_ecg_jepa_encoder_through_its_lead_token_grid(
    data_dir: Path, tmp_path: Path
) -> None:
    from services.export.onnx import export_checked
    from services.models import ecg_jepa
    from services.models.ecg_jepa import LeadTokens
    from services.models.heads import Embedder
    from services.models.vqvae import VqConfig, VqVae

    torch.manual_seed(0)
    encoder = ecg_jepa.EcgJepaEncoder(ecg_jepa.SIZES["tiny"]).eval()
    windows = preprocess(read_wfdb(data_dir / f"{RECORD}.hea"), ecg_jepa.INPUT_SPEC)  # (1, 8, 2500)
    x = torch.from_numpy(windows).repeat(4, 1, 1)
    tokens = LeadTokens(encoder).forward_tokens(x)
    cfg = encoder.cfg
    assert tokens.shape == (4, 8, cfg.seq_len // cfg.patch_size, cfg.width)
    flat = encoder.forward_tokens(x)  # lead-major (B, C * N, D): lead 1's tokens follow lead 0's
    torch.testing.assert_close(
        tokens[:, 1], flat[:, cfg.seq_len // cfg.patch_size : 2 * (cfg.seq_len // cfg.patch_size)]
    )
    model = VqVae(LeadTokens(encoder), cfg.width, cfg.patch_size, VqConfig(num_codes=16, code_dim=8))
    model.train()
    loss = model(x)
    loss.backward()
    assert torch.isfinite(loss) and model.pop_usage()["codes_used"] > 1
    parity = export_checked(Embedder(model.eval()), windows, tmp_path / "vq.onnx")
    assert parity < 1e-4
