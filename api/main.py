"""The FastAPI gateway: HTTP only; it queues work and serves ONNX models, it never trains."""

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError

from api import metrics
from api.guard import RequestGuard
from api.metrics import RequestMetrics
from api.responses import install_responses, status_of
from api.routers import datasets, ecg, embed, health, jobs, methods, model_files, models, predict
from api.routers.dashboard import install_dashboard
from services.db.session import error_text, is_transient
from services.errors import ClientError
from services.inference.sessions import SESSIONS
from services.registry.shipped import register_on_first_start

log = logging.getLogger(__name__)

DATABASE_BUSY_RETRY_AFTER_S = 5  # the Retry-After of a 503 for a database that is busy or briefly away


def json_safe(value: object) -> object:
    """``value`` with non-finite floats as the strings 'NaN', 'Infinity', '-Infinity' (strict JSON has no
    such numbers: a 422 echoing the NaN it refused could not be written, and became a 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(register_on_first_start)  # the shipped diagnosis model, once per database
    yield
    SESSIONS.clear()  # release the ONNX sessions this app loaded (each closes once its last request ends)


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc: api.routers.dashboard serves them from local files
        redoc_url=None,
        title="ECG self-supervised learning service",
        version="0.1.0",
        description=(
            "Pretrain ECG encoders with self-supervised methods (ST-MEM, ECG-JEPA, SimCLR: GET /methods), "
            "fine-tune and evaluate them on labelled ECGs, follow the jobs, and serve uploaded ECGs from the "
            "exported ONNX models: embeddings (POST /embed) and diagnosis probabilities (POST /predict). The "
            "web dashboard is at /."
        ),
    )

    app.add_middleware(RequestGuard)  # the API key and the body-size limit, before the body is read
    app.add_middleware(RequestMetrics, router=app.router)  # outermost: request ids, counts and latencies

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse(status_code=status_of(exc), content={"detail": str(exc)})

    @app.exception_handler(DBAPIError)
    async def database_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        """A transient database error (its lock held past the busy timeout, a dropped connection) is a 503
        with a Retry-After; any other stays a server error."""
        if not is_transient(exc):
            raise exc
        log.warning("answering 503: the database is busy or away: %s", error_text(exc))
        return JSONResponse(
            status_code=503,
            headers={"Retry-After": str(DATABASE_BUSY_RETRY_AFTER_S)},
            content={
                "detail": "the database is busy (another writer holds its lock, or its connection dropped): "
                f"retry in {DATABASE_BUSY_RETRY_AFTER_S} s"
            },
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer (422, {"detail": [errors]}), with a non-finite input echoed as a string
        return JSONResponse(status_code=422, content={"detail": json_safe(jsonable_encoder(exc.errors()))})

    for router in (
        datasets.router,
        jobs.router,
        methods.router,
        models.router,
        model_files.router,
        embed.router,
        predict.router,
        ecg.router,
        health.router,
        metrics.router,
    ):
        app.include_router(router)
    install_dashboard(app)  # the web dashboard at /, offline /docs and /redoc
    install_responses(app)  # the OpenAPI document's API key as configured; a 405 lists all allowed methods
    return app


app = create_app()
