"""The resumable runner on a small simulated field, on SQLite and PostgreSQL.

One field of 4 epochs (384x384 pixels) holds a source that appears at the third epoch
and a variable star; beside the 4 good files lie a truncated copy of one of them and a
file that is not FITS at all. The baseline runs everything in this process on SQLite;
the other tests compare their database content with it (ids, timestamps and worker
names aside, see :mod:`astrid.pipeline.tests.dbcontent`): on PostgreSQL, after killing
``astrid process --workers 2`` with SIGKILL twice (once while calibrating, once while
subtracting) and resuming, and after a second run that must find nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from sqlalchemy import URL, Engine, func, select

from astrid.events import (
    CandidateCreated,
    Event,
    EventBus,
    ObservationFailed,
    ObservationIngested,
    ObservationProcessed,
)
from astrid.io.fits import write_exposure
from astrid.pipeline.runner import PipelineRunner, RunSummary, open_engine
from astrid.pipeline.tests.dbcontent import database_content
from astrid.science.simulate import (
    EpochConditions,
    FieldConfig,
    TransientSpec,
    simulate_field,
    simulate_survey,
)
from astrid.services.candidates import candidates_in_cone
from astrid.services.objects import objects_in_cone
from astrid.services.observations import ingest_paths, reset_failed
from astrid.store import migrate
from astrid.store.artifacts import LocalArtifactStore
from astrid.store.db import create_session_factory
from astrid.store.models import (
    Candidate,
    Cutout,
    DifferenceImage,
    ModelScore,
    Observation,
    ObservationStatus,
    ProcessingRun,
    ReferenceImage,
    RunStatus,
    SkyObject,
)

FIELD = FieldConfig(shape=(384, 384), n_stars=450, n_galaxies=60)
CONDITIONS = [
    EpochConditions(fwhm=1.0, exposure_time=120.0, mjd=60000.0),
    EpochConditions(fwhm=1.3, exposure_time=60.0, dx=1.5, dy=-1.0, mjd=60003.0),
    EpochConditions(fwhm=1.2, exposure_time=60.0, dx=-1.0, dy=2.0, mjd=60006.0),
    EpochConditions(fwhm=1.4, exposure_time=60.0, dx=0.5, dy=0.7, mjd=60009.0),
]
SEED = 3


@dataclass(frozen=True)
class FieldFiles:
    """The simulated files and what was injected."""

    folder: Path
    good: tuple[Path, ...]
    truncated: Path
    garbage: Path
    appearing: TransientSpec
    variable: TransientSpec


@pytest.fixture(scope="module")
def field_files(tmp_path_factory: pytest.TempPathFactory) -> FieldFiles:
    folder = tmp_path_factory.mktemp("field")
    field = simulate_field(FIELD, seed=SEED)
    stars = field.stars
    x, y, mag = (np.asarray(stars[c]) for c in ("x", "y", "mag"))
    inner = np.flatnonzero((x > 60) & (x < 320) & (y > 60) & (y < 320))
    star = int(inner[np.argmin(np.abs(mag[inner] - 18.0))])
    variable = TransientSpec(
        kind="variable",
        ra=float(stars["ra"][star]),
        dec=float(stars["dec"][star]),
        mag=float(mag[star]),
        t0=60000.0,
        period=12.0,
        amplitude=0.6,
        host_star=int(stars["id"][star]),
    )
    ra, dec = field.wcs.pixel_to_world_values(250.0, 120.0)
    appearing = TransientSpec(kind="appearing", ra=float(ra), dec=float(dec), mag=18.5, t0=60005.0)
    survey = simulate_survey(
        FIELD, seed=SEED, conditions=CONDITIONS, transients=[appearing, variable]
    )
    good = tuple(
        write_exposure(e, folder / f"epoch_{i}.fits") for i, e in enumerate(survey.exposures)
    )
    data = good[1].read_bytes()
    truncated = folder / "truncated.fits"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = folder / "garbage.fits"
    garbage.write_bytes(b"SIMPLE  = this is not a FITS file" * 100)
    return FieldFiles(folder, good, truncated, garbage, appearing, variable)


def _database(url: str, folder: Path, files: FieldFiles, events: EventBus | None = None) -> str:
    """Migrate a database and register the field's files; returns the artifact folder."""
    migrate.upgrade(url)
    engine = open_engine(url)
    try:
        artifacts = folder / "artifacts"
        ingest_paths(
            create_session_factory(engine),
            LocalArtifactStore(artifacts),
            [files.folder],
            events=events,
        )
    finally:
        engine.dispose()
    return str(artifacts)


