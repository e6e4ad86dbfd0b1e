"""The dataset kinds on real ECGs (../shared/data): PTB-XL, WFDB folders, CinC-style .mat records, .npz
arrays and the synthetic GAN ECGs, plus option validation and kind detection."""

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb
from scipy.signal import find_peaks

from services.config import get_settings
from services.datasets import synthetic
from services.datasets.cinc import CincDataset
from services.datasets.kinds import DATASET_KINDS, detect_dataset_kind, open_dataset
from services.datasets.npz import NpzDataset
from services.datasets.ptbxl import BENCHMARK_SPLIT, SUPERCLASSES, PtbxlDataset
from services.datasets.wfdb_folder import WfdbFolderDataset, read_header_info
from services.ecg.leads import STANDARD_LEADS
from services.ecg.readers import read_wfdb
from services.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]
PTBXL_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _hr(ptbxl_dir: Path, ecg_id: int) -> Path:
    return ptbxl_dir / "records500" / "00000" / f"{ecg_id:05d}_hr.hea"


def _rewrite(src_header: Path, folder: Path, name: str, comments: list[str] | None = None, mat: bool = False):
    """Write the real record ``src_header`` again as ``folder/name``: WFDB format 16 in a .dat, or as
    CinC does, a MATLAB v4 .mat holding the digital samples (``val``, leads x samples) behind a 24-byte
    MAT header, with the header's byte offset pointing past it."""
    rec = wfdb.rdrecord(str(src_header.with_suffix("")), physical=False)
    folder.mkdir(parents=True, exist_ok=True)
    if mat:
        scipy.io.savemat(folder / f"{name}.mat", {"val": rec.d_signal.T.astype(np.int16)}, format="4")
        rec.record_name, rec.comments = name, comments or []
        rec.file_name, rec.byte_offset = [f"{name}.mat"] * rec.n_sig, [24] * rec.n_sig
        rec.wrheader(write_dir=str(folder))
    else:
        wfdb.wrsamp(
            name, fs=rec.fs, units=rec.units, sig_name=rec.sig_name, d_signal=rec.d_signal, fmt=rec.fmt,
            adc_gain=rec.adc_gain, baseline=rec.baseline, comments=comments, write_dir=str(folder),
        )  # fmt: skip


# ptbxl


def test_ptbxl_labels_folds_split(ptbxl_dir: Path):
    dataset = open_dataset("ptbxl", ptbxl_dir, {})
    assert isinstance(dataset, PtbxlDataset) and dataset.kind == "ptbxl"
    assert len(dataset) == 500
    assert dataset.label_names == SUPERCLASSES
    assert dataset.labels.shape == (500, 5) and dataset.labels.dtype == np.float32
    counts = dict(zip(SUPERCLASSES, dataset.labels.sum(axis=0).astype(int).tolist(), strict=True))
    assert counts == {"NORM": 297, "MI": 73, "STTC": 96, "CD": 78, "HYP": 40}
    assert int((dataset.labels.sum(axis=1) == 0).sum()) == 12
    assert int((dataset.labels.sum(axis=1) > 1).sum()) == 73
    # benchmark split from strat_fold: folds 1-8 / 9 / 10
    parts = {name: dataset.split(name) for name in ("train", "val", "test")}
    assert len(parts["test"]) == 66
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(500))
    for name, idx in parts.items():
        assert set(dataset.folds[idx].tolist()) <= set(BENCHMARK_SPLIT[name])
        np.testing.assert_array_equal(idx, dataset.indices(BENCHMARK_SPLIT[name]))
    assert dataset.record_id(0) == "1" and dataset.record_id(499) == "500"
    assert dataset.patient_ids.dtype == np.int64 and dataset.patient_ids[0] == 15709
    rec = dataset.recording(0)
    assert rec.source == "00001_hr.hea" and rec.signal.shape == (12, 5000) and rec.fs == 500
    first_two = list(dataset.recordings(np.array([0, 1])))
    np.testing.assert_array_equal(first_two[1].signal, read_wfdb(_hr(ptbxl_dir, 2)).signal)


