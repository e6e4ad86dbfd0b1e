"""Dependencies shared by the routers: database session, API-key check, and the inference upload form."""

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, File, Form, HTTPException, Query, UploadFile, status
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.orm import Session

from services import registry
from services.config import get_settings
from services.db.session import session_scope
from services.errors import ClientError
from services.inference.sessions import Precision
from services.inference.uploads import Upload

_bearer = HTTPBearer(auto_error=False, description="the service's API key, when one is configured")

API_KEY_REFUSAL = "missing or wrong API key: send the header 'Authorization: Bearer <ECGSSL_API_KEY>'"


def db_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# A route's database session, committed when the route returns and before its answer is sent (scope
# "function"), so that a client acting on a 201 at once finds the row.
SessionDep = Annotated[Session, Depends(db_session, scope="function")]


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


FILES_DESCRIPTION = "WFDB .hea plus its .dat/.mat files, or one .zip, .edf, .bdf, .npy, .npz, .csv, .json"
FS_DESCRIPTION = "sampling rate in Hz: needed for .npy, and for .npz/.csv/.json without one"
LEADS_DESCRIPTION = "comma-separated lead names of the rows/columns (.npy, .npz, .csv, .json)"
MODEL_DESCRIPTION = (
    "'name@version' (pinned), 'name@alias' or 'name' (its 'production' alias: the first version registered "
    "under a name gets it, a later one serves only once promoted with PUT /models/{name}/aliases/production; "
    "never simply the newest version). Default: the ECGSSL_DEFAULT_MODEL setting, else the 'production' "
    "alias of the shipped model (registered on first start), else of the first model registered"
)
PRECISION_DESCRIPTION = (
    "ONNX variant: fp32 (exact), int8 (CPU) or fp16 (CUDA), refused with the reason when the version's "
    "variant did not pass its check; default: the ECGSSL_SERVE_PRECISION setting (auto)"
)


def read_files(files: list[UploadFile]) -> dict[str, bytes]:
    """File name -> content. The body's size was bounded before it was read (``api.guard``)."""
    contents: dict[str, bytes] = {}
    for upload in files:
        name = Path(upload.filename or "").name
        if not name:
            raise ClientError("an uploaded file has no file name")
        if name in contents:
            raise ClientError(f"file '{name}' was uploaded twice")
        contents[name] = upload.file.read()
    return contents


def upload_form(
    files_description: str = FILES_DESCRIPTION,
    fs_description: str = FS_DESCRIPTION,
    leads_description: str = LEADS_DESCRIPTION,
) -> Callable[..., Upload]:
    """The dependency of an inference route's upload: the files and the form fields ``fs`` and ``leads``
    (documented with the descriptions given), and the query parameters ``model`` and ``precision``."""

    def upload(
        files: list[UploadFile] = File(..., description=files_description),
        fs: float | None = Form(None, gt=0, allow_inf_nan=False, description=fs_description),
        leads: str | None = Form(None, description=leads_description),
        model: str | None = Query(None, description=MODEL_DESCRIPTION),
        precision: Precision | None = Query(None, description=PRECISION_DESCRIPTION),
    ) -> Upload:
        lead_names = [name.strip() for name in leads.split(",")] if leads else None
        return Upload(read_files(files), fs, lead_names, model, precision)

    return upload


# path parameters of the model routes (models, model_files)
MAX_VERSION = 2**31 - 1  # the model_versions.version column (a 32-bit integer)
# The rules are checked by the registry (a name that cannot be registered: 404 'not registered'), so the
# schema states them without FastAPI checking them first.
NamePath = PathParam(
    ...,
    description="registry name of the model: 1-100 letters, digits, '.', '_' or '-'",
    examples=["st_mem-tiny"],
    json_schema_extra={"pattern": f"^{registry.NAME_PATTERN}$"},
)
VersionPath = PathParam(..., ge=1, le=MAX_VERSION, description="version number")
