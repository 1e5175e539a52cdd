"""Registering files: content-hash dedupe, metadata from headers, fields, unreadable files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from astrid.events import Event, EventBus, ObservationIngested
from astrid.io.fits import write_exposure
from astrid.science.simulate import EpochConditions, FieldConfig, simulate_survey
from astrid.services.observations import (
    describe_fits,
    find_fits_files,
    ingest_file,
    ingest_paths,
    status_report,
)
from astrid.store.artifacts import LocalArtifactStore, sha256_file
from astrid.store.db import create_session_factory
from astrid.store.models import (
    Observation,
    ObservationStatus,
    ProcessingRun,
    RunStatus,
    SkyField,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small epochs of one field (3 pixels apart) and one of a field 1 degree away."""
    folder = tmp_path_factory.mktemp("images")
    config = FieldConfig(shape=(64, 64), n_stars=10, n_galaxies=0, n_bad_columns=0)
    conditions = [
        EpochConditions(mjd=60000.0),
        EpochConditions(mjd=60001.5, dx=3.0, dy=-2.0, exposure_time=30.0),
    ]
    survey = simulate_survey(config, seed=1, conditions=conditions)
    other = simulate_survey(
        FieldConfig(shape=(64, 64), n_stars=10, n_galaxies=0, ra=151.0, band="g"),
        seed=2,
        n_epochs=1,
    )
    paths = []
    for i, exposure in enumerate([*survey.exposures, *other.exposures]):
        paths.append(write_exposure(exposure, folder / f"epoch_{i}.fits"))
    return paths


def test_the_same_file_twice_is_one_observation(
    engine: Engine, images: list[Path], tmp_path: Path
) -> None:
    sessions = create_session_factory(engine)
    store = LocalArtifactStore(tmp_path / "artifacts")
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)

    first = ingest_file(sessions, store, images[0], events=bus)
    again = ingest_file(sessions, store, images[0], events=bus)
    copy = tmp_path / "renamed copy.fits"
    shutil.copyfile(images[0], copy)
    renamed = ingest_file(sessions, store, copy, events=bus)

    assert first.is_new and not again.is_new and not renamed.is_new
    assert first.observation_id == again.observation_id == renamed.observation_id
    assert first.sha256 == sha256_file(images[0])
    assert first.status == ObservationStatus.REGISTERED
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Observation)) == 1
        runs = session.scalars(select(ProcessingRun)).all()
        assert [(r.stage, r.status) for r in runs] == [("ingest", RunStatus.SUCCEEDED)]
        observation = session.get(Observation, first.observation_id)
        assert observation is not None
        assert store.exists(observation.artifact_key)
        assert store.verify(observation.artifact_key)
    assert [type(e) for e in seen] == [ObservationIngested]


def test_metadata_fields_and_unreadable_files(
    engine: Engine, images: list[Path], tmp_path: Path
) -> None:
    sessions = create_session_factory(engine)
    store = LocalArtifactStore(tmp_path / "artifacts")
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in images:
        shutil.copyfile(path, folder / path.name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.fits").write_bytes(b"this is not FITS at all" * 200)

    results = ingest_paths(sessions, store, [folder])
    assert [r.path.name for r in results] == [
        "broken.fits",
        "epoch_0.fits",
        "epoch_1.fits",
        "epoch_2.fits",
    ]
    broken = results[0]
    assert broken.is_new and broken.status == ObservationStatus.FAILED
    assert broken.failure_reason is not None
    assert "CorruptFitsFile" in broken.failure_reason

    with sessions() as session:
        observations = {
            Path(o.original_name or "").name: o for o in session.scalars(select(Observation))
        }
        e0, e1, e2 = (observations[f"epoch_{i}.fits"] for i in range(3))
        assert e0.band == "r" and e2.band == "g"
        assert e0.mjd == pytest.approx(60000.0) and e1.mjd == pytest.approx(60001.5)
        assert e1.exposure_time == pytest.approx(30.0)
        assert e0.width == e0.height == 64
        assert e0.ra == pytest.approx(150.0, abs=1e-3) and e0.dec == pytest.approx(2.2, abs=1e-3)
        assert e0.healpix is not None and e0.obs_time is not None
        assert e0.header is not None and e0.header["FILTER"] == "r"
        # Epochs 0 and 1 point 3.6 pixels apart: one field; epoch 2 is a degree away.
        assert e0.field_id == e1.field_id != e2.field_id
        assert session.scalar(select(func.count()).select_from(SkyField)) == 2
        report = status_report(session)
    assert report.observations[ObservationStatus.REGISTERED] == 3
    assert report.observations[ObservationStatus.FAILED] == 1
    assert report.runs[("ingest", RunStatus.FAILED)] == 1
    assert [f.original_name for f in report.failures] == [str(broken.path)]


def test_describe_reads_headers_only(images: list[Path]) -> None:
    description = describe_fits(images[1])
    assert description.shape == (64, 64)
    assert description.meta.band == "r"
    assert description.wcs is not None
    ra, dec = description.centre() or (0.0, 0.0)
    assert ra == pytest.approx(150.0, abs=2e-3) and dec == pytest.approx(2.2, abs=2e-3)
    radius = description.footprint_radius_deg()
    assert radius == pytest.approx(32 * 0.5 * 2**0.5 / 3600.0, rel=0.05)


def test_find_fits_files_refuses_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        find_fits_files([tmp_path / "absent"])
    (tmp_path / "a.FITS").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.fits.fz").write_bytes(b"")
    assert [p.name for p in find_fits_files([tmp_path])] == ["a.FITS", "b.fits.fz"]
