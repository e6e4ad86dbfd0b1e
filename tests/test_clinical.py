"""Clinical features (NeuroKit2 at the true sampling rate), their normaliser and the prototype's feature
channels, checked on real PTB-XL and PTB Diagnostic records read in place from ../shared/data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from services.datasets.npz import NpzDataset
from services.datasets.ptbxl import PtbxlDataset
from services.ecg import clinical
from services.ecg.clinical import (
    CLINICAL_FEATURES,
    FeatureNormaliser,
    clinical_features,
    clinical_features_for,
    find_beats,
)
from services.ecg.leads import STANDARD_LEADS
from services.ecg.preprocess import InputSpec, resample
from services.ecg.readers import read_wfdb
from services.ecg.recording import Recording

F = {name: i for i, name in enumerate(CLINICAL_FEATURES)}
RECORDS = (1, 2, 9)  # PTB-XL ecg_ids: 64, 48 and 61 bpm


def _hr(ptbxl_dir: Path, ecg_id: int) -> Recording:
    return read_wfdb(ptbxl_dir / "records500" / "00000" / f"{ecg_id:05d}_hr.hea")


def _lr(ptbxl_dir: Path, ecg_id: int) -> Recording:
    return read_wfdb(ptbxl_dir / "records100" / "00000" / f"{ecg_id:05d}_lr.hea")


def _at(recording: Recording, fs: float) -> Recording:
    signal = resample(recording.signal.astype(np.float64), recording.fs, fs).astype(np.float32)
    return Recording(signal=signal, fs=fs, lead_names=recording.lead_names, source=recording.source)


@pytest.mark.parametrize("ecg_id", RECORDS)
def test_heart_rate_follows_the_true_sampling_rate(ptbxl_dir: Path, ecg_id: int) -> None:
    high, low = _hr(ptbxl_dir, ecg_id), _lr(ptbxl_dir, ecg_id)
    f_high, f_low = clinical_features(high), clinical_features(low)
    beats = find_beats(high.signal[STANDARD_LEADS.index("II")], high.fs)
    from_rr = 60.0 / float(np.mean(np.diff(beats.peaks) / high.fs))
    # NeuroKit2's mean per-beat rate against 60 / mean RR of the same R peaks
    assert f_high[F["heart_rate_bpm"]] == pytest.approx(from_rr, rel=0.03)
    # PTB-XL's 100 Hz and 500 Hz versions of the record: the same heart
    assert f_low[F["heart_rate_bpm"]] == pytest.approx(f_high[F["heart_rate_bpm"]], abs=1.5)
    assert 40 < f_high[F["heart_rate_bpm"]] < 100
    # The prototype's bug (250 Hz samples read as 500 Hz) doubles the rate: what the true fs avoids
    mislabelled = _at(high, 250.0)
    mislabelled.fs = 500.0
    assert clinical_features(mislabelled)[F["heart_rate_bpm"]] == pytest.approx(
        2 * f_high[F["heart_rate_bpm"]], rel=0.03
    )


def test_intervals_are_plausible_on_norm_records(ptbxl_dir: Path) -> None:
    dataset = PtbxlDataset(ptbxl_dir)
    norm_only = np.nonzero((dataset.labels == np.array([1, 0, 0, 0, 0])).all(axis=1))[0][:10]
    features = np.stack([clinical_features(dataset.recording(int(i))) for i in norm_only])
    assert np.isfinite(features).mean() > 0.95

    def share_in(name: str, low: float, high: float) -> float:
        values = features[:, F[name]]
        return float(np.mean((values >= low) & (values <= high)))

    assert share_in("qrs_ms", 60, 140) >= 0.9
    assert share_in("pr_ms", 100, 250) >= 0.8
    assert share_in("qtc_ms", 350, 480) >= 0.9
    assert share_in("qt_ms", 300, 480) >= 0.9
    assert share_in("heart_rate_bpm", 45, 110) >= 0.9
    assert share_in("qrs_axis_deg", -30, 100) >= 0.8  # normal frontal axis
    assert share_in("st_ii_mv", -0.1, 0.1) >= 0.9  # no ST elevation or depression
    assert np.nanmedian(features[:, F["qrs_ms"]]) == pytest.approx(90, abs=15)


@pytest.mark.parametrize("ecg_id", RECORDS)
def test_a_record_resampled_to_250_hz_keeps_its_features(ptbxl_dir: Path, ecg_id: int) -> None:
    original = _hr(ptbxl_dir, ecg_id)
    f500, f250 = clinical_features(original), clinical_features(_at(original, 250.0))
    assert np.isfinite(f500).all() and np.isfinite(f250).all()
    tolerance = {
        "heart_rate_bpm": 0.5,
        "rr_sdnn_ms": 5,
        "rr_rmssd_ms": 5,
        "pr_ms": 10,
        "qrs_ms": 10,
        "qt_ms": 10,
        "qtc_ms": 12,
        "st_ii_mv": 0.02,
        "st_v2_mv": 0.03,
        "st_v5_mv": 0.02,
        "qrs_axis_deg": 5,
    }
    assert set(tolerance) == set(CLINICAL_FEATURES)
    for name, tol in tolerance.items():
        assert f250[F[name]] == pytest.approx(f500[F[name]], abs=tol), name


def test_ptb_diagnostic_1000_hz_15_channels(ptb_record: Path) -> None:
    recording = read_wfdb(ptb_record)
    assert recording.fs == 1000 and recording.signal.shape[0] == 15
    features = clinical_features(recording)
    assert np.isfinite(features).all()
    assert 50 < features[F["heart_rate_bpm"]] < 120
    assert 60 <= features[F["qrs_ms"]] <= 160  # Q waves and S waves belong to the QRS
    assert 350 <= features[F["qtc_ms"]] <= 520
    at_250 = clinical_features(_at(recording, 250.0))
    assert at_250[F["heart_rate_bpm"]] == pytest.approx(features[F["heart_rate_bpm"]], abs=1.0)
    assert at_250[F["qrs_ms"]] == pytest.approx(features[F["qrs_ms"]], abs=10)


def test_a_wave_neurokit2_cannot_match_to_beats_is_missing_not_an_error(data_dir: Path) -> None:
    """Record 19688 of ptbxl-unlabelled (250 Hz, band-passed, z-scored): NeuroKit2 drops the first beat's P
    onset (it would fall before the record starts), so its P onsets do not line up with the 13 beats. That
    raised and failed any job that measured the record (a hybrid pretraining whose training set holds it)."""
    dataset = NpzDataset(data_dir / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz")
    index = dataset.record_ids.index("19688")
    recording = dataset.recording(index)
    beats = find_beats(clinical._lead(recording, "II"), recording.fs)  # as clinical_features finds them
    _, raw = clinical.nk.ecg_delineate(beats.clean, beats.peaks, sampling_rate=beats.fs, method="prominence")
    assert len(raw["ECG_P_Onsets"]) != len(beats.peaks)  # the case this test is about
    features = clinical_features(recording)
    assert np.isnan(features[F["pr_ms"]])  # from the P onsets: not measured
    assert 50 < features[F["heart_rate_bpm"]] < 120
    assert 60 <= features[F["qrs_ms"]] <= 160 and np.isfinite(features[F["qt_ms"]])  # the other waves stand


def _twelve(signal: np.ndarray, fs: float) -> Recording:
    return Recording(signal=signal.astype(np.float32), fs=fs, lead_names=list(STANDARD_LEADS), source="test")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_noise_and_broken_signals_give_nan_not_exceptions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 5000
    cases = {
        "flat": np.zeros((12, n)),
        "constant offset": np.full((12, n), 0.7),
        "white noise": rng.normal(0, 0.3, (12, n)),
        "brownian noise": np.cumsum(rng.normal(0, 0.05, (12, n)), axis=1),
        "heavy-tailed noise": rng.standard_t(2, (12, n)) * 0.2,
        "all NaN": np.full((12, n), np.nan),
        "one second": rng.normal(0, 0.3, (12, 500)),
    }
    for name, signal in cases.items():
        features = clinical_features(_twelve(signal, 500.0))
        assert features.shape == (len(CLINICAL_FEATURES),)
        assert np.isnan(features).all(), name
    normaliser = FeatureNormaliser.fit(np.array([[60, 40, 30, 160, 90, 400, 420, 0, 0.1, 0, 45.0]]))
    values, missing = normaliser.transform(clinical_features(_twelve(cases["white noise"], 500.0))[None])
    assert (missing == 1).all() and np.isfinite(values).all()


def test_a_record_without_standard_lead_names_uses_its_first_channel(ptbxl_dir: Path) -> None:
    original = _hr(ptbxl_dir, 1)
    single = Recording(signal=original.signal[1:2], fs=original.fs, lead_names=["ECG"], source="single-lead")
    features = clinical_features(single)
    assert features[F["heart_rate_bpm"]] == pytest.approx(clinical_features(original)[0], abs=0.5)
    assert np.isnan(features[F["qrs_axis_deg"]]) and np.isnan(features[F["st_v2_mv"]])


def _table(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([70, 40, 30, 160, 90, 390, 420, 0.0, 0.05, 0.02, 40])
    spread = np.array([10, 20, 15, 20, 10, 30, 20, 0.05, 0.1, 0.05, 30])
    x = centres + spread * rng.standard_normal((rows, len(centres)))
    x[:, 1:3] = np.abs(x[:, 1:3])
    x[rng.random(x.shape) < 0.1] = np.nan
    return x


def test_normaliser_fits_training_rows_only_and_round_trips() -> None:
    features = _table(60)
    train, test = np.arange(40), np.arange(40, 60)
    normaliser = FeatureNormaliser.fit(features, rows=train)
    changed = features.copy()
    changed[test] = 1e6  # test rows, however extreme, do not move the statistics
    refit = FeatureNormaliser.fit(changed, rows=train)
    for key in ("mean", "scale", "fill"):
        np.testing.assert_array_equal(getattr(refit, key), getattr(normaliser, key))
    assert normaliser.to_dict() == FeatureNormaliser.fit(features[train]).to_dict()
    differs = FeatureNormaliser.fit(changed)  # all rows: the statistics do move
    assert not np.allclose(differs.mean, normaliser.mean)

    restored = FeatureNormaliser.from_dict(json.loads(json.dumps(normaliser.to_dict())))
    values, missing = normaliser.transform(features)
    values2, missing2 = restored.transform(features)
    np.testing.assert_array_equal(values, values2)
    np.testing.assert_array_equal(missing, missing2)
    assert values.shape == missing.shape == features.shape and values.dtype == np.float32
    assert np.isfinite(values).all()
    np.testing.assert_array_equal(missing, np.isnan(features).astype(np.float32))

    # standardised on the training rows: mean 0, std 1 over present training values (log for HRV)
    train_values = values[train]
    present = missing[train] == 0
    for j in range(features.shape[1]):
        column = train_values[present[:, j], j]
        assert column.mean() == pytest.approx(0, abs=1e-5) and column.std() == pytest.approx(1, abs=1e-4)
    # a missing value becomes the standardised training median, flagged
    j = F["qrs_ms"]
    median = np.nanmedian(features[train, j])
    expected = (median - normaliser.mean[j]) / normaliser.scale[j]
    assert values[np.isnan(features[:, j]), j] == pytest.approx(expected, abs=1e-5)
    assert set(normaliser.log) == {"rr_sdnn_ms", "rr_rmssd_ms"}
    stacked = normaliser.transform_stacked(features)
    assert stacked.shape == (60, 2 * len(CLINICAL_FEATURES))
    # extreme test values are clipped, not passed on as 1e6
    assert np.abs(normaliser.transform(changed)[0]).max() <= normaliser.clip


def test_normaliser_with_a_feature_never_measured_in_training() -> None:
    features = _table(20)
    features[:, F["pr_ms"]] = np.nan
    normaliser = FeatureNormaliser.fit(features, impute="mean")
    values, missing = normaliser.transform(features)
    assert (values[:, F["pr_ms"]] == 0).all() and (missing[:, F["pr_ms"]] == 1).all()
    with pytest.raises(ValueError):
        normaliser.transform(features[:, :5])


def test_features_for_a_dataset_are_cached(ptbxl_dir: Path, tmp_path: Path, monkeypatch) -> None:
    dataset = PtbxlDataset(ptbxl_dir)
    indices = dataset.split("train")[:3]
    progress: list[tuple[int, int]] = []
    rows = clinical_features_for(
        dataset, indices, cache_dir=tmp_path, on_progress=lambda d, t: progress.append((d, t))
    )
    assert rows.shape == (3, len(CLINICAL_FEATURES)) and progress[-1] == (3, 3)
    np.testing.assert_array_equal(rows[1], clinical_features(dataset.recording(int(indices[1]))))
    assert len(list(tmp_path.glob("clinical-*.npy"))) == 1

    def fail(recording: Recording) -> np.ndarray:
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(clinical, "clinical_features", fail)
    np.testing.assert_array_equal(clinical_features_for(dataset, indices, cache_dir=tmp_path), rows)
    other = clinical.clinical_cache_key(dataset, indices[:2])
    assert other != clinical.clinical_cache_key(dataset, indices)
    assert not math.isnan(rows[0, F["heart_rate_bpm"]])


# --------------------------------------------------------------------------------------------------
# hybrid models: a pretraining job with clinical_features, served by /embed


def test_a_hybrid_job_registers_its_normaliser_and_embed_appends_the_measurements(
    client, settings_env: pytest.MonkeyPatch, ptbxl_dir: Path
) -> None:
    import uuid

    from services.db.models import ModelVersion
    from services.db.session import session_scope
    from services.jobs.pretrain import run_pretrain_job

    settings_env.setenv("ECGSSL_DEVICE", "cpu")
    name = f"hybrid-{uuid.uuid4().hex[:6]}"
    body = {"dataset": "ptbxl-500", "epochs": 1, "batch_size": 8, "record_limit": 30, "folds": [1, 2, 3],
            "clinical_features": True, "model_name": name, "val_fraction": 0.2}  # fmt: skip
    response = client.post("/jobs/pretrain", json=body)
    assert response.status_code == 202, response.text
    job_id = uuid.UUID(response.json()["job_id"])
    assert run_pretrain_job(job_id, worker="test-worker") == "succeeded"

    served = next(m for m in client.get("/models").json()["models"] if m["name"] == name)["versions"][0]
    assert served["clinical_features"] == list(CLINICAL_FEATURES)
    assert served["embedding_dim"] == 64 + 2 * len(CLINICAL_FEATURES)
    with session_scope() as s:
        normaliser = FeatureNormaliser.from_dict(
            s.query(ModelVersion).filter_by(source_job_id=job_id).one().clinical_normaliser
        )

    # fitted on the job's 24 training records only (30 records, 6 held out for val_loss)
    dataset = PtbxlDataset(ptbxl_dir)
    used = np.nonzero(np.isin(dataset.folds, [1, 2, 3]))[0][:30]
    all_features = np.stack([clinical_features(dataset.recording(int(i))) for i in used])
    fitted_on_all = FeatureNormaliser.fit(all_features)
    assert not np.allclose(normaliser.mean, fitted_on_all.mean)  # the held-out records were left out
    hr = CLINICAL_FEATURES.index("heart_rate_bpm")
    assert 50 < normaliser.mean[hr] < 90  # bpm of real records, not of a mis-stated rate

    record = ptbxl_dir / "records500" / "00000" / "00001_hr"
    files = [
        ("files", (record.with_suffix(s).name, record.with_suffix(s).read_bytes())) for s in (".hea", ".dat")
    ]
    out = client.post("/embed", params={"model": f"{name}@1", "precision": "fp32"}, files=files)
    assert out.status_code == 200, out.text
    vector = np.asarray(out.json()["embedding"])
    assert vector.shape == (served["embedding_dim"],)
    expected = normaliser.transform_stacked(clinical_features(read_wfdb(record.with_suffix(".hea")))[None])[0]
    np.testing.assert_allclose(vector[64:], expected, atol=1e-5)

    # the version keeps its PyTorch encoder beside the ONNX file (fine-tuning starts from it): same embedding
    import torch

    from services.ecg.preprocess import preprocess
    from services.models.checkpoints import ENCODER_FILE, load_saved_encoder

    with session_scope() as s:
        onnx_path = Path(s.query(ModelVersion).filter_by(source_job_id=job_id).one().onnx_path)
    encoder, method = load_saved_encoder(onnx_path.with_name(ENCODER_FILE))
    windows = preprocess(read_wfdb(record.with_suffix(".hea")), InputSpec())
    with torch.no_grad():
        np.testing.assert_allclose(encoder(torch.from_numpy(windows)).mean(0).numpy(), vector[:64], atol=1e-4)
    assert method == "st_mem"
