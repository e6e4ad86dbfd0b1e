"""Dependencies shared by the routers: database session and API-key check."""

import secrets
from collections.abc import Iterator

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from services.config import get_settings
from services.db.session import session_scope

_bearer = HTTPBearer(auto_error=False, description="the service's API key, when one is configured")


def db_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 unless the configured API key is sent (no key configured: open). Async: it does no blocking
    I/O, so it runs on the event loop instead of taking a thread-pool hop on every request."""
    expected = get_settings().api_key
    if not expected:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong API key: send the header 'Authorization: Bearer <ECGSSL_API_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
