"""Characterisation invariants on simulated exposures, with stated tolerances."""

from __future__ import annotations

import numpy as np
import pytest

from astrid.pipeline.characterize import characterize
from astrid.science.detect import psf_photometry
from astrid.science.psf import measure_fwhm
from astrid.science.simulate import (
    EpochConditions,
    FieldConfig,
    SimulatedField,
    simulate_exposure,
    simulate_field,
)


@pytest.fixture(scope="module")
def field() -> SimulatedField:
    config = FieldConfig(
        shape=(768, 768), n_stars=700, n_galaxies=100, psf_variation=0.0, cosmic_ray_rate=0.0
    )
    return simulate_field(config, seed=42)


@pytest.mark.parametrize("fwhm_arcsec", [1.0, 2.0])
def test_psf_fwhm_recovered_within_5_percent(field: SimulatedField, fwhm_arcsec: float) -> None:
    sim = simulate_exposure(field, EpochConditions(fwhm=fwhm_arcsec, exposure_time=60.0), seed=7)
    result = characterize(sim.exposure)
    # Truth: the FWHM of the true PSF as the pixels sample it (the nominal profile FWHM
    # convolved with the pixel; 2.00 -> 2.15 px at 1", negligible at 2").
    ny, nx = sim.exposure.shape
    truth = measure_fwhm(sim.true_psf.at(nx / 2, ny / 2))
    assert result.exposure.psf is not None
    assert result.quality.fwhm_pix == pytest.approx(truth, rel=0.05)
    assert result.quality.passed, result.quality.reasons


def test_limiting_magnitude_matches_injected_star_recovery(field: SimulatedField) -> None:
    """Stars injected at the 5-sigma limit are measured at S/N ~5 and found half the time."""
    sim = simulate_exposure(field, EpochConditions(fwhm=1.2, exposure_time=60.0), seed=3)
    result = characterize(sim.exposure)
    q = result.quality
    assert not q.limiting_mag_is_instrumental and q.zero_point is not None
    psf = result.exposure.psf
    assert psf is not None
    rng = np.random.default_rng(0)
    # Inject on a grid of positions away from catalogue sources (and one another).
    stars = result.sources
    n = 0
    xs: list[float] = []
    ys: list[float] = []
    while len(xs) < 300 and n < 20000:
        n += 1
        x, y = rng.uniform(30, 738, 2)
        if np.min(np.hypot(stars["x"] - x, stars["y"] - y)) < 12:
            continue
        if xs and np.min(np.hypot(np.array(xs) - x, np.array(ys) - y)) < 15:
            continue
        xs.append(x)
        ys.append(y)
    x_arr, y_arr = np.array(xs), np.array(ys)
    from astrid.science.simulate import add_point_sources

    snrs = {}
    for dmag in (0.0, -0.75):
        flux = 10 ** (-0.4 * (q.limiting_mag + dmag - q.zero_point))
        injected = add_point_sources(sim.exposure.data, x_arr, y_arr, flux, psf)
        f, e, _ = psf_photometry(
            injected - result.background.background,
            result.background.rms**2,
            x_arr,
            y_arr,
            psf,
        )
        snrs[dmag] = f / e
    at_limit = snrs[0.0]
    # Median measured S/N at the limit is 5 within 10 %, and half are above 5 (+/- 10 %).
    assert np.median(at_limit) == pytest.approx(5.0, rel=0.10)
    assert np.mean(at_limit > 5.0) == pytest.approx(0.5, abs=0.10)
    # 0.75 mag brighter (S/N ~10): essentially all recovered.
    assert np.mean(snrs[-0.75] > 5.0) > 0.95
