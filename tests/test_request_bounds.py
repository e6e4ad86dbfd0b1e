"""Bounded work per request, and limits checked before a request's body is read.

- Each record's duration (``ECGSSL_UPLOAD_MAX_SECONDS``), the model windows of a request
  (``ECGSSL_SERVE_MAX_WINDOWS``) and the records of a batch (``ECGSSL_SERVE_MAX_RECORDS``) are checked from
  headers and array shapes, before samples are decoded: 413 naming the limit and its setting.
- The API key and the body size (``ECGSSL_UPLOAD_MAX_BYTES``) are checked before the body is read
  (``api.guard``): an unauthenticated or oversize upload costs no disk.

The in-process tests use the TestClient; the memory and disk figures come from a real uvicorn process
(``python -m api``) with its own temporary folder, measured from /proc.
"""

import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import wfdb
from fastapi.testclient import TestClient

from api.guard import MUTATING_METHODS
from api.main import create_app
from services.ecg.leads import STANDARD_LEADS
from services.ecg.preprocess import InputSpec, preprocess, window_count
from services.ecg.readers import read_wfdb
from services.ecg.recording import Recording
from services.models.ecg_jepa import INPUT_SPEC as JEPA_SPEC
from services.models.resnet1d import INPUT_SPEC as RESNET_SPEC
from tests.conftest import ROOT
from tests.test_bad_input import FORMATS, MARK, Source, files, npy
from tests.test_readers import zip_of

RECORDS = [f"ptbxl-500/records500/00000/0000{i}_hr" for i in (1, 2, 3)]
API_KEY = "bounds-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MB = 1024 * 1024


@pytest.fixture(scope="module")
def tiny_model(registered_tiny_model: tuple) -> str:
    return registered_tiny_model[0]


