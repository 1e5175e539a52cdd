"""Stage failure rules: typed and unexpected errors are recorded, database errors stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

import astrid.pipeline.stages as stages
from astrid.events import EventBus, ObservationFailed
from astrid.io.fits import write_exposure
from astrid.pipeline.runner import PipelineRunner, open_engine
from astrid.science.simulate import FieldConfig, simulate_survey
from astrid.services.observations import ingest_paths
from astrid.store import migrate
from astrid.store.artifacts import LocalArtifactStore
from astrid.store.db import create_session_factory
from astrid.store.models import Observation, ObservationStatus, ProcessingRun, RunStatus


@pytest.fixture
def registered(tmp_path: Path) -> tuple[str, str]:
    """A SQLite database with two small registered epochs; (url, artifact folder)."""
    config = FieldConfig(shape=(64, 64), n_stars=5, n_galaxies=0)
    for i, exposure in enumerate(simulate_survey(config, seed=8, n_epochs=2).exposures):
        write_exposure(exposure, tmp_path / "images" / f"epoch_{i}.fits")
    url = f"sqlite:///{tmp_path / 'astrid.db'}"
    migrate.upgrade(url)
    engine = open_engine(url)
    artifacts = tmp_path / "artifacts"
    ingest_paths(
        create_session_factory(engine), LocalArtifactStore(artifacts), [tmp_path / "images"]
    )
    engine.dispose()
    return url, str(artifacts)


def _observations(url: str) -> list[Observation]:
    engine = open_engine(url)
    try:
        with create_session_factory(engine)() as session:
            return list(session.scalars(select(Observation).order_by(Observation.mjd)))
    finally:
        engine.dispose()


def test_an_unexpected_error_fails_one_observation_and_the_run_goes_on(
    registered: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, artifacts = registered
    real = stages.calibrate_exposure
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in calibration")
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "calibrate_exposure", flaky)
    bus = EventBus()
    seen: list[ObservationFailed] = []
    bus.subscribe(seen.append, ObservationFailed)
    summary = PipelineRunner(url, artifacts, workers=1, events=bus).run()
    assert (summary.n_failed, summary.n_rejected) == (1, 1)

    first, second = _observations(url)
    assert first.status == ObservationStatus.FAILED
    assert first.failure_reason == "calibrate: RuntimeError: a bug in calibration"
    assert second.status == ObservationStatus.REJECTED  # 64x64 pixels: too few stars
    engine = open_engine(url)
    try:
        with create_session_factory(engine)() as session:
            run = session.scalars(
                select(ProcessingRun).where(
                    ProcessingRun.observation_id == first.id,
                    ProcessingRun.status == RunStatus.FAILED,
                )
            ).one()
    finally:
        engine.dispose()
    assert run.error_type == "RuntimeError" and run.provenance is not None
    assert run.provenance["unexpected"] is True
    assert "a bug in calibration" in "".join(run.provenance["traceback"])
    assert [(e.stage, e.status) for e in seen] == [
        ("calibrate", "failed"),
        ("characterize", "rejected"),
    ]


def test_a_database_error_stops_the_run_without_failing_observations(
    registered: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, artifacts = registered

    def database_down(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(stages, "calibrate_exposure", database_down)
    with pytest.raises(OperationalError):
        PipelineRunner(url, artifacts, workers=1).run()
    assert {o.status for o in _observations(url)} == {ObservationStatus.REGISTERED}
