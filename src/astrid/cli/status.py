"""``astrid status``: observations per status, runs per stage, and the failures."""

from __future__ import annotations

from pathlib import Path

import typer

from astrid.cli.context import (
    ARTIFACT_URL_OPTION,
    DATA_DIR_OPTION,
    DATABASE_URL_OPTION,
    load_settings,
    open_database,
)
from astrid.cli.errors import friendly_errors

__all__ = ["status"]


@friendly_errors
def status(
    failures: int = typer.Option(
        20, "--failures", min=0, help="Show at most this many failed or rejected observations."
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
    database_url: str | None = DATABASE_URL_OPTION,
    artifact_url: str | None = ARTIFACT_URL_OPTION,
) -> None:
    """Show how far the pipeline has got.

    Observations per status, processing runs per stage (succeeded / failed) with their
    summed time, references, candidates, scores and objects, and the failed or rejected
    observations with their reasons.
    """
    from sqlalchemy import func, select

    from astrid.pipeline.runner import pending_counts
    from astrid.pipeline.stages import STAGES
    from astrid.services.objects import pending_association
    from astrid.services.observations import stage_durations, status_report
    from astrid.store.models import Candidate, ModelScore, ReferenceImage, RunStatus, SkyObject

    settings = load_settings(
        data_dir=data_dir, database_url=database_url, artifact_url=artifact_url
    )
    with open_database(settings) as db, db.sessions() as session:
        report = status_report(session, limit_failures=failures)
        durations = stage_durations(session)
        n_candidates = session.scalar(select(func.count()).select_from(Candidate)) or 0
        n_scores = session.scalar(select(func.count()).select_from(ModelScore)) or 0
        n_objects = session.scalar(select(func.count()).select_from(SkyObject)) or 0
        n_references = session.scalar(select(func.count()).select_from(ReferenceImage)) or 0
        n_unassociated = pending_association(session)
        pending = pending_counts(session)
        shown = db.display_url
        artifacts = db.artifact_url
    typer.echo(f"database     {shown}")
    typer.echo(f"artifacts    {artifacts}")
    typer.echo(f"observations {report.n_observations}")
    for state, count in report.observations.items():
        if count:
            typer.echo(f"  {state.value:<12}{count:>8}")
    if pending["prepare"] or pending["difference"]:
        typer.echo(
            f"pending      {pending['prepare']} to calibrate and characterize, "
            f"{pending['difference']} to subtract and score (run `astrid process`)"
        )
    typer.echo("stages       succeeded   failed   seconds")
    stages = [s for s in STAGES if any(k[0] == s for k in report.runs)]
    stages += sorted({k[0] for k in report.runs} - set(stages))
    for stage in stages:
        ok = report.runs.get((stage, RunStatus.SUCCEEDED), 0)
        bad = report.runs.get((stage, RunStatus.FAILED), 0)
        seconds = durations.get(stage, (0, 0.0))[1]
        typer.echo(f"  {stage:<12}{ok:>10}{bad:>9}{seconds:>10.1f}")
    typer.echo(f"references   {n_references}")
    scored = f"{n_scores} model scores" if n_scores else "no model scores (no model configured)"
    typer.echo(f"candidates   {n_candidates} ({scored}; {n_unassociated} not yet associated)")
    typer.echo(f"objects      {n_objects}")
    if report.failures:
        typer.echo("failed or rejected observations:")
        for f in report.failures:
            typer.echo(f"  {f.observation_id:>6}  {f.status.value:<9} {f.original_name}")
            typer.echo(f"          {f.reason}")
