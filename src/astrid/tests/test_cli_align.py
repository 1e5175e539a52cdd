"""Tests of ``astrid align``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.wcs import WCS
from typer.testing import CliRunner

from astrid.cli import app
from astrid.exposure import Exposure, MaskBit
from astrid.io.fits import read_exposure, write_exposure

runner = CliRunner()

SIZE = 128
SHIFT = (2.4, -1.3)  # reference pixel = science pixel + SHIFT


def _wcs(crpix: tuple[float, float]) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = list(crpix)
    w.wcs.cd = 0.25 / 3600 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    return w


def _image(xy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    img = np.full((SIZE, SIZE), 100.0)
    for x0, y0 in xy:
        img += 800.0 * np.exp(-0.5 * ((x - x0) ** 2 + (y - y0) ** 2) / 1.3**2)
    return img + rng.normal(0.0, 5.0, img.shape)


def _write_pair(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    grid = np.arange(16, SIZE - 16, 16, dtype=float)
    xy = np.array([(x, y) for x in grid for y in grid]) + rng.uniform(-3, 3, (len(grid) ** 2, 2))
    science = Exposure.from_arrays(_image(xy, rng), wcs=_wcs((64.5, 64.5)), noise=5.0)
    reference = Exposure.from_arrays(
        _image(xy + np.array(SHIFT), rng),
        wcs=_wcs((64.5 + SHIFT[0], 64.5 + SHIFT[1])),
        noise=5.0,
    )
    reference.mask[60, 70] |= MaskBit.BAD
    return (
        write_exposure(science, folder / "science.fits"),
        write_exposure(reference, folder / "reference.fits"),
    )


def test_align_writes_the_aligned_reference_and_prints_the_residual(tmp_path: Path) -> None:
    science, reference = _write_pair(tmp_path)
    out = tmp_path / "aligned.fits"
    result = runner.invoke(app, ["align", str(science), str(reference), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "method    wcs" in result.output
    assert "px rms" in result.output and "arcsec" in result.output
    residual = float(result.output.split("residual")[1].split()[0])
    assert residual < 0.1
    aligned = read_exposure(out)
    assert aligned.shape == (SIZE, SIZE)
    assert aligned.wcs is not None
    # the bad reference pixel (70, 60) shows up near science pixel (67.6, 61.3)
    bad = np.argwhere(aligned.mask & MaskBit.BAD)
    assert len(bad) > 0
    assert np.all(np.abs(bad - np.array([61.3, 67.6])) < 2.5)
    assert aligned.provenance.get("align_method") == "wcs"


def test_align_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    science, reference = _write_pair(tmp_path)
    out = tmp_path / "aligned.fits"
    out.write_bytes(b"")
    result = runner.invoke(app, ["align", str(science), str(reference), "-o", str(out)])
    assert result.exit_code == 2
    ok = runner.invoke(
        app,
        ["align", str(science), str(reference), "-o", str(out), "--overwrite", "--method", "stars"],
    )
    assert ok.exit_code == 0, ok.output
    assert "method    stars" in ok.output


def test_align_bad_input_exits_3_with_one_line(tmp_path: Path) -> None:
    science, _ = _write_pair(tmp_path)
    junk = tmp_path / "junk.fits"
    junk.write_text("this is not a FITS file\n")
    result = runner.invoke(app, ["align", str(science), str(junk), "-o", str(tmp_path / "o.fits")])
    assert result.exit_code == 3
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: CorruptFitsFile")
    assert not (tmp_path / "o.fits").exists()
