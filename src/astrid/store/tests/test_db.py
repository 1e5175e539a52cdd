"""Engine settings and the session scope."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from astrid.store import migrate
from astrid.store.db import create_engine, create_session_factory, session_scope
from astrid.store.models import Survey


def test_sqlite_connections_enforce_foreign_keys_and_use_wal(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
    finally:
        engine.dispose()


def test_session_scope_commits_or_rolls_back(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        migrate.upgrade(engine)
        factory = create_session_factory(engine)
        with session_scope(factory) as session:
            survey = Survey(name="ztf")
            session.add(survey)
        # Committed, and still readable after the session closed.
        assert survey.id is not None and survey.name == "ztf"

        with pytest.raises(RuntimeError), session_scope(engine) as session:
            session.add(Survey(name="decam"))
            session.flush()
            raise RuntimeError("stage failed")

        with session_scope(engine) as session:
            names = session.scalars(select(Survey.name)).all()
            assert names == ["ztf"]
            assert session.scalar(select(func.count()).select_from(Survey)) == 1
    finally:
        engine.dispose()
