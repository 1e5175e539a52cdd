"""Alembic environment: migrates a database to the schema of :mod:`astrid.store.models`.

Run through :mod:`astrid.store.migrate`, which puts either an open ``connection`` or a
database ``url`` into ``config.attributes``. The ``alembic`` command line also works with
a configuration whose ``script_location`` points here and whose ``sqlalchemy.url`` is
set.

SQLite cannot alter most table properties, so every operation is rendered in batch mode
(copy the table, drop the old one, rename). Foreign keys are switched off on that
connection while migrating (a table rebuild would otherwise cascade deletes into its
children) and checked with ``PRAGMA foreign_key_check`` before the transaction commits.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import JSON, Connection, make_url
from sqlalchemy.pool import NullPool

from astrid.store.db import create_engine
from astrid.store.models import Base
from astrid.store.types import UtcDateTime

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Render AstrID's own column types as plain SQLAlchemy types.

    Migration scripts must not import application code, which changes over time; a
    :class:`UtcDateTime` is a ``DateTime(timezone=True)`` in the database, and the JSON
    type is ``JSON`` with a ``JSONB`` variant on PostgreSQL.
    """
    if type_ != "type":
        return False
    if isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(obj, JSON) and "postgresql" in getattr(obj, "_variant_mapping", {}):
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.JSON().with_variant(postgresql.JSONB(), "postgresql")'
    return False


def _configure_options() -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "render_as_batch": True,
        "compare_type": True,
        "render_item": render_item,
    }


def run_migrations_offline() -> None:
    """Write the migration SQL instead of running it (``alembic upgrade --sql``)."""
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    context.configure(
        url=make_url(url) if url is not None else None,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_configure_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    if not is_sqlite:
        context.configure(connection=connection, **_configure_options())
        with context.begin_transaction():
            context.run_migrations()
        return

    if connection.in_transaction():
        raise RuntimeError("migrate SQLite on a connection with no transaction begun")
    driver_connection: Any = connection.connection.driver_connection
    foreign_keys_were_on = bool(driver_connection.execute("PRAGMA foreign_keys").fetchone()[0])
    # Only outside a transaction does SQLite accept this pragma.
    driver_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        # astrid.store.db engines make SQLite DDL transactional: one transaction for the
        # whole upgrade, so a failed migration leaves the database as it was.
        context.configure(connection=connection, transactional_ddl=True, **_configure_options())
        with context.begin_transaction():
            context.run_migrations()
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left foreign-key violations: {broken[:10]}")
    finally:
        if connection.in_transaction():
            connection.rollback()
        if foreign_keys_were_on:
            driver_connection.execute("PRAGMA foreign_keys=ON")


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on a new engine for the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("no database: set config.attributes['url'] or sqlalchemy.url")
    engine = create_engine(url, sqlite_foreign_keys=False, poolclass=NullPool)
    try:
        with engine.connect() as new_connection:
            _run_on(new_connection)
            new_connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