def test_ptbxl_summary_from_headers(ptbxl_dir: Path):
    dataset = PtbxlDataset(ptbxl_dir)
    started = time.perf_counter()
    summary = dataset.summary()
    assert time.perf_counter() - started < 1.0  # 500 headers, no signal read
    assert json.loads(json.dumps(summary)) == summary
    assert summary == {
        "records": 500,
        "sampling_rates": {"500": 500},
        "leads": PTBXL_LEADS,
        "duration_s": {"min": 10.0, "max": 10.0},
        "label_counts": {"NORM": 297, "MI": 73, "STTC": 96, "CD": 78, "HYP": 40},
        "unlabelled": 12,
        "folds": {"1": 58, "2": 51, "3": 34, "4": 42, "5": 47, "6": 33, "7": 44, "8": 44, "9": 81, "10": 66},
    }


def test_ptbxl_100hz_same_labels(ptbxl_dir: Path):
    high = PtbxlDataset(ptbxl_dir)
    low = open_dataset("ptbxl", ptbxl_dir, {"sampling_rate": 100})
    np.testing.assert_array_equal(low.labels, high.labels)
    np.testing.assert_array_equal(low.folds, high.folds)
    assert [low.record_id(i) for i in range(len(low))] == [high.record_id(i) for i in range(len(high))]
    summary = low.summary()
    assert summary["sampling_rates"] == {"100": 500} and summary["duration_s"] == {"min": 10.0, "max": 10.0}
    assert summary["label_counts"] == high.summary()["label_counts"]
    rec = low.recording(0)
    assert rec.source == "00001_lr.hea" and rec.signal.shape == (12, 1000) and rec.fs == 100


def test_header_reader_agrees_with_rdheader(ptbxl_dir: Path, ptb_record: Path, tmp_path: Path):
    headers = sorted((ptbxl_dir / "records500" / "00000").glob("*.hea"))[:40]
    headers += sorted((ptbxl_dir / "records100" / "00000").glob("*.hea"))[:40]
    # lead descriptions with spaces, a header comment
    (tmp_path / "odd.hea").write_text(
        "odd 2 128 1000\nodd.dat 16 200/mV 16 0 0 0 0 ECG lead I\nodd.dat 16 200 16 0 0 0 0 II\n#  Dx: 1, 2\n"
    )
    # and one the fast grammar does not take (no sig_len): read through wfdb.rdheader instead
    (tmp_path / "short.hea").write_text("short 1 360\nshort.dat 212 200 11 1024 0 0 0 MLII\n# a comment\n")
    for header in [*headers, ptb_record, tmp_path / "odd.hea"]:
        info = read_header_info(header)
        expected = wfdb.rdheader(str(header.with_suffix("")))
        assert info.fs == expected.fs and info.sig_len == expected.sig_len, header.name
        assert list(info.sig_names) == expected.sig_name and list(info.comments) == expected.comments
    odd = read_header_info(tmp_path / "odd.hea")
    assert (
        odd.sig_names == ("ECG lead I", "II")
        and odd.comments == ("Dx: 1, 2",)
        and odd.duration_s == 1000 / 128
    )
    with pytest.raises(DatasetError, match="short.hea: the header declares no sampling rate or no samples"):
        read_header_info(tmp_path / "short.hea")
    (tmp_path / "broken.hea").write_text("this is not a header\n")
    with pytest.raises(DatasetError, match="broken.hea: not a readable WFDB header"):
        read_header_info(tmp_path / "broken.hea")


# wfdb_folder


