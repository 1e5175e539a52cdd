"""Migrations build exactly the schema of the models, and remove it, on both engines."""

from __future__ import annotations

import pytest
from sqlalchemy import URL, inspect

from astrid.store import migrate
from astrid.store.db import create_engine
from astrid.store.models import Base

MODEL_TABLES = set(Base.metadata.tables)


def _tables(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_matches_models_and_downgrade_removes_everything(empty_database: URL) -> None:
    assert migrate.current(empty_database) is None

    migrate.upgrade(empty_database)
    assert migrate.current(empty_database) == migrate.head()
    assert _tables(empty_database) == MODEL_TABLES | {"alembic_version"}
    # What `alembic check` tests: autogenerate finds nothing to change.
    assert migrate.compare(empty_database) == []

    migrate.upgrade(empty_database)  # already at head: nothing to do
    assert migrate.current(empty_database) == migrate.head()

    migrate.downgrade(empty_database, "base")
    assert migrate.current(empty_database) is None
    assert _tables(empty_database) - {"alembic_version"} == set()


def test_upgrade_accepts_an_engine(tmp_path: pytest.TempPathFactory) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/engine.db")
    try:
        migrate.upgrade(engine)
        assert migrate.current(engine) == migrate.head()
        assert MODEL_TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            # The migration switched foreign keys off only while it ran.
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        engine.dispose()


def test_unmigrated_database_differs_from_models(tmp_path: pytest.TempPathFactory) -> None:
    diffs = migrate.compare(f"sqlite:///{tmp_path}/empty.db")
    added = {diff[1].name for diff in diffs if diff[0] == "add_table"}
    assert added == MODEL_TABLES


def test_migration_scripts_ship_inside_the_package() -> None:
    assert (migrate.MIGRATIONS_DIR / "env.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "script.py.mako").is_file()
    assert migrate.head() == "0001"
