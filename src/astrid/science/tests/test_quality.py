"""Quality metrics and gate on arrays whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from astrid.errors import StarMatchFailed
from astrid.exposure import MaskBit
from astrid.science.psf_model import PsfModel, gaussian_fwhm_to_sigma
from astrid.science.quality import (
    QualityConfig,
    QualityReport,
    gate_quality,
    limiting_flux,
    measure_quality,
    relative_zero_point,
)


def test_limiting_flux_of_a_gaussian_matches_the_closed_form() -> None:
    fwhm = 4.0
    sigma = gaussian_fwhm_to_sigma(fwhm)
    psf = PsfModel.gaussian(fwhm, size=41)
    # N_eff = 4 pi sigma^2 for a well-sampled Gaussian.
    expected = 5.0 * 3.0 * np.sqrt(4.0 * np.pi * sigma**2)
    assert limiting_flux(3.0, psf) == pytest.approx(expected, rel=1e-3)


def _report(**kw: object) -> QualityReport:
    shape = (100, 100)
    mask = np.zeros(shape, np.uint16)
    mask[:10, :] |= np.uint16(MaskBit.SATURATED)  # 10 %
    mask[50, :5] |= np.uint16(MaskBit.COSMIC_RAY)  # 0.05 %
    args: dict[str, object] = dict(
        mask=mask,
        background=np.full(shape, 100.0),
        noise=np.full(shape, 2.0),
        n_stars=25,
        psf=PsfModel.gaussian(3.0),
        zero_point=25.0,
        pixel_scale=0.5,
    )
    args.update(kw)
    return measure_quality(**args)  # type: ignore[arg-type]


def test_metrics_by_hand() -> None:
    r = _report()
    assert r.background == 100.0 and r.noise == 2.0
    assert r.fwhm_pix == pytest.approx(3.0)
    assert r.fwhm_arcsec == pytest.approx(1.5)
    assert r.saturated_fraction == pytest.approx(0.10)
    assert r.cosmic_ray_fraction == pytest.approx(5 / 10000)
    assert r.masked_fraction == pytest.approx(0.1005)
    expected_mag = 25.0 - 2.5 * np.log10(limiting_flux(2.0, PsfModel.gaussian(3.0)))
    assert r.limiting_mag == pytest.approx(expected_mag)
    assert not r.limiting_mag_is_instrumental


def test_gate_gives_reasons_with_numbers() -> None:
    r = gate_quality(_report(), QualityConfig(max_saturated_fraction=0.05))
    assert not r.passed
    assert any("10.00% saturated" in reason for reason in r.reasons)
    ok = gate_quality(_report(), QualityConfig(max_saturated_fraction=0.2))
    assert ok.passed and ok.reasons == ()
    few = gate_quality(_report(n_stars=3), QualityConfig(max_saturated_fraction=0.2))
    assert "3 stars found, need at least 10" in few.reasons


def test_no_psf_or_zero_point_is_said_not_hidden() -> None:
    r = _report(psf=None, zero_point=None)
    assert np.isnan(r.fwhm_pix)
    assert r.limiting_mag_is_instrumental
    assert any("no PSF" in w for w in r.warnings)
    gated = gate_quality(r, QualityConfig(max_saturated_fraction=1.0))
    assert not gated.passed
    d = gated.as_dict()
    assert d["fwhm_pix"] is None and isinstance(d["reasons"], list)


def test_relative_zero_point_recovers_a_known_offset() -> None:
    rng = np.random.default_rng(3)
    n = 40
    x = rng.uniform(0, 500, n)
    y = rng.uniform(0, 500, n)
    flux_ref = 10 ** rng.uniform(3, 5, n)
    ratio = 0.8  # e.g. thin cloud
    flux = flux_ref * ratio * (1 + rng.normal(0, 0.01, n))
    flux[0] *= 3.0  # a variable star, clipped
    ref = Table({"x": x, "y": y, "flux": flux_ref})
    sci = Table({"x": x + rng.normal(0, 0.1, n), "y": y, "flux": flux})
    tie = relative_zero_point(sci, ref)
    assert tie.offset == pytest.approx(-2.5 * np.log10(ratio), abs=0.005)
    assert tie.flux_ratio == pytest.approx(ratio, rel=0.005)
    assert tie.n_matched == n - 1
    with pytest.raises(StarMatchFailed) as info:
        relative_zero_point(sci[:3], ref[:3])
    assert info.value.n_matched == 3 and info.value.n_required == 5
