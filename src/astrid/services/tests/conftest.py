"""Databases for the service tests: a SQLite file and a fresh PostgreSQL database.

PostgreSQL comes from the store tests' factory (``ASTRID_TEST_POSTGRES_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``); an unreachable server fails the
tests rather than skipping them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, make_url

from astrid.store import migrate
from astrid.store.db import create_engine
from astrid.store.tests.conftest import postgres_database

__all__ = ["engine", "postgres_database"]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a new database migrated to the latest schema, of each backend."""
    if request.param == "sqlite":
        url: URL = make_url(f"sqlite:///{tmp_path / 'astrid.db'}")
    else:
        make: Callable[[], URL] = request.getfixturevalue("postgres_database")
        url = make()
    migrate.upgrade(url)
    created = create_engine(url)
    yield created
    created.dispose()