def _content(url: str) -> dict[str, list[str]]:
    engine = open_engine(url)
    try:
        return database_content(engine)
    finally:
        engine.dispose()


@dataclass
class Baseline:
    url: str
    artifacts: str
    summary: RunSummary
    events: list[Event]
    content: dict[str, list[str]]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, field_files: FieldFiles) -> Baseline:
    """The whole pipeline in this process on SQLite, uninterrupted."""
    folder = tmp_path_factory.mktemp("baseline")
    url = f"sqlite:///{folder / 'astrid.db'}"
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    artifacts = _database(url, folder, field_files, events=bus)
    summary = PipelineRunner(url, artifacts, workers=1, events=bus).run()
    return Baseline(url, artifacts, summary, events, _content(url))


def test_whole_pipeline_records_every_stage_and_failure(
    baseline: Baseline, field_files: FieldFiles
) -> None:
    engine = open_engine(baseline.url)
    sessions = create_session_factory(engine)
    store = LocalArtifactStore(baseline.artifacts)
    try:
        with sessions() as session:
            observations = {
                Path(o.original_name or "").name: o for o in session.scalars(select(Observation))
            }
            for i in range(4):
                assert observations[f"epoch_{i}.fits"].status == ObservationStatus.PROCESSED
            garbage = observations["garbage.fits"]
            assert garbage.status == ObservationStatus.FAILED
            assert (garbage.failure_reason or "").startswith("ingest: CorruptFitsFile")
            truncated = observations["truncated.fits"]
            assert truncated.status == ObservationStatus.FAILED
            assert (truncated.failure_reason or "").startswith("calibrate: CorruptFitsFile")
            failed_run = session.scalars(
                select(ProcessingRun).where(
                    ProcessingRun.observation_id == truncated.id,
                    ProcessingRun.status == RunStatus.FAILED,
                )
            ).one()
            assert failed_run.stage == "calibrate" and failed_run.error_type == "CorruptFitsFile"

            # The sharp, deep first epoch is the reference; it is not subtracted from itself.
            reference = session.scalars(select(ReferenceImage)).one()
            first = observations["epoch_0.fits"]
            assert reference.artifact_key == first.calibrated_artifact_key
            assert reference.provenance is not None
            assert reference.provenance["observation_sha256"] == first.sha256
            assert session.scalar(select(func.count()).select_from(DifferenceImage)) == 3

            # Every stage of every good observation, once; provenance and config recorded.
            runs = session.scalars(
                select(ProcessingRun).where(ProcessingRun.status == RunStatus.SUCCEEDED)
            ).all()
            per_stage: dict[str, int] = {}
            for run in runs:
                per_stage[run.stage] = per_stage.get(run.stage, 0) + 1
                assert run.code_version and run.provenance and "astrid" in run.provenance
                assert run.started_at is not None and run.finished_at is not None
            assert per_stage == {
                "ingest": 5,
                "calibrate": 4,
                "characterize": 4,
                "reference": 1,
                "subtract": 4,
                "score": 4,
                "associate": 1,
            }

            # No model: no score rows, and the score runs say so.
            assert session.scalar(select(func.count()).select_from(ModelScore)) == 0
            for run in runs:
                if run.stage == "score":
                    assert run.provenance is not None and run.provenance["scored"] is False

            candidates = session.scalars(select(Candidate)).all()
            assert candidates and all(c.object_id is not None for c in candidates)
            assert session.scalar(select(func.count()).select_from(Cutout)) == 3 * len(candidates)
            for cutout in session.scalars(select(Cutout)).all()[:6]:
                assert store.exists(cutout.artifact_key)

            # The appearing source: one object with its two epochs, brighter.
            spec = field_files.appearing
            table = objects_in_cone(session, spec.ra, spec.dec, 1.0)
            assert len(table) == 1
            assert table["n_detections"][0] == 2 and table["n_positive"][0] == 2
            assert table["peak_mag"][0] == pytest.approx(spec.mag, abs=0.15)
            # The variable star differs from the reference at every other epoch.
            spec = field_files.variable
            table = objects_in_cone(session, spec.ra, spec.dec, 1.0)
            assert len(table) == 1 and table["n_detections"][0] >= 2

            # Cone search over candidates agrees with astropy's separations.
            centre = SkyCoord(field_files.appearing.ra, field_files.appearing.dec, unit="deg")
            found = candidates_in_cone(session, centre.ra.deg, centre.dec.deg, 60.0)
            all_sep = centre.separation(
                SkyCoord([c.ra for c in candidates], [c.dec for c in candidates], unit="deg")
            ).arcsec
            assert sorted(found["id"]) == sorted(
                c.id for c, s in zip(candidates, all_sep, strict=True) if s <= 60.0
            )
            expected = {c.id: s for c, s in zip(candidates, all_sep, strict=True)}
            for row in found:
                assert row["separation"] == pytest.approx(expected[row["id"]], abs=1e-6)
            assert bool(np.all(found["score"].mask))  # no model has scored them
    finally:
        engine.dispose()
    summary = baseline.summary
    assert summary.n_processed == 4 and summary.n_failed == 1
    assert summary.association is not None
    assert summary.association.n_candidates == len(candidates)


