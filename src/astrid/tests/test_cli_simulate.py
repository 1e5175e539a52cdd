"""Tests of ``astrid simulate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.table import Table
from typer.testing import CliRunner

from astrid.cli import app
from astrid.io.fits import read_exposure

runner = CliRunner()

ARGS = ["simulate", "--size", "96", "--epochs", "2", "--transients", "3", "--seed", "5"]


def test_simulate_writes_images_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    result = runner.invoke(app, [*ARGS, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "epoch_000.fits",
        "epoch_001.fits",
        "epochs.csv",
        "galaxies.csv",
        "stars.csv",
        "transients.csv",
    ]
    truth = Table.read(out / "transients.csv", format="ascii.csv")
    required = {"id", "epoch", "kind", "x", "y", "ra", "dec", "flux", "snr"}
    assert required <= set(truth.colnames)
    assert len(truth) >= 1 and set(truth["epoch"]) <= {0, 1}
    stars = Table.read(out / "stars.csv", format="ascii.csv")
    assert {"id", "ra", "dec", "mag", "x", "y"} <= set(stars.colnames)
    assert len(stars) == round(1000 * (96 / 1024) ** 2)
    epochs = Table.read(out / "epochs.csv", format="ascii.csv")
    assert list(epochs["epoch"]) == [0, 1]

    exposure = read_exposure(out / "epoch_001.fits")
    assert exposure.shape == (96, 96)
    assert exposure.psf is None
    assert exposure.meta.instrument == "AstrID simulator"
    assert exposure.meta.gain == 1.5 and exposure.meta.zero_point is not None
    assert exposure.meta.time is not None
    assert abs(exposure.meta.time.mjd - float(epochs["mjd"][1])) < 1e-6
    # truth positions agree with the written WCS (0-based pixels)
    assert exposure.wcs is not None
    for row in truth[truth["epoch"] == 1]:
        x, y = exposure.wcs.world_to_pixel_values(row["ra"], row["dec"])
        assert abs(float(x) - row["x"]) < 0.01 and abs(float(y) - row["y"]) < 0.01


def test_simulate_is_seeded_and_refuses_to_overwrite(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert runner.invoke(app, [*ARGS, "-o", str(a)]).exit_code == 0
    assert runner.invoke(app, [*ARGS, "-o", str(b), "--true-psf"]).exit_code == 0
    ea, eb = read_exposure(a / "epoch_000.fits"), read_exposure(b / "epoch_000.fits")
    np.testing.assert_array_equal(ea.data, eb.data)
    assert eb.psf is not None and eb.psf.stamps.shape[:2] == (5, 5)
    assert (a / "transients.csv").read_text() == (b / "transients.csv").read_text()

    again = runner.invoke(app, [*ARGS, "-o", str(a)])
    assert again.exit_code == 2
    assert "--overwrite" in again.output
    assert runner.invoke(app, [*ARGS, "-o", str(a), "--overwrite"]).exit_code == 0


def test_simulate_help_documents_every_option() -> None:
    result = runner.invoke(app, ["simulate", "--help"])
    assert result.exit_code == 0
    for option in ("--size", "--epochs", "--transients", "--seed", "--output", "--psf"):
        assert option in result.output
