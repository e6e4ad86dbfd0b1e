"""Serving speed in one run: engines side by side, the API's own overhead, and a load run.

1. Engines, on centre windows of real PTB-XL records (../shared/data/ptbxl-500, 500 Hz -> the model's
   250 Hz): PyTorch eager fp32, ONNX Runtime fp32 and ONNX Runtime int8 (the version's int8 variant, made
   and checked against fp32 as at registration; sessions as the service makes them) at batch 1 and 16.
   The engines run in alternating blocks (so that the drift of a shared machine hits all alike);
   throughput = windows / total time, latency = one call (one batch), p50 and p99 (with few calls p99 is
   close to the maximum: n is printed).
2. The API's overhead for one record: the encoder is registered in a fresh SQLite database and the service
   started as a subprocess (``python -m api``, as in tests/test_e2e.py); one client sends one 10-s
   500 Hz WFDB record at a time to ``POST /embed`` (default precision: int8 where it passed). Overhead =
   end-to-end latency at the client - the session time the server reports (``Server-Timing: session``).
3. Load: ``--clients`` concurrent clients (32) for ``--load-seconds`` (60 s) against the same service,
   cycling over real records; errors (any non-200) are counted and must be 0.
4. On a GPU (``torch.cuda.is_available()``): ONNX Runtime CUDA (fp32, and the fp16 variant where its check
   passes) with IO binding at batch 64 in ECGs/s (one ECG = one window), against the arithmetic limit:
   the GPU's measured dense fp16 matmul rate / the encoder's FLOPs per window (~71 GFLOP for ViT-B/75).

    .venv/bin/python bench/serve.py [--size base|small|tiny] [--seconds 20] [--clients 32] [--load-seconds 60]

The machine (CPU model, cores, load average before and after) is printed with the figures. Random-weight
encoders (speed does not depend on the weights); the int8 cosine figure is for these weights.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
PTBXL = DATA / "ptbxl-500"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def flops_per_window(cfg, leads: int, samples: int) -> float:  # noqa: ANN001
    """Matmul FLOPs (2 x multiply-adds) of one forward of the ST-MEM encoder on one window."""
    patches = samples // cfg.patch_size
    tokens = leads * (patches + 2)  # each lead's patches between its SEP tokens
    d, hidden = cfg.width, cfg.mlp_dim
    inner = cfg.heads * cfg.dim_head
    per_token = 3 * d * inner + inner * d + 2 * d * hidden  # qkv, out projection, MLP
    attention = 2 * tokens * tokens * inner  # q k^T and attn v
    embed = leads * patches * cfg.patch_size * d
    return 2.0 * (cfg.depth * (tokens * per_token + attention) + embed)


# --------------------------------------------------------------------------------------------------
# 1. engines


def time_engines(
    engines: dict, windows: np.ndarray, batch: int, budget_s: float, min_calls: int, rounds: int = 3
) -> dict[str, list[float]]:
    """Each engine runs ``budget_s`` (and ``min_calls`` calls) in all, in ``rounds`` blocks that alternate
    between the engines: the drift of a shared machine hits all alike, and no engine's idle threads (OpenMP,
    ONNX Runtime) compete with another's calls. The first call of each block is a warm-up, not timed."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    per_round_s, per_round_calls = budget_s / rounds, -(-min_calls // rounds)
    offset = 0
    for _ in range(rounds):
        for name, fn in engines.items():
            fn(windows[:batch])
            spent, calls = 0.0, 0
            while spent < per_round_s or calls < per_round_calls:
                x = np.take(windows, range(offset, offset + batch), axis=0, mode="wrap")
                offset += batch
                started = time.perf_counter()
                fn(x)
                elapsed = time.perf_counter() - started
                times[name].append(elapsed)
                spent, calls = spent + elapsed, calls + 1
            time.sleep(0.2)  # let the engine's threads go idle before the next one runs
    return times


def report_engines(times: dict[str, list[float]], batch: int, reference: str) -> dict[str, float]:
    rates = {name: batch * len(t) / sum(t) for name, t in times.items()}
    for name, t in times.items():
        ratio = rates[name] / rates[reference]
        print(
            f"  batch {batch:>2}  {name:<22} {rates[name]:8.2f} ECG/s  ({ratio:4.2f}x PyTorch eager)  "
            f"latency p50 {percentile(t, 50) * 1000:8.1f} ms  p99 {percentile(t, 99) * 1000:8.1f} ms  "
            f"(n={len(t)})"
        )
    return rates


