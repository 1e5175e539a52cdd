"""Candidate detection and measurement on synthetic difference images."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from astrid.errors import ShapeMismatch
from astrid.science.detect import (
    detect_candidates,
    fit_point_sources,
    make_cutouts,
    psf_photometry,
)
from astrid.science.psf_model import PsfModel


def _place(image: np.ndarray, psf: PsfModel, x: float, y: float, flux: float) -> None:
    from scipy.ndimage import shift

    stamp = shift(np.asarray(psf.stamps[0, 0], np.float64), (y - round(y), x - round(x)), order=3)
    h = psf.size // 2
    iy, ix = round(y), round(x)
    image[iy - h : iy + h + 1, ix - h : ix + h + 1] += flux * stamp


def _matched_filter_score(d: np.ndarray, psf: PsfModel, sigma: float) -> np.ndarray:
    from scipy.signal import fftconvolve

    p = np.asarray(psf.stamps[0, 0], np.float64)
    return fftconvolve(d, p[::-1, ::-1], mode="same") / (sigma * np.sqrt(np.sum(p**2)))


def test_psf_photometry_is_unbiased_with_the_right_error() -> None:
    rng = np.random.default_rng(11)
    psf = PsfModel.gaussian(3.0, size=21)
    sigma = 2.0
    fluxes, errs = [], []
    for _ in range(200):
        img = rng.normal(0.0, sigma, (41, 41))
        _place(img, psf, 20.3, 19.8, 500.0)
        f, e, frac = psf_photometry(
            img, np.full(img.shape, sigma**2), np.array([20.3]), np.array([19.8]), psf
        )
        fluxes.append(f[0])
        errs.append(e[0])
        assert frac[0] == pytest.approx(0.0, abs=1e-9)
    # Expected error: sigma * sqrt(N_eff).
    expected_err = sigma / np.sqrt(np.sum(np.asarray(psf.stamps[0, 0], float) ** 2))
    assert np.median(errs) == pytest.approx(expected_err, rel=0.02)
    assert np.mean(fluxes) == pytest.approx(500.0, abs=3 * expected_err / np.sqrt(200))
    assert np.std(fluxes) == pytest.approx(expected_err, rel=0.15)


def test_detects_both_polarities_dipoles_and_edges() -> None:
    rng = np.random.default_rng(5)
    sigma = 1.0
    psf = PsfModel.gaussian(3.0, size=13)
    d = rng.normal(0.0, sigma, (200, 200))
    _place(d, psf, 60.2, 70.7, 300.0)  # positive transient
    _place(d, psf, 140.0, 50.0, -300.0)  # a source that faded
    _place(d, psf, 100.0, 150.0, 250.0)  # dipole: + and - lobes 2 px apart
    _place(d, psf, 102.0, 150.0, -250.0)
    _place(d, psf, 193.0, 100.0, 300.0)  # at the edge
    score = _matched_filter_score(d, psf, sigma)
    ref = Table({"x": [61.0], "y": [70.0], "flux": [1000.0]})
    cands = detect_candidates(
        score, d, np.full(d.shape, sigma**2), psf, zero_point=25.0, reference_sources=ref
    )
    xy = np.column_stack([cands["x"].value, cands["y"].value])

    def row(x: float, y: float) -> int:
        dist = np.hypot(xy[:, 0] - x, xy[:, 1] - y)
        assert dist.min() < 1.5, (x, y, xy)
        return int(np.argmin(dist))

    pos = cands[row(60.2, 70.7)]
    assert pos["polarity"] == 1 and not pos["is_dipole"] and not pos["is_edge"]
    assert pos["flux"] == pytest.approx(300.0, rel=0.1)
    assert pos["mag"].value == pytest.approx(25.0 - 2.5 * np.log10(300.0), abs=0.1)
    assert pos["ref_distance"].value == pytest.approx(np.hypot(0.8, 0.7), abs=0.5)
    assert pos["ref_mag"].value == pytest.approx(25.0 - 2.5 * np.log10(1000.0))
    neg = cands[row(140.0, 50.0)]
    assert neg["polarity"] == -1 and neg["flux"] == pytest.approx(-300.0, rel=0.1)
    assert cands[row(100.0, 150.0)]["is_dipole"]
    assert cands[row(193.0, 100.0)]["is_edge"]
    assert cands["x"].unit == "pix" and cands["ra"].unit == "deg"
    # Pure noise elsewhere: nothing else above 5 sigma in 40,000 pixels (expect ~0.01).
    assert len(cands) <= 7


def test_cutouts_centre_and_pad() -> None:
    img = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    c = make_cutouts(img, img + 1, img + 2, np.array([50.0, 0.0]), np.array([40.0, 99.0]), size=7)
    assert c.science.shape == (2, 7, 7)
    assert c.science[0, 3, 3] == img[40, 50]
    assert c.reference[0, 3, 3] == img[40, 50] + 1
    assert np.isnan(c.difference[1, 0, 0]) and c.difference[1, 3, 3] == img[99, 0] + 2
    with pytest.raises(ShapeMismatch):
        make_cutouts(img, img[:50], img, np.array([1.0]), np.array([1.0]))


def test_free_position_fit_recovers_position_and_flux() -> None:
    """A fit started 0.4 px off finds the source; at the wrong place the flux reads low."""
    rng = np.random.default_rng(3)
    psf = PsfModel.gaussian(3.0, size=21)
    x0, y0, flux = 30.3, 25.7, 2000.0
    fits, fixed = [], []
    for _ in range(20):
        img = rng.normal(0.0, 1.0, (60, 60))
        _place(img, psf, x0, y0, flux)
        var = np.ones_like(img)
        fit = fit_point_sources(img, var, np.array([30.0]), np.array([26.0]), psf)
        assert fit.refined[0]
        fits.append((fit.x[0], fit.y[0], fit.flux[0]))
        fixed.append(psf_photometry(img, var, np.array([30.0]), np.array([26.0]), psf)[0][0])
    x, y, f = np.asarray(fits).T
    assert np.mean(x) == pytest.approx(x0, abs=0.01)
    assert np.mean(y) == pytest.approx(y0, abs=0.01)
    assert np.mean(f) == pytest.approx(flux, rel=0.005)
    # Off by (0.3, 0.3) px with sigma = 1.27 px: exp(-0.18 / (4 sigma²)) ~ 0.97.
    assert np.mean(fixed) == pytest.approx(
        flux * np.exp(-0.18 / (4 * (3.0 / 2.3548) ** 2)), rel=0.01
    )
