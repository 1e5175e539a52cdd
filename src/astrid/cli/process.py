"""``astrid process``: run every pending pipeline stage, resumably, in parallel."""

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

__all__ = ["print_run_summary", "process"]


def print_run_summary(summary: object) -> None:
    """Print a :class:`~astrid.pipeline.runner.RunSummary` as a few lines and a table."""
    from astrid.pipeline.runner import RunSummary

    assert isinstance(summary, RunSummary)
    typer.echo(
        f"processed {summary.n_processed}, failed {summary.n_failed}, "
        f"rejected {summary.n_rejected}; {summary.n_candidates} new candidates"
    )
    if summary.association is not None:
        a = summary.association
        typer.echo(
            f"associated {a.n_candidates} candidates: {a.n_new_objects} new objects, "
            f"{a.n_updated_objects} objects with new detections"
        )
    for reference in summary.references:
        typer.echo(
            f"reference for field {reference.field_id} band {reference.band}: "
            f"observation {reference.observation_id}"
        )
    rows = summary.stage_table()
    if rows:
        typer.echo(f"time per stage, summed over {summary.workers} worker process(es):")
        typer.echo(f"  {'stage':<13}{'seconds':>9}{'share':>8}")
        for stage, seconds, share in rows:
            typer.echo(f"  {stage:<13}{seconds:>9.1f}{share:>8.0%}")
    typer.echo(f"wall time {summary.wall_seconds:.1f} s")


@friendly_errors
def process(
    workers: int | None = typer.Option(
        None, "--workers", "-w", min=1, help="Worker processes (env ASTRID_WORKERS; default 2)."
    ),
    retry_failed: bool = typer.Option(
        False,
        "--retry-failed",
        help="First make failed observations pending again from the stage that failed "
        "(after fixing what failed them); rejected ones stay rejected.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Real/bogus model: packaged (shipped in the package), champion or challenger "
        "(registry aliases), a bundle folder, or none (env ASTRID_REAL_BOGUS_MODEL; "
        "default packaged). Running again with another model scores the processed "
        "observations with it too (shadow scoring): every score names its model.",
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
    database_url: str | None = DATABASE_URL_OPTION,
    artifact_url: str | None = ARTIFACT_URL_OPTION,
) -> None:
    """Run every pending stage of every registered observation.

    Calibrate and characterise (quality gate), choose a reference per field and band,
    align, subtract, detect and measure candidates, score them with the real/bogus
    model, and associate them into objects. Every stage is recorded as it completes, so
    an interrupted run resumes where it stopped when started again; a failed observation
    is recorded with its reason and the others go on.
    """
    from astrid.events import EventBus
    from astrid.pipeline.runner import PipelineRunner

    settings = load_settings(
        data_dir=data_dir,
        database_url=database_url,
        artifact_url=artifact_url,
        workers=workers,
        real_bogus_model=model,
    )
    scorer = settings.scorer()
    if scorer is not None:
        typer.echo(f"scoring with {scorer.model_name} version {scorer.model_version}")
    with open_database(settings) as db:
        if retry_failed:
            from astrid.services.observations import reset_failed

            with db.sessions() as session, session.begin():
                retried = reset_failed(session)
            typer.echo(f"retrying {len(retried)} failed observation(s)")
        runner = PipelineRunner(
            db.url,
            db.artifact_url,
            config=settings.pipeline_config(),
            workers=settings.workers,
            scorer=scorer,
            events=EventBus(),
        )
        with RichProgress() as progress:
            runner.progress = progress
            summary = runner.run()
    print_run_summary(summary)
