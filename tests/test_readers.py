"""ECG readers of every accepted upload format, on a real PTB-XL record written to each format.

The writers here (``as_csv``, ``as_json``, ``as_npz``, ``as_edf``, ``as_wfdb_zip``, ``as_cinc_mat``) are
reused by tests/test_bad_input.py.
"""

import io
import json
import os
import stat
import struct
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.signal as sps
import wfdb

from api.responses import status_of
from services.ecg.leads import lead_label
from services.ecg.preprocess import InputSpec, check_signal, interpolate_gaps, prepare_signal, preprocess
from services.ecg.readers import extract_zip, read_csv, read_edf, read_json, read_npz, read_wfdb
from services.ecg.readers.archive import MAX_ZIP_MEMBERS
from services.ecg.readers.wfdb_record import read_header_fields
from services.ecg.recording import ContentTooLargeError, Recording
from services.ecg.upload import read_upload
from services.errors import EcgInputError

SPEC = InputSpec()
RECORD = "ptbxl-500/records500/00000/00001_hr"
EDF_RANGE_UV = 5000.0  # physical range +-5 mV written as uV, over the 16-bit digital range
EDF_STEP_MV = 2 * EDF_RANGE_UV / 65535 / 1000  # one quantisation step of that EDF, in mV


# --------------------------------------------------------------------------------------------------
# writers of the same record in every format


def as_csv(rec: Recording, *, time_column: bool = False, delimiter: str = ",", units: str = "") -> bytes:
    """Header of lead names, one row per sample; float32 values printed with 9 significant digits (exact)."""
    names = [f"{n} ({units})" if units else n for n in rec.lead_names]
    scale = 1000.0 if units == "uV" else 1.0
    columns = [rec.signal.astype(np.float64).T * scale]
    if time_column:
        names = ["time", *names]
        columns.insert(0, (np.arange(rec.signal.shape[1]) / rec.fs)[:, None])
    buffer = io.StringIO()
    np.savetxt(
        buffer, np.hstack(columns), fmt="%.9g", delimiter=delimiter, header=delimiter.join(names), comments=""
    )
    text = buffer.getvalue()
    return (text.replace(".", ",") if delimiter == ";" else text).encode()


def as_json(rec: Recording, units: str = "mV", with_fs: bool = True) -> bytes:
    scale = 1000.0 if units == "uV" else 1.0
    obj = {
        "leads": rec.lead_names,
        "signal": (rec.signal.astype(np.float64) * scale).tolist(),
        "units": units,
    }
    if with_fs:
        obj["fs"] = rec.fs
    return json.dumps(obj).encode()


def as_npz(rec: Recording, key: str = "signal", **extra: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    arrays = {key: rec.signal, "fs": np.array(rec.fs), "leads": np.array(rec.lead_names), **extra}
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def as_edf(rec: Recording, path: Path, extra: list[tuple[np.ndarray, dict]] = ()) -> Path:
    """EDF+ of the leads labelled 'ECG <name>' in uV over +-5 mV, plus ``extra`` (signal, header) channels."""
    from pyedflib import highlevel

    headers = [
        highlevel.make_signal_header(
            f"ECG {name}",
            dimension="uV",
            sample_frequency=rec.fs,
            physical_min=-EDF_RANGE_UV,
            physical_max=EDF_RANGE_UV,
        )
        for name in rec.lead_names
    ]
    signals = [row.astype(np.float64) * 1000 for row in rec.signal]
    for signal, header in extra:
        signals.append(signal)
        headers.append(header)
    highlevel.write_edf(str(path), signals, headers, header={"annotations": [[1.0, 0.5, "test event"]]})
    return path


def as_wfdb_zip(header: Path, folder: str = "rec/", compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for path in (header, header.with_suffix(".dat")):
            archive.writestr(folder + path.name, path.read_bytes())
    return buffer.getvalue()


def as_cinc_mat(header: Path, name: str = "A0001") -> dict[str, bytes]:
    """The record as a PhysioNet/CinC challenge record: a MATLAB v4 ``val`` matrix and a header whose
    signal lines name '<name>.mat 16+24' (the 24-byte MAT v4 header skipped as a byte offset)."""
    digital = wfdb.rdrecord(str(header.with_suffix("")), physical=False).d_signal.T.astype(np.int16)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"val": digital}, format="4")
    lines = header.read_text().splitlines()
    lines[0] = lines[0].replace(header.stem, name, 1)
    lines[1:13] = [line.replace(f"{header.stem}.dat 16 ", f"{name}.mat 16+24 ") for line in lines[1:13]]
    return {f"{name}.hea": ("\n".join(lines) + "\n").encode(), f"{name}.mat": buffer.getvalue()}


