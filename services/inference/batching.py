"""Micro-batching: concurrent requests for one session are gathered into one run.

A ``MicroBatcher`` owns one worker thread. Callers ``submit`` an array of rows (windows) and get a
``Future``; the worker takes the first waiting item and everything queued behind it (up to ``max_batch``
rows), runs them as one batch and hands each caller its own rows back. Under load the queue fills while a
run is in progress, so runs grow without waiting. When ``waiters`` says more requests hold the session
than the run has items (they are still preparing their windows), the worker waits for them up to
``max_wait_s``; a request alone never waits.

A run that fails is retried item by item, so one bad item (a wrong shape, say) fails only its own caller.
An item with more rows than ``max_batch`` runs alone (split it before submitting to bound a run's size).
"""

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from services.observability.metrics import BATCH_ITEMS, BATCH_RUN_SECONDS, BATCH_WAIT_SECONDS, BATCH_WINDOWS

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]  # (B, ...) -> one (B, ...) array per output


@dataclass
class BatchTiming:
    """Where one item's time went: queued (waiting to be taken and for batch mates) and in the run."""

    queued_s: float = 0.0
    run_s: float = 0.0
    batch_rows: int = 0  # rows of the run this item was part of
    run_id: int = 0  # which run of the batcher (items of one run share it)


@dataclass
class _Item:
    rows: np.ndarray
    future: Future
    submitted: float = field(default_factory=time.perf_counter)


class BatcherClosed(RuntimeError):
    """Submitted to a batcher that was closed (its session was released)."""


def observe_run(waits: list[float], windows: int, run_s: float) -> None:
    """A session run in the metrics: its items and windows, each item's wait, its duration."""
    BATCH_ITEMS.observe(len(waits))
    BATCH_WINDOWS.observe(windows)
    BATCH_RUN_SECONDS.observe(run_s)
    for wait in waits:
        BATCH_WAIT_SECONDS.observe(wait)


class MicroBatcher:
    """Gathers concurrent submissions into runs of at most ``max_batch`` rows (thread-safe)."""

    def __init__(
        self,
        run: RunFn,
        max_batch: int,
        max_wait_s: float,
        name: str = "batcher",
        waiters: Callable[[], int] | None = None,
    ):
        self._run = run
        self._waiters = waiters  # how many callers may submit soon; None: always wait up to max_wait_s
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._held: _Item | None = None  # taken but left for the next run (it did not fit)
        self._closed = False
        self._lock = threading.Lock()
        self.runs = 0
        self.recent_batches: deque[int] = deque(maxlen=256)  # items per run, newest last
        self._thread = threading.Thread(target=self._loop, name=f"microbatch-{name}", daemon=True)
        self._thread.start()

    def submit(self, rows: np.ndarray) -> "Future[tuple[list[np.ndarray], BatchTiming]]":
        """Queue ``rows`` (B, ...) for a run; the future gives (one array per output, timing)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed(f"{self.name} is closed")
            self._queue.put(_Item(np.asarray(rows), future))
        return future

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        """Submit and wait: the outputs for ``rows``."""
        return self.submit(rows).result()[0]

    def pending(self) -> int:
        """Items waiting for a run (approximate)."""
        return self._queue.qsize() + (self._held is not None)

    def close(self) -> None:
        """Stop taking items; the worker finishes what was queued and exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---------------------------------------------------------------------------------------------

    def _next(self, timeout: float | None) -> _Item | None | bool:
        """The held item, else the next queued one; False on timeout; None when closing."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        try:
            if timeout is not None and timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return False

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = [first]
            rows = len(first.rows)
            deadline = time.perf_counter() + self.max_wait_s
            closing = False
            while rows < self.max_batch:
                expected = self._waiters() if self._waiters is not None else None
                queued_only = expected is not None and len(batch) >= expected
                item = self._next(0 if queued_only else deadline - time.perf_counter())
                if item is False:
                    break
                if item is None:
                    closing = True
                    break
                if rows + len(item.rows) > self.max_batch:
                    self._held = item
                    break
                batch.append(item)
                rows += len(item.rows)
            self._run_batch(batch)
            if closing:
                while (item := self._next(0)) not in (None, False):
                    self._run_batch([item])
                return

    def _run_batch(self, batch: list[_Item]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        started = time.perf_counter()
        self.runs += 1
        run_id = self.runs
        self.recent_batches.append(len(batch))
        try:
            outputs = [np.asarray(o) for o in self._run(np.concatenate([item.rows for item in batch]))]
            if any(len(o) != sum(len(item.rows) for item in batch) for o in outputs):
                raise ValueError("the run returned another number of rows than it was given")
        except Exception as exc:  # one bad item must not fail the others: run them one by one
            log.info("%s: a run of %d items failed (%s); running them one by one", self.name, len(batch), exc)
            for item in batch:
                self._run_alone(item)
            return
        run_s = time.perf_counter() - started
        total = sum(len(item.rows) for item in batch)
        observe_run([started - item.submitted for item in batch], total, run_s)
        offset = 0
        for item in batch:
            n = len(item.rows)
            timing = BatchTiming(started - item.submitted, run_s, total, run_id)
            item.future.set_result(([o[offset : offset + n] for o in outputs], timing))
            offset += n

    def _run_alone(self, item: _Item) -> None:
        started = time.perf_counter()
        self.runs += 1
        run_id = self.runs
        self.recent_batches.append(1)
        try:
            outputs = [np.asarray(o) for o in self._run(item.rows)]
        except Exception as exc:
            item.future.set_exception(exc)
            return
        timing = BatchTiming(started - item.submitted, time.perf_counter() - started, len(item.rows), run_id)
        observe_run([timing.queued_s], len(item.rows), timing.run_s)
        item.future.set_result((outputs, timing))
