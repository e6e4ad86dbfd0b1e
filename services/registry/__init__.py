"""Model registry: the rows of models, versions (with their ONNX variants) and aliases, and resolving what a
request names. It reads and writes rows only: ``publish`` makes and checks the files a version is
registered with, ``checkpoint_import`` and ``shipped`` bring in models from outside.

What a reference serves changes only when someone moves an alias (``PUT /models/{name}/aliases/{alias}``):

- ``name@version`` is pinned; ``name@alias`` (e.g. ``name@production``) serves the version it points at;
- ``name`` serves its ``production`` alias, never "the newest version": the first version registered under a
  name gets ``production``, later versions serve under the bare name only once promoted; a model whose
  ``production`` alias was removed is refused (404 saying how to promote one);
- nothing: the ``default_model`` setting (any of the above), else the ``production`` alias of the shipped
  model (``services.registry.shipped``, registered on first start), else of the first model registered.
"""

import logging
import re
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.config import get_settings
from services.db.models import Model, ModelAlias, ModelVersion
from services.db.session import conflict_insert
from services.errors import ClientError, NotFoundError
from services.registry.shipped import shipped_model_name

log = logging.getLogger(__name__)

PRODUCTION = "production"  # the alias a bare model name (and the default model) serves
NAME_PATTERN = r"[A-Za-z0-9_.\-]{1,100}"
ALIAS_PATTERN = r"[a-z][a-z0-9_\-]{0,63}"
RESERVED_ALIASES = frozenset({"latest"})  # would read as "the newest version", which nothing serves by itself
_REF = re.compile(rf"^(?P<name>{NAME_PATTERN})(?:@(?P<selector>.*))?$")
_ALIAS = re.compile(rf"^{ALIAS_PATTERN}$")
_NAME = re.compile(rf"{NAME_PATTERN}\Z")
_VERSION = re.compile(r"[0-9]{1,64}\Z")  # as long as an alias may be; int() of it is cheap


def register_model_version(
    session: Session,
    *,
    name: str,
    method: str,
    source_job_id: uuid.UUID | None,
    onnx_path: str,
    sha256: str,
    input_spec: dict,
    embedding_dim: int,
    parity_max_abs_diff: float,
    metrics: dict,
    variants: dict,
    clinical_normaliser: dict | None = None,
    head: dict | None = None,
    knn_reference: dict | None = None,
) -> ModelVersion:
    """Add the next version of model ``name`` (created on first use), its files already checked
    (``services.registry.publish``); the first version of a model gets its ``production`` alias, later ones
    none (what the bare name serves moves only by promotion). ``variants``: its ONNX variants and their
    checks; ``head``: a diagnosis model's classes and thresholds; ``knn_reference``: its stored kNN reference
    set.
    """
    model = _locked_model(session, name, method)
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id))
    version = ModelVersion(
        model=model,
        version=(latest or 0) + 1,
        source_job_id=source_job_id,
        onnx_path=onnx_path,
        sha256=sha256,
        input_spec=input_spec,
        embedding_dim=embedding_dim,
        parity_max_abs_diff=parity_max_abs_diff,
        metrics=metrics,
        clinical_normaliser=clinical_normaliser,
        variants=variants,
        head=head,
        knn_reference=knn_reference,
    )
    session.add(version)
    session.flush()
    if version.version == 1:
        set_alias(session, name, PRODUCTION, 1)
    return version


def _locked_model(session: Session, name: str, method: str) -> Model:
    """Model ``name``'s row (created on first use), locked until the transaction ends: registrations of one
    name by two jobs at once take their version numbers one after the other. Insert-if-absent, then lock: in
    PostgreSQL the second waits for the first's commit, then reads its version; SQLite lets one writer in."""
    insert = conflict_insert(session)
    if insert is not None:
        statement = insert(Model).values(name=name, method=method)
        session.execute(statement.on_conflict_do_nothing(index_elements=["name"]))
    model = session.scalar(
        select(Model).where(Model.name == name).with_for_update().execution_options(populate_existing=True)
    )
    if model is None:  # another database: the plain ORM insert
        model = Model(name=name, method=method)
        session.add(model)
        session.flush()
    return model


# --------------------------------------------------------------------------------------------------
# look-ups


def get_model(session: Session, name: str) -> Model:
    # a name that cannot be registered is not looked up (PostgreSQL refuses a NUL in a query: a 500)
    model = session.scalar(select(Model).where(Model.name == name)) if _NAME.match(name) else None
    if model is None:
        raise NotFoundError(f"model '{name}' is not registered (GET /models lists the models)")
    return model


def _versions_text(model: Model) -> str:
    return ", ".join(str(v.version) for v in model.versions) or "none yet"


def get_version(session: Session, name: str, number: int) -> ModelVersion:
    model = get_model(session, name)
    for candidate in model.versions:
        if candidate.version == number:
            return candidate
    raise NotFoundError(f"model '{name}' has no version {number} (its versions: {_versions_text(model)})")


@dataclass(frozen=True)
class Resolution:
    """The version a reference names; ``moving`` names the reference when it can move to another version
    (an alias, a bare name, the default), None when it is pinned (``name@3``)."""

    version: ModelVersion
    moving: str | None


def default_model_name(session: Session) -> str:
    """The model a request naming none serves when the ``default_model`` setting is unset: the shipped model
    where it is registered, else the first model registered (so registering another never changes it)."""
    shipped = shipped_model_name()
    if shipped is not None and session.scalar(select(Model.id).where(Model.name == shipped)) is not None:
        return shipped
    first = session.scalar(select(Model.name).order_by(Model.created_at, Model.id))
    if first is None:
        raise NotFoundError("no model is registered yet: run a pretraining job first (POST /jobs/pretrain)")
    return first


