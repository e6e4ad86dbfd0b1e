"""ONNX Runtime sessions per model version: variant and provider choice, reference-counted cache, batching.

The public API for routers (``/embed``, ``/predict``)::

    served = resolve_served(db_session, "name@production")      # ServedModel, detached from the database
    with SESSIONS.lease(served, precision=None) as loaded:      # LoadedModel, kept alive while leased
        (embedding,) = loaded.infer(windows)                    # (n, D), run through the micro-batcher
        emb, probs = loaded.infer(windows, ("embedding", "probabilities"))  # any outputs of the graph

A ``LoadedModel`` is one session of one variant (fp32, int8, fp16) on one provider (CUDA or CPU) of one
model version, with one ``MicroBatcher`` per tuple of output names: concurrent requests for the same
version and outputs share runs. Leases are counted: when a version is retired (its alias moved away, or the
LRU is full) it leaves the cache at once, and its session is closed when the last request that holds it
finishes, so a request in flight during a promotion completes on the version it started with. A request
that looked a version up before it was retired, but leases it only after, is served by a session of its own
that is not cached (``ServedModel.looked_up``).
"""

import contextlib
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from sqlalchemy.orm import Session

from services.config import get_settings
from services.db.models import ModelAlias, ModelVersion
from services.ecg.preprocess import InputSpec
from services.errors import ClientError, UnavailableError
from services.export.contract import INPUT_NAME, OUTPUT_NAME
from services.export.variants import CUDA, variant_verdict
from services.inference.batching import BatchTiming, MicroBatcher
from services.observability.metrics import SESSION_LOAD_SECONDS, SESSION_LOADS, SESSIONS_CACHED
from services.registry import aliases_pointing_at, delete_alias, resolve_reference, set_alias, version_by_id

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "int8", "fp16"]
CPU = "CPUExecutionProvider"


class ModelUnavailable(UnavailableError):
    """The model's files are not where the registry says (a deployment problem, not the request's)."""


@dataclass(frozen=True, eq=False)
class ServedModel:
    """What serving needs of a model version (detached from the database session)."""

    version_id: int
    name: str
    version: int
    onnx_path: str
    sha256: str
    spec: InputSpec
    embedding_dim: int
    clinical_normaliser: dict | None = None  # hybrid: clinical measurements appended to the embedding
    variants: dict | None = None  # ModelVersion.variants: the fp32/int8/fp16 files and their checks
    head: dict | None = None  # diagnosis models: class names, thresholds (the graph has "probabilities")
    knn_reference: dict | None = None  # a stored labelled reference set for kNN prediction
    looked_up: int | None = None  # ``SessionCache.ticket()`` taken before the registry look-up (None: not
    # tracked): a session loaded for a version retired after it is served but not cached

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_version(cls, version: ModelVersion, looked_up: int | None = None) -> "ServedModel":
        return cls(
            version_id=version.id,
            name=version.model.name,
            version=version.version,
            onnx_path=version.onnx_path,
            sha256=version.sha256,
            spec=InputSpec.from_dict(version.input_spec),
            embedding_dim=version.embedding_dim,
            clinical_normaliser=version.clinical_normaliser,
            variants=version.variants,
            head=version.head,
            knn_reference=version.knn_reference,
            looked_up=looked_up,
        )


def resolve_served(session: Session, ref: str | None) -> ServedModel:
    """The model version ``ref`` names (see ``services.registry.resolve_reference``), ready to serve.

    References that move (an alias, a bare name, the default) are remembered per process: when one now
    names another version than before, the previous version's session is retired from the cache. The look-up
    is stamped (``ServedModel.looked_up``) so that a version retired between it and the lease (a promotion
    in between) is served to this request without being cached again, and so that a look-up noted after a
    later one does not move the reference back.
    """
    looked_up = SESSIONS.ticket()  # before reading the registry: a retirement after this may be missed
    resolution = resolve_reference(session, ref)
    served = ServedModel.from_version(resolution.version, looked_up)
    if resolution.moving is not None:
        SESSIONS.note_reference(resolution.moving, served.version_id, looked_up)
    return served


