"""Limits checked before a request's body is read: the API key of mutating requests, and the body's size.

FastAPI parses a form (Starlette spooling its files to temporary files past 1 MB) before any dependency of
the route runs, so a check in a dependency comes after the disk and memory are spent. ``RequestGuard`` is a
pure ASGI middleware in front of the routes:

- a POST, PUT, PATCH or DELETE without the configured API key: 401 before a byte of the body is read (the
  routes that take these methods all depend on ``require_api_key``, which the guard's check is);
- a Content-Length over ``ECGSSL_UPLOAD_MAX_BYTES``: 413 before a byte of the body is read;
- a body without Content-Length (chunked), or longer than declared: counted as it is received, reading
  stops with 413 as soon as it passes the limit (at most the limit is spooled, and freed at once).

The connection stays open: the server discards, without storing, what the client still sends.
"""

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import api_key_refusal, bearer_token
from services.config import get_settings

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def body_limit_refusal(limit: int, size: str) -> str:
    """The 413 message: the body's ``size`` (as far as known), the limit and the setting that changes it."""
    return (
        f"the request body ({size}) is over the limit of {limit} bytes: send a smaller upload (fewer or "
        "shorter records), or raise the limit with the setting ECGSSL_UPLOAD_MAX_BYTES"
    )


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once the body passes the limit. FastAPI re-raises HTTP exceptions from body
    parsing, so the app's handler answers it; the guard answers it if it escapes before a response."""

    def __init__(self, limit: int, received: int) -> None:
        super().__init__(413, detail=body_limit_refusal(limit, f"more than {received} bytes so far"))


def declared_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


class RequestGuard:
    """Pure ASGI middleware: the API key and the body-size limit, before the body is read (module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["method"] in MUTATING_METHODS and (
            refusal := api_key_refusal(bearer_token(headers.get("authorization")))
        ):
            response = JSONResponse({"detail": refusal}, 401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        limit = get_settings().upload_max_bytes
        declared = declared_length(headers)
        if declared is not None and declared > limit:
            await JSONResponse({"detail": body_limit_refusal(limit, f"{declared} bytes")}, 413)(
                scope, receive, send
            )
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit, received)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLargeError as exc:
            if started:
                raise
            await JSONResponse({"detail": exc.detail}, 413)(scope, receive, send)