def summary_lines(rates: dict[int, dict[str, float]], int8: dict) -> list[str]:
    """The ratios to PyTorch eager per batch size; int8's only where its variant passed its check (the
    service serves it only then), with the variant's status either way."""
    status = f"int8 variant {int8['status']}, cosine to fp32 min {int8.get('cosine_min')}"
    lines = []
    for batch, r in rates.items():
        eager = r["PyTorch eager fp32"]
        fp32 = f"ONNX Runtime fp32 {r['ONNX Runtime fp32'] / eager:.2f}x PyTorch eager"
        if int8["status"] == "passed" and "ONNX Runtime int8" in r:
            lines.append(f"  batch {batch:>2}: int8 {r['ONNX Runtime int8'] / eager:.2f}x, {fp32} ({status})")
        elif "ONNX Runtime int8" in r:  # timed, but the service would not serve it: no claim for int8
            lines.append(
                f"  batch {batch:>2}: {fp32}; {status}, so not served: its "
                f"{r['ONNX Runtime int8'] / eager:.2f}x is not counted against the int8 target"
            )
        else:
            lines.append(f"  batch {batch:>2}: {fp32}; {status}: not measured")
    return lines


# --------------------------------------------------------------------------------------------------
# 2./3. the service


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", str(port), "--no-migrate"],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"the API did not answer in 120 s:\n{log.read_text()[-3000:]}")


def record_uploads(headers: list[Path]) -> list[list[tuple[str, tuple[str, bytes]]]]:
    return [
        [("files", (h.with_suffix(s).name, h.with_suffix(s).read_bytes())) for s in (".hea", ".dat")]
        for h in headers
    ]


def server_timing(response) -> dict[str, float]:  # noqa: ANN001
    """The ``Server-Timing`` entries of a response: name -> ms."""
    entries = {}
    for part in response.headers.get("server-timing", "").split(","):
        name, _, value = part.strip().partition(";dur=")
        if value:
            entries[name] = float(value)
    if "session" not in entries:
        raise RuntimeError("no Server-Timing session entry in the response")
    return entries


def api_overhead(url: str, ref: str, uploads: list, requests: int) -> dict:
    import httpx

    e2e, session, app, steps, variants = [], [], [], [], set()
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(requests + 3):
            started = time.perf_counter()
            response = client.post("/embed", params={"model": ref}, files=uploads[i % len(uploads)])
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"/embed answered {response.status_code}: {response.text[:500]}")
            if i >= 3:  # the first requests load the session
                timing = server_timing(response)
                e2e.append(elapsed)
                session.append(timing["session"])
                app.append(timing.get("app", float("nan")))
                steps.append(timing)
                variants.add(response.json()["variant"])
    overhead = [a - b for a, b in zip(e2e, session, strict=True)]
    return {
        "e2e": e2e,
        "session": session,
        "app": app,
        "steps": steps,
        "overhead": overhead,
        "variants": variants,
    }


def load_run(url: str, ref: str, uploads: list, clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    windows = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=900) as client:
            i = k
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    response = client.post("/embed", params={"model": ref}, files=uploads[i % len(uploads)])
                    ok = response.status_code == 200
                    detail = "" if ok else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - began)
                        windows[0] += response.json()["record"]["windows"]
                    else:
                        errors.append(detail)
                i += clients

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed, "windows": windows[0]}


# --------------------------------------------------------------------------------------------------
# 4. GPU