# --------------------------------------------------------------------------------------------------
# which variant, on which provider


@dataclass(frozen=True)
class SessionPlan:
    variant: str  # fp32, int8, fp16
    path: str
    device: Literal["cpu", "cuda"]
    reason: str  # why this variant (shown in logs and on the version endpoint)


_logged: set[str] = set()
_logged_lock = threading.Lock()


def _log_once(level: int, message: str) -> None:
    with _logged_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)


_cuda_failure: str | None = None  # why a CUDA session did not start in this process (None: none failed)
_cuda_lock = threading.Lock()


def cuda_available() -> bool:
    """ONNX Runtime lists CUDA and no CUDA session has failed to start in this process."""
    return CUDA in ort.get_available_providers() and _cuda_failure is None


def _note_cuda_failure(model: "ServedModel", why: str) -> None:
    """Remember (process-wide) that a CUDA session did not start, so that later plans choose the CPU
    provider at once instead of trying CUDA again on every request; logged once."""
    global _cuda_failure
    with _cuda_lock:
        first = _cuda_failure is None
        if first:
            _cuda_failure = why
    if first:
        log.warning(
            "%s: the %s did not start (%s): falling back to the %s for this process",
            model.ref,
            CUDA,
            why,
            CPU,
        )


def _variant_state(model: ServedModel, name: str) -> tuple[bool, str]:
    """(usable, why not) for a reduced-precision variant of ``model``."""
    entry = (model.variants or {}).get(name)
    if entry is None:
        return False, f"{model.ref} has no {name} variant"
    if entry.get("status") != "passed":
        status = entry.get("status")
        return False, f"the {name} variant of {model.ref} is {status}: {variant_verdict(name, entry)}"
    if not Path(entry["file"]).is_file():
        return False, f"the {name} variant file of {model.ref} is missing ({entry['file']})"
    return True, ""


def plan_session(
    model: ServedModel, precision: Precision | None = None, device: str | None = None, strict: bool = False
) -> SessionPlan:
    """Choose variant and provider. ``precision``/``device`` default to the serve settings.

    auto: on CUDA the fp16 variant where it passed its check, else fp32; on the CPU the int8 variant where
    it passed, else fp32. An explicit precision whose variant cannot serve falls back to fp32 with a logged
    reason, or, with ``strict`` (a request asked for it), raises a ``ClientError`` saying why.
    """
    settings = get_settings()
    precision = precision or settings.serve_precision
    device = device or settings.serve_device
    has_cuda = cuda_available()
    failure = _cuda_failure
    if device == "cuda" and not has_cuda and failure is None:
        _log_once(
            logging.WARNING,
            f"serving asked for CUDA but ONNX Runtime has no {CUDA} (providers: "
            f"{', '.join(ort.get_available_providers())}): falling back to the {CPU}",
        )
    on_cuda = device != "cpu" and has_cuda
    no_cuda = (
        "ONNX Runtime has no CUDA"
        if failure is None
        else f"the {CUDA} did not start in this process ({failure})"
    )
    cpu_reason = "" if on_cuda or device == "cpu" or failure is None else f"; {no_cuda}"
    fp32 = SessionPlan("fp32", model.onnx_path, "cuda" if on_cuda else "cpu", "fp32" + cpu_reason)

    if precision == "fp32":
        return fp32
    wanted = precision if precision != "auto" else ("fp16" if on_cuda else "int8")
    usable, why_not = _variant_state(model, wanted)
    if wanted == "fp16" and not on_cuda:
        usable, why_not = False, f"fp16 is served on CUDA only, and {no_cuda} here"
    if not usable:
        if strict and precision != "auto":
            raise ClientError(f"precision '{precision}' cannot be served: {why_not}; fp32 always can")
        if precision != "auto" or (model.variants or {}).get(wanted) is not None:
            _log_once(logging.INFO, f"{model.ref}: serving fp32 instead of {wanted}: {why_not}")
        suffix = cpu_reason if wanted != "fp16" else ""  # fp16's reason already says why there is no CUDA
        return SessionPlan(fp32.variant, fp32.path, fp32.device, f"fp32 ({why_not}){suffix}")
    path = model.variants[wanted]["file"]
    if wanted == "int8":  # dynamically quantised graphs run their integer kernels on the CPU provider
        reason = "int8: passed its check against fp32 on real records"
        return SessionPlan("int8", path, "cpu", reason + cpu_reason)
    return SessionPlan("fp16", path, "cuda", "fp16: passed its check against fp32 on real records")


