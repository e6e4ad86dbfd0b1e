"""``GET /metrics`` (Prometheus text format) and the middleware that counts and times every request by its
route template and gives it a request id (``X-Request-ID``: the client's, else a new one; echoed on the
response and carried by every log record of the request)."""

import logging
import time
from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.observability.logs import REQUEST_ID, new_request_id
from services.observability.metrics import REQUEST_SECONDS, REQUESTS, HeartbeatCollector, register_once

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
UNMATCHED = "<unmatched>"  # the route label of a request no route matched (a 404): its path is not a label

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics of the gateway", include_in_schema=False)
def metrics() -> Response:
    """Requests by route and status with latency histograms, micro-batch sizes and waits, session loads and
    the session cache, jobs by kind and status, the broker's queue depth and the workers' last heartbeats
    (epoch durations are on each worker's own ``/metrics``: ``ECGSSL_WORKER_METRICS_PORT``)."""
    register_once("service", ServiceCollector())
    register_once("heartbeat", HeartbeatCollector())
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class ServiceCollector(Collector):
    """Jobs by kind and status (the run log) and the broker's queue depth, read at each scrape; a source
    that does not answer leaves its metric out and counts in ``ecgssl_scrape_errors``."""

    def __init__(self, queue: str = "gpu"):
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from services.db.models import Job, JobStatus
        from services.db.session import session_scope

        errors = GaugeMetricFamily(
            "ecgssl_scrape_errors", "sources that failed during this scrape", labels=["source"]
        )
        try:
            with session_scope() as s:
                rows = s.execute(
                    select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
                ).all()
            jobs = GaugeMetricFamily(
                "ecgssl_jobs", "jobs in the run log by kind and status", labels=["kind", "status"]
            )
            counts = {(str(kind), str(status)): n for kind, status, n in rows}
            for kind in sorted({k for k, _ in counts} | {"pretrain", "finetune", "evaluate"}):
                for status in JobStatus:
                    jobs.add_metric([kind, status.value], counts.get((kind, status.value), 0))
            yield jobs
        except Exception as exc:
            log.warning("metrics: the run log could not be read: %s", exc)
            errors.add_metric(["database"], 1)
        try:
            depth = GaugeMetricFamily(
                "ecgssl_queue_depth",
                "messages waiting in the broker queue (not yet taken by a worker)",
                labels=["queue"],
            )
            depth.add_metric([self.queue], queue_depth(self.queue))
            yield depth
        except Exception as exc:
            log.warning("metrics: the broker queue could not be read: %s", exc)
            errors.add_metric(["broker"], 1)
        yield errors


def queue_depth(queue: str) -> int:
    """Messages ready in ``queue``, from a (non-passive: Redis deletes an emptied queue's list, which a
    passive declare would report as a missing queue) declare of it: Redis counts the lists of its
    priorities, Celery's SQLAlchemy transport its visible rows."""
    from worker.celery_app import celery_app

    with celery_app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        return int(conn.default_channel.queue_declare(queue=queue, durable=True).message_count)


class RequestMetrics:
    """Pure ASGI middleware: request id, then the request counted and timed under its route template
    (``/jobs/{job_id}``, not the path) once its response has started (or failed)."""

    def __init__(self, app: ASGIApp, router: Router):
        self.app, self.router = app, router

    def route_of(self, scope: Scope) -> str:
        """The template of the route that served the request; for one answered before routing (a 401 or 413
        of the request guard), the route it was for; else ``UNMATCHED``."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.router.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(REQUEST_ID_HEADER.lower().encode())
        request_id = new_request_id(given.decode("latin-1") if given else None)
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500  # an exception before the response started is answered 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (REQUEST_ID_HEADER.lower().encode(), request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            template = self.route_of(scope)
            method = scope.get("method", "")
            REQUESTS.labels(method, template, str(status)).inc()
            REQUEST_SECONDS.labels(method, template).observe(time.perf_counter() - started)
            REQUEST_ID.reset(token)