@pytest.fixture(scope="module")
def header(data_dir: Path) -> Path:
    return data_dir / f"{RECORD}.hea"


@pytest.fixture(scope="module")
def rec(header: Path) -> Recording:
    return read_wfdb(header)


def _fresh(tmp_path: Path, name: str) -> Path:
    """A new empty work directory, as each upload gets."""
    path = tmp_path / name
    path.mkdir()
    return path


def _same(got: Recording, rec: Recording, atol: float = 0.0) -> None:
    assert got.fs == rec.fs == 500.0
    assert got.lead_names == rec.lead_names
    assert got.signal.dtype == np.float32 and got.signal.shape == rec.signal.shape
    np.testing.assert_allclose(got.signal, rec.signal, rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------------
# every format reads back the same record


def test_csv_reads_back_exactly(rec: Recording, tmp_path: Path):
    _same(read_upload({"ecg.csv": as_csv(rec)}, tmp_path, fs=500.0), rec)
    # the sampling rate from a time column in seconds; ';' with decimal commas; a unit in the header
    _same(read_upload({"ecg.csv": as_csv(rec, time_column=True)}, tmp_path), rec)
    _same(read_csv(as_csv(rec, delimiter=";"), 500.0, None, "x.csv"), rec)
    _same(read_csv(as_csv(rec, units="uV"), 500.0, None, "x.csv"), rec, atol=1e-7)
    with pytest.raises(EcgInputError, match="contradicts the 'time' column"):
        read_csv(as_csv(rec, time_column=True), 250.0, None, "x.csv")


def test_json_reads_back_exactly(rec: Recording, tmp_path: Path):
    _same(read_upload({"ecg.json": as_json(rec)}, tmp_path), rec)
    _same(read_json(as_json(rec, units="uV"), None, None, "x.json"), rec, atol=1e-7)
    as_dict = {"fs": 500, "signal": dict(zip(rec.lead_names, rec.signal.astype(float).tolist(), strict=True))}
    _same(read_json(json.dumps(as_dict).encode(), None, None, "x.json"), rec)
    # form fields complete what the file lacks
    _same(read_json(as_json(rec, with_fs=False), 500.0, None, "x.json"), rec)


def test_npy_and_npz_read_back_exactly(rec: Recording, tmp_path: Path):
    buffer = io.BytesIO()
    np.save(buffer, rec.signal)
    _same(read_upload({"ecg.npy": buffer.getvalue()}, tmp_path, 500.0, rec.lead_names), rec)
    _same(read_upload({"ecg.npz": as_npz(rec)}, tmp_path), rec)
    one_record = Recording(rec.signal[None], 500.0, rec.lead_names, "x")  # (1, leads, samples)
    _same(read_npz(as_npz(one_record, key="signals"), None, None, "x"), rec)
    microvolts = read_npz(
        as_npz(Recording(rec.signal * 1000, 500.0, rec.lead_names, "x"), units=np.array("uV")),
        None,
        None,
        "x",
    )
    _same(microvolts, rec, atol=1e-6)
    # the form field overrides the file's rate
    assert read_npz(as_npz(rec), 1000.0, None, "x.npz").fs == 1000.0
    two_records = Recording(np.stack([rec.signal] * 2), 500.0, rec.lead_names, "x")
    with pytest.raises(EcgInputError, match="holds 2 records"):
        read_npz(as_npz(two_records, key="signals"), None, None, "x")
    with pytest.raises(EcgInputError, match="no array named 'signal'"):
        read_npz(as_npz(rec, key="ecg"), None, None, "x.npz")


def test_edf_reads_back_within_one_quantisation_step(rec: Recording, tmp_path: Path):
    """EDF stores 16-bit integers over the physical range (here +-5 mV): edflib truncates physical values
    to the digital grid, so a sample may be off by up to one step of 10 mV / 65535 (0.15 µV)."""
    path = as_edf(rec, tmp_path / "ecg.edf")
    got = read_upload({"ecg.edf": path.read_bytes()}, _fresh(tmp_path, "work"))
    assert got.source == "ecg.edf"
    _same(got, rec, atol=EDF_STEP_MV + 1e-6)
    assert np.abs(got.signal - rec.signal).max() > 0  # it really went through the 16-bit grid


def test_edf_keeps_the_ecg_channels_at_their_common_rate(rec: Recording, tmp_path: Path):
    """Beside the 12 leads at 500 Hz: an ECG channel at 250 Hz, a plethysmogram in %, and more EEG channels
    (in uV, at 100 Hz) than there are leads: only the 12 leads are read."""
    from pyedflib import highlevel

    def header(label: str, unit: str, fs: int, low: float, high: float) -> dict:
        return highlevel.make_signal_header(label, unit, fs, physical_min=low, physical_max=high)

    extra = [
        (rec.signal[1, ::2].astype(np.float64), header("ECG aux", "mV", 250, -5, 5)),
        (np.linspace(0, 100, 1250), header("Pleth", "%", 125, 0, 100)),
        *[(np.zeros(1000), header(f"EEG C{k}", "uV", 100, -200, 200)) for k in range(14)],
    ]
    got = read_edf(as_edf(rec, tmp_path / "multi.edf", extra), "multi.edf")
    _same(got, rec, atol=EDF_STEP_MV + 1e-6)
    assert got.comments[0] == "ECG channels at other rates ignored: ECG aux (250 Hz)"
    assert "Pleth (%, 125 Hz)" in got.comments[1] and "EEG C13 (uV, 100 Hz)" in got.comments[1]
    pleth = extra[1][1]

    no_ecg = tmp_path / "no_ecg.edf"
    highlevel.write_edf(str(no_ecg), [np.linspace(0, 100, 1250)], [pleth])
    with pytest.raises(EcgInputError, match=r"no ECG channel.*Pleth \(%, 125 Hz\)"):
        read_edf(no_ecg, "no_ecg.edf")
    broken = tmp_path / "broken.edf"
    broken.write_bytes(no_ecg.read_bytes()[:300])
    with pytest.raises(EcgInputError, match="not a readable EDF"):
        read_edf(broken, "broken.edf")


def test_wfdb_in_a_zip_reads_back_exactly(rec: Recording, header: Path, tmp_path: Path):
    got = read_upload({"record.zip": as_wfdb_zip(header, folder="export/ptbxl/")}, tmp_path)
    _same(got, rec)
    assert got.source == "record.zip:export/ptbxl/00001_hr.hea"
    # at the top level, stored uncompressed, and another format inside a zip
    _same(read_upload({"r.zip": as_wfdb_zip(header, "", zipfile.ZIP_STORED)}, _fresh(tmp_path, "a")), rec)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data/ecg.csv", as_csv(rec, time_column=True))
        archive.writestr("__MACOSX/data/._ecg.csv", b"resource fork")
    _same(read_upload({"csv.zip": buffer.getvalue()}, _fresh(tmp_path, "b")), rec)


def test_wfdb_header_without_sample_count(rec: Recording, header: Path, tmp_path: Path):
    """The sample count is optional in a WFDB header: wfdb infers it from the signal file's size."""
    text = header.read_text().replace("00001_hr 12 500 5000", "00001_hr 12 500", 1)
    dat = header.with_suffix(".dat").read_bytes()
    _same(read_upload({"00001_hr.hea": text.encode(), "00001_hr.dat": dat}, tmp_path), rec)


def test_wfdb_with_cinc_style_mat_signal_file(rec: Recording, header: Path, tmp_path: Path):
    files = as_cinc_mat(header)
    assert scipy.io.loadmat(io.BytesIO(files["A0001.mat"]))["val"].shape == (12, 5000)  # a real MAT file
    assert "A0001.mat 16+24 " in files["A0001.hea"].decode()
    got = read_upload(files, tmp_path)
    _same(got, rec)
    assert got.source == "A0001.hea"


def test_wfdb_with_wfdb2mat_output(
    rec: Recording, header: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """wfdb's own converter writes a MAT v5 file and a header with the matching byte offset."""
    from wfdb.io.convert.matlab import wfdb_to_mat

    for suffix in (".hea", ".dat"):
        (tmp_path / f"{header.stem}{suffix}").write_bytes(header.with_suffix(suffix).read_bytes())
    monkeypatch.chdir(tmp_path)  # wfdb_to_mat writes into the working directory
    wfdb_to_mat(header.stem)
    files = {name: (tmp_path / name).read_bytes() for name in ("00001_hrm.hea", "00001_hrm.mat")}
    _same(read_upload(files, _fresh(tmp_path, "work")), rec)


def test_microvolt_units_become_millivolts(rec: Recording, tmp_path: Path):
    in_uv = Recording(rec.signal * 1000, 500.0, rec.lead_names, "x")
    for got in (
        read_json(as_json(rec, units="uV"), None, None, "x.json"),
        read_csv(as_csv(rec, units="uV"), 500.0, None, "x.csv"),
        read_npz(as_npz(in_uv, units=np.array("uV")), None, None, "x.npz"),
        read_edf(as_edf(rec, tmp_path / "uv.edf"), "uv.edf"),  # stored in uV
    ):
        assert 0.5 < np.abs(got.signal).max() < 5, got.source  # mV amplitudes, not 1000x
        np.testing.assert_allclose(got.signal, rec.signal, atol=EDF_STEP_MV + 1e-6)


def test_lead_labels():
    assert [lead_label(n) for n in ("ECG I", "EKG-V1", "ecg lead aVR", "II", "Pleth", "ECG")] == [
        "I", "V1", "aVR", "II", "Pleth", "ECG",
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# signal checks of the one preprocessing path


def test_nan_gap_is_interpolated_close_to_the_original(rec: Recording):
    gap = slice(2000, 2010)  # 20 ms of lead V2
    holed = rec.signal.copy()
    holed[7, gap] = np.nan
    broken = Recording(holed, rec.fs, rec.lead_names, "gap")
    with pytest.raises(EcgInputError, match=r"10 NaN or infinite sample\(s\).* in lead\(s\) V2$"):
        prepare_signal(broken, SPEC)
    filled = interpolate_gaps(holed)
    original = rec.signal[7, gap.start - 1 : gap.stop + 1]
    # linear interpolation stays between its end points, so it is off by at most the signal's local range
    local_range = original.max() - original.min()
    assert np.abs(filled[7, gap] - rec.signal[7, gap]).max() <= local_range + 1e-6
    np.testing.assert_array_equal(np.delete(filled, 7, axis=0), np.delete(rec.signal, 7, axis=0))
    repaired = prepare_signal(broken, SPEC, interpolate_nan=True)
    clean = prepare_signal(rec, SPEC)
    assert np.isfinite(repaired).all()
    np.testing.assert_array_equal(np.delete(repaired, 7, axis=0), np.delete(clean, 7, axis=0))
    diff = np.abs(repaired[7] - clean[7])
    assert diff.max() < 0.03, diff.max()  # mV, on a lead peaking at 1.35 mV: a 20 ms gap barely shows
    near = slice(gap.start // 2 - 50, gap.stop // 2 + 50)  # at 250 Hz
    assert np.delete(diff, np.r_[near]).max() < 0.05 * diff.max() + 1e-6  # and only near the gap
    windows = preprocess(broken, SPEC, interpolate_nan=True)
    assert windows.shape == (2, 12, 2250) and np.isfinite(windows).all()


def test_nan_edges_and_dead_leads():
    x = np.array([[np.nan, 1.0, np.nan, 3.0, np.inf], [0.0, 1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(interpolate_gaps(x), [[1, 1, 2, 3, 3], [0, 1, 2, 3, 4]])
    dead = np.array([[np.nan] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]], np.float32)
    with pytest.raises(EcgInputError, match="lead.s. V1 hold no finite sample"):
        check_signal(dead, ["V1", "V2"], "x", interpolate_nan=True)


def test_flat_line(rec: Recording):
    flat = Recording(np.full((12, 5000), 0.3, np.float32), 500.0, rec.lead_names, "flat")
    with pytest.raises(EcgInputError, match="flat line"):
        prepare_signal(flat, SPEC, reject_flat=True)
    assert np.all(preprocess(flat, SPEC) == 0)  # default (training): standardised to zeros, as before
    one_flat = rec.signal.copy()
    one_flat[8] = 0.0  # V3 disconnected: the other leads still carry the ECG, so it is accepted
    assert np.isfinite(
        prepare_signal(Recording(one_flat, 500.0, rec.lead_names, "x"), SPEC, reject_flat=True)
    ).all()
    in_volts = Recording(rec.signal / 1000, 500.0, rec.lead_names, "volts")  # std ~0.2 µV in every lead
    with pytest.raises(EcgInputError, match="not in mV"):
        prepare_signal(in_volts, SPEC, reject_flat=True)


def test_zero_length_signals(rec: Recording):
    with pytest.raises(EcgInputError, match="no samples"):
        check_signal(np.zeros((12, 0), np.float32), list(rec.lead_names), "x")
    with pytest.raises(EcgInputError, match="no samples"):
        prepare_signal(Recording(np.zeros((12, 0), np.float32), 500.0, rec.lead_names, "x"), SPEC)
    with pytest.raises(EcgInputError, match="no samples"):
        read_csv(b"I,II,III\n", 500.0, None, "x.csv")
    with pytest.raises(EcgInputError, match="no samples"):
        read_json(b'{"fs": 500, "leads": ["I"], "signal": [[]]}', None, None, "x.json")
    with pytest.raises(EcgInputError, match="no samples"):
        read_npz(
            as_npz(Recording(np.zeros((12, 0), np.float32), 500.0, rec.lead_names, "x")), None, None, "x"
        )


# --------------------------------------------------------------------------------------------------
# readers refusing what they cannot read, saying why


def test_binary_file_posing_as_csv():
    with pytest.raises(EcgInputError, match="binary file, not CSV"):
        read_csv(os.urandom(256) + b"\x00" + os.urandom(256), 500.0, None, "x.csv")
    with pytest.raises(EcgInputError, match=r"not UTF-8 text \(byte 0xe9 at offset 16\)"):
        read_csv("I,II\n0.1,0.2\ncaf\xe9".encode("latin-1"), 500.0, None, "x.csv")


def test_csv_problems_name_line_and_column():
    with pytest.raises(EcgInputError, match=r"line 3, column 'II' \(column 2\): 'abc' is not a number"):
        read_csv(b"I,II\n0.1,0.2\n0.1,abc\n", 500.0, None, "x.csv")
    with pytest.raises(EcgInputError, match="binary file"):
        read_csv(b"I,II\n" + b"0.1,0.2\n" * 20000 + b"0.1,\x000.2\n", 500.0, None, "x.csv")  # NUL far in
    with pytest.raises(EcgInputError, match="not a readable CSV file"):
        read_csv(b'I,II\n"' + b"1" * 200_000 + b'",1\n', 500.0, None, "x.csv")  # over csv's field limit
    with pytest.raises(EcgInputError, match="line 3 has 3 cells but the header has 2"):
        read_csv(b"I,II\n0.1,0.2\n0.1,0.2,0.3\n", 500.0, None, "x.csv")
    with pytest.raises(EcgInputError, match="first row must name the leads"):
        read_csv(b"0.1,0.2\n0.1,0.2\n", 500.0, None, "x.csv")
    with pytest.raises(EcgInputError, match="'fs'"):
        read_csv(b"I,II\n0.1,0.2\n0.1,0.2\n", None, None, "x.csv")
    with pytest.raises(EcgInputError, match="not evenly spaced.*line 4"):
        read_csv(b"t,I\n0,1\n0.002,2\n0.010,3\n0.012,4\n", None, None, "x.csv")
    with pytest.raises(EcgInputError, match="one row per lead.*transpose"):
        read_csv(b"I,0.1,0.2,0.3\nII,0.1,0.2,0.3\n", 500.0, None, "x.csv")
    excel = read_csv(b"sep=;\r\nI;II\r\n0,1;0,2\r\n0,3;0,4\r\n", 500.0, None, "x.csv")
    np.testing.assert_allclose(excel.signal, [[0.1, 0.3], [0.2, 0.4]], rtol=1e-6)
    got = read_csv(b"I,II\n0.1,\n0.3,0.4\n", 500.0, None, "x.csv")  # an empty cell is a missing sample
    assert np.isnan(got.signal[1, 0]) and got.signal[0, 1] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"fs": 500, "signal": [[1, 2]', "not valid JSON"),
        (b"[[1, 2], [3, 4]]", "expected a JSON object"),
        (b'{"fs": 500, "data": [[1, 2]]}', "no 'signal'"),
        (b'{"fs": 500, "signal": [1, 2, 3]}', "list of leads"),
        (b'{"fs": 500, "leads": ["I", "II"], "signal": [[1, 2, 3], [1, 2]]}', "differ in length"),
        (b'{"fs": 500, "leads": ["I", "II"], "signal": [[1, 2], [1, "x"]]}', r"signal\[1\]\[1\] is \"x\""),
        (b'{"fs": 500, "leads": ["I", "II"], "signal": [[1, 2], [1, true]]}', "not a number"),
        (b'{"fs": "fast", "leads": ["I"], "signal": [[1, 2]]}', "'fs' must be a number"),
        (b'{"leads": ["I"], "signal": [[1, 2]]}', "'fs'"),
        (
            b'{"fs": 500, "leads": ["I", "II", "III"], "signal": [[1, 2, 3, 4]]}',
            "3 lead names given for 1 rows",
        ),
        (b'{"fs": 500, "leads": ["I"], "units": "mmHg", "signal": [[1, 2]]}', "unknown unit 'mmHg'"),
        (b'{"fs": 1, "leads": ["I"], "signal": [[1, 2]]}', "outside the accepted 50-100000 Hz"),
        (b"[" * 100_000 + b"]" * 100_000, "not readable JSON"),
        (b'{"fs": 500, "signal": [[1' + b"0" * 5000 + b"]]}", "not readable JSON"),
        (b'{"fs": 500, "signal": [[1' + b"0" * 400 + b"]]}", "too large"),
    ],
)
def test_bad_json_structures(content: bytes, expected: str):
    with pytest.raises(EcgInputError, match=expected):
        read_json(content, None, None, "x.json")


def test_upload_dispatch_names_what_is_accepted(rec: Recording, header: Path, tmp_path: Path):
    with pytest.raises(
        EcgInputError, match=r"cannot read the upload \(ecg.xml\): expected a WFDB record.*\.edf"
    ):
        read_upload({"ecg.xml": b"<ecg/>"}, tmp_path)
    with pytest.raises(EcgInputError, match=r"need their \.hea header"):
        read_upload({"00001_hr.dat": header.with_suffix(".dat").read_bytes()}, tmp_path)
    with pytest.raises(EcgInputError, match="must be uploaded alone"):
        read_upload({"r.zip": as_wfdb_zip(header), "x.hea": b"x 1 500 10"}, tmp_path)
    with pytest.raises(EcgInputError, match="outside the accepted"):
        read_upload({"x.csv": as_csv(rec)}, tmp_path, fs=1.0)


def test_header_naming_a_file_elsewhere_is_refused(header: Path, tmp_path: Path):
    """wfdb's header grammar already refuses paths in signal lines; read_wfdb checks again regardless."""
    (tmp_path / "00001_hr.dat").write_bytes(header.with_suffix(".dat").read_bytes())
    for name in ("../00001_hr.dat", "sub/00001_hr.dat", "/tmp/00001_hr.dat"):
        text = header.read_text().replace("00001_hr.dat", name)
        with pytest.raises(
            EcgInputError, match="00001_hr.hea: (not a readable WFDB header|.*plain file names)"
        ):
            read_upload({"00001_hr.hea": text.encode()}, _fresh(tmp_path, f"w{len(name)}{name[0]}"))


def test_npy_header_claiming_more_data_than_the_file_holds(rec: Recording, tmp_path: Path):
    buffer = io.BytesIO()
    np.save(buffer, rec.signal)
    with pytest.raises(EcgInputError, match="truncated"):
        read_upload({"x.npy": buffer.getvalue()[:-100]}, tmp_path, fs=500.0)


# --------------------------------------------------------------------------------------------------
# zip safety


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def zip_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("rec/link.dat")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def zip_bomb(size: int = 200 * 1024 * 1024, name: str = "rec/00001_hr.dat") -> bytes:
    """``size`` bytes of zeros deflated to about size/1000, streamed (never held uncompressed)."""
    buffer = io.BytesIO()
    chunk = bytes(1024 * 1024)
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open(name, "w", force_zip64=True) as member,
    ):
        for _ in range(size // len(chunk)):
            member.write(chunk)
    return buffer.getvalue()


def lie_about_size(data: bytes, declared: int) -> bytes:
    """The archive with every member's uncompressed size rewritten to ``declared`` (central directory and
    local headers), as a crafted archive would."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        start = 0
        while (start := out.find(signature, start)) >= 0:
            struct.pack_into("<I", out, start + offset, declared)
            start += 4
    return bytes(out)


@pytest.mark.parametrize(
    ("name", "archive", "expected"),
    [
        ("dotdot", lambda: zip_of({"rec/../../escape.hea": b"x"}), r"points outside the archive \('\.\.'"),
        ("absolute", lambda: zip_of({"/tmp/escape.hea": b"x"}), "absolute path"),
        ("drive", lambda: zip_of({"C:/escape.hea": b"x"}), "absolute path"),
        ("symlink", zip_with_symlink, "symbolic link"),
        ("many", lambda: zip_of({f"f{i}.txt": b"x" for i in range(MAX_ZIP_MEMBERS + 1)}), "at most 64"),
        ("bomb", lambda: zip_bomb(10 * 1024 * 1024), r"10485760 bytes \(\d+:1, over 100:1\).*zip bomb"),
        ("duplicate", lambda: zip_of({"a.hea": b"x", "A.hea": b"y"}), "appears twice"),
        ("not a zip", lambda: b"PK\x03\x04 not really", "not a valid .zip"),
    ],
)
def test_unsafe_zips_are_refused_before_anything_is_written(
    name: str, archive, expected: str, tmp_path: Path
):
    dest = tmp_path / "upload" / "zip"
    dest.parent.mkdir()
    with pytest.raises(EcgInputError, match=expected):
        extract_zip(archive(), dest, "x.zip", limit=50 * 1024 * 1024)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["upload"]


def test_zip_over_the_size_limit(header: Path, tmp_path: Path):
    data = as_wfdb_zip(header)
    content = header.stat().st_size + header.with_suffix(".dat").stat().st_size
    with pytest.raises(ContentTooLargeError, match=f"upload limit of {content - 1} bytes") as info:
        extract_zip(data, tmp_path / "a", "x.zip", limit=content - 1)
    assert status_of(info.value) == 413  # the API maps the error kind to its status
    assert [p.name for p in extract_zip(data, tmp_path / "b", "x.zip", limit=content)] == [
        "00001_hr.hea",
        "00001_hr.dat",
    ]


def test_zip_lying_about_its_sizes_stops_while_extracting(header: Path, tmp_path: Path):
    """Declared sizes pass the checks, the real data is larger: extraction stops (zipfile reads at most
    the declared size, the CRC then fails; our byte count would catch any excess too)."""
    data = lie_about_size(zip_of({"rec/big.dat": bytes(3 * 1024 * 1024)}), declared=1000)
    dest = tmp_path / "zip"
    with pytest.raises(EcgInputError, match="big.dat"):
        extract_zip(data, dest, "x.zip", limit=50 * 1024 * 1024)
    assert all(p.stat().st_size <= 1000 for p in dest.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) in (
        [],
        ["zip/rec/big.dat"],
    )


def test_zip_records_and_listing(rec: Recording, header: Path, tmp_path: Path):
    two = zip_of({"a/00001_hr.hea": header.read_bytes(), "b/00001_hr.hea": header.read_bytes()})
    with pytest.raises(EcgInputError, match="several WFDB headers in the archive"):
        read_upload({"two.zip": two}, _fresh(tmp_path, "w0"))
    missing = zip_of({"rec/00001_hr.hea": header.read_bytes()})
    with pytest.raises(EcgInputError, match=r"references signal file '00001_hr\.dat'"):
        read_upload({"missing.zip": missing}, _fresh(tmp_path, "w1"))
    both = zip_of({"a.csv": as_csv(rec), "b.csv": as_csv(rec)})
    with pytest.raises(EcgInputError, match="must hold one record.*a.csv, b.csv"):
        read_upload({"two.zip": both}, _fresh(tmp_path, "w2"))
    with pytest.raises(EcgInputError, match=r"notes.zip: cannot read 'docs/notes.txt' from the archive"):
        read_upload({"notes.zip": zip_of({"docs/notes.txt": b"hello"})}, _fresh(tmp_path, "w3"))
    with pytest.raises(EcgInputError, match=r"^csv.zip: ecg.csv: line 2, column 'I'"):
        read_upload({"csv.zip": zip_of({"ecg.csv": b"I\nx\n"})}, _fresh(tmp_path, "w4"), fs=500.0)


# --------------------------------------------------------------------------------------------------
# the WFDB read for the cache: one header parse, the format-16 signal straight from the file, the same
# arrays as wfdb.rdrecord + resample_poly + sosfiltfilt written plainly (bench/cache_throughput.py times both)


def test_wfdb_header_fields_and_signals_equal_wfdbs_own(ptbxl_dir: Path, ptb_record: Path):
    headers = sorted((ptbxl_dir / "records500").glob("*/*_hr.hea"))
    headers += sorted((ptbxl_dir / "records100").glob("*/*_lr.hea"))[:50] + [ptb_record]
    assert len(headers) == 551
    for header in headers:
        fields, reference = read_header_fields(header), wfdb.rdheader(str(header.with_suffix("")))
        checked = ("n_sig", "fs", "sig_len", "file_name", "fmt", "samps_per_frame", "byte_offset", "sig_name")
        for name in checked:
            assert getattr(fields, name) == getattr(reference, name), (header.name, name)
        channels = [0, 1, 2] if header == ptb_record else None  # PTB: 15 signals in two files
        record = wfdb.rdrecord(str(header.with_suffix("")), channels=channels)
        ours = read_wfdb(header)
        rows = ours.signal[:3] if header == ptb_record else ours.signal
        # mV already (the factor is 1): exactly wfdb's physical values, as float32
        np.testing.assert_array_equal(rows, record.p_signal.T.astype(np.float32), err_msg=header.name)
        assert ours.lead_names[:3] == record.sig_name[:3] and ours.comments == record.comments
        assert ours.fs == float(record.fs)


def test_a_record_read_for_the_cache_equals_the_plain_path(ptbxl_dir: Path):
    spec = InputSpec()
    for i in (1, 2, 77, 500):
        header = ptbxl_dir / "records500" / f"{(i // 1000) * 1000:05d}" / f"{i:05d}_hr.hea"
        record = wfdb.rdrecord(str(header.with_suffix("")))
        ratio = Fraction(spec.fs / record.fs)
        x = sps.resample_poly(record.p_signal.T, ratio.numerator, ratio.denominator, axis=-1, padtype="line")
        high = sps.butter(spec.filter_order, spec.highpass_hz, btype="highpass", fs=spec.fs, output="sos")
        low = sps.butter(spec.filter_order, spec.lowpass_hz, btype="lowpass", fs=spec.fs, output="sos")
        plain = sps.sosfiltfilt(np.concatenate([high, low]), x, axis=-1).astype(np.float32)
        ours = prepare_signal(read_wfdb(header), spec)
        assert ours.shape == plain.shape == (12, 2500)
        # ours reads float32 mV (the Recording type): only that rounding differs
        np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-5 * np.abs(plain).max(), err_msg=header.name)