# --------------------------------------------------------------------------------------------------
# a loaded session


@dataclass
class Timing:
    """Accumulates where a request's inference time went (for the Server-Timing header and the bench)."""

    session_s: float = 0.0  # inside session runs this request took part in (each run counted once)
    queued_s: float = 0.0  # longest wait of its items for a run
    runs: int = 0
    steps: dict[str, float] = field(default_factory=dict)  # other named steps (seconds), e.g. read, prep
    _seen: set = field(default_factory=set, repr=False)

    def add(self, batcher_id: int, run: int, timing: BatchTiming) -> None:
        self.queued_s = max(self.queued_s, timing.queued_s)
        if (batcher_id, run) not in self._seen:
            self._seen.add((batcher_id, run))
            self.session_s += timing.run_s
            self.runs += 1

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block and add it to ``steps[name]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - started


class PendingRun:
    """Futures of one submission (its chunks); ``result`` joins them back in order."""

    def __init__(self, parts: list[tuple[int, "object"]]):
        self._parts = parts  # (batcher id, future)

    def result(self, timing: Timing | None = None) -> list[np.ndarray]:
        chunks = []
        for batcher_id, future in self._parts:
            outputs, batch_timing = future.result()
            if timing is not None:
                timing.add(batcher_id, batch_timing.run_id, batch_timing)
            chunks.append(outputs)
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def session_key(model: ServedModel, plan: SessionPlan) -> tuple[int, str, str, str]:
    """What a cached session is found by: the version's row id, its variant and provider, and the fp32
    file's sha256 (row ids restart with a new database: a process serving another one, as tests do, or a
    registry rebuilt under a running API, never gets another model's session)."""
    return (model.version_id, plan.variant, plan.device, model.sha256)


