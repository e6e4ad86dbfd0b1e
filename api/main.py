"""The FastAPI gateway: HTTP only; it queues work and serves ONNX models, it never trains."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.routers import datasets, embed, health, jobs, methods, models, predict
from services.errors import ClientError
from services.shipped import register_on_first_start


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(register_on_first_start)  # the shipped diagnosis model, once per database
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        title="ECG self-supervised learning service",
        version="0.1.0",
        description=(
            "Pretrain 12-lead ECG encoders with self-supervised methods (ST-MEM), follow the jobs, and "
            "get embeddings of uploaded ECGs from the exported ONNX encoders."
        ),
    )

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    for router in (
        datasets.router,
        jobs.router,
        methods.router,
        models.router,
        embed.router,
        predict.router,
        health.router,
    ):
        app.include_router(router)
    return app


app = create_app()
