"""Fixtures of the store tests: real SQLite and PostgreSQL databases, a real S3 server.

PostgreSQL is taken from ``ASTRID_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``); each test session creates its
own databases (``astrid_test_<random>``) there and drops them at the end. If the server
cannot be reached the tests fail, on purpose: CI starts one, and a skipped test would
hide that the PostgreSQL path is untested.

S3 is a moto server on a free loopback port (a real HTTP S3 API, not patched calls).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import URL, Engine, delete, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from astrid.store import migrate
from astrid.store.db import create_engine, create_session_factory
from astrid.store.models import Base

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgresql")
S3_CREDENTIALS: dict[str, Any] = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


def postgres_admin_url() -> URL:
    """URL of the PostgreSQL database the test databases are created from."""
    return make_url(os.environ.get("ASTRID_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[Callable[[], URL]]:
    """Factory of fresh, empty PostgreSQL databases, all dropped after the session."""
    admin_url = postgres_admin_url()
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with admin.connect() as connection:
            connection.execute(text("select 1"))
    except OperationalError as error:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {admin_url.render_as_string()} "
            "(set ASTRID_TEST_POSTGRES_URL to a server where this user may CREATE DATABASE): "
            f"{error.orig}",
            pytrace=False,
        )
    created: list[str] = []

    def make() -> URL:
        name = f"astrid_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return admin_url.set(database=name)

    yield make
    with admin.connect() as connection:
        for name in created:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """A fresh empty database of each backend."""
    if request.param == "sqlite":
        return make_url(f"sqlite:///{tmp_path / 'astrid.db'}")
    make_postgres: Callable[[], URL] = request.getfixturevalue("postgres_database")
    return make_postgres()


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """An engine on a database migrated to head, shared by the tests of one backend."""
    if request.param == "sqlite":
        url = make_url(f"sqlite:///{tmp_path_factory.mktemp('db') / 'astrid.db'}")
    else:
        make_postgres: Callable[[], URL] = request.getfixturevalue("postgres_database")
        url = make_postgres()
    migrate.upgrade(url)
    engine = create_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(migrated_engine: Engine) -> Iterator[Session]:
    """A session on a migrated database; every table is emptied afterwards."""
    factory = create_session_factory(migrated_engine)
    with factory() as active:
        yield active
        active.rollback()
    with migrated_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(delete(table))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the moto server."""
    import boto3

    name = f"astrid-{uuid.uuid4().hex[:12]}"
    client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint, **S3_CREDENTIALS)
    client.create_bucket(Bucket=name)
    return name
