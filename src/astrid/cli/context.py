"""What the database commands share: settings, the database and artifact store, progress.

Commands build :class:`~astrid.settings.Settings` (environment and ``.env``, then the
command's own options on top), open the database (creating the SQLite folder and
migrating to the latest schema on first use) and the artifact store, and show the
runner's progress with rich progress bars on standard error (standard output stays
free for tables).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from astrid.errors import AstridError
from astrid.settings import Settings
from astrid.store.artifacts import ArtifactStore, artifact_store_from_url

__all__ = [
    "ARTIFACT_URL_OPTION",
    "DATABASE_URL_OPTION",
    "DATA_DIR_OPTION",
    "Database",
    "DatabaseUnavailable",
    "RichProgress",
    "load_settings",
    "open_database",
]

DATA_DIR_OPTION = typer.Option(
    None,
    "--data-dir",
    help="Folder of the default SQLite database and artifact store "
    "(env ASTRID_DATA_DIR; default ./astrid-data).",
)
DATABASE_URL_OPTION = typer.Option(
    None,
    "--database-url",
    help="Database URL, e.g. postgresql+psycopg://user@host/astrid "
    "(env ASTRID_DATABASE_URL; default sqlite:///<data-dir>/astrid.db).",
)
ARTIFACT_URL_OPTION = typer.Option(
    None,
    "--artifact-url",
    help="Artifact store: a folder or s3://bucket/prefix "
    "(env ASTRID_ARTIFACT_URL; default <data-dir>/artifacts).",
)


class DatabaseUnavailable(AstridError):
    """The database cannot be opened or migrated.

    Parameters
    ----------
    url : str
        The database URL (password hidden).
    reason : str
        What the driver reported.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot open the database {url}: {reason}")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the options that were given (not None) on top."""
    given = {name: value for name, value in overrides.items() if value is not None}
    return Settings(**given)


@dataclass
class Database:
    """An open database and artifact store.

    Attributes
    ----------
    settings : Settings
        The settings used.
    url : str
        Database URL.
    engine : Engine
        The engine (disposed when the :func:`open_database` block ends).
    sessions : sessionmaker
        Session factory.
    store : ArtifactStore
        The artifact store.
    artifact_url : str
        Its URL.
    """

    settings: Settings
    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    artifact_url: str

    @property
    def display_url(self) -> str:
        """The database URL with any password hidden."""
        return make_url(self.url).render_as_string(hide_password=True)


@contextmanager
def open_database(settings: Settings) -> Iterator[Database]:
    """Open (and, if needed, create and migrate) the database and the artifact store.

    Raises
    ------
    DatabaseUnavailable
        If the database cannot be reached or migrated.
    """
    from astrid.pipeline.runner import open_engine
    from astrid.store import migrate
    from astrid.store.db import create_session_factory

    url = settings.resolved_database_url()
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        if migrate.current(url) != migrate.head():
            migrate.upgrade(url)
    except OperationalError as error:
        raise DatabaseUnavailable(shown, str(error.orig).strip().splitlines()[0]) from error
    artifact_url = settings.resolved_artifact_url()
    engine = open_engine(url)
    try:
        yield Database(
            settings=settings,
            url=url,
            engine=engine,
            sessions=create_session_factory(engine),
            store=artifact_store_from_url(artifact_url),
            artifact_url=artifact_url,
        )
    finally:
        engine.dispose()


_PHASE_LABELS = {
    "ingest": "register files",
    "prepare": "calibrate + characterize",
    "reference": "choose references",
    "difference": "subtract + detect + score",
    "associate": "associate into objects",
}


class RichProgress:
    """Progress bars (one per phase) on standard error; a :class:`ProgressReporter`.

    Use as a context manager around a run.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description:<26}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, phase: str, total: int) -> None:
        """Add a bar for ``phase``."""
        label = _PHASE_LABELS.get(phase, phase)
        self._totals[phase] = max(total, 0)
        self._tasks[phase] = self._progress.add_task(label, total=self._totals[phase])

    def advance(self, phase: str, done: int = 1) -> None:
        """Move the bar of ``phase``."""
        if phase in self._tasks:
            self._progress.advance(self._tasks[phase], done)

    def finish(self, phase: str) -> None:
        """Complete the bar of ``phase``."""
        if phase in self._tasks:
            self._progress.update(self._tasks[phase], completed=self._totals[phase])
