"""``astrid demo``: simulate a field with transients and run the whole pipeline on it."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from astrid.cli.context import RichProgress, load_settings, open_database
from astrid.cli.errors import friendly_errors

__all__ = ["demo"]


@friendly_errors
def demo(
    output: Path = typer.Option(
        Path("astrid-demo"),
        "--output",
        "-o",
        help="Folder for the images, truth tables, database and artifacts (created if "
        "missing; running again reuses what is there).",
    ),
    size: int = typer.Option(1024, "--size", min=256, max=8192, help="Image side, pixels."),
    epochs: int = typer.Option(6, "--epochs", min=3, max=50, help="Number of epochs."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed of the simulation."),
    workers: int | None = typer.Option(
        None, "--workers", "-w", min=1, help="Worker processes (env ASTRID_WORKERS; default 2)."
    ),
) -> None:
    """Simulate a field observed at several epochs and find what changed.

    The field holds a rising supernova on a galaxy, a variable star and a source that
    appears half-way through. The images are written as FITS to OUTPUT/images, then
    registered and processed exactly as `astrid ingest` and `astrid process` would:
    calibration, quality gate, reference choice, alignment, subtraction, detection and
    measurement, real/bogus scoring (the model shipped in the package, or the one
    ASTRID_REAL_BOGUS_MODEL names) and association into objects, in a
    SQLite database and artifact folder inside OUTPUT. The summary lists what was
    found, which injected transients were recovered (an object within 1 arcsec of the
    true position) and the time spent per stage.
    """
    from sqlalchemy import func, select

    from astrid.events import EventBus
    from astrid.pipeline.demo import recover_transients, simulate_demo_field
    from astrid.pipeline.runner import PipelineRunner
    from astrid.services.observations import ingest_file, stage_durations, status_report
    from astrid.store.models import (
        Candidate,
        ModelScore,
        Observation,
        ReferenceImage,
        SkyObject,
    )

    started = time.perf_counter()
    # The demo always runs on the embedded default, inside OUTPUT.
    settings = load_settings(data_dir=output, workers=workers)
    settings = settings.model_copy(update={"database_url": None, "artifact_url": None})
    config = settings.pipeline_config()
    scorer = settings.scorer()
    typer.echo(f"simulating {epochs} epochs of a {size}x{size} field (seed {seed}) in {output}")
    field = simulate_demo_field(output, size=size, epochs=epochs, seed=seed)

    with open_database(settings) as db:
        t0 = time.perf_counter()
        bus = EventBus()
        with RichProgress() as progress:
            progress.start("ingest", len(field.images))
            results = []
            for path in field.images:
                results.append(
                    ingest_file(
                        db.sessions,
                        db.store,
                        path,
                        events=bus,
                        field_match_fraction=config.field_match_fraction,
                    )
                )
                progress.advance("ingest")
            progress.finish("ingest")
            ingest_seconds = time.perf_counter() - t0
            runner = PipelineRunner(
                db.url,
                db.artifact_url,
                config=config,
                workers=settings.workers,
                scorer=scorer,
                events=bus,
                progress=progress,
            )
            summary = runner.run()

        with db.sessions() as session:
            report = status_report(session)
            durations = stage_durations(session)
            n_candidates = session.scalar(select(func.count()).select_from(Candidate)) or 0
            n_negative = (
                session.scalar(
                    select(func.count()).select_from(Candidate).where(Candidate.is_negative)
                )
                or 0
            )
            n_objects = session.scalar(select(func.count()).select_from(SkyObject)) or 0
            multi = (
                session.scalar(
                    select(func.count()).select_from(SkyObject).where(SkyObject.n_detections > 1)
                )
                or 0
            )
            reference = session.scalars(select(ReferenceImage).order_by(ReferenceImage.id)).first()
            reference_obs = None
            if reference is not None:
                reference_obs = session.scalars(
                    select(Observation).where(
                        Observation.calibrated_artifact_key == reference.artifact_key
                    )
                ).first()
            reference_mjd = (
                reference_obs.mjd
                if reference_obs is not None and reference_obs.mjd is not None
                else field.mjds[0]
            )
            model = None if scorer is None else (scorer.model_name, scorer.model_version)
            recoveries = recover_transients(
                session, field, reference_mjd=reference_mjd, radius_arcsec=1.0, model=model
            )
            all_scores = (
                []
                if model is None
                else list(
                    session.scalars(
                        select(ModelScore.score).where(
                            ModelScore.model_name == model[0], ModelScore.model_version == model[1]
                        )
                    )
                )
            )
        shown = db.display_url
        artifacts = db.artifact_url
    total = time.perf_counter() - started

    new = sum(r.is_new for r in results)
    typer.echo("")
    typer.echo(f"images        {len(field.images)} FITS files in {output / 'images'}")
    typer.echo(f"database      {shown}")
    typer.echo(f"artifacts     {artifacts}")
    typer.echo(
        f"observations  {report.n_observations} ({new} new this run): "
        + ", ".join(f"{n} {s.value}" for s, n in report.observations.items() if n)
    )
    if reference_obs is not None:
        typer.echo(
            f"reference     {Path(reference_obs.original_name or '').name} "
            f"(seeing {reference_obs.seeing_fwhm_arcsec or float('nan'):.2f} arcsec, "
            f"limiting mag {reference_obs.limiting_magnitude or float('nan'):.2f})"
        )
    typer.echo(
        f"candidates    {n_candidates} ({n_candidates - n_negative} brighter, {n_negative} "
        "fainter than the reference)"
    )
    if scorer is None:
        typer.echo("real/bogus    none (no model configured: candidates are not scored)")
    else:
        transient_scores = [v for r in recoveries for v in r.scores]
        n_other = len(all_scores) - len(transient_scores)
        other_real = sum(v >= 0.5 for v in all_scores) - sum(v >= 0.5 for v in transient_scores)
        typer.echo(
            f"real/bogus    {len(all_scores)} candidates scored by {scorer.model_name} version "
            f"{scorer.model_version}: {sum(v >= 0.5 for v in transient_scores)} of "
            f"{len(transient_scores)} detections of injected transients score >= 0.5, "
            f"{other_real} of the other {n_other}"
        )
    typer.echo(f"objects       {n_objects} ({multi} detected at more than one epoch)")
    for f in report.failures:
        typer.echo(f"failed        observation {f.observation_id}: {f.reason}")

    found = sum(r.recovered for r in recoveries)
    typer.echo("")
    typer.echo(
        f"injected transients recovered: {found} of {len(recoveries)} (object within 1 arcsec)"
    )
    typer.echo(
        f"  {'transient':<18}{'ra':>11}{'dec':>10}  {'object':>6}{'offset':>8}"
        f"{'detections':>12}  difference magnitudes (brighter), in time order; real/bogus"
    )
    for r in recoveries:
        if r.recovered:
            mags = " ".join(f"{m:.2f}" for m in r.magnitudes) or "-"
            scores = " ".join(f"{v:.2f}" for v in r.scores)
            typer.echo(
                f"  {r.label:<18}{r.spec.ra:>11.5f}{r.spec.dec:>10.5f}  {r.object_id:>6}"
                f'{r.separation_arcsec or 0.0:>7.2f}"'
                f"{f'{r.n_detections} of {r.n_changed_epochs}':>12}  {mags}"
                + (f"; {scores}" if scores else "")
            )
        else:
            typer.echo(
                f"  {r.label:<18}{r.spec.ra:>11.5f}{r.spec.dec:>10.5f}  {'-':>6}{'-':>8}"
                f"{f'0 of {r.n_changed_epochs}':>12}  not recovered"
            )

    typer.echo("")
    typer.echo(
        f"time per stage (seconds summed over {settings.workers} worker process(es); "
        "all runs in this database)"
    )
    typer.echo(f"  {'stage':<13}{'runs':>6}{'seconds':>9}{'share':>8}")
    from astrid.pipeline.stages import STAGES

    stage_total = sum(seconds for _, seconds in durations.values()) or 1.0
    for stage in STAGES:
        if stage in durations:
            n, seconds = durations[stage]
            typer.echo(f"  {stage:<13}{n:>6}{seconds:>9.1f}{seconds / stage_total:>8.0%}")
    typer.echo(
        f"wall time     {total:.1f} s (simulation {field.seconds:.1f} s, ingest "
        f"{ingest_seconds:.1f} s, pipeline {summary.wall_seconds:.1f} s)"
    )
    if recoveries and recoveries[0].recovered:
        r = recoveries[0]
        typer.echo("")
        typer.echo("explore:")
        typer.echo(
            f"  ASTRID_DATA_DIR={output} astrid candidates --ra {r.spec.ra:.5f} "
            f"--dec {r.spec.dec:.5f} --radius 2"
        )
        typer.echo(f"  ASTRID_DATA_DIR={output} astrid status")
