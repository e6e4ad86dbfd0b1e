"""A version's files and documents: its ONNX graph (and variants) to download, and its model card."""

import base64
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response
from sqlalchemy.orm import Session

from api.deps import db_session
from api.responses import errors
from api.routers.models import MAX_VERSION, NamePath
from services import registry
from services.db.models import ModelVersion
from services.errors import NotFoundError
from services.inference.sessions import ModelUnavailable
from services.registry.cards import card_html, model_card

router = APIRouter(prefix="/models", tags=["models"])

VersionPath = PathParam(..., ge=1, le=MAX_VERSION, description="version number")
VERSION_NOT_FOUND = (404, "the model is not registered, or has no such version")
MARKDOWN = "text/markdown; charset=utf-8"


def downloadable_variants(version: ModelVersion) -> dict[str, tuple[str, str]]:
    """Variant name -> (file, sha256) of each ONNX file of ``version`` that was written (fp32 always)."""
    files = {"fp32": (version.onnx_path, version.sha256)}
    for name, entry in (version.variants or {}).items():
        if name != "fp32" and entry.get("file") and entry.get("sha256"):
            files[name] = (entry["file"], entry["sha256"])
    return files


@router.get(
    "/{name}/versions/{version}/onnx",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "the ONNX file; `X-Content-SHA256` (hex) and `Repr-Digest` (RFC 9530) give its "
            "sha256, `Content-Disposition` its file name",
        },
        **errors(
            (
                404,
                "the model is not registered, has no such version, or no such variant (the message names "
                "those it has)",
            ),
            422,
            (503, "the file is not where the registry says"),
        ),  # fmt: skip
    },
    summary="Download a version's ONNX file (fp32, or its int8 / fp16 variant), with its sha256",
)
def download_onnx(
    name: str = NamePath,
    version: int = VersionPath,
    variant: Literal["fp32", "int8", "fp16"] = Query(
        "fp32", description="fp32 (the exported graph), or a reduced-precision variant the version has"
    ),
    session: Session = Depends(db_session),
) -> FileResponse:
    row = registry.get_version(session, name, version)
    files = downloadable_variants(row)
    if variant not in files:
        raise NotFoundError(
            f"{row.ref} has no {variant} variant (its ONNX files: {', '.join(files)}); variants are made "
            "when a version is registered (ECGSSL_EXPORT_VARIANTS; fp16 where ONNX Runtime has CUDA)"
        )
    path, sha256 = files[variant]
    if not Path(path).is_file():
        raise ModelUnavailable(f"the {variant} ONNX file of {row.ref} is missing from the artifact store")
    suffix = "" if variant == "fp32" else f".{variant}"
    digest = base64.b64encode(bytes.fromhex(sha256)).decode()
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{row.model.name}-{row.version}{suffix}.onnx",
        headers={"X-Content-SHA256": sha256, "Repr-Digest": f"sha-256=:{digest}:", "X-Model-Ref": row.ref},
    )


@router.get(
    "/{name}/versions/{version}/card",
    response_class=Response,
    responses={
        200: {
            "content": {"text/markdown": {}, "text/html": {}},
            "description": "the model card: Markdown, or HTML with `?format=html` or `Accept: text/html`",
        },
        **errors(VERSION_NOT_FOUND, 422),
    },
    summary="A version's model card: data, method, recipe, training run, metrics, parity, variants, use",
    description=(
        "Built from the version, the job that made it and its metrics: datasets with record counts and "
        "folds, method, size and recipe (the job's parameters), training time and device, metrics (test "
        "macro AUROC per class, kNN), parity and ONNX variants with their checks, intended use and "
        "limitations (a research tool, not a medical device). The shipped model's card is the one written "
        "with it, followed by this registration's checks. Markdown by default; HTML (user text escaped) for "
        "`?format=html` or an `Accept` header preferring text/html."
    ),
)
def get_card(
    name: str = NamePath,
    version: int = VersionPath,
    format: Literal["markdown", "html"] | None = Query(
        None, description="markdown or html; default: from the Accept header (text/html), else markdown"
    ),
    accept: str | None = Header(None, include_in_schema=False),
    session: Session = Depends(db_session),
) -> Response:
    row = registry.get_version(session, name, version)
    markdown = model_card(session, row)
    wants_html = format == "html" or (
        format is None and accept is not None and "text/html" in accept and "text/markdown" not in accept
    )
    if wants_html:
        return HTMLResponse(card_html(markdown, f"Model card: {row.ref}"))
    return Response(markdown, media_type=MARKDOWN)
