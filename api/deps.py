"""Dependencies shared by the routers: database session and API-key check."""

import secrets
from collections.abc import Iterator

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.orm import Session

from services.config import get_settings
from services.db.session import session_scope

_bearer = HTTPBearer(auto_error=False, description="the service's API key, when one is configured")

API_KEY_REFUSAL = "missing or wrong API key: send the header 'Authorization: Bearer <ECGSSL_API_KEY>'"


def db_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None for none or another scheme), parsed as
    FastAPI's ``HTTPBearer`` parses it."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if scheme.lower() == "bearer" and token else None


def api_key_refusal(token: str | None) -> str | None:
    """Why ``token`` is not the configured API key (None when it is, or when no key is configured: open).
    The one check of the key: ``require_api_key`` and the request guard (``api.guard``) both ask it."""
    expected = get_settings().api_key
    if not expected:
        return None
    if token is None or not secrets.compare_digest(token.encode(), expected.encode()):
        return API_KEY_REFUSAL
    return None


async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 unless the configured API key is sent (no key configured: open). Async: it does no blocking
    I/O, so it runs on the event loop instead of taking a thread-pool hop on every request. The request
    guard (``api.guard``) has already refused a mutating request without the key before its body was read;
    this dependency marks the routes that need the key (and their OpenAPI security)."""
    if refusal := api_key_refusal(credentials.credentials if credentials else None):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=refusal, headers={"WWW-Authenticate": "Bearer"}
        )
