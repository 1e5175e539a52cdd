"""The database commands: ingest (new vs known), process, status, candidates cone search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from sqlalchemy import select
from typer.testing import CliRunner

from astrid.cli import app
from astrid.io.fits import write_exposure
from astrid.pipeline.runner import open_engine
from astrid.science.simulate import FieldConfig, simulate_survey
from astrid.store.db import create_session_factory
from astrid.store.models import (
    Candidate,
    DifferenceImage,
    Observation,
    ReferenceImage,
    SkyObject,
    SubtractionMethod,
)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DATABASE_URL", "ARTIFACT_URL", "WORKERS"):
        monkeypatch.delenv(f"ASTRID_{name}", raising=False)
    folder = tmp_path / "data"
    monkeypatch.setenv("ASTRID_DATA_DIR", str(folder))
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64x64 epochs: too few stars for a PSF, so the quality gate rejects them."""
    folder = tmp_path_factory.mktemp("tiny")
    config = FieldConfig(shape=(64, 64), n_stars=5, n_galaxies=0)
    for i, exposure in enumerate(simulate_survey(config, seed=5, n_epochs=2).exposures):
        write_exposure(exposure, folder / f"epoch_{i}.fits")
    return folder


def test_ingest_reports_new_then_known_and_process_records_rejections(
    data_dir: Path, tiny_images: Path
) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["ingest", str(tiny_images)])
    assert first.exit_code == 0, first.output
    assert "2 new, 0 already known, 0 unreadable (2 files)" in first.output
    again = runner.invoke(app, ["ingest", str(tiny_images / "epoch_0.fits")])
    assert again.exit_code == 0, again.output
    assert "0 new, 1 already known" in again.output
    assert (data_dir / "astrid.db").is_file() and (data_dir / "artifacts").is_dir()

    processed = runner.invoke(app, ["process", "--workers", "1"])
    assert processed.exit_code == 0, processed.output
    assert "processed 0, failed 0, rejected 2" in processed.output

    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    assert "observations 2" in status.output and "rejected" in status.output
    assert "quality gate" in status.output  # the reasons are shown
    assert "no model scores" in status.output


def test_ingest_refuses_a_missing_path(data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["ingest", "does-not-exist.fits"])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_candidates_cone_search_prints_an_astropy_table(data_dir: Path) -> None:
    migrate_url = f"sqlite:///{data_dir / 'astrid.db'}"
    data_dir.mkdir(parents=True)
    from astrid.store import migrate

    migrate.upgrade(migrate_url)
    engine = open_engine(migrate_url)
    rng = np.random.default_rng(2)
    ra = 150.0 + rng.uniform(-10, 10, 30) / 3600.0
    dec = 2.2 + rng.uniform(-10, 10, 30) / 3600.0
    try:
        with create_session_factory(engine)() as session, session.begin():
            observation = Observation(sha256="a" * 64, artifact_key="k", mjd=60000.0, band="r")
            reference = ReferenceImage(
                band="r", sha256="b" * 64, artifact_key="r", source="observation", ra=150, dec=2.2
            )
            session.add_all([observation, reference])
            session.flush()
            difference = DifferenceImage(
                science_observation_id=observation.id,
                reference_id=reference.id,
                method=SubtractionMethod.ZOGY,
                artifact_key="d",
            )
            sky_object = SkyObject(ra=150.0, dec=2.2, n_detections=1)
            session.add_all([difference, sky_object])
            session.flush()
            for i, (r, d) in enumerate(zip(ra, dec, strict=True)):
                session.add(
                    Candidate(
                        difference_id=difference.id,
                        detection_index=i,
                        object_id=sky_object.id if i == 0 else None,
                        ra=float(r),
                        dec=float(d),
                        x=float(i),
                        y=0.0,
                        mjd=60000.0,
                        band="r",
                        flux=100.0,
                        flux_err=10.0,
                        snr=10.0,
                        mag=20.0,
                    )
                )
    finally:
        engine.dispose()

    result = CliRunner().invoke(app, ["candidates", "--ra", "150", "--dec", "2.2", "--radius", "8"])
    assert result.exit_code == 0, result.output
    separations = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(150.0, 2.2, unit="deg"))
    expected = int(np.sum(separations.arcsec <= 8.0))
    assert f"{expected} candidates within 8 arcsec" in result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["id", "object_id"])
    assert "separation" in header and "score" in header
    # Nearest first: the separations printed increase.
    column = header.split().index("separation")
    printed = [float(line.split()[column]) for line in lines[lines.index(header) + 3 :] if line]
    assert printed == sorted(printed) and len(printed) == expected
    assert printed[0] == pytest.approx(float(np.min(separations.arcsec)), abs=1e-3)

    out = data_dir / "cone.ecsv"
    objects = CliRunner().invoke(
        app,
        ["candidates", "--ra", "150", "--dec", "2.2", "--radius", "1", "--objects", "-o", str(out)],
    )
    assert objects.exit_code == 0, objects.output
    assert "1 objects within 1 arcsec" in objects.output and out.is_file()
    from astropy.table import Table

    table = Table.read(out)
    assert list(table["n_detections"]) == [1] and table["separation"].unit == "arcsec"
    with create_session_factory(open_engine(migrate_url))() as session:
        assert session.scalars(select(SkyObject)).one().n_detections == 1