class LoadedModel:
    """One ONNX Runtime session (a variant of a version on a provider) and its micro-batchers."""

    def __init__(self, model: ServedModel, plan: SessionPlan, session: ort.InferenceSession):
        self.model = model
        self.plan = plan
        self.session = session
        self.variant = plan.variant
        self.provider = session.get_providers()[0]
        self.key = session_key(model, plan)
        self.output_names = tuple(o.name for o in session.get_outputs())
        self.refs = 0
        self.retired = False
        self.closed = False
        self._batchers: dict[tuple[str, ...], MicroBatcher] = {}
        self._lock = threading.Lock()

    @property
    def version_id(self) -> int:
        return self.model.version_id

    def run(self, windows: np.ndarray, outputs: Sequence[str] = (OUTPUT_NAME,)) -> list[np.ndarray]:
        """One session run of ``windows`` (B, leads, samples), unbatched: one array per output name."""
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if self.provider == CUDA:  # IO binding: input copied to the GPU once, outputs fetched once
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(windows, "cuda", 0))
            for name in outputs:
                binding.bind_output(name, "cuda", 0)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        return self.session.run(list(outputs), {INPUT_NAME: windows})

    def batcher(self, outputs: Sequence[str] = (OUTPUT_NAME,)) -> MicroBatcher:
        """The micro-batcher of this session for ``outputs`` (one per tuple of output names)."""
        outputs = tuple(outputs)
        unknown = [name for name in outputs if name not in self.output_names]
        if unknown:
            raise ClientError(
                f"{self.model.ref} has no output {', '.join(unknown)} "
                f"(its outputs: {', '.join(self.output_names)})"
            )
        with self._lock:
            batcher = self._batchers.get(outputs)
            if batcher is None:
                settings = get_settings()
                batcher = MicroBatcher(
                    lambda x: self.run(x, outputs),  # looked up at call time
                    max_batch=settings.serve_max_batch,
                    max_wait_s=settings.serve_max_wait_ms / 1000,
                    name=f"{self.model.ref}-{self.variant}-{'+'.join(outputs)}",
                    waiters=lambda: self.refs,  # requests holding the session may still submit
                )
                self._batchers[outputs] = batcher
            return batcher

    def submit(self, windows: np.ndarray, outputs: Sequence[str] = (OUTPUT_NAME,)) -> PendingRun:
        """Queue ``windows`` for batched runs (split into runs of at most ``serve_max_batch`` rows)."""
        batcher = self.batcher(outputs)
        windows = np.asarray(windows, dtype=np.float32)
        step = batcher.max_batch
        starts = range(0, max(len(windows), 1), step)
        return PendingRun([(id(batcher), batcher.submit(windows[s : s + step])) for s in starts])

    def infer(
        self, windows: np.ndarray, outputs: Sequence[str] = (OUTPUT_NAME,), timing: Timing | None = None
    ) -> list[np.ndarray]:
        """``windows`` through the micro-batcher: one array (B, ...) per output name."""
        return self.submit(windows, outputs).result(timing)

    def close(self) -> None:
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
            self.closed = True
        for batcher in batchers:
            batcher.close()
        self.session = None  # type: ignore[assignment]  # ONNX Runtime frees it with the last reference
        log.info("released the %s session of %s (%s)", self.variant, self.model.ref, self.provider)


# --------------------------------------------------------------------------------------------------
# the cache


def _load(model: ServedModel, plan: SessionPlan) -> ort.InferenceSession:
    if not Path(plan.path).is_file():
        raise ModelUnavailable(
            f"the ONNX file of {model.ref} ({plan.variant}) is missing from the artifact store: {plan.path}"
        )
    settings = get_settings()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = settings.serve_threads
    spinning = "1" if settings.serve_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    providers: list = [(CUDA, {"device_id": 0}), CPU] if plan.device == "cuda" else [CPU]
    return ort.InferenceSession(plan.path, options, providers=providers)