@pytest.fixture
def wfdb_folder(ptbxl_dir: Path, ptb_record: Path, tmp_path: Path) -> Path:
    """Five real PTB-XL records (two in a sub-folder) plus the 1000 Hz PTB record, copied as is."""
    root = tmp_path / "wfdb"
    for ecg_id in (1, 2, 3):
        _rewrite(_hr(ptbxl_dir, ecg_id), root, f"rec{ecg_id}")
    for ecg_id in (4, 5):
        _rewrite(_hr(ptbxl_dir, ecg_id), root / "sub", f"rec{ecg_id}")
    for file in ptb_record.parent.glob("s0010_re.*"):
        shutil.copy(file, root / "sub" / file.name)
    return root


def test_wfdb_folder_records_and_summary(wfdb_folder: Path, ptbxl_dir: Path, ptb_record: Path):
    assert detect_dataset_kind(wfdb_folder) == "wfdb_folder"
    dataset = open_dataset("wfdb_folder", wfdb_folder, {})
    names = [dataset.record_id(i) for i in range(len(dataset))]
    assert names == ["rec1", "rec2", "rec3", "sub/rec4", "sub/rec5", "sub/s0010_re"]
    assert dataset.labels is None and dataset.label_names == () and dataset.folds is None
    np.testing.assert_array_equal(dataset.recording(3).signal, read_wfdb(_hr(ptbxl_dir, 4)).signal)
    ptb = dataset.recording(5)
    assert ptb.fs == 1000 and ptb.signal.shape == read_wfdb(ptb_record).signal.shape
    summary = dataset.summary()
    assert summary["records"] == 6 and summary["sampling_rates"] == {"500": 5, "1000": 1}
    assert summary["leads"][:12] == PTBXL_LEADS and summary["leads"][12:15] == ["i", "ii", "iii"]
    assert "vz" in summary["leads"]
    assert summary["duration_s"]["min"] == 10.0 and summary["duration_s"]["max"] == pytest.approx(
        38.4, abs=0.1
    )
    assert summary["label_counts"] == {} and summary["unlabelled"] == 6 and summary["folds"] == {}
    # no folds: a deterministic 80/10/10 partition by record
    parts = [dataset.split(name) for name in ("train", "val", "test")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(6))
    np.testing.assert_array_equal(parts[0], open_dataset("wfdb_folder", wfdb_folder, {}).split("train"))


