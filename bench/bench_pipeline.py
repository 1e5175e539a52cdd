"""Benchmark: throughput of the whole pipeline, FITS files in, scored candidates stored.

Usage::

    python bench/bench_pipeline.py prepare bench/out/pipeline2k --n 8 --size 2048
    python bench/bench_pipeline.py run bench/out/pipeline2k --backend sqlite --workers 2
    python bench/bench_pipeline.py run bench/out/pipeline2k --backend postgresql \\
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test

``prepare`` simulates one field at ``n + 1`` epochs (1000 stars and 300 galaxies per
1024x1024 pixels, cosmic rays, a few transients) and writes them as FITS: the first,
sharp and deep, is the reference; the other ``n`` are the observations timed.

``run`` measures the steady state of a survey, in which a field's reference already
exists and new epochs arrive: on a fresh database (a SQLite file, or a new PostgreSQL
database created from ``--postgres-url`` and dropped afterwards) it first registers and
processes the reference epoch alone (not timed), then times registering the ``n`` new
files and running every stage on them (calibrate, characterize, align, subtract,
detect and measure, score with the shipped real/bogus model unless ``--model none``,
associate) with ``--workers`` processes. It prints the
observations per hour and per day, and the time of each stage summed over the worker
processes with its share of the total.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import uuid
from collections.abc import Callable
from pathlib import Path


def prepare(folder: Path, n: int, size: int, seed: int) -> None:
    from astrid.io.fits import write_exposure
    from astrid.science.simulate import FieldConfig, random_conditions, simulate_survey

    area = (size / 1024.0) ** 2
    config = FieldConfig(
        shape=(size, size), n_stars=round(1000 * area), n_galaxies=round(300 * area)
    )
    conditions = random_conditions(n + 1, seed=seed, fwhm_range=(1.0, 1.8))
    # The reference: sharper and deeper than every later epoch.
    first = conditions[0]
    conditions[0] = type(first)(
        fwhm=0.85, exposure_time=120.0, sky_brightness=first.sky_brightness, mjd=first.mjd
    )
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    survey = simulate_survey(config, seed=seed, conditions=conditions, n_transients=4)
    for k, exposure in enumerate(survey.exposures):
        name = "reference.fits" if k == 0 else f"epoch_{k:03d}.fits"
        write_exposure(exposure, folder / name, overwrite=True)
    print(
        f"wrote {n + 1} epochs of {size}x{size} to {folder} in {time.perf_counter() - start:.0f} s"
    )


def _database_url(backend: str, folder: Path, postgres_url: str) -> tuple[str, Callable[[], None]]:
    """A fresh database URL and a clean-up callable."""
    from sqlalchemy import make_url, text

    from astrid.store.db import create_engine

    if backend == "sqlite":
        path = folder / "bench.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}", lambda: None
    admin_url = make_url(postgres_url)
    name = f"astrid_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.set(database=name).render_as_string(hide_password=False), drop


def run(folder: Path, backend: str, workers: int, postgres_url: str, model: str) -> None:
    import shutil

    from astrid.ml.serve import Scorer
    from astrid.pipeline.runner import PipelineRunner, open_engine
    from astrid.pipeline.stages import STAGES
    from astrid.services.observations import ingest_file
    from astrid.store import migrate
    from astrid.store.artifacts import LocalArtifactStore
    from astrid.store.db import create_session_factory

    epochs = sorted(folder.glob("epoch_*.fits"))
    if not epochs or not (folder / "reference.fits").is_file():
        raise SystemExit(f"run `prepare {folder}` first")
    artifacts = folder / f"artifacts-{backend}"
    shutil.rmtree(artifacts, ignore_errors=True)
    url, cleanup = _database_url(backend, folder, postgres_url)
    try:
        migrate.upgrade(url)
        engine = open_engine(url)
        sessions = create_session_factory(engine)
        store = LocalArtifactStore(artifacts)

        # Not timed: the field's reference.
        scorer = None if model == "none" else Scorer.packaged(model)
        ingest_file(sessions, store, folder / "reference.fits")
        PipelineRunner(url, str(artifacts), workers=1, scorer=scorer).run()

        load_before = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        for path in epochs:
            ingest_file(sessions, store, path)
        ingest_seconds = time.perf_counter() - start
        ingest_cpu = time.process_time() - cpu_start
        summary = PipelineRunner(url, str(artifacts), workers=workers, scorer=scorer).run()
        wall = time.perf_counter() - start
        engine.dispose()
    finally:
        cleanup()

    n = len(epochs)
    per_obs = wall / n
    print(
        f"{n} observations of {_shape(epochs[0])} on {backend}, {workers} worker processes, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}); scored by "
        + ("no model" if scorer is None else f"{scorer.model_name} version {scorer.model_version}")
    )
    print(
        f"wall {wall:.1f} s: {per_obs:.2f} s per observation, {3600 / per_obs:,.0f} per hour, "
        f"{86400 / per_obs:,.0f} per day"
    )
    print(
        f"processed {summary.n_processed}, failed {summary.n_failed}, rejected "
        f"{summary.n_rejected}, candidates {summary.n_candidates}; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    stage_seconds: dict[str, float] = dict(summary.stage_seconds)
    stage_seconds["ingest"] = ingest_seconds
    cpu_seconds: dict[str, float] = dict(summary.stage_cpu_seconds)
    cpu_seconds["ingest"] = ingest_cpu
    total = sum(stage_seconds.values())
    total_cpu = sum(cpu_seconds.values())
    print(
        f"{'stage':<13}{'elapsed':>9}{'CPU':>8}{'CPU/obs':>9}{'share':>8}"
        "   elapsed load / compute / store / commit"
    )
    for stage in STAGES:
        if stage not in stage_seconds:
            continue
        seconds = stage_seconds[stage]
        cpu = cpu_seconds.get(stage, seconds)
        parts = summary.stage_parts.get(stage, {})
        split = " / ".join(
            f"{parts.get(p, 0.0):.1f}" for p in ("load", "compute", "store", "commit")
        )
        print(
            f"{stage:<13}{seconds:>9.1f}{cpu:>8.1f}{cpu / n:>9.2f}{cpu / total_cpu:>8.0%}   {split}"
        )
    print(
        f"{'total':<13}{total:>9.1f}{total_cpu:>8.1f}{total_cpu / n:>9.2f}"
        "   (seconds summed over the worker processes; shares of CPU time)"
    )
    cores = min(workers, os.cpu_count() or 1)
    print(
        f"CPU-bound estimate on {cores} otherwise idle cores: {total_cpu / n / cores:.2f} s per "
        f"observation, {86400 * cores * n / total_cpu:,.0f} per day"
    )


def _shape(path: Path) -> str:
    from astropy.io import fits

    header = fits.getheader(path, "SCI")
    return f"{header['NAXIS1']}x{header['NAXIS2']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="simulate and write the epochs")
    p.add_argument("folder", type=Path)
    p.add_argument("--n", type=int, default=8, help="observations to time (plus a reference)")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("run", help="time the pipeline on a fresh database")
    r.add_argument("folder", type=Path)
    r.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "ASTRID_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="server where a scratch database may be created",
    )
    r.add_argument(
        "--model", default="real_bogus", help="shipped real/bogus model that scores, or none"
    )
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.folder, args.n, args.size, args.seed)
    else:
        run(args.folder, args.backend, args.workers, args.postgres_url, args.model)


if __name__ == "__main__":
    main()
