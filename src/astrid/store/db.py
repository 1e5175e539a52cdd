"""Engine and session factory from a database URL.

A SQLite file is the default (``sqlite:///astrid.db``, relative to the working
directory; ``sqlite:////abs/path/astrid.db`` for an absolute path). PostgreSQL is
selected by URL (``postgresql+psycopg://user@host:5432/astrid``, driver psycopg 3).
Nothing is created at import time: entry points call :func:`create_engine` once at
start-up and pass the engine or a session factory on. Create engines after forking
worker processes (or call ``engine.dispose(close=False)`` in the child).

On SQLite every connection gets ``PRAGMA foreign_keys=ON`` (SQLite ignores foreign keys
otherwise, so ``ON DELETE`` rules would silently not apply), ``journal_mode=WAL`` (readers
do not block the writer) and ``synchronous=NORMAL``; and transactions are begun by
SQLAlchemy rather than by the ``sqlite3`` module, so that ``SAVEPOINT``
(``session.begin_nested()``) and transactional DDL behave as on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy
from sqlalchemy import URL, Connection, Engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "DEFAULT_DATABASE_URL",
    "create_engine",
    "create_session_factory",
    "session_scope",
]

#: Database used when no URL is configured: a SQLite file in the working directory.
DEFAULT_DATABASE_URL = "sqlite:///astrid.db"


def create_engine(
    url: str | URL = DEFAULT_DATABASE_URL,
    *,
    echo: bool = False,
    sqlite_foreign_keys: bool = True,
    **engine_options: Any,
) -> Engine:
    """Create an engine for ``url`` with AstrID's connection settings.

    Parameters
    ----------
    url : str or sqlalchemy.URL
        Database URL: ``sqlite:///path.db`` (default ``sqlite:///astrid.db``),
        ``sqlite://`` (in memory), or ``postgresql+psycopg://user:pass@host:port/db``.
    echo : bool
        Log every SQL statement (debugging).
    sqlite_foreign_keys : bool
        Enforce foreign keys on SQLite connections. Only migrations turn this off (table
        rebuilds in batch mode must not cascade).
    **engine_options
        Passed to :func:`sqlalchemy.create_engine` (``pool_size``, ``poolclass``, ...).

    Returns
    -------
    sqlalchemy.Engine
        A new engine; the caller owns it and should ``dispose()`` it when done.
    """
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        engine = sqlalchemy.create_engine(url, echo=echo, **engine_options)
        _configure_sqlite(engine, foreign_keys=sqlite_foreign_keys)
        return engine
    engine_options.setdefault("pool_pre_ping", True)
    return sqlalchemy.create_engine(url, echo=echo, **engine_options)


def _configure_sqlite(engine: Engine, *, foreign_keys: bool) -> None:
    """Install the connection pragmas and explicit ``BEGIN`` on a SQLite engine."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Stop the sqlite3 module from issuing BEGIN/COMMIT on its own; SQLAlchemy's
        # "begin" event below emits BEGIN, so SAVEPOINT and DDL are transactional.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``.

    Sessions keep loaded attribute values after commit (``expire_on_commit=False``), so
    objects can be returned from a :func:`session_scope` block and read afterwards.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session] | Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises.

    Parameters
    ----------
    factory : sessionmaker or sqlalchemy.Engine
        Where sessions come from; an engine is wrapped with
        :func:`create_session_factory`.

    Yields
    ------
    sqlalchemy.orm.Session
        The session; it is closed when the block exits.

    Examples
    --------
    >>> engine = create_engine("sqlite://")
    >>> with session_scope(engine) as session:
    ...     _ = session.execute(sqlalchemy.text("select 1")).scalar_one()
    """
    make_session = create_session_factory(factory) if isinstance(factory, Engine) else factory
    session = make_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
