"""every model gets a 'production' alias (at its newest version where it had none)

A bare model name now serves its ``production`` alias only (no longer its newest version when it has none),
so each model without one gets it at the version its bare name served before this upgrade: what every
reference serves is unchanged by the upgrade, and from then on moves only by promotion.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 21:00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

versions = sa.table(
    "model_versions",
    sa.column("id", sa.Integer),
    sa.column("model_id", sa.Integer),
    sa.column("version", sa.Integer),
)
aliases = sa.table(
    "model_aliases",
    sa.column("model_id", sa.Integer),
    sa.column("name", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    bind = op.get_bind()
    with_production = sa.select(aliases.c.model_id).where(aliases.c.name == "production")
    newest = (
        sa.select(versions.c.model_id, sa.func.max(versions.c.version).label("version"))
        .where(versions.c.model_id.not_in(with_production))
        .group_by(versions.c.model_id)
        .subquery()
    )
    rows = bind.execute(
        sa.select(versions.c.model_id, versions.c.id).join(
            newest, (versions.c.model_id == newest.c.model_id) & (versions.c.version == newest.c.version)
        )
    ).all()
    now = datetime.now(UTC)
    for model_id, version_id in rows:
        bind.execute(
            aliases.insert().values(
                model_id=model_id, name="production", version_id=version_id, created_at=now, updated_at=now
            )
        )


def downgrade() -> None:
    """Nothing to undo: a 'production' alias is a valid alias at every revision."""
