"""The model registry (versions, variants, aliases), and importing published checkpoints into it."""

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Response, status

from api.deps import NamePath, SessionDep, VersionPath, require_api_key
from api.responses import errors
from api.schemas import (
    AliasList,
    AliasOut,
    AliasSet,
    ModelImportRequest,
    ModelList,
    ModelOut,
    ModelVersionOut,
    ServingOut,
    VariantOut,
)
from services import registry
from services.db.models import Model, ModelAlias, ModelVersion
from services.inference.sessions import move_alias, remove_alias, serving_state

router = APIRouter(prefix="/models", tags=["models"])

# The alias rules are checked by the registry (an alias that cannot be set: 422 naming the rule), so the
# schema states them without FastAPI checking them first.
AliasPath = Path(
    ...,
    description="alias: 1-64 lower-case letters, digits, '_' or '-', starting with a letter; not 'latest'",
    examples=["production"],
    json_schema_extra={"pattern": f"^{registry.ALIAS_PATTERN}$"},
)
MODEL_NOT_FOUND = (404, "the model is not registered")
ALIAS_NOT_FOUND = (404, "the model is not registered, or has no such alias")


def version_out(v: ModelVersion, serving: bool = False) -> ModelVersionOut:
    variants = {
        name: VariantOut(**{k: value for k, value in entry.items() if k in VariantOut.model_fields})
        for name, entry in (v.variants or {}).items()
    }
    serving_out = None
    if serving:
        plan, loaded = serving_state(v)
        serving_out = ServingOut(variant=plan.variant, device=plan.device, reason=plan.reason, loaded=loaded)
    return ModelVersionOut(
        name=v.model.name,
        version=v.version,
        ref=v.ref,
        method=v.model.method,
        source_job_id=v.source_job_id,
        sha256=v.sha256,
        input_spec=v.input_spec,
        embedding_dim=v.embedding_dim,
        parity_max_abs_diff=v.parity_max_abs_diff,
        metrics=v.metrics,
        clinical_features=v.clinical_normaliser["names"] if v.clinical_normaliser else None,
        head=v.head,
        knn_reference={k: value for k, value in v.knn_reference.items() if k != "file"}
        if v.knn_reference
        else None,
        aliases=[a.name for a in v.aliases],
        variants=variants,
        serving=serving_out,
        created_at=v.created_at,
    )


def model_out(m: Model) -> ModelOut:
    return ModelOut(
        name=m.name,
        method=m.method,
        aliases={a.name: a.version.version for a in m.aliases},
        versions=[version_out(v) for v in m.versions],
    )


def alias_out(a: ModelAlias, previous_version: int | None = None) -> AliasOut:
    return AliasOut(
        model=a.model.name,
        alias=a.name,
        version=a.version.version,
        ref=a.version.ref,
        previous_version=previous_version,
        updated_at=a.updated_at,
    )


@router.get("", response_model=ModelList, summary="Registered models, their versions and aliases")
def list_models(
    session: SessionDep,
) -> ModelList:
    return ModelList(models=[model_out(m) for m in registry.list_models(session)])


@router.get(
    "/{name}",
    response_model=ModelOut,
    responses=errors(MODEL_NOT_FOUND, 422),
    summary="One model: its versions and aliases",
)
def get_model(session: SessionDep, name: str = NamePath) -> ModelOut:
    return model_out(registry.get_model(session, name))


@router.get(
    "/{name}/versions/{version}",
    response_model=ModelVersionOut,
    responses=errors((404, "the model is not registered, or has no such version"), 422),
    summary="One version: input spec, metrics, parity, file hashes, variants, source job, what serves",
)
def get_version(
    session: SessionDep,
    name: str = NamePath,
    version: int = VersionPath,
) -> ModelVersionOut:
    return version_out(registry.get_version(session, name, version), serving=True)


@router.get(
    "/{name}/aliases",
    response_model=AliasList,
    responses=errors(MODEL_NOT_FOUND, 422),
    summary="The aliases of a model",
)
def list_aliases(session: SessionDep, name: str = NamePath) -> AliasList:
    model = registry.get_model(session, name)
    return AliasList(model=model.name, aliases=[alias_out(a) for a in model.aliases])


@router.get(
    "/{name}/aliases/{alias}",
    response_model=AliasOut,
    responses=errors(ALIAS_NOT_FOUND, 422),
    summary="The version an alias names",
)
def get_alias(session: SessionDep, name: str = NamePath, alias: str = AliasPath) -> AliasOut:
    return alias_out(registry.get_alias(session, name, alias))


@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasOut,
    dependencies=[Depends(require_api_key)],
    responses=errors(400, 401, MODEL_NOT_FOUND, (422, "not a valid alias, no such version, or a bad body")),
    summary="Point an alias at a version (promote): requests naming it are served by that version at once",
    description=(
        "Creates the alias or moves it. `?model=name@alias` (and `?model=name` for `production`) then "
        "resolves to the new version: this process loads its session, and the old version's session is "
        "released once the requests already running on it finish. Other API processes follow on their next "
        "request. This is the only way what a name serves changes: the first version of a model gets "
        "`production` when it is registered, later versions (a second pretraining job of the same name, "
        "a fine-tuning) never take it over by themselves."
    ),
)
def put_alias(
    session: SessionDep, name: str = NamePath, alias: str = AliasPath, body: AliasSet = Body(...)
) -> AliasOut:
    moved = move_alias(session, name, alias, body.version)
    return alias_out(moved.alias, moved.previous_version)


@router.delete(
    "/{name}/aliases/{alias}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_api_key)],
    responses=errors(401, ALIAS_NOT_FOUND, 422),
    summary="Remove an alias (its version stays registered)",
    description=(
        "Removing `production` leaves the bare model name serving nothing (404 saying how to promote a "
        "version) until a version is promoted again; pinned references (`name@2`) keep serving."
    ),
)
def delete_alias(session: SessionDep, name: str = NamePath, alias: str = AliasPath) -> Response:
    remove_alias(session, name, alias)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/import",
    response_model=ModelVersionOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_api_key)],
    responses=errors(
        400,
        401,
        (409, "a model of that name is registered with another method"),
        422,
        (501, "this gateway was installed without torch (a serving-only install), which importing needs"),
    ),
    summary="Import a published encoder checkpoint (under the data root) as a new model version",
    description=(
        "Loads the checkpoint with strict key matching (format 'st_mem': the official ST-MEM encoder file, "
        "a dict whose 'model' holds 166 tensors for ViT-B/75, or the full masked-autoencoder file, 228 "
        "tensors), exports the encoder to ONNX, checks ONNX Runtime against PyTorch on real ECG windows, "
        "makes and checks the int8 variant, and registers the version. Synchronous: seconds for small "
        "models, up to ~1 min for ViT-B on a small CPU. A file of another layout is refused (422) with the "
        "missing, unexpected or mis-shaped keys."
    ),
)
def import_model(session: SessionDep, body: ModelImportRequest) -> ModelVersionOut:
    try:  # torch (loading the checkpoint, exporting it): loaded on the first import, not with the gateway
        from services.registry.checkpoint_import import import_checkpoint
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        raise HTTPException(
            status.HTTP_501_NOT_IMPLEMENTED,
            "importing a checkpoint needs torch, which this gateway was installed without "
            "(pip install '.[serve]'); install the training dependencies (the Makefile's install) to import",
        ) from exc
    version = import_checkpoint(session, body.format, body.path, body.name)
    return version_out(version)