@pytest.fixture(scope="module")
def source(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Source:
    header = data_dir / f"{RECORDS[0]}.hea"
    return Source(read_wfdb(header), header, tmp_path_factory.mktemp("bounds"))


def wfdb_upload(data_dir: Path, record: str) -> list[tuple[str, tuple[str, bytes]]]:
    header = data_dir / f"{record}.hea"
    return [("files", (p.name, p.read_bytes())) for p in (header, header.with_suffix(".dat"))]


# --------------------------------------------------------------------------------------------------
# windows counted from a record's length are the windows preprocess cuts


@pytest.mark.parametrize(
    "spec", [InputSpec(), JEPA_SPEC, RESNET_SPEC], ids=["st_mem", "ecg_jepa", "resnet1d"]
)
def test_window_count_from_the_length_is_what_preprocess_cuts(ptb_record: Path, spec: InputSpec) -> None:
    """Real records (PTB at 1000 Hz, 38.4 s; PTB-XL at 500 Hz, 10 s) cut to lengths around the window and
    segment boundaries: the count from (samples, fs) alone equals the windows ``preprocess`` makes."""
    records = [read_wfdb(ptb_record), read_wfdb(ptb_record.parents[1] / f"{RECORDS[0]}.hea")]
    for rec in records:
        per_second = rec.fs
        lengths = {rec.signal.shape[1], int(9.3 * per_second), int(10 * per_second), int(20.5 * per_second)}
        lengths |= {int(spec.samples / spec.fs * per_second) + d for d in (-3, 0, 1, 7)}
        for samples in sorted(n for n in lengths if 100 < n <= rec.signal.shape[1]):
            cut = Recording(rec.signal[:, :samples], rec.fs, rec.lead_names, rec.source)
            for windowing in ("sliding", "center", "three_crop"):
                made = preprocess(cut, spec, windowing=windowing, pad=True)
                counted = window_count(samples, rec.fs, spec, windowing)
                assert counted == len(made), (rec.source, samples, windowing)


# --------------------------------------------------------------------------------------------------
# duration, windows and records: 413 naming the limit, in every format, before the samples are read


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_record_longer_than_the_limit_is_413_in_every_format(
    client: TestClient, tiny_model: str, source: Source, settings_env: pytest.MonkeyPatch, fmt: str
) -> None:
    make, form, _ = FORMATS[fmt]
    settings_env.setenv("ECGSSL_UPLOAD_MAX_SECONDS", "5")
    response = client.post("/embed", params={"model": tiny_model}, files=files(make(source)), data=form)
    assert response.status_code == 413, f"{fmt}: {response.text}"
    detail = response.json()["detail"]
    assert "lasts 10.0 s (5000 samples at 500 Hz)" in detail, detail
    assert "5.0 s accepted per record" in detail and "ECGSSL_UPLOAD_MAX_SECONDS" in detail
    settings_env.setenv("ECGSSL_UPLOAD_MAX_SECONDS", "10")  # the limit itself is accepted
    accepted = client.post("/embed", params={"model": tiny_model}, files=files(make(source)), data=form)
    assert accepted.status_code == 200, f"{fmt}: {accepted.text}"


@pytest.mark.parametrize("fmt", ["wfdb .hea + .dat", "npy", "edf", "csv"])
def test_more_windows_than_the_limit_is_413(
    client: TestClient, tiny_model: str, source: Source, settings_env: pytest.MonkeyPatch, fmt: str
) -> None:
    """The 10-s record gives 2 sliding windows and 3 three-crop windows (the limit counts the windowing the
    request asks for)."""
    make, form, _ = FORMATS[fmt]
    settings_env.setenv("ECGSSL_SERVE_MAX_WINDOWS", "2")
    sliding = client.post("/embed", params={"model": tiny_model}, files=files(make(source)), data=form)
    assert sliding.status_code == 200 and sliding.json()["record"]["windows"] == 2, sliding.text
    settings_env.setenv("ECGSSL_SERVE_MAX_WINDOWS", "1")
    refused = client.post("/embed", params={"model": tiny_model}, files=files(make(source)), data=form)
    assert refused.status_code == 413, refused.text
    detail = refused.json()["detail"]
    assert "gives 2 model windows" in detail and "limit of 1 windows per request" in detail
    assert "ECGSSL_SERVE_MAX_WINDOWS" in detail


def test_embed_batch_counts_the_windows_of_all_its_records_and_refuses_long_records_in_place(
    client: TestClient, tiny_model: str, data_dir: Path, source: Source, settings_env: pytest.MonkeyPatch
) -> None:
    params = {"model": tiny_model}
    three = [f for record in RECORDS for f in wfdb_upload(data_dir, record)]  # 2 windows each
    settings_env.setenv("ECGSSL_SERVE_MAX_WINDOWS", "6")
    assert client.post("/embed/batch", params=params, files=three).status_code == 200
    settings_env.setenv("ECGSSL_SERVE_MAX_WINDOWS", "5")
    refused = client.post("/embed/batch", params=params, files=three)
    assert refused.status_code == 413, refused.text
    detail = refused.json()["detail"]
    assert "00003_hr.hea: this record gives 2 model windows" in detail
    assert "6 with the records before it" in detail and "ECGSSL_SERVE_MAX_WINDOWS" in detail

    settings_env.delenv("ECGSSL_SERVE_MAX_WINDOWS")
    settings_env.setenv("ECGSSL_UPLOAD_MAX_SECONDS", "9")
    long_npy = ("files", (f"{MARK}-long.npy", npy(np.tile(source.rec.signal, 2))))  # 20 s at 500 Hz
    mixed = client.post("/embed/batch", params=params, files=[long_npy], data={"fs": "500"})
    assert mixed.status_code == 413, mixed.text  # its only record is too long: the request has nothing
    settings_env.setenv("ECGSSL_UPLOAD_MAX_SECONDS", "15")
    mixed = client.post(
        "/embed/batch",
        params=params,
        files=[*wfdb_upload(data_dir, RECORDS[0]), long_npy],
        data={"fs": "500"},
    )
    assert mixed.status_code == 200, mixed.text
    first, second = mixed.json()["records"]
    assert first["ok"] and not second["ok"] and second["status_code"] == 413
    assert "lasts 20.0 s" in second["error"] and "ECGSSL_UPLOAD_MAX_SECONDS" in second["error"]


def test_the_records_limit_counts_records_not_files(
    client: TestClient, tiny_model: str, data_dir: Path, settings_env: pytest.MonkeyPatch
) -> None:
    """A zip holding 3 WFDB records (6 files) counts as 3 records against ECGSSL_SERVE_MAX_RECORDS."""
    members = {}
    for i, record in enumerate(RECORDS):
        header = data_dir / f"{record}.hea"
        members |= {f"r{i}/{p.name}": p.read_bytes() for p in (header, header.with_suffix(".dat"))}
    upload = [("files", ("three.zip", zip_of(members)))]
    settings_env.setenv("ECGSSL_SERVE_MAX_RECORDS", "3")
    accepted = client.post("/embed/batch", params={"model": tiny_model}, files=upload)
    assert accepted.status_code == 200 and len(accepted.json()["records"]) == 3, accepted.text
    settings_env.setenv("ECGSSL_SERVE_MAX_RECORDS", "2")
    refused = client.post("/embed/batch", params={"model": tiny_model}, files=upload)
    assert refused.status_code == 413, refused.text
    assert "holds 3 records; at most 2" in refused.json()["detail"]
    assert "ECGSSL_SERVE_MAX_RECORDS" in refused.json()["detail"]


def test_every_mutating_route_needs_the_api_key() -> None:
    """The guard refuses POST/PUT/PATCH/DELETE without the key before reading the body; that is right only
    while every route taking these methods depends on ``require_api_key`` (in the OpenAPI schema: the
    bearer security) and no other route does."""
    operations = [
        (path, method, operation)
        for path, item in create_app().openapi()["paths"].items()
        for method, operation in item.items()
    ]
    assert len(operations) > 10
    for path, method, operation in operations:
        keyed = {"HTTPBearer": []} in operation.get("security", [])
        assert keyed == (method.upper() in MUTATING_METHODS), (method, path)


# --------------------------------------------------------------------------------------------------
# the real server: memory of a 10-hour record, disk of refused uploads


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    tmpdir: Path
    log: Path
    baseline: frozenset[tuple[int, int]] = frozenset()  # temporary files of the process itself (see fixture)

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=300, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: str, data_dir: Path) -> Iterator[Server]:
    """``python -m api`` on this run's database (the tiny model registered), with an API key and its own,
    empty temporary folder (TMPDIR), warmed up by one /embed (ONNX Runtime leaves a '.ses' file there when
    it creates its first session: the baseline the tests compare with)."""
    tmp = tmp_path_factory.mktemp("server")
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmpdir), "ECGSSL_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    env.pop("ECGSSL_UPLOAD_MAX_BYTES", None)  # the defaults: 50 MiB, 1 hour, 2048 windows
    log = tmp / "api.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", str(port), "--no-migrate"],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, tmpdir, log)
    deadline = time.monotonic() + 120
    with server.client() as client:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the API did not start:\n{log.read_text()[-4000:]}")
            try:
                if client.get("/models").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        warm = client.post(
            "/embed", params={"model": tiny_model}, files=wfdb_upload(data_dir, RECORDS[0]), headers=AUTH
        )
        assert warm.status_code == 200, warm.text
    server.baseline = frozenset(temp_files(server))
    yield server
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def status_kb(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0; our own child)