def test_events_are_published_in_order(baseline: Baseline) -> None:
    events = baseline.events
    kinds = [type(e) for e in events]
    n_ingested = kinds.count(ObservationIngested)
    assert n_ingested == 6 and kinds[:n_ingested] == [ObservationIngested] * n_ingested
    processed = [e for e in events if isinstance(e, ObservationProcessed)]
    assert len(processed) == 4
    assert sum(e.is_reference for e in processed) == 1
    failed = [e for e in events if isinstance(e, ObservationFailed)]
    assert [(e.stage, e.error_type) for e in failed] == [("calibrate", "CorruptFitsFile")]
    # Each observation's candidates are announced before the observation is processed.
    position = {id(e): i for i, e in enumerate(events)}
    for done in processed:
        mine = [
            e
            for e in events
            if isinstance(e, CandidateCreated) and e.observation_id == done.observation_id
        ]
        assert len(mine) == done.n_candidates
        assert all(position[id(c)] < position[id(done)] for c in mine)
    n_candidates = sum(isinstance(e, CandidateCreated) for e in events)
    assert n_candidates == baseline.summary.n_candidates > 0


def test_running_again_does_nothing(baseline: Baseline, tmp_path: Path) -> None:
    copy = tmp_path / "again.db"
    shutil.copyfile(baseline.url.removeprefix("sqlite:///"), copy)
    url = f"sqlite:///{copy}"
    summary = PipelineRunner(url, baseline.artifacts, workers=1).run()
    assert (summary.n_prepared, summary.n_differenced, summary.n_candidates) == (0, 0, 0)
    assert summary.references == [] and summary.association is None
    assert _content(url) == baseline.content


def test_postgresql_gives_the_same_database(
    baseline: Baseline,
    field_files: FieldFiles,
    postgres_database: Callable[[], URL],
    tmp_path: Path,
) -> None:
    url = postgres_database().render_as_string(hide_password=False)
    artifacts = _database(url, tmp_path, field_files)
    summary = PipelineRunner(url, artifacts, workers=1).run()
    assert summary.n_processed == 4
    content = _content(url)
    for table, rows in baseline.content.items():
        assert content[table] == rows, table


class _ConstantScorer:
    """A stand-in model for the test (a real scorer is a trained network)."""

    model_name = "test-constant"
    model_version = "1"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def score(self, triplets: np.ndarray) -> np.ndarray:
        self.shapes.append(triplets.shape)
        return np.full(len(triplets), 0.25)


