"""``astrid ingest``: register FITS files as observations (each file's content once)."""

from __future__ import annotations

from pathlib import Path

import typer

from astrid.cli.context import (
    ARTIFACT_URL_OPTION,
    DATA_DIR_OPTION,
    DATABASE_URL_OPTION,
    RichProgress,
    load_settings,
    open_database,
)
from astrid.cli.errors import friendly_errors

__all__ = ["ingest"]


@friendly_errors
def ingest(
    paths: list[Path] = typer.Argument(
        ...,
        help="FITS files, or folders searched recursively for *.fits, *.fit, *.fts, "
        "*.fits.gz, *.fits.fz.",
    ),
    survey: str = typer.Option(
        "local", "--survey", help="Survey the observations belong to (created if new)."
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
    database_url: str | None = DATABASE_URL_OPTION,
    artifact_url: str | None = ARTIFACT_URL_OPTION,
) -> None:
    """Register FITS files as observations, ready for `astrid process`.

    Each file is hashed (SHA-256): a file whose content is already registered, under
    any name, is reported as known and not added again. New files are copied into the
    artifact store and recorded with their header metadata (time, band, exposure,
    zero point, image centre) and the field they belong to. Only headers are read here;
    a file whose headers cannot be read is registered as failed, with the reason.
    """
    from astrid.events import EventBus
    from astrid.services.observations import find_fits_files, ingest_file

    try:
        files = find_fits_files(paths)
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error), param_hint="PATHS") from error
    if not files:
        raise typer.BadParameter("no FITS files found", param_hint="PATHS")
    settings = load_settings(
        data_dir=data_dir, database_url=database_url, artifact_url=artifact_url
    )
    results = []
    bus = EventBus()
    with open_database(settings) as db, RichProgress() as progress:
        progress.start("ingest", len(files))
        for path in files:
            results.append(
                ingest_file(
                    db.sessions,
                    db.store,
                    path,
                    events=bus,
                    survey_name=survey,
                )
            )
            progress.advance("ingest")
        progress.finish("ingest")
        shown = db.display_url
    new = [r for r in results if r.is_new and r.failure_reason is None]
    failed = [r for r in results if r.is_new and r.failure_reason is not None]
    known = [r for r in results if not r.is_new]
    typer.echo(
        f"{len(new)} new, {len(known)} already known, {len(failed)} unreadable "
        f"({len(results)} files) in {shown}"
    )
    for r in known:
        typer.echo(f"  known      {r.path}  (observation {r.observation_id})")
    for r in failed:
        typer.echo(f"  failed     {r.path}  {r.failure_reason}")