def test_wfdb_folder_labels_csv(wfdb_folder: Path):
    # one 'label' column, ';'-separated; bare names, relative paths and a '.hea' suffix all match
    (wfdb_folder / "labels.csv").write_text(
        "record,label,note\nrec1,NORM,x\nrec2,MI;STTC,\nsub/rec4,STTC,\nrec5.hea,,\nnot-there,CD,\n"
    )
    dataset = open_dataset("wfdb_folder", wfdb_folder, {"labels_csv": "labels.csv"})
    assert dataset.label_names == ("CD", "MI", "NORM", "STTC")  # CD only on a row naming no record
    expected = [[0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(dataset.labels, np.array(expected, dtype=np.float32))
    summary = dataset.summary()
    assert summary["label_counts"] == {"CD": 0, "MI": 1, "NORM": 1, "STTC": 2}
    assert summary["unlabelled"] == 3
    # one 0/1 column per class
    (wfdb_folder / "sub" / "hot.csv").write_text("record,AF,LBBB\nrec1,1,0\nrec3,1,1\nsub/s0010_re,0,0\n")
    hot = WfdbFolderDataset(wfdb_folder, labels_csv="sub/hot.csv")
    assert hot.label_names == ("AF", "LBBB")
    np.testing.assert_array_equal(hot.labels[:, 0], [1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(hot.labels[:, 1], [0, 0, 1, 0, 0, 0])
    assert hot.summary()["unlabelled"] == 4
    # bad CSVs
    (wfdb_folder / "bad.csv").write_text("record,AF\nrec1,2\n")
    (wfdb_folder / "nomatch.csv").write_text("record,label\nnobody,AF\n")
    (wfdb_folder / "norecord.csv").write_text("name,label\nrec1,AF\n")
    (wfdb_folder.parent / "outside.csv").write_text("record,label\nrec1,AF\n")
    for option, match in [
        ("bad.csv", "class column 'AF' must hold 0 or 1, found '2'"),
        ("nomatch.csv", "no value of column 'record' names a record"),
        ("norecord.csv", "needs a column 'record'"),
        ("missing.csv", "option 'labels_csv': file 'missing.csv' not found"),
        ("../outside.csv", "option 'labels_csv' .* points outside the dataset folder"),
        (str(wfdb_folder / "labels.csv"), "option 'labels_csv' .* must be relative"),
    ]:
        with pytest.raises(DatasetError, match=match):
            open_dataset("wfdb_folder", wfdb_folder, {"labels_csv": option})


# cinc


@pytest.fixture
def cinc_folder(ptbxl_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "cinc"
    dx = {1: "426783006", 2: "164889003,59118001", 3: "164889003,999999", 4: None}  # NSR / AF,RBBB / AF,?
    for ecg_id, codes in dx.items():
        comments = ["Age: 56", "Sex: Female", *([f"Dx: {codes}"] if codes else []), "Rx: Unknown"]
        _rewrite(
            _hr(ptbxl_dir, ecg_id),
            root / ("g1" if ecg_id < 3 else "g2"),
            f"A{ecg_id:04d}",
            comments,
            mat=True,
        )
    return root


def test_cinc_mat_records_and_labels(cinc_folder: Path, ptbxl_dir: Path):
    header = (cinc_folder / "g1" / "A0001.hea").read_text()
    assert "A0001.mat 16x1+24 1000.0(0)/mV" in header and "# Dx: 426783006" in header
    assert scipy.io.loadmat(cinc_folder / "g1" / "A0001.mat")["val"].shape == (12, 5000)  # MAT v4, as CinC
    assert detect_dataset_kind(cinc_folder) == "cinc"
    (cinc_folder / "map.csv").write_text(
        "snomed,label\n164889003,AF\n426783006,NSR\n427084000,STach\n284470004,PAC\n"
    )
    dataset = open_dataset("cinc", cinc_folder, {"mapping_csv": "map.csv"})
    assert [dataset.record_id(i) for i in range(4)] == ["g1/A0001", "g1/A0002", "g2/A0003", "g2/A0004"]
    assert dataset.label_names == ("AF", "NSR", "STach", "PAC")
    np.testing.assert_array_equal(dataset.labels[:, :2], [[0, 1], [1, 0], [1, 0], [0, 0]])
    assert dataset.labels[:, 2:].sum() == 0  # 59118001 and 999999 are not in the map: ignored
    for i, ecg_id in enumerate((1, 2, 3, 4)):  # the .mat signal reads back exactly as the original
        np.testing.assert_array_equal(dataset.recording(i).signal, read_wfdb(_hr(ptbxl_dir, ecg_id)).signal)
    assert dataset.recording(0).source == "A0001.hea"
    summary = dataset.summary()
    assert summary["label_counts"] == {"AF": 2, "NSR": 1, "STach": 0, "PAC": 0} and summary["unlabelled"] == 1
    assert summary["sampling_rates"] == {"500": 4} and summary["leads"] == PTBXL_LEADS
    # without a map every distinct code is a class
    raw = CincDataset(cinc_folder)
    assert raw.label_names == ("999999", "59118001", "164889003", "426783006")
    np.testing.assert_array_equal(raw.labels.sum(axis=0), [1, 1, 2, 1])
    assert raw.summary()["unlabelled"] == 1
    (cinc_folder / "badmap.csv").write_text("code,label\n1,x\n")
    with pytest.raises(DatasetError, match="mapping_csv 'badmap.csv' needs columns 'snomed'"):
        open_dataset("cinc", cinc_folder, {"mapping_csv": "badmap.csv"})
    with pytest.raises(DatasetError, match="option 'mapping_csv' .* points outside"):
        open_dataset("cinc", cinc_folder, {"mapping_csv": "../../x.csv"})


# npz


def test_npz_real_unlabelled(data_dir: Path):
    path = data_dir / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz"
    assert detect_dataset_kind(path) == "npz" and detect_dataset_kind(path.parent) == "npz"
    dataset = open_dataset("npz", path.parent, {})
    assert isinstance(dataset, NpzDataset) and dataset.file == path
    assert len(dataset) == 1320 and dataset.fs == 250.0 and dataset.lead_names == list(STANDARD_LEADS)
    assert dataset.labels is None and dataset.folds is None
    summary = dataset.summary()
    assert dataset._signals is None  # opening and summarising never decompress the signals
    assert summary == {
        "records": 1320,
        "sampling_rates": {"250": 1320},
        "leads": list(STANDARD_LEADS),
        "duration_s": {"min": 10.0, "max": 10.0},
        "label_counts": {},
        "unlabelled": 1320,
        "folds": {},
    }
    with np.load(path) as arrays:
        ids, first, last = arrays["ecg_id"], arrays["signals"][0], arrays["signals"][-1]
    assert dataset.record_id(0) == str(ids[0]) == "607"
    rec = dataset.recording(0)
    assert rec.signal.dtype == np.float32 and rec.signal.shape == (12, 2500) and rec.fs == 250.0
    np.testing.assert_array_equal(rec.signal, first.astype(np.float32))
    np.testing.assert_array_equal(dataset.recording(1319).signal, last.astype(np.float32))
    assert not dataset.memory_mapped  # a compressed member: loaded once, on first access


def test_npz_labels_folds_memmap(tmp_path: Path, data_dir: Path):
    with np.load(data_dir / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz") as arrays:
        signals = arrays["signals"][:6, [0, 1, 6]]  # real float16 ECGs, 3 leads
    arrays = {
        "signals": signals,
        "fs": np.array(250),
        "lead_names": np.array(["I", "II", "V1"]),
        "record_ids": np.array([f"r{i}" for i in range(6)]),
        "labels": np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 0]], dtype=np.int8),
        "label_names": np.array(["AF", "MI"]),
        "folds": np.array([1, 2, 9, 10, 10, 3]),
    }
    np.savez(tmp_path / "plain.npz", **arrays)
    (tmp_path / "packed").mkdir()
    np.savez_compressed(tmp_path / "packed" / "packed.npz", **arrays)
    plain = open_dataset("npz", tmp_path / "plain.npz", {})
    packed = open_dataset("npz", tmp_path / "packed", {})
    assert plain.memory_mapped and not packed.memory_mapped  # stored members are mapped, not read
    for dataset in (plain, packed):
        assert dataset.label_names == ("AF", "MI") and dataset.lead_names == ["I", "II", "V1"]
        np.testing.assert_array_equal(dataset.labels, arrays["labels"])
        np.testing.assert_array_equal(dataset.split("test"), [3, 4])
        np.testing.assert_array_equal(dataset.split("val"), [2])
        rec = dataset.recording(2)
        assert dataset.record_id(2) == "r2" and rec.lead_names == ["I", "II", "V1"]
        np.testing.assert_array_equal(rec.signal, signals[2].astype(np.float32))
        summary = dataset.summary()
        assert summary["label_counts"] == {"AF": 3, "MI": 2} and summary["unlabelled"] == 2
        assert summary["folds"] == {"1": 1, "2": 1, "3": 1, "9": 1, "10": 2}
    assert not isinstance(plain.recording(0).signal, np.memmap)
    # malformed files
    cases = {
        "nosignals": ({"x": signals}, "expected an array named 'signals'"),
        "noleads": ({"signals": signals}, "'signals' has 3 leads; without an array 'lead_names'"),
        "nonames": (
            {**arrays, "label_names": np.array(["AF"])},
            "give their names as an array 'label_names'",
        ),
        "badfolds": ({**arrays, "folds": np.array([1.5] * 6)}, "'folds' must be integers"),
        "flat": ({"signals": signals[0]}, r"'signals' must be \(records, leads, samples\)"),
    }
    for name, (content, match) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **content)
        with pytest.raises(DatasetError, match=match):
            NpzDataset(tmp_path / f"{name}.npz")
    with pytest.raises(DatasetError, match="expected exactly one .npz file in the folder, found"):
        NpzDataset(tmp_path)


# synthetic


@pytest.fixture
def artifact_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ECGSSL_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    yield tmp_path / "artifacts"
    get_settings.cache_clear()


def test_synthetic_ecgs(artifact_dir: Path, monkeypatch: pytest.MonkeyPatch):
    first = open_dataset("synthetic", None, {"n": 4, "seed": 0})
    cache = artifact_dir / "datasets" / "synthetic-n4-seed0.npz"
    # opening and summarising generate nothing
    assert len(first) == 4 and first.labels is None and first.label_names == () and first.folds is None
    assert first.summary() == {
        "records": 4,
        "sampling_rates": {"500": 4},
        "leads": list(STANDARD_LEADS),
        "duration_s": {"min": 10.0, "max": 10.0},
        "label_counts": {},
        "unlabelled": 4,
        "folds": {},
    }
    assert first.from_cache is None and not cache.exists()
    signals = np.array(first.signals)
    assert first.from_cache is False and cache.is_file() and first.materialise().memory_mapped
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary file left
    assert signals.shape == (4, 12, 5000) and signals.dtype == np.float32
    rec = first.recording(3)
    assert rec.fs == 500 and rec.lead_names == list(STANDARD_LEADS) and rec.signal.shape == (12, 5000)
    assert first.record_id(3) == "3" and rec.source == "synthetic-n4-seed0:3"
    np.testing.assert_array_equal(rec.signal, signals[3])
    # III, aVR, aVL, aVF derived from I and II, exactly
    lead_i, lead_ii = signals[:, 0], signals[:, 1]
    np.testing.assert_array_equal(signals[:, 2], lead_ii - lead_i)
    np.testing.assert_array_equal(signals[:, 3], -(lead_i + lead_ii) / 2)
    np.testing.assert_array_equal(signals[:, 4], lead_i - lead_ii / 2)
    np.testing.assert_array_equal(signals[:, 5], lead_ii - lead_i / 2)
    # mV amplitudes of a normal ECG, and a regular heartbeat in lead II
    for ecg in signals:
        lead = ecg[1] - np.median(ecg[1])
        r_wave = float(np.percentile(lead, 99.9))
        assert 0.3 < r_wave < 2.5, r_wave
        assert 1.0 < float(np.ptp(ecg, axis=1).max()) < 6.0
        peaks, _ = find_peaks(lead, height=0.5 * lead.max(), distance=150)
        rate = 60 * 500 / float(np.median(np.diff(peaks)))
        assert 40 < rate < 150 and 6 <= len(peaks) <= 25, (rate, len(peaks))
    # the second open reads the cache (generating again would fail here)
    real_generate = synthetic.generate
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("generated instead of cached"))
    again = open_dataset("synthetic", None, {"n": 4, "seed": 0})
    np.testing.assert_array_equal(np.asarray(again.signals), signals)
    assert again.from_cache is True
    # generating is deterministic (not just cached), and another seed gives other ECGs
    monkeypatch.setattr(synthetic, "generate", real_generate)
    cache.unlink()
    np.testing.assert_array_equal(np.asarray(open_dataset("synthetic", None, {"n": 4}).signals), signals)
    other = np.asarray(open_dataset("synthetic", None, {"n": 4, "seed": 1}).signals)
    assert other.shape == signals.shape and np.abs(other - signals).mean() > 0.05
    # the cache is itself a valid npz dataset
    assert detect_dataset_kind(cache) == "npz" and NpzDataset(cache).fs == 500.0
    with zipfile.ZipFile(cache) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}