class SessionCache:
    """Reference-counted LRU of loaded sessions keyed by ``session_key`` (thread-safe)."""

    def __init__(self, capacity: int | None = None):
        self._capacity = capacity
        self._entries: OrderedDict[tuple, LoadedModel] = OrderedDict()
        # moving reference -> (version id it last named, ticket of that look-up or None)
        self._references: dict[str, tuple[int, int | None]] = {}
        self._clock = 0  # tickets: look-ups and retirements in one order
        self._retired_at: dict[int, int] = {}  # version id -> ticket of its last retirement
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity or get_settings().serve_cache_size

    def ticket(self) -> int:
        """The next tick of the cache's clock (look-ups take one; each retirement takes one)."""
        with self._lock:
            self._clock += 1
            return self._clock

    def acquire(
        self, model: ServedModel, precision: Precision | None = None, strict: bool = False, cache: bool = True
    ) -> LoadedModel:
        """The loaded session for ``model`` (loaded on first use), leased: ``release`` it when done.

        A session loaded here is cached unless ``cache`` is False or the version was retired after
        ``model.looked_up`` (a promotion between the request's look-up and its lease): then it serves this
        lease alone and is closed when released."""
        plan = plan_session(model, precision, strict=strict)
        key = session_key(model, plan)
        with self._lock:
            loaded = self._lease_locked(key)
        if loaded is not None:
            return loaded
        with self._load_lock:  # one load at a time; a concurrent request for the same key waits for it
            if plan.device == "cuda" and not cuda_available():  # CUDA failed to start while we waited
                plan = plan_session(model, precision, strict=strict)
                key = session_key(model, plan)
            with self._lock:
                loaded = self._lease_locked(key)
            if loaded is not None:
                return loaded
            started = time.perf_counter()
            try:
                session = _load(model, plan)
                cuda_error = None
            except ModelUnavailable:
                raise
            except Exception as exc:  # a CUDA session that raises is tried on the CPU provider below
                if plan.device != "cuda":
                    raise
                session, cuda_error = None, f"{type(exc).__name__}: {exc}"
            if plan.device == "cuda" and (session is None or CUDA not in session.get_providers()):
                why = cuda_error or f"session providers: {', '.join(session.get_providers())}"
                plan = plan_session(model, precision, device="cpu")
                key = session_key(model, plan)
                with self._lock:
                    loaded = self._lease_locked(key)
                if loaded is None:
                    session = _load(model, plan)
                _note_cuda_failure(model, why)  # after the CPU provider served: a broken file is not CUDA's
                if loaded is not None:
                    return loaded
                plan = dataclasses.replace(plan, reason=f"{plan.reason}; the {CUDA} did not start ({why})")
            loaded = LoadedModel(model, plan, session)
            SESSION_LOADS.labels(variant=plan.variant, device=plan.device).inc()
            SESSION_LOAD_SECONDS.observe(time.perf_counter() - started)
            log.info(
                "loaded %s %s on %s in %.2f s (%s)",
                model.ref,
                plan.variant,
                loaded.provider,
                time.perf_counter() - started,
                plan.reason,
            )
            with self._lock:
                loaded.refs = 1
                retired_since = (
                    model.looked_up is not None
                    and self._retired_at.get(model.version_id, 0) > model.looked_up
                )
                if cache and not retired_since:
                    self._entries[key] = loaded
                    self._evict_locked()
                else:
                    loaded.retired = True  # closed when this lease ends
            if retired_since:
                log.info("%s was retired after this request looked it up: served once, not cached", model.ref)
            return loaded

    def release(self, loaded: LoadedModel) -> None:
        with self._lock:
            loaded.refs -= 1
            close = loaded.retired and loaded.refs == 0 and not loaded.closed
        if close:
            loaded.close()

    @contextlib.contextmanager
    def lease(
        self, model: ServedModel, precision: Precision | None = None, strict: bool = False, cache: bool = True
    ) -> Iterator[LoadedModel]:
        loaded = self.acquire(model, precision, strict, cache)
        try:
            yield loaded
        finally:
            self.release(loaded)

    def retire_version(self, version_id: int) -> int:
        """Take every session of ``version_id`` out of the cache; each closes when its last lease ends.
        Returns how many were taken out."""
        with self._lock:
            taken, to_close = self._retire_locked(version_id)
        for loaded in to_close:
            loaded.close()
        return taken

    def _retire_locked(self, version_id: int) -> tuple[int, list[LoadedModel]]:
        """(sessions taken out, those to close now); under the lock."""
        self._clock += 1
        self._retired_at[version_id] = self._clock
        keys = [key for key in self._entries if key[0] == version_id]
        taken = [self._entries.pop(key) for key in keys]
        self._references = {r: noted for r, noted in self._references.items() if noted[0] != version_id}
        to_close = []
        for loaded in taken:
            loaded.retired = True
            if loaded.refs == 0 and not loaded.closed:
                to_close.append(loaded)
        return len(taken), to_close

    def note_reference(self, reference: str, version_id: int, looked_up: int | None = None) -> None:
        """``reference`` (an alias, bare name or the default) now names ``version_id``: if it named another
        version before, and no other remembered reference does, that version's sessions are retired.

        ``looked_up`` (the look-up's ``ticket``) orders notes that arrive out of order: a look-up older than
        the one remembered for ``reference``, or older than the retirement of ``version_id``, saw a state
        that has moved on since and is not noted (it would retire the newer version)."""
        to_close: list[LoadedModel] = []
        with self._lock:
            noted = self._references.get(reference)
            if looked_up is not None and (
                self._retired_at.get(version_id, 0) > looked_up
                or (noted is not None and noted[1] is not None and noted[1] > looked_up)
            ):
                return
            previous = noted[0] if noted is not None else None
            self._references[reference] = (version_id, looked_up)
            named = {v for v, _ in self._references.values()}
            if previous not in (None, version_id) and previous not in named:
                log.info(
                    "%s moved from version id %s to %s: old one retired", reference, previous, version_id
                )
                _, to_close = self._retire_locked(previous)
        for loaded in to_close:
            loaded.close()

    def loaded(self, version_id: int | None = None) -> list[LoadedModel]:
        with self._lock:
            return [e for e in self._entries.values() if version_id is None or e.version_id == version_id]

    def loaded_versions(self) -> set[int]:
        with self._lock:
            return {key[0] for key in self._entries}

    def clear(self) -> None:
        for version_id in self.loaded_versions():
            self.retire_version(version_id)
        with self._lock:
            self._references.clear()

    def __contains__(self, version_id: object) -> bool:
        return version_id in self.loaded_versions()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _lease_locked(self, key: tuple) -> LoadedModel | None:
        loaded = self._entries.get(key)
        if loaded is None:
            return None
        self._entries.move_to_end(key)
        loaded.refs += 1
        return loaded

    def _evict_locked(self) -> None:
        while len(self._entries) > self.capacity:
            _, loaded = self._entries.popitem(last=False)
            loaded.retired = True
            if loaded.refs == 0 and not loaded.closed:
                # closing joins nothing and takes no cache lock: safe under the lock
                loaded.close()