def temp_files(server: Server) -> dict[tuple[int, int], int]:
    """The server's temporary files, (device, inode) -> bytes: files under its TMPDIR, and files there it
    holds open (a spooled upload is unlinked when it is created: only its descriptor shows it)."""
    seen: dict[tuple[int, int], int] = {}
    for path in server.tmpdir.rglob("*"):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            seen[(info.st_dev, info.st_ino)] = info.st_size
    for fd in Path(f"/proc/{server.pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(server.tmpdir)):
                info = os.stat(fd)
                seen[(info.st_dev, info.st_ino)] = info.st_size
        except (FileNotFoundError, PermissionError):
            continue
    return seen


def temp_bytes(server: Server) -> int:
    """Bytes of the server's temporary files beyond its baseline."""
    return sum(size for key, size in temp_files(server).items() if key not in server.baseline)


def long_wfdb(folder: Path, hours: float = 10, fs: int = 50) -> list[tuple[str, tuple[str, bytes]]]:
    """A 12-lead WFDB record (format 16) of ``hours`` at ``fs`` Hz written by wfdb.wrsamp: 43 MB for 10 h
    at 50 Hz, the size of the record in the report."""
    samples = int(hours * 3600 * fs)
    beat = (np.sin(np.linspace(0, 2 * np.pi, fs)) * 200).astype(np.int16)  # 1 mV at gain 200
    digital = np.tile(beat, samples // fs)[:, None] + np.arange(12, dtype=np.int16)[None, :]
    wfdb.wrsamp(
        "long", fs=fs, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), d_signal=digital, fmt=["16"] * 12,
        adc_gain=[200.0] * 12, baseline=[0] * 12, write_dir=str(folder),
    )  # fmt: skip
    return [("files", (f"long{ext}", (folder / f"long{ext}").read_bytes())) for ext in (".hea", ".dat")]


def long_npy(hours: float = 10, fs: int = 50) -> list[tuple[str, tuple[str, bytes]]]:
    """12 leads x ``hours`` at ``fs`` Hz as int16 in a .npy (43 MB for 10 h at 50 Hz)."""
    samples = int(hours * 3600 * fs)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((12, samples), dtype=np.int16))
    return [("files", ("long.npy", buffer.getvalue()))]