def test_importing_datasets_does_not_import_torch():
    """The API process imports the datasets and opens and summarises a synthetic one at registration."""
    code = (
        "import sys; from services.datasets.kinds import open_dataset; "
        "open_dataset('synthetic', None, {'n': 10000}).summary(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# options and detection


def test_open_dataset_rejects_bad_options(ptbxl_dir: Path, data_dir: Path, tmp_path: Path):
    assert set(DATASET_KINDS) == {"ptbxl", "wfdb_folder", "cinc", "npz", "synthetic"}
    cases = [
        ("nope", ptbxl_dir, {}, "unknown dataset kind 'nope'; expected one of ptbxl"),
        (
            "ptbxl",
            ptbxl_dir,
            {"rate": 500},
            "unknown option 'rate' for dataset kind 'ptbxl'; it takes sampling_rate",
        ),
        (
            "ptbxl",
            ptbxl_dir,
            {"sampling_rate": "500"},
            "option 'sampling_rate' .* must be 100 or 500 .* got str",
        ),
        ("ptbxl", ptbxl_dir, {"sampling_rate": True}, "option 'sampling_rate' .* got bool"),
        (
            "ptbxl",
            ptbxl_dir,
            {"sampling_rate": 250},
            "option 'sampling_rate' .* must be 100 or 500 .*got 250",
        ),
        ("ptbxl", None, {}, "dataset kind 'ptbxl' needs a path"),
        ("ptbxl", data_dir / "ptbxl-unlabelled", {}, "no ptbxl_database.csv"),
        (
            "npz",
            data_dir / "ptbxl-unlabelled",
            {"fs": 250},
            "unknown option 'fs' for dataset kind 'npz'; it takes none",
        ),
        ("npz", ptbxl_dir, {}, "expected exactly one .npz file in the folder, found 0"),
        ("wfdb_folder", ptbxl_dir / "ptbxl_database.csv", {}, "needs a folder"),
        ("wfdb_folder", tmp_path, {}, "no WFDB header"),
        (
            "wfdb_folder",
            ptbxl_dir,
            {"labels_csv": 3},
            "option 'labels_csv' .* must be a CSV file path .* got int",
        ),
        ("cinc", tmp_path / "absent", {}, "does not exist"),
        ("synthetic", None, {}, "needs the option 'n'"),
        ("synthetic", None, {"n": 0}, "option 'n' .* must be an integer from 1 to 10000, got 0"),
        ("synthetic", None, {"n": 10001}, "option 'n' .* got 10001"),
        ("synthetic", None, {"n": 2.0}, "option 'n' .* got float"),
        ("synthetic", None, {"n": 4, "seed": -1}, "option 'seed' .* got -1"),
        ("synthetic", ptbxl_dir, {"n": 4}, "takes no path"),
    ]
    for kind, path, options, match in cases:
        with pytest.raises(DatasetError, match=match):
            open_dataset(kind, path, options)


def test_detect_dataset_kind(data_dir: Path, tmp_path: Path):
    assert detect_dataset_kind(data_dir / "ptbxl-500") == "ptbxl"
    assert detect_dataset_kind(data_dir / "ptbxl-500" / "records100") == "wfdb_folder"
    assert detect_dataset_kind(data_dir / "ptb-diagnostic") == "wfdb_folder"
    for bad, match in [
        (tmp_path, "holds no recognised dataset"),
        (data_dir / "ptbxl-500" / "ptbxl_database.csv", "is a file but not a .npz"),
        (tmp_path / "absent", "does not exist"),
    ]:
        with pytest.raises(DatasetError, match=match):
            detect_dataset_kind(bad)
