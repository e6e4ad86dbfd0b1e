"""ECG readers, lead handling, preprocessing and datasets, checked on the real records of ../shared/data."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from services.datasets import resolve_data_path
from services.datasets.cache import preprocessed
from services.datasets.kinds import open_dataset
from services.datasets.ptbxl import SUPERCLASSES, PtbxlDataset
from services.ecg.leads import STANDARD_LEADS, select_leads
from services.ecg.preprocess import InputSpec, prepare_signal, preprocess, resample
from services.ecg.readers import read_npy, read_wfdb
from services.ecg.recording import Recording
from services.ecg.upload import read_upload
from services.errors import DatasetError, EcgInputError

SPEC = InputSpec()
PTB_STANDARD = ["i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"]


def _hr(ptbxl_dir: Path, ecg_id: int) -> Path:
    return ptbxl_dir / "records500" / "00000" / f"{ecg_id:05d}_hr.hea"


def _lr(ptbxl_dir: Path, ecg_id: int) -> Path:
    return ptbxl_dir / "records100" / "00000" / f"{ecg_id:05d}_lr.hea"


def _copy_record(header: Path, dest: Path, suffixes: tuple[str, ...]) -> Path:
    for suffix in suffixes:
        shutil.copy(header.with_suffix(suffix), dest / f"{header.stem}{suffix}")
    return dest / header.name


def _amplitude_at(x: np.ndarray, freq: float, fs: float, edge_s: float) -> np.ndarray:
    """Per-row amplitude of the ``freq`` component (least-squares sin/cos/offset fit), edges left out."""
    cut = int(edge_s * fs)
    y = x[:, cut : x.shape[1] - cut].astype(np.float64)
    t = np.arange(cut, cut + y.shape[1]) / fs
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones_like(t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y.T, rcond=None)
    return np.hypot(coef[0], coef[1])


# --------------------------------------------------------------------------------------------------
# read_wfdb


@pytest.fixture(scope="module")
def ptb(ptb_record: Path) -> Recording:
    return read_wfdb(ptb_record)


def test_read_wfdb_ptb_record(ptb: Recording):
    assert ptb.signal.shape == (15, 38400)
    assert ptb.signal.dtype == np.float32
    assert ptb.fs == 1000.0
    assert ptb.duration_s == pytest.approx(38.4)
    assert ptb.lead_names == [*PTB_STANDARD, "vx", "vy", "vz"]
    assert ptb.source == "s0010_re.hea"
    assert any("Myocardial infarction" in line for line in ptb.comments)
    # physical units (mV): gain 2000 adu/mV, so a real ECG peaks around 0.3-3 mV, never 10+ mV
    peak = np.abs(ptb.signal).max(axis=1)
    assert np.all(peak < 10.0)
    assert np.all(peak > 0.2)
    assert np.isfinite(ptb.signal).all()
    # first sample of lead i from the header's initial value: -489 adu / 2000 adu/mV
    assert ptb.signal[0, 0] == pytest.approx(-489 / 2000, abs=1e-6)


def test_read_wfdb_without_xyz_file_keeps_the_12_leads(ptb_record: Path, ptb: Recording, tmp_path: Path):
    header = _copy_record(ptb_record, tmp_path, (".hea", ".dat"))
    rec = read_wfdb(header)
    assert rec.lead_names == PTB_STANDARD
    assert rec.signal.shape == (12, 38400)
    np.testing.assert_array_equal(rec.signal, ptb.signal[:12])


def test_read_wfdb_without_dat_file_names_it(ptb_record: Path, tmp_path: Path):
    header = _copy_record(ptb_record, tmp_path, (".hea", ".xyz"))
    with pytest.raises(EcgInputError, match=r"s0010_re\.dat"):
        read_wfdb(header)


def test_read_wfdb_truncated_dat(ptbxl_dir: Path, tmp_path: Path):
    header = _copy_record(_hr(ptbxl_dir, 1), tmp_path, (".hea", ".dat"))
    assert read_wfdb(header).signal.shape == (12, 5000)  # the intact copy reads
    dat = header.with_suffix(".dat")
    content = dat.read_bytes()
    dat.write_bytes(content[: len(content) // 2])
    with pytest.raises(EcgInputError, match="00001_hr.hea"):
        read_wfdb(header)
    dat.write_bytes(content[:-1])  # one byte short: not even a whole sample frame
    with pytest.raises(EcgInputError):
        read_wfdb(header)


def test_read_wfdb_header_claiming_more_samples(ptbxl_dir: Path, tmp_path: Path):
    header = _copy_record(_hr(ptbxl_dir, 1), tmp_path, (".hea", ".dat"))
    lines = header.read_text().splitlines()
    assert lines[0].split() == ["00001_hr", "12", "500", "5000"]
    lines[0] = "00001_hr 12 500 6000"
    header.write_text("\n".join(lines) + "\n")
    with pytest.raises(EcgInputError):
        read_wfdb(header)


def test_read_wfdb_converts_microvolts_to_millivolts(ptbxl_dir: Path, tmp_path: Path):
    original = read_wfdb(_hr(ptbxl_dir, 1))
    header = _copy_record(_hr(ptbxl_dir, 1), tmp_path, (".hea", ".dat"))
    text = header.read_text()
    assert text.count("1000.0(0)/mV") == 12
    header.write_text(text.replace("1000.0(0)/mV", "1.0(0)/uV"))  # same samples, stated in µV
    rec = read_wfdb(header)
    np.testing.assert_allclose(rec.signal, original.signal, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# select_leads


def test_select_leads_is_case_insensitive_and_ignores_extra_channels(ptb: Recording):
    x = select_leads(ptb.signal, ptb.lead_names, STANDARD_LEADS)
    assert x.shape == (12, 38400)
    np.testing.assert_array_equal(x, ptb.signal[:12])
    # any order and case in the file: rows come back in the order asked for
    order = [14, 6, 0, 13, 11, 3, 1, 5, 12, 2, 4, 7, 8, 9, 10]
    names = [ptb.lead_names[i].upper() if i % 2 else ptb.lead_names[i] for i in order]
    y = select_leads(ptb.signal[order], names, ("V6", "aVR", "I", "V1"))
    np.testing.assert_array_equal(y, ptb.signal[[11, 3, 0, 6]])


def test_derived_limb_leads_match_recorded_ones(ptbxl_dir: Path):
    # PTB-XL stores all 12 leads at 1 µV resolution; III, aVR, aVL, aVF derived from the stored I and II
    # agree with the stored ones to within rounding (measured max 0.0015 mV over records 1-20).
    wanted = ("I", "II", "III", "aVR", "aVL", "aVF")
    for ecg_id in range(1, 21):
        rec = read_wfdb(_hr(ptbxl_dir, ecg_id))
        recorded = select_leads(rec.signal, rec.lead_names, wanted)
        only_i_ii = [rec.lead_names.index("I"), rec.lead_names.index("II")]
        derived = select_leads(rec.signal[only_i_ii], ["I", "II"], wanted)
        err = np.abs(derived - recorded).max(axis=1)
        assert err[:2].max() == 0.0
        assert err.max() < 0.0025, f"record {ecg_id}: max error per lead {err}"
        assert np.abs(recorded[2:]).max() > 0.1  # the comparison is on a real signal, not on zeros


def test_select_leads_missing_v1(ptbxl_dir: Path):
    rec = read_wfdb(_hr(ptbxl_dir, 1))
    keep = [i for i, name in enumerate(rec.lead_names) if name != "V1"]
    with pytest.raises(EcgInputError, match=r"missing lead\(s\) V1\b") as info:
        select_leads(rec.signal[keep], [rec.lead_names[i] for i in keep], STANDARD_LEADS)
    assert "V2" not in str(info.value).split("the model needs")[0]


def test_inverted_avr_channel_is_negated(ptbxl_dir: Path):
    rec = read_wfdb(_hr(ptbxl_dir, 1))
    avr = rec.lead_names.index("AVR")
    signal = rec.signal.copy()
    signal[avr] = -signal[avr]
    names = list(rec.lead_names)
    names[avr] = "-aVR"
    got = select_leads(signal, names, ("aVR",))[0]
    np.testing.assert_allclose(got, rec.signal[avr], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# preprocess / prepare_signal


def test_preprocess_ptb_windows(ptb: Recording):
    prepared = prepare_signal(ptb, SPEC)
    assert prepared.shape == (12, 9600)  # 38.4 s at 250 Hz
    assert prepared.dtype == np.float32
    sliding = preprocess(ptb, SPEC)
    assert sliding.shape == (5, 12, 2250)
    center = preprocess(ptb, SPEC, windowing="center")
    assert center.shape == (1, 12, 2250)
    for windows in (sliding, center):
        assert windows.dtype == np.float32
        np.testing.assert_allclose(windows.mean(axis=(1, 2)), 0.0, atol=1e-4)
        np.testing.assert_allclose(windows.std(axis=(1, 2)), 1.0, atol=1e-4)
        # one mean/std per window over leads and time: the per-lead spread still differs between leads
        lead_std = windows.std(axis=2)
        assert (lead_std.max(axis=1) / lead_std.min(axis=1)).min() > 1.5
    # sliding windows start at 0 and end at the end of the record; each is the standardised slice
    starts = np.linspace(0, 9600 - 2250, 5).round().astype(int)
    for window, start in zip(sliding, starts, strict=True):
        chunk = prepared[:, start : start + 2250].astype(np.float64)
        np.testing.assert_allclose(window, (chunk - chunk.mean()) / chunk.std(), atol=1e-4)
    mid = (9600 - 2250) // 2
    chunk = prepared[:, mid : mid + 2250].astype(np.float64)
    np.testing.assert_allclose(center[0], (chunk - chunk.mean()) / chunk.std(), atol=1e-4)


@pytest.mark.parametrize(("value", "lead"), [(np.nan, "V3"), (np.inf, "aVL"), (-np.inf, "V6")])
def test_non_finite_sample_names_the_lead(ptbxl_dir: Path, value: float, lead: str):
    rec = read_wfdb(_hr(ptbxl_dir, 2))
    row = [name.lower() for name in rec.lead_names].index(lead.lower())
    rec.signal[row, 1234] = value
    with pytest.raises(EcgInputError, match=rf"lead\(s\) {lead}$"):
        prepare_signal(rec, SPEC)
    with pytest.raises(EcgInputError, match=lead):
        preprocess(rec, SPEC)


def test_non_finite_sample_in_an_unused_channel_is_ignored(ptb: Recording):
    signal = ptb.signal.copy()
    signal[13, 100] = np.nan  # vy, a Frank lead the model does not use
    rec = Recording(signal, ptb.fs, ptb.lead_names, ptb.source)
    np.testing.assert_array_equal(prepare_signal(rec, SPEC), prepare_signal(ptb, SPEC))


def test_record_shorter_than_the_window(ptbxl_dir: Path):
    rec = read_wfdb(_hr(ptbxl_dir, 3))
    short = Recording(rec.signal[:, :2500], rec.fs, rec.lead_names, "short")  # 5 s < 9 s window
    with pytest.raises(EcgInputError, match="pad"):
        preprocess(short, SPEC)
    padded = preprocess(short, SPEC, pad=True)
    assert padded.shape == (1, 12, 2250)
    assert np.isfinite(padded).all()
    # the 5 s of signal (1250 samples at 250 Hz) come first, then zeros (before standardisation)
    raw = prepare_signal(short, SPEC)
    assert raw.shape == (12, 1250)
    tail = padded[0, :, 1250:]
    assert np.allclose(tail, tail[0, 0])
    assert padded[0, :, :1250].std() > 1.0
    tiny = Recording(rec.signal[:, :50], rec.fs, rec.lead_names, "tiny")  # 0.1 s: too short to filter
    for pad in (False, True):
        with pytest.raises(EcgInputError, match="tiny"):
            preprocess(tiny, SPEC, pad=pad)


def test_flat_line_gives_zeros_not_nan():
    for value in (0.0, 0.7):
        rec = Recording(np.full((12, 2500), value, np.float32), 250.0, list(STANDARD_LEADS), "flat")
        windows = preprocess(rec, SPEC)
        assert windows.shape == (2, 12, 2250)
        assert np.isfinite(windows).all()
        np.testing.assert_array_equal(windows, 0.0)
    rec = Recording(np.zeros((12, 5000), np.float32), 500.0, list(STANDARD_LEADS), "flat500")
    np.testing.assert_array_equal(preprocess(rec, SPEC), 0.0)


def test_flat_line_at_an_offset_gives_zeros_after_resampling():
    rec = Recording(np.full((12, 5000), 0.5, np.float32), 500.0, list(STANDARD_LEADS), "flat500")
    windows = preprocess(rec, SPEC)
    assert np.isfinite(windows).all()
    np.testing.assert_array_equal(windows, 0.0)


def test_prepare_signal_ignores_a_dc_offset_on_a_resampled_record(ptbxl_dir: Path):
    rec = read_wfdb(_hr(ptbxl_dir, 1))
    shifted = Recording(rec.signal + 1.0, rec.fs, rec.lead_names, rec.source)
    diff = np.abs(prepare_signal(shifted, SPEC) - prepare_signal(rec, SPEC))
    assert diff.max() < 0.01


def test_prepare_signal_ignores_a_dc_offset_at_the_model_rate(ptbxl_dir: Path):
    rec = read_wfdb(_hr(ptbxl_dir, 1))
    at_250 = Recording(resample(rec.signal, 500.0, 250.0).astype(np.float32), 250.0, rec.lead_names, "r")
    shifted = Recording(at_250.signal + 1.0, 250.0, rec.lead_names, "s")
    diff = np.abs(prepare_signal(shifted, SPEC) - prepare_signal(at_250, SPEC))
    assert diff.max() < 1e-4


@pytest.mark.parametrize(
    ("freq", "amplitude", "low", "high"),
    [
        (0.1, 1.0, 0.0, 0.01),  # baseline wander: measured ratio <= 0.0009
        (50.0, 0.5, 0.0, 0.10),  # mains: order-5 Butterworth at 40 Hz, zero-phase: 0.058 by design
        (10.0, 0.5, 0.95, 1.05),  # the pass band is kept (measured 1.000-1.001)
    ],
)
def test_band_pass_on_a_real_record(ptb: Recording, freq: float, amplitude: float, low: float, high: float):
    t = np.arange(ptb.signal.shape[1]) / ptb.fs
    noisy = Recording(
        (ptb.signal + amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32),
        ptb.fs,
        ptb.lead_names,
        ptb.source,
    )
    unfiltered = resample(
        select_leads(noisy.signal, noisy.lead_names, SPEC.leads).astype(np.float64), 1000, 250
    )
    filtered = prepare_signal(noisy, SPEC)
    before = _amplitude_at(unfiltered, freq, SPEC.fs, edge_s=2.0)
    after = _amplitude_at(filtered, freq, SPEC.fs, edge_s=2.0)
    np.testing.assert_allclose(before, amplitude, rtol=0.1)  # the added sine dominates that frequency
    ratio = after / before
    assert np.all((ratio >= low) & (ratio <= high)), ratio


def test_100hz_and_500hz_versions_agree(ptbxl_dir: Path):
    # The first and last second are left out: several 500 Hz files end in a held sample value that the
    # 100 Hz files do not have (e.g. records 2 and 4), so the filter edges differ there. Measured over
    # records 1-10 on the inner 8 s: per-lead correlation >= 0.984, RMS ratio 0.994-1.010, no lag.
    for ecg_id in range(1, 11):
        hi = prepare_signal(read_wfdb(_hr(ptbxl_dir, ecg_id)), SPEC)
        lo = prepare_signal(read_wfdb(_lr(ptbxl_dir, ecg_id)), SPEC)
        assert hi.shape == lo.shape == (12, 2500)
        hi, lo = hi[:, 250:-250], lo[:, 250:-250]
        corr = np.array([np.corrcoef(hi[k], lo[k])[0, 1] for k in range(12)])
        assert corr.min() > 0.97, f"record {ecg_id}: {corr}"
        rms_ratio = lo.std(axis=1) / hi.std(axis=1)
        assert np.all((rms_ratio > 0.95) & (rms_ratio < 1.05)), f"record {ecg_id}: {rms_ratio}"


# --------------------------------------------------------------------------------------------------
# read_npy / read_upload


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_read_npy(ptbxl_dir: Path):
    rec = read_wfdb(_hr(ptbxl_dir, 1))
    data = _npy_bytes(rec.signal)
    with pytest.raises(EcgInputError, match="'fs'"):
        read_npy(data, None, None, "x.npy")
    got = read_npy(data, 500.0, None, "x.npy")
    assert got.lead_names == list(STANDARD_LEADS)
    assert got.fs == 500.0
    np.testing.assert_array_equal(got.signal, rec.signal)
    np.testing.assert_allclose(prepare_signal(got, SPEC), prepare_signal(rec, SPEC), atol=1e-6)
    with pytest.raises(EcgInputError, match="samples x leads"):
        read_npy(_npy_bytes(rec.signal.T.copy()), 500.0, None, "x.npy")
    with pytest.raises(EcgInputError, match="lead names"):
        read_npy(_npy_bytes(rec.signal[:8]), 500.0, None, "x.npy")
    with pytest.raises(EcgInputError):
        read_npy(b"not an array", 500.0, None, "x.npy")


def test_read_upload(ptbxl_dir: Path, tmp_path: Path):
    header = _hr(ptbxl_dir, 5)
    files = {header.name: header.read_bytes(), "00005_hr.dat": header.with_suffix(".dat").read_bytes()}
    workdir = tmp_path / "work"
    workdir.mkdir()
    rec = read_upload(files, workdir)
    np.testing.assert_array_equal(rec.signal, read_wfdb(header).signal)

    for name in ("../x.hea", "/etc/x.hea", ".hidden.hea", "a b.hea"):
        with pytest.raises(EcgInputError, match="not allowed"):
            read_upload({name: b"x"}, tmp_path)
    assert not (tmp_path.parent / "x.hea").exists()

    with pytest.raises(EcgInputError, match="several WFDB headers"):
        read_upload({**files, "00006_hr.hea": _hr(ptbxl_dir, 6).read_bytes()}, tmp_path / "work")
    with pytest.raises(EcgInputError, match="'fs'"):
        read_upload({"x.npy": _npy_bytes(rec.signal)}, tmp_path)
    assert read_upload({"x.npy": _npy_bytes(rec.signal)}, tmp_path, fs=500.0).signal.shape == (12, 5000)
    with pytest.raises(EcgInputError, match="no file"):
        read_upload({}, tmp_path)


# --------------------------------------------------------------------------------------------------
# datasets


def test_dataset_records_through_the_cache_ptbxl(ptbxl_dir: Path, tmp_path: Path):
    dataset = open_dataset("ptbxl", ptbxl_dir, {})
    train = dataset.split("train")[:10]
    progress: list[tuple[int, int]] = []
    cache = preprocessed(
        dataset,
        {"path": str(ptbxl_dir)},
        SPEC,
        tmp_path,
        indices=train,
        on_progress=lambda n, t: progress.append((n, t)),
    )
    assert cache.signals.shape == (10, 12, 2500) and cache.signals.dtype == np.float32
    assert cache.meta["skipped"] == [] and progress[-1] == (10, 10)
    expected_ids = [int(i) for i in dataset.table.index[dataset.folds <= 8][:10]]
    assert [int(i) for i in cache.record_ids] == expected_ids
    # each row is the record prepared by the one preprocessing function
    first = prepare_signal(read_wfdb(_hr(ptbxl_dir, expected_ids[0])), SPEC)
    np.testing.assert_array_equal(cache.signals[0], first)
    test_ids = [dataset.record_id(int(i)) for i in dataset.split("test")]
    assert set(test_ids).isdisjoint(cache.record_ids) and len(test_ids) == 66


def test_dataset_records_through_the_cache_npz(data_dir: Path, tmp_path: Path):
    path = data_dir / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz"
    cache = preprocessed(
        open_dataset("npz", path, {}), {"path": str(path)}, SPEC, tmp_path, indices=np.arange(5)
    )
    assert cache.signals.shape == (5, 12, 2500) and np.isfinite(cache.signals).all()
    assert list(cache.record_ids) == [str(i) for i in np.load(path)["ecg_id"][:5]]
    # the same through the folder holding the one .npz
    again = preprocessed(
        open_dataset("npz", path.parent, {}), {"path": str(path.parent)}, SPEC, tmp_path, indices=np.arange(5)
    )
    np.testing.assert_array_equal(again.signals, cache.signals)


def test_resolve_data_path(data_dir: Path, tmp_path: Path):
    assert resolve_data_path(data_dir, "ptbxl-500") == (data_dir / "ptbxl-500").resolve()
    inside = str((data_dir / "ptbxl-500").resolve())
    assert resolve_data_path(data_dir, inside) == Path(inside)
    for bad in ("../x", "../main", "ptbxl-500/../../main", str(tmp_path), "/etc"):
        with pytest.raises(DatasetError, match="outside the data root"):
            resolve_data_path(data_dir, bad)
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_data_path(data_dir, "no-such-dataset")
    # a sibling sharing the root's name as a prefix, and a symlink out of the root, are outside
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (tmp_path / "root-evil").mkdir()
    (root / "link").symlink_to(tmp_path / "root-evil")
    assert resolve_data_path(root, "real") == (root / "real").resolve()
    for bad in (str(tmp_path / "root-evil"), "../root-evil", "link"):
        with pytest.raises(DatasetError, match="outside"):
            resolve_data_path(root, bad)


def test_ptbxl_dataset_labels(ptbxl_dir: Path):
    dataset = PtbxlDataset(ptbxl_dir)
    assert len(dataset) == 500
    assert dataset.labels.shape == (500, 5)
    counts = dict(zip(SUPERCLASSES, dataset.labels.sum(axis=0).astype(int).tolist(), strict=True))
    assert counts == {"NORM": 297, "MI": 73, "STTC": 96, "CD": 78, "HYP": 40}
    per_record = dataset.labels.sum(axis=1)
    assert int((per_record == 0).sum()) == 12
    assert int((per_record > 1).sum()) == 73
    assert len(dataset.indices((10,))) == 66
    assert len(dataset.indices(tuple(range(1, 9)))) + len(dataset.indices((9, 10))) == 500
    rec = dataset.recording(0)
    assert rec.source == "00001_hr.hea"
    assert rec.signal.shape == (12, 5000)