def resolve_reference(session: Session, ref: str | None) -> Resolution:
    """``name@version``, ``name@alias``, ``name`` (its production alias) or None: the ``default_model``
    setting, else ``default_model_name`` as ``name``."""
    if not ref:
        default = get_settings().default_model or default_model_name(session)
        resolution = resolve_reference(session, default)
        return Resolution(resolution.version, resolution.moving and f"default:{resolution.moving}")
    match = _REF.match(ref)
    if match is None or match["selector"] == "":
        raise ClientError(
            f"model reference '{ref}' is not valid: expected 'name', 'name@version' (e.g. st_mem-tiny@2) or "
            "'name@alias' (e.g. st_mem-tiny@production); a name has 1-100 letters, digits, '.', '_' or '-'"
        )
    name, selector = match["name"], match["selector"]
    model = get_model(session, name)
    if selector is None:
        alias = _alias_of(model, PRODUCTION)
        if alias is None:
            raise NotFoundError(
                f"model '{name}' has no '{PRODUCTION}' alias, so its bare name serves no version: name one "
                f"({name}@1; its versions: {_versions_text(model)}) or promote one (PUT "
                f'/models/{name}/aliases/{PRODUCTION} with {{"version": N}})'
            )
        return Resolution(alias.version, name)
    if _VERSION.match(selector):  # ASCII digits only: '²'.isdigit() is True but int('²') fails
        return Resolution(get_version(session, name, int(selector)), None)
    alias = _alias_of(model, selector)
    if alias is None:
        aliases = ", ".join(a.name for a in model.aliases) or "none"
        raise ClientError(
            f"model reference '{ref}': '{selector}' is neither a version nor an alias of model '{name}'; the "
            f"version after '@' must be a number, e.g. {name}@1, or an alias (its aliases: {aliases})"
        )
    return Resolution(alias.version, f"{name}@{selector}")


def resolve_model_version(session: Session, ref: str | None) -> ModelVersion:
    """The version ``ref`` names (see ``resolve_reference``)."""
    return resolve_reference(session, ref).version


# --------------------------------------------------------------------------------------------------
# aliases


def _alias_of(model: Model, alias: str) -> ModelAlias | None:
    return next((a for a in model.aliases if a.name == alias), None)


def check_alias_name(alias: str) -> str:
    if not _ALIAS.match(alias):
        raise ClientError(
            f"alias '{alias}' is not valid: 1-64 lower-case letters, digits, '_' or '-', starting with a "
            "letter (e.g. production, staging)"
        )
    if alias in RESERVED_ALIASES:
        raise ClientError(
            f"alias '{alias}' is reserved: nothing serves 'the newest version' by itself; name the version "
            "(name@3) or point an alias such as 'staging' at it"
        )
    return alias


def get_alias(session: Session, name: str, alias: str) -> ModelAlias:
    model = get_model(session, name)
    found = _alias_of(model, check_alias_name(alias))
    if found is None:
        aliases = ", ".join(a.name for a in model.aliases) or "none"
        raise NotFoundError(f"model '{name}' has no alias '{alias}' (its aliases: {aliases})")
    return found


def set_alias(session: Session, name: str, alias: str, number: int) -> tuple[ModelAlias, int | None]:
    """Point ``name@alias`` at version ``number`` (created or moved); returns it and the version id it
    pointed at before (None if new)."""
    check_alias_name(alias)
    model = get_model(session, name)
    target = next((v for v in model.versions if v.version == number), None)
    if target is None:
        raise ClientError(
            f"model '{name}' has no version {number} to point alias '{alias}' at (its versions: "
            f"{_versions_text(model)})"
        )
    # Insert-if-absent, then lock the row and move it: two requests creating the same alias at once do not
    # hit the unique constraint (the second waits for the first in PostgreSQL, then moves its alias).
    insert = conflict_insert(session)
    created = False
    if insert is not None:
        statement = insert(ModelAlias).values(model_id=model.id, name=alias, version_id=target.id)
        statement = statement.on_conflict_do_nothing(index_elements=["model_id", "name"])
        created = session.execute(statement.returning(ModelAlias.id)).first() is not None
    found = session.scalar(
        select(ModelAlias)
        .where(ModelAlias.model_id == model.id, ModelAlias.name == alias)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    previous = None
    if found is None:  # another database: the plain ORM insert
        found = ModelAlias(model=model, name=alias, version=target)
        session.add(found)
    elif not created:
        previous = found.version_id
        found.version = target
    session.flush()
    session.expire(model, ["aliases"])  # the collection may predate the insert
    log.info("alias %s@%s -> version %d", name, alias, number)
    return found, previous


def delete_alias(session: Session, name: str, alias: str) -> int:
    """Remove ``name@alias``; returns the version id it pointed at."""
    found = get_alias(session, name, alias)
    version_id = found.version_id
    found.model.aliases.remove(found)
    session.flush()
    return version_id


def aliases_pointing_at(session: Session, version_id: int) -> list[str]:
    return list(session.scalars(select(ModelAlias.name).where(ModelAlias.version_id == version_id)))


def list_models(session: Session) -> list[Model]:
    """Every registered model, by name."""
    return list(session.scalars(select(Model).order_by(Model.name)))


def version_by_id(session: Session, version_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, version_id)