def test_an_injected_scorer_scores_the_stored_candidates(
    baseline: Baseline, tmp_path: Path
) -> None:
    copy = tmp_path / "scored.db"
    shutil.copyfile(baseline.url.removeprefix("sqlite:///"), copy)
    url = f"sqlite:///{copy}"
    scorer = _ConstantScorer()
    summary = PipelineRunner(url, baseline.artifacts, workers=1, scorer=scorer).run()
    assert summary.n_differenced == 4 and summary.n_candidates == 0
    engine = open_engine(url)
    try:
        with create_session_factory(engine)() as session:
            n_candidates = session.scalar(select(func.count()).select_from(Candidate))
            scores = session.scalars(select(ModelScore)).all()
            assert len(scores) == n_candidates
            assert {(s.model_name, s.model_version, s.score) for s in scores} == {
                ("test-constant", "1", 0.25)
            }
            assert all(s.processing_run_id is not None for s in scores)
    finally:
        engine.dispose()
    assert all(shape[1:] == (3, 63, 63) for shape in scorer.shapes)
    # Scoring again with the same model finds nothing to do.
    again = PipelineRunner(url, baseline.artifacts, workers=1, scorer=scorer).run()
    assert again.n_differenced == 0


def test_the_shipped_model_scores_in_worker_processes(baseline: Baseline, tmp_path: Path) -> None:
    from astrid.ml.serve import Scorer
    from astrid.services.candidates import candidate_triplets

    copy = tmp_path / "shipped.db"
    shutil.copyfile(baseline.url.removeprefix("sqlite:///"), copy)
    url = f"sqlite:///{copy}"
    scorer = Scorer.packaged("real_bogus")
    summary = PipelineRunner(url, baseline.artifacts, workers=2, scorer=scorer).run()
    assert summary.n_differenced == 4
    engine = open_engine(url)
    try:
        with create_session_factory(engine)() as session:
            rows = session.execute(
                select(ModelScore.candidate_id, ModelScore.score, ModelScore.model_version)
                .where(ModelScore.model_name == "real_bogus")
                .order_by(ModelScore.candidate_id)
            ).all()
            n_candidates = session.scalar(select(func.count()).select_from(Candidate))
            assert n_candidates and len(rows) == n_candidates
            assert {r.model_version for r in rows} == {scorer.model_version}
            ids = [int(r.candidate_id) for r in rows]
            # What the workers stored is what the model gives on the stored cutouts.
            store = LocalArtifactStore(baseline.artifacts)
            expected = scorer.score(candidate_triplets(session, store, ids))
    finally:
        engine.dispose()
    np.testing.assert_allclose([r.score for r in rows], expected, rtol=1e-5, atol=1e-6)


