"""``astrid inspect`` on simulated and real files, and on bad input."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from astrid.cli import app
from astrid.io.fits import write_exposure
from astrid.science.simulate import EpochConditions, FieldConfig, simulate_exposure, simulate_field

runner = CliRunner()


def test_inspect_json_keys(tmp_path: Path) -> None:
    field = simulate_field(FieldConfig(shape=(512, 512), n_stars=400, n_galaxies=50), seed=1)
    sim = simulate_exposure(field, EpochConditions(fwhm=1.5), seed=2)
    path = write_exposure(sim.exposure, tmp_path / "epoch.fits")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("fwhm_pix", "background", "noise", "limiting_mag", "n_stars", "passed"):
        assert key in report
    assert report["fwhm_pix"] > 0 and report["n_stars"] >= 10
    assert abs(report["background"] / sim.sky_level - 1) < 0.02


def test_inspect_real_image_without_wcs_or_zero_point(shared_data: Path) -> None:
    path = shared_data / "images_sfft_decam" / "input_data" / "DEC-OBS04a.mini.fits"
    result = runner.invoke(app, ["inspect", str(path), "--json", "--min-stars", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # Header FWHM of this exposure is ~5.2 px (measured with a Gaussian fit, ~6 % high).
    assert 4.3 < report["fwhm_pix"] < 5.6
    assert report["limiting_mag_is_instrumental"] is True
    assert "zero_point" in report["missing_metadata"]


def test_inspect_bad_file_exits_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 3
    assert "CorruptFitsFile" in result.output
