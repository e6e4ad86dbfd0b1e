"""Liveness of the service's parts: the database (reachable, and taking writes), the broker, the workers."""

from fastapi import APIRouter, Response, status
from sqlalchemy import text

from api.schemas import HealthOut
from services.db.session import check_writable, error_text, session_scope
from services.jobs.workers import live_workers

router = APIRouter(tags=["health"])


def _broker_status() -> str:
    from worker.celery_app import celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"unreachable: {exc}"


def _database_status() -> tuple[str, list[str]]:
    """The database: 'ok', 'unreachable: ...' (no answer to a read) or 'not writable: ...' (read-only,
    or locked for longer than the write probe waits); and the live workers it lists."""
    try:
        with session_scope() as s:
            s.execute(text("SELECT 1"))
        workers = [f"{w.hostname} ({w.device})" for w in live_workers()]
    except Exception as exc:
        return f"unreachable: {exc}", []
    try:
        check_writable()
    except Exception as exc:
        return f"not writable: {error_text(exc)}", workers
    return "ok", workers


@router.get(
    "/health",
    response_model=HealthOut,
    responses={
        503: {
            "model": HealthOut,
            "description": "degraded: the database is unreachable or takes no writes, the broker is "
            "unreachable, or no worker is live",
        }
    },
    summary="Database (reads and writes), broker and workers",
)
def health(response: Response) -> HealthOut:
    database, workers = _database_status()
    broker = _broker_status()
    healthy = database == "ok" and broker == "ok" and bool(workers)
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthOut(
        status="ok" if healthy else "degraded", database=database, broker=broker, workers=workers
    )
