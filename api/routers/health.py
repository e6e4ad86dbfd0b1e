"""Liveness of the service's parts."""

from fastapi import APIRouter, Response, status
from sqlalchemy import text

from api.schemas import HealthOut
from services.db.session import session_scope
from services.workers import live_workers

router = APIRouter(tags=["health"])


def _broker_status() -> str:
    from worker.celery_app import celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"unreachable: {exc}"


@router.get(
    "/health",
    response_model=HealthOut,
    responses={
        503: {
            "model": HealthOut,
            "description": "degraded: the database or the broker is unreachable, or no worker is live",
        }
    },
    summary="Database, broker and workers",
)
def health(response: Response) -> HealthOut:
    try:
        with session_scope() as s:
            s.execute(text("SELECT 1"))
        database = "ok"
        workers = [f"{w.hostname} ({w.device})" for w in live_workers()]
    except Exception as exc:
        database, workers = f"unreachable: {exc}", []
    broker = _broker_status()
    healthy = database == "ok" and broker == "ok" and bool(workers)
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthOut(
        status="ok" if healthy else "degraded", database=database, broker=broker, workers=workers
    )