def gpu_section(served, cfg, spec, windows: np.ndarray, batch: int = 64) -> None:  # noqa: ANN001
    import torch

    from services.inference.sessions import SESSIONS

    name = torch.cuda.get_device_name(0)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    peak = 2 * n**3 * reps / (time.perf_counter() - started)
    per_window = flops_per_window(cfg, len(spec.leads), spec.samples)
    limit = peak / per_window
    print(f"\nGPU: {name}; measured dense fp16 matmul {peak / 1e12:.0f} TFLOP/s; {per_window / 1e9:.1f} "
          f"GFLOP per ECG -> arithmetic limit {limit:,.0f} ECG/s (at the fp16 peak)")  # fmt: skip
    x = np.take(windows, range(batch), axis=0, mode="wrap")
    for precision in ("fp32", "fp16"):
        try:
            with SESSIONS.lease(served, precision, strict=True) as loaded:
                if loaded.provider != "CUDAExecutionProvider":
                    print(f"  {precision}: served on {loaded.provider}, not CUDA: skipped")
                    continue
                for _ in range(3):
                    loaded.run(x)
                times = []
                while sum(times) < 10 or len(times) < 10:
                    started = time.perf_counter()
                    loaded.run(x)  # IO binding: input to the GPU once, outputs back once
                    times.append(time.perf_counter() - started)
                rate = batch * len(times) / sum(times)
                # the limit is the fp16 matmul peak: an fp32 graph runs on slower units (its ceiling is lower)
                basis = "" if precision == "fp16" else " (fp32 against the fp16 matmul limit)"
                print(
                    f"  ONNX Runtime CUDA {precision:<4} batch {batch}: {rate:9,.0f} ECG/s = "
                    f"{100 * rate / limit:5.1f} % of the arithmetic limit{basis}; latency p50 "
                    f"{percentile(times, 50) * 1000:.1f} ms, p99 {percentile(times, 99) * 1000:.1f} ms"
                )
        except Exception as exc:  # e.g. no fp16 variant that passed
            print(f"  {precision}: not measured ({exc})")


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--records", type=int, default=64, help="real records (centre windows) to cycle")
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget per engine and batch size")
    parser.add_argument("--min-calls", type=int, default=5)
    parser.add_argument("--overhead-requests", type=int, default=30)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--skip-api", action="store_true", help="engines only")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ecgssl-bench-serve-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGSSL_")}
    env.update(
        ECGSSL_DATABASE_URL=f"sqlite:///{tmp / 'bench.db'}",
        ECGSSL_BROKER_URL=f"sqla+sqlite:///{tmp / 'broker.db'}",
        ECGSSL_ARTIFACT_DIR=str(tmp / "artifacts"),
        ECGSSL_DATA_ROOT=str(DATA),
        PYTHONUNBUFFERED="1",
    )
    os.environ.update(env)  # before the service modules read their settings

    import onnxruntime as ort
    import torch

    from services.db.session import session_scope
    from services.ecg.preprocess import InputSpec, preprocess
    from services.ecg.readers import read_wfdb
    from services.export.onnx import INPUT_NAME, OUTPUT_NAME, export_checked, sha256_file
    from services.export.variants import make_variants
    from services.inference.sessions import ServedModel, SessionPlan, _load
    from services.models.st_mem import SIZES, StMemEncoder
    from services.registry import register_model_version
    from services.training.loop import machine_description

    if not (PTBXL / "ptbxl_database.csv").is_file():
        sys.exit(f"the real PTB-XL records are not at {PTBXL}")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    providers = ", ".join(ort.get_available_providers())
    print(
        f"machine: {machine_description()}; torch {torch.__version__}, onnxruntime "
        f"{ort.__version__} ({providers}); load average {load_average()}"
    )

    spec = InputSpec()
    headers = sorted((PTBXL / "records500").glob("*/*_hr.hea"))[: args.records]
    windows = np.stack([preprocess(read_wfdb(h), spec, "center")[0] for h in headers])
    cfg = SIZES[args.size]
    torch.manual_seed(0)
    encoder = StMemEncoder(cfg).eval()
    path = tmp / "artifacts" / "bench" / "encoder.onnx"
    started = time.perf_counter()
    parity = export_checked(encoder, windows[:8], path)
    sha = sha256_file(path)
    variants = make_variants(path, spec, sha256=sha)
    int8 = variants["int8"]
    parameters = sum(p.numel() for p in encoder.parameters()) / 1e6
    gflop = flops_per_window(cfg, 12, spec.samples) / 1e9
    setup_s = time.perf_counter() - started
    print(
        f"model: ST-MEM {args.size} ({parameters:.1f} M parameters, {gflop:.1f} GFLOP per window of "
        f"12 x {spec.samples}), random weights; export + parity {parity:.1e} + variants in {setup_s:.0f} s;"
        f" int8 variant: {int8['status']}, cosine to fp32 min {int8.get('cosine_min')} over "
        f"{len(int8.get('check_records', []))} real records"
    )

    def ort_engine(file: str):  # noqa: ANN202
        session = _load(
            ServedModel(0, "bench", 1, str(path), sha, spec, cfg.width), SessionPlan("x", file, "cpu", "")
        )
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})

    def torch_engine(x: np.ndarray) -> None:
        with torch.inference_mode():
            encoder(torch.from_numpy(x))

    engines = {"PyTorch eager fp32": torch_engine, "ONNX Runtime fp32": ort_engine(str(path))}
    if int8["status"] in ("passed", "failed", "unchecked"):
        engines["ONNX Runtime int8"] = ort_engine(int8["file"])
    print(
        f"\n1. engines on {len(windows)} real PTB-XL records (centre windows), 1 ECG = one 9-s 12-lead window"
    )
    if int8["status"] != "passed":
        print(
            f"  the int8 variant is {int8['status']}: the service does not serve it (it serves fp32)"
            + ("; int8 is timed for information only" if "ONNX Runtime int8" in engines else "")
        )
    rates = {}
    for batch in (1, 16):
        times = time_engines(engines, windows, batch, args.seconds, args.min_calls)
        rates[batch] = report_engines(times, batch, "PyTorch eager fp32")

    if torch.cuda.is_available():
        served_gpu = ServedModel(0, "bench", 1, str(path), sha, spec, cfg.width, variants=variants)
        gpu_section(served_gpu, cfg, spec, windows)

    if not args.skip_api:
        from alembic import command
        from alembic.config import Config

        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        with session_scope() as s:
            version = register_model_version(
                s,
                name=f"bench-{args.size}",
                method="st_mem",
                source_job_id=None,
                onnx_path=str(path),
                sha256=sha,
                input_spec=spec.to_dict(),
                embedding_dim=cfg.width,
                parity_max_abs_diff=parity,
                metrics={},
                variants=variants,
            )
            ref = version.ref
        process, url = start_api(env, tmp / "api.log")
        try:
            uploads = record_uploads(headers)
            over = api_overhead(url, ref, uploads, args.overhead_requests)
            e2e, sess, extra = (over[k] for k in ("e2e", "session", "overhead"))
            print(
                f"\n2. API overhead, one 10-s 500 Hz WFDB record a request, sequential ({len(e2e)} "
                f"requests, variant {', '.join(sorted(over['variants']))}):\n"
                f"  end-to-end p50 {percentile(e2e, 50):.1f} ms, session p50 {percentile(sess, 50):.1f} ms"
                f" -> overhead p50 {percentile(extra, 50):.1f} ms, p99 {percentile(extra, 99):.1f} ms"
                " (target <= 15 ms)"
            )
            names = [n for n in over["steps"][0] if n not in ("session", "app")]
            medians = {n: percentile([t.get(n, 0.0) for t in over["steps"]], 50) for n in names}
            steps = ", ".join(f"{n} {ms:.1f}" for n, ms in medians.items())
            print(f"  inside the handler (Server-Timing, p50 ms): {steps}")
            load = load_run(url, ref, uploads, args.clients, args.load_seconds)
            lat = load["latencies"]
            elapsed = load["elapsed"]
            print(
                f"\n3. load: {args.clients} concurrent clients for {args.load_seconds:.0f} s (and until the "
                f"requests in flight finished: {elapsed:.0f} s):\n"
                f"  {len(lat)} requests, errors {len(load['errors'])}; throughput {len(lat) / elapsed:.2f} "
                f"records/s = {load['windows'] / elapsed:.2f} ECG windows/s; latency p50 "
                f"{percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms"
            )
            for detail in load["errors"][:5]:
                print(f"  error: {detail}")
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    print(
        "\nsummary (targets for the 2-core CPU, base size: int8 >= 3x PyTorch eager; API overhead <= 15 ms):"
    )
    for line in summary_lines(rates, int8):
        print(line)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
