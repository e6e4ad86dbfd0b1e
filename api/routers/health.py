"""Liveness of the service's parts: the database (reachable, and taking writes), the broker, the workers."""

from fastapi import APIRouter, Response, status

from api.schemas import HealthOut
from services.jobs.workers import database_status

router = APIRouter(tags=["health"])


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
    from worker.celery_app import broker_status  # the broker's settings, read when first asked

    database, workers = database_status()
    broker = broker_status()
    healthy = database == "ok" and broker == "ok" and bool(workers)
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthOut(
        status="ok" if healthy else "degraded", database=database, broker=broker, workers=workers
    )
