"""The alembic migration runs on PostgreSQL and SQLite and matches the SQLAlchemy models."""

from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from tests.conftest import ROOT, fresh_postgres_url, needs_servers

TABLES = {
    "datasets",
    "jobs",
    "job_metrics",
    "models",
    "model_versions",
    "model_aliases",
    "workers",
    "alembic_version",
}


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    config.attributes["database_url"] = url
    return config


@pytest.fixture(params=[pytest.param("postgresql", marks=needs_servers), "sqlite"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_postgres_url() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'ecgssl.db'}"


def test_migration_upgrade_check_and_downgrade(empty_database: str) -> None:
    config = alembic_config(empty_database)
    command.upgrade(config, "head")
    engine = create_engine(empty_database)
    try:
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) == TABLES
        job_columns = {c["name"] for c in inspector.get_columns("jobs")}
        assert {
            "status",
            "epoch",
            "step",
            "total_steps",
            "last_loss",
            "samples_per_s",
            "eta_s",
            "error",
        } <= job_columns
        version_columns = {c["name"] for c in inspector.get_columns("model_versions")}
        assert {
            "onnx_path",
            "sha256",
            "input_spec",
            "embedding_dim",
            "parity_max_abs_diff",
        } <= version_columns
        command.check(config)  # raises if the models and the migration disagree
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_keeps_rows_written_by_the_first_schema(empty_database: str) -> None:
    """0001 -> head on a database that already holds a dataset and a job: nothing is lost."""
    config = alembic_config(empty_database)
    command.upgrade(config, "0001")
    engine = create_engine(empty_database)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO datasets (name, kind, path, summary, created_at)"
                    " VALUES ('old', 'ptbxl', '/data/old', '{}', CURRENT_TIMESTAMP)"
                )
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            row = conn.execute(text("SELECT name, kind, path, options FROM datasets")).one()
        assert tuple(row[:3]) == ("old", "ptbxl", "/data/old")
        assert row[3] in ({}, "{}")
    finally:
        engine.dispose()


def test_upgrade_gives_each_model_without_production_alias_one_at_its_newest_version(
    empty_database: str,
) -> None:
    """0005 -> head: a bare name served the newest version of a model without 'production', and serves only
    'production' after; the upgrade points it there (a model that had one keeps it)."""
    config = alembic_config(empty_database)
    command.upgrade(config, "0005")
    engine = create_engine(empty_database)
    version = (
        "INSERT INTO model_versions (id, model_id, version, onnx_path, sha256, input_spec, embedding_dim, "
        "parity_max_abs_diff, metrics, created_at) "
        "VALUES (:id, :model, :version, 'x.onnx', 'ab', '{}', 8, 0, '{}', CURRENT_TIMESTAMP)"
    )
    try:
        with engine.begin() as conn:
            for model_id, name in ((1, "unpromoted"), (2, "promoted")):
                conn.execute(
                    text(
                        "INSERT INTO models (id, name, method, created_at) "
                        "VALUES (:id, :name, 'st_mem', CURRENT_TIMESTAMP)"
                    ),
                    {"id": model_id, "name": name},
                )
            for row_id, model_id, number in ((1, 1, 1), (2, 1, 2), (3, 2, 1), (4, 2, 2)):
                conn.execute(text(version), {"id": row_id, "model": model_id, "version": number})
            conn.execute(
                text(
                    "INSERT INTO model_aliases (model_id, name, version_id, created_at, updated_at) "
                    "VALUES (2, 'production', 3, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT model_id, name, version_id FROM model_aliases ORDER BY model_id, name")
            ).all()
        assert [tuple(r) for r in rows] == [(1, "production", 2), (2, "production", 3)]
    finally:
        engine.dispose()