def _committed(engine: Engine, what: str) -> int:
    """Succeeded runs of a stage, or stored difference images for ``"difference"``."""
    query = select(func.count())
    if what == "difference":
        query = query.select_from(DifferenceImage)
    else:
        query = query.select_from(ProcessingRun).where(
            ProcessingRun.stage == what, ProcessingRun.status == RunStatus.SUCCEEDED
        )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def _process_command(url: str, artifacts: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ASTRID_DATABASE_URL": url,
        "ASTRID_ARTIFACT_URL": artifacts,
        # The baseline is unscored; scoring in worker processes has its own test.
        "ASTRID_REAL_BOGUS_MODEL": "none",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", "from astrid.cli import app; app()", "process", "--workers", "2"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _session_members(session_id: int) -> list[int]:
    """Processes of a session (Linux ``/proc``; empty elsewhere)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _kill_when(process: subprocess.Popen[bytes], url: str, stage: str, log: Path) -> None:
    """SIGKILL the runner as soon as a first ``stage`` run (or difference) has committed."""
    deadline = time.monotonic() + 120.0
    engine = open_engine(url)
    try:
        while _committed(engine, stage) < 1:
            if process.poll() is not None:
                pytest.fail(
                    f"astrid process ended before any {stage} committed:\n{log.read_text()}"
                )
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no {stage} run committed within 120 s:\n{log.read_text()}")
            time.sleep(0.02)
    finally:
        engine.dispose()
    os.kill(process.pid, signal.SIGKILL)  # the runner only: its workers must die with it
    process.wait(timeout=30)
    deadline = time.monotonic() + 10.0
    while _session_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _session_members(process.pid) == [], "worker processes outlived the runner"
    try:
        os.killpg(process.pid, signal.SIGKILL)  # nothing should be left; make sure
    except ProcessLookupError:
        pass


def test_kill_and_resume_gives_the_same_database(
    baseline: Baseline, field_files: FieldFiles, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'astrid.db'}"
    artifacts = _database(url, tmp_path, field_files)
    log = tmp_path / "process.log"

    # Killed while calibrating, then while subtracting, then left to finish.
    for stage in ("calibrate", "difference"):
        process = _process_command(url, artifacts, log)
        _kill_when(process, url, stage, log)
        interrupted = _content(url)
        statuses = [row for row in interrupted["observations"] if '"processed"' in row]
        assert len(statuses) < 4, f"the run finished before the kill:\n{log.read_text()}"
        runs = [json.loads(row) for row in interrupted["processing_runs"]]
        print(
            f"killed once a first {stage} committed: {len(statuses)} of 4 observations "
            f"processed; runs committed: "
            + ", ".join(
                f"{name} {sum(r['stage'] == name and r['status'] == 'succeeded' for r in runs)}"
                for name in ("calibrate", "characterize", "reference", "subtract", "score")
            )
        )
    process = _process_command(url, artifacts, log)
    assert process.wait(timeout=300) == 0, log.read_text()

    content = _content(url)
    for table, rows in baseline.content.items():
        assert content[table] == rows, table
    # Every file the database refers to is in the store.
    store = LocalArtifactStore(artifacts)
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            keys: list[str | None] = list(connection.execute(select(Cutout.artifact_key)).scalars())
            keys += list(connection.execute(select(DifferenceImage.artifact_key)).scalars())
            keys += list(connection.execute(select(Observation.calibrated_artifact_key)).scalars())
            n_objects = connection.execute(select(func.count()).select_from(SkyObject)).scalar_one()
    finally:
        engine.dispose()
    assert all(store.exists(k) for k in keys if k is not None)
    assert n_objects > 0
    print(
        f"resumed to completion: all {len(content)} tables identical to the uninterrupted run "
        f"({len(content['candidates'])} candidates, {n_objects} objects, "
        f"{len(content['processing_runs'])} processing runs, no duplicates)"
    )


def test_retry_failed_repeats_only_the_stage_that_failed(
    baseline: Baseline, tmp_path: Path
) -> None:
    copy = tmp_path / "retry.db"
    shutil.copyfile(baseline.url.removeprefix("sqlite:///"), copy)
    url = f"sqlite:///{copy}"
    engine = open_engine(url)
    try:
        sessions = create_session_factory(engine)
        with sessions() as session, session.begin():
            retried = reset_failed(session)
        with sessions() as session:
            statuses = {
                Path(o.original_name or "").name: o.status
                for o in session.scalars(select(Observation).where(Observation.id.in_(retried)))
            }
        # The truncated file goes back to calibration; the unreadable one cannot be retried.
        assert statuses == {"truncated.fits": ObservationStatus.REGISTERED}
        summary = PipelineRunner(url, baseline.artifacts, workers=1).run()
        assert (summary.n_prepared, summary.n_failed) == (1, 1)
        with sessions() as session:
            stages = session.execute(
                select(ProcessingRun.stage, ProcessingRun.status).where(
                    ProcessingRun.observation_id == retried[0]
                )
            ).all()
        assert sorted(stages) == [
            ("calibrate", RunStatus.FAILED),
            ("calibrate", RunStatus.FAILED),
            ("ingest", RunStatus.SUCCEEDED),
        ]
    finally:
        engine.dispose()