SESSIONS = SessionCache()


def requested_model(session: Session, ref: str | None, timing: Timing | None = None) -> ServedModel:
    """``resolve_served`` for one request (timed as its 'resolve' step); the database connection goes back
    to the pool at once, as inference needs no database."""
    with timing.step("resolve") if timing is not None else contextlib.nullcontext():
        served = resolve_served(session, ref)
    session.close()
    return served


@dataclass
class AliasMove:
    """An alias after it was set, and the version number it named before (None: it is new)."""

    alias: ModelAlias
    previous_version: int | None


def move_alias(session: Session, name: str, alias: str, number: int) -> AliasMove:
    """Point ``name@alias`` at version ``number`` (created or moved) and commit, so that every process sees
    it; then this process serves it at once: the previous version's sessions are retired unless another
    alias still names that version, and where the previous version was loaded the new one is loaded too
    (a failure to load is logged: the alias has moved, the first request will say what is wrong)."""
    found, previous_id = set_alias(session, name, alias, number)
    previous = version_by_id(session, previous_id) if previous_id is not None else None
    moved = AliasMove(found, previous.version if previous is not None else None)
    target = ServedModel.from_version(found.version)
    still_named = previous_id is not None and aliases_pointing_at(session, previous_id)
    session.commit()  # visible to every process before this one swaps its sessions
    if previous_id is not None and previous_id != target.version_id:
        was_loaded = previous_id in SESSIONS
        if not still_named:
            SESSIONS.retire_version(previous_id)
        if was_loaded:  # warm the new version where the old one was serving
            try:
                SESSIONS.release(SESSIONS.acquire(target))
            except ClientError as exc:
                log.warning("could not load %s after moving %s@%s: %s", target.ref, name, alias, exc)
    return moved


def remove_alias(session: Session, name: str, alias: str) -> None:
    """Delete ``name@alias`` and commit; the version it named stops being served by this process unless
    another alias still names it."""
    version_id = delete_alias(session, name, alias)
    still_named = aliases_pointing_at(session, version_id)
    session.commit()
    if not still_named:
        SESSIONS.retire_version(version_id)


def serving_state(version: ModelVersion) -> tuple[SessionPlan, bool]:
    """How this process would serve ``version`` (variant, device and why), and whether it has it loaded."""
    return plan_session(ServedModel.from_version(version)), version.id in SESSIONS


SESSIONS_CACHED.set_function(SESSIONS.__len__)