def test_a_ten_hour_record_is_refused_before_it_is_read_and_the_api_stays_small(
    server: Server, tiny_model: str, data_dir: Path, tmp_path: Path
) -> None:
    """The report: 10 hours at 50 Hz through /embed took the API from 0.84 to 4.44 GB (here, without the
    limits: 0.58 to 4.19 GB, 200 after 48 s). Now the record is refused from its header (413) and the API's
    peak resident memory grows by less than 150 MB while it receives and refuses the 43-MB upload (as
    WFDB, as .npy, and in /embed/batch; measured: 42 MB, the upload's bytes)."""
    params = {"model": tiny_model}
    wfdb_files, npy_files = long_wfdb(tmp_path), long_npy()
    assert 40 * MB < sum(len(f[1][1]) for f in wfdb_files) < 50 * MB  # under the body limit: it is read
    with server.client(headers=AUTH) as client:
        cases: list[tuple[str, str, list, dict]] = [
            ("wfdb", "/embed", wfdb_files, {}),
            ("npy", "/embed", npy_files, {"fs": "50"}),
            ("wfdb", "/embed/batch", wfdb_files, {}),
        ]
        growth = {}
        for name, path, upload, form in cases:
            before = status_kb(server.pid, "VmRSS")
            reset_peak(server.pid)
            response = client.post(path, params=params, files=upload, data=form)
            peak = status_kb(server.pid, "VmHWM")
            growth[f"{path} {name}"] = (before, peak)
            assert response.status_code == 413, response.text
            detail = response.json()["detail"]
            assert "lasts 10.00 h (1800000 samples at 50 Hz)" in detail, detail
            assert "1.00 h accepted per record" in detail and "ECGSSL_UPLOAD_MAX_SECONDS" in detail
        print("API resident memory (kB, before -> peak):", growth)
        for case, (before, peak) in growth.items():
            assert peak - before < 150 * 1024, f"{case}: the API grew from {before} to {peak} kB"
        assert client.get("/models").status_code == 200
    assert temp_bytes(server) == 0, "temporary files left behind"


def multipart_body(total: int, sample: Callable[[], None], boundary: str) -> Iterator[bytes]:
    """A multipart upload of one ``total``-byte file, in 1-MB chunks; ``sample`` is called every 4 MB."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.dat"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    block = b"\x01" * MB
    for sent in range(0, total, MB):
        yield block
        if sent % (4 * MB) == 0:
            sample()
    yield f"\r\n--{boundary}--\r\n".encode()


def upload_size(total: int, boundary: str) -> int:
    return sum(len(part) for part in multipart_body(total, lambda: None, boundary))


def send_big(server: Server, total: int, headers: dict, declare_length: bool) -> tuple[httpx.Response, int]:
    """POST /embed/batch a ``total``-byte file (chunked, or with its Content-Length); the answer and the most
    bytes of temporary files the server held while the body was being sent."""
    boundary = uuid.uuid4().hex
    most = 0

    def sample() -> None:
        nonlocal most
        most = max(most, temp_bytes(server))

    headers = {**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    if declare_length:
        headers["Content-Length"] = str(upload_size(total, boundary))
    with server.client() as client:
        response = client.post(
            "/embed/batch", content=multipart_body(total, sample, boundary), headers=headers
        )
    sample()
    return response, most


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(server: Server) -> None:
    """120 MB sent without the key, chunked and with a Content-Length: 401, and no byte of it ever reached
    the server's temporary folder (without the guard, Starlette spools the file part to disk before the
    route's key check runs)."""
    for declare_length in (False, True):
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            response, most = send_big(server, 120 * MB, headers, declare_length)
            assert response.status_code == 401, response.text
            assert "API key" in response.json()["detail"] and response.headers["www-authenticate"] == "Bearer"
            assert most == 0, f"{most} bytes of temporary files while refusing an unauthenticated upload"
    assert temp_bytes(server) == 0


def test_an_oversize_upload_is_refused_when_it_passes_the_limit(server: Server) -> None:
    """With the key, 120 MB over the 50-MiB limit: with a Content-Length, 413 before a byte is read (no
    temporary file); chunked, reading stops at the limit (the spooled part never exceeds it and is freed)."""
    limit = 50 * MB
    response, most = send_big(server, 120 * MB, AUTH, declare_length=True)
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert f"over the limit of {limit} bytes" in detail and "ECGSSL_UPLOAD_MAX_BYTES" in detail
    assert most == 0
    response, most = send_big(server, 120 * MB, AUTH, declare_length=False)
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert f"over the limit of {limit} bytes" in detail and "ECGSSL_UPLOAD_MAX_BYTES" in detail
    print(f"most temporary bytes while refusing a chunked 120-MB upload: {most}")
    assert most <= limit
    assert temp_bytes(server) == 0, "temporary files left behind"
    with server.client() as client:
        assert client.get("/models").status_code == 200  # still serving
