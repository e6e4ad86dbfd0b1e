"""Prometheus metrics of the service (prometheus-client, the process-wide default registry).

Observed where they happen: HTTP requests (``api/metrics.py``), micro-batches
(``services/inference/batching.py``), session loads and the cache (``services/inference/sessions.py``),
training epochs (``services.observability.logs.log_epoch``), finished job runs (the worker's
``task_postrun``).
Computed at scrape time: each worker's last heartbeat from the database (``HeartbeatCollector``); jobs by
kind and status and the broker's queue depth on the gateway (``api/metrics.py``).

The gateway serves them at ``GET /metrics``; a worker at ``http://<host>:ECGSSL_WORKER_METRICS_PORT/metrics``
(``start_worker_server``, in the process that runs its tasks).
"""

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "ecgssl_http_requests",
    "HTTP requests by method, route template and status",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "ecgssl_http_request_duration_seconds",
    "HTTP request latency by method and route template (until the response is sent)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_ITEMS = Histogram(
    "ecgssl_microbatch_items",
    "requests (items) gathered into one session run",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
BATCH_WINDOWS = Histogram(
    "ecgssl_microbatch_windows",
    "model windows in one session run",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCH_WAIT_SECONDS = Histogram(
    "ecgssl_microbatch_wait_seconds",
    "time an item waited in the queue (to be taken and for its batch mates) before its run",
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
BATCH_RUN_SECONDS = Histogram(
    "ecgssl_microbatch_run_seconds",
    "duration of one session run",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SESSION_LOADS = Counter(
    "ecgssl_session_loads", "ONNX Runtime sessions loaded, by variant and device", ["variant", "device"]
)
SESSION_LOAD_SECONDS = Histogram(
    "ecgssl_session_load_seconds",
    "time to load an ONNX Runtime session",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SESSIONS_CACHED = Gauge("ecgssl_sessions_cached", "ONNX Runtime sessions held in this process's cache")
EPOCH_SECONDS = Histogram(
    "ecgssl_epoch_duration_seconds",
    "wall time of one training epoch (its steps and validation), by job kind",
    ["kind"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
JOB_RUNS = Counter(
    "ecgssl_worker_job_runs",
    "job deliveries a worker ran to their end, by kind and outcome",
    ["kind", "outcome"],
)


class HeartbeatCollector(Collector):
    """The last heartbeat of each worker in the database (``only``: that worker instance alone)."""

    def __init__(self, only: str | None = None):
        self.only = only

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from services.db.models import Worker
        from services.db.session import session_scope

        beats = GaugeMetricFamily(
            "ecgssl_worker_last_heartbeat_timestamp_seconds",
            "Unix time of each worker's last heartbeat (workers forget theirs on a clean shutdown)",
            labels=["worker", "device"],
        )
        try:
            with session_scope() as s:
                query = select(Worker.hostname, Worker.device, Worker.last_seen)
                if self.only is not None:
                    query = query.where(Worker.hostname == self.only)
                rows = s.execute(query).all()
        except Exception as exc:
            log.warning("metrics: the workers' heartbeats could not be read: %s", exc)
            return
        for hostname, device, last_seen in rows:
            beats.add_metric([hostname, device or ""], _timestamp(last_seen))
        yield beats


def _timestamp(moment: datetime) -> float:
    """Unix time of a stored moment (naive ones are UTC: SQLite returns them so)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


_registered: set[str] = set()


def register_once(name: str, collector: Collector) -> None:
    """Register a scrape-time collector with the default registry once per process."""
    if name not in _registered:
        REGISTRY.register(collector)
        _registered.add(name)


def start_worker_server(port: int, instance: str) -> bool:
    """Serve this process's metrics (and its own heartbeat) on ``port``; False when the port is taken."""
    register_once("heartbeat", HeartbeatCollector(only=instance))
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("worker metrics: port %d is not available (%s): not serving /metrics", port, exc)
        return False
    log.info("worker metrics on http://0.0.0.0:%d/metrics", port)
    return True
