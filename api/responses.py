"""The error answers of the HTTP API as its OpenAPI document shows them.

Every refusal has a JSON body ``{"detail": ...}``: a string (``ErrorOut``: a ``ClientError`` or an
``HTTPException`` of the service), or, for a request that does not fit the schema, the list of what is wrong
(``ValidationErrorOut``; ``api.main`` writes it); a ``ClientError``'s status is that of its kind
(``status_of``). ``errors(...)`` declares, per route, the statuses it can answer with those bodies.
``install_responses`` makes the document say that the API key is optional when the service has none, and a
405's ``Allow`` list every method of the path (Starlette names only one route's). ``server_timing`` writes
the ``Server-Timing`` header of the inference routes.
"""

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.config import get_settings
from services.errors import (
    ClientError,
    ConflictError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
    UnsupportedError,
)
from services.inference.sessions import Timing


class ErrorOut(BaseModel):
    """A refused request: what is wrong and, where it helps, what was expected."""

    detail: str = Field(
        description="what is wrong and what was expected",
        examples=["model 'st_mem-tiny' is not registered (GET /models lists the models)"],
    )


class ValidationIssue(BaseModel):
    """One way the request does not fit the schema."""

    type: str = Field(description="the kind of error, e.g. missing, string_pattern_mismatch, uuid_parsing")
    loc: list[str | int] = Field(
        description="where: 'path', 'query' or 'body', then the field's name (and item index)",
        examples=[["body", "learning_rate"]],
    )
    msg: str = Field(description="what is wrong", examples=["Input should be greater than 0"])
    input: Any = Field(
        None,
        description="the value refused (non-finite numbers as the strings 'NaN', 'Infinity', '-Infinity')",
    )
    ctx: dict[str, Any] | None = Field(None, description="the rule that was broken, e.g. {'gt': 0.0}")


class ValidationErrorOut(BaseModel):
    """422: the request does not fit the schema (a list of issues), or something it names cannot be used (one
    message: e.g. a dataset path that does not exist, an ECG that cannot be read, a model reference that is
    neither a version nor an alias)."""

    detail: str | list[ValidationIssue] = Field(
        description="the schema's issues, one per field; or one message for a value that cannot be used"
    )


# what each status means, unless a route says more precisely
DESCRIPTIONS: dict[int, str] = {
    400: "the body cannot be parsed (JSON that is not UTF-8, a malformed multipart body)",
    401: "the API key is missing or wrong (only when the service has one: ECGSSL_API_KEY)",
    404: "what the request names does not exist",
    409: "the request conflicts with the current state",
    413: "the upload is over the size limit (ECGSSL_UPLOAD_MAX_BYTES; a .zip counts expanded)",
    422: "the request does not fit the schema, or what it names cannot be used",
    501: "this server cannot read the uploaded format (EDF/BDF without pyedflib)",
    503: "a part the request needs is unavailable (retry later)",
}

UPLOAD_ERRORS = (
    400,
    401,
    (404, "the model is not registered, or has no version yet"),
    413,
    422,
    501,
    (503, "the model's files are missing on this server"),
)


def errors(*statuses: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: each status (or ``(status, description)``) with its documented body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for entry in statuses:
        status, description = entry if isinstance(entry, tuple) else (entry, DESCRIPTIONS[entry])
        response: dict[str, Any] = {
            "model": ValidationErrorOut if status == 422 else ErrorOut,
            "description": description,
        }
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {
                    "description": "Bearer",
                    "required": True,
                    "schema": {"type": "string"},
                }
            }
        responses[status] = response
    return responses


def install_responses(app: FastAPI) -> None:
    """The OpenAPI document's security as the settings have it (``install_openapi``), and a 405's ``Allow``
    header with every method the path takes."""
    install_openapi(app)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(app, request))}
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, http_error)


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods some route takes on the request's path (Starlette's 405 names only the first route's)."""
    routes = app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def install_openapi(app: FastAPI) -> None:
    """``app.openapi()`` as FastAPI builds it, except that without an API key configured an operation's
    bearer security is optional (``{}`` listed first), as the service then takes requests without one.
    Built once per setting (a test may change it)."""
    built: dict[bool, dict[str, Any]] = {}
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        keyed = bool(get_settings().api_key)
        if keyed not in built:
            app.openapi_schema = None
            document = copy.deepcopy(fastapi_openapi())
            if not keyed:
                for operation in _operations(document):
                    if operation.get("security"):
                        operation["security"] = [{}, *operation["security"]]
            for operation in _operations(document, MUTATING):  # api/guard.py refuses any oversize body
                operation["responses"].setdefault("413", BODY_TOO_LARGE)
            for operation in _operations(document):  # api/main.py's handler of a busy database
                operation["responses"].setdefault("503", DATABASE_BUSY)
            built[keyed] = document
        app.openapi_schema = built[keyed]
        return built[keyed]

    app.openapi = openapi  # type: ignore[method-assign]


ALL_METHODS = frozenset({"get", "put", "post", "delete", "patch", "options", "head", "trace"})
MUTATING = frozenset({"post", "put", "patch", "delete"})
BODY_TOO_LARGE = {
    "description": "the request body is over ECGSSL_UPLOAD_MAX_BYTES (refused before it is read)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
}

DATABASE_BUSY = {
    "description": "the database is busy or unreachable for now (Retry-After says when to try again)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
}


def _operations(document: dict[str, Any], methods: frozenset[str] = ALL_METHODS) -> list[dict[str, Any]]:
    return [op for path in document.get("paths", {}).values() for m, op in path.items() if m in methods]


def pattern_extra(schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` that documents a parameter with ``schema`` instead of its Python type's (for a
    parameter the route checks itself, with messages that say more than a schema error would)."""

    def replace(generated: dict[str, Any]) -> None:
        kept = {key: generated[key] for key in ("title", "description", "examples") if key in generated}
        generated.clear()
        generated.update(kept | schema)

    return replace


# the status of each kind of ``ClientError`` (services.errors); any other: 422
STATUS_OF_KIND: dict[type[ClientError], int] = {
    NotFoundError: 404,
    ConflictError: 409,
    TooLargeError: 413,
    UnsupportedError: 501,
    UnavailableError: 503,
}


def status_of(error: ClientError) -> int:
    """The HTTP status of a client error: that of the first of its classes with one, else 422."""
    return next((STATUS_OF_KIND[kind] for kind in type(error).__mro__ if kind in STATUS_OF_KIND), 422)


def server_timing(timing: Timing, total_s: float) -> str:
    """The ``Server-Timing`` header (ms): session run(s), longest queue wait, the request's steps (resolve:
    registry, read: upload, prep: checks and windows), and app: the handler's whole time ``total_s``."""
    parts = [
        ("session", timing.session_s),
        ("queue", timing.queued_s),
        *timing.steps.items(),
        ("app", total_s),
    ]
    return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in parts)
