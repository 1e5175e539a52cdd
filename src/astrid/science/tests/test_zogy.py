"""Tests of the ZOGY subtraction kernel and the photometric tie.

Images are simulated here: Gaussian PSFs of different FWHM in the science (new) and
reference images, point-sampled at sub-pixel star positions (the same model the PSF stamps
describe), Gaussian background noise and, where stated, Gaussian source noise with a
variance equal to the source signal (gain 1).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from astrid.errors import BackendUnavailable, InvalidPsf, ShapeMismatch, StarMatchFailed
from astrid.science.psf_model import PsfModel
from astrid.science.zogy import (
    FluxScale,
    ZogyConfig,
    ZogyResult,
    fit_flux_scale,
    zogy_subtract,
)

Field = dict[str, NDArray[np.float64]]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
FWHM_SCIENCE = 4.0
FWHM_REFERENCE = 2.5
SIGMA_SCIENCE = 10.0
SIGMA_REFERENCE = 5.0
RATIO = 0.7  # F_n / F_r
BACKGROUND_SCIENCE = 100.0
BACKGROUND_REFERENCE = 30.0


def gaussian_stamp(fwhm: float, size: int | None = None) -> NDArray[np.float64]:
    sigma = fwhm / FWHM_PER_SIGMA
    if size is None:
        size = 2 * int(np.ceil(4 * sigma)) + 1
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    stamp = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return stamp / stamp.sum()


def render(
    shape: tuple[int, int],
    xs: NDArray[np.float64],
    ys: NDArray[np.float64],
    fluxes: NDArray[np.float64],
    fwhm: float | NDArray[np.float64],
) -> NDArray[np.float64]:
    """Stars as point-sampled unit-integral Gaussians (0-based positions, ``[y, x]``)."""
    image = np.zeros(shape)
    fwhms = np.broadcast_to(np.asarray(fwhm, dtype=float), np.shape(xs))
    for x, y, flux, fw in zip(xs, ys, fluxes, fwhms, strict=True):
        sigma = fw / FWHM_PER_SIGMA
        half = int(np.ceil(5 * sigma))
        ix, iy = round(x), round(y)
        y0, y1 = max(0, iy - half), min(shape[0], iy + half + 1)
        x0, x1 = max(0, ix - half), min(shape[1], ix + half + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        g = np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2) / (2 * np.pi * sigma**2)
        image[y0:y1, x0:x1] += flux * g
    return image


def make_field(n: int, seed: int, *, n_stars: int = 60, integer: bool = True) -> Field:
    """One field seen twice: same stars, different seeing, flux scale and background, with
    independent background and source noise; the variance maps include the source noise."""
    rng = np.random.default_rng(seed)
    if integer:
        xs = rng.integers(15, n - 15, n_stars).astype(float)
        ys = rng.integers(15, n - 15, n_stars).astype(float)
    else:
        xs = rng.uniform(15, n - 15, n_stars)
        ys = rng.uniform(15, n - 15, n_stars)
    fluxes = np.exp(rng.uniform(np.log(2e3), np.log(5e4), n_stars))
    model_r = render((n, n), xs, ys, fluxes, FWHM_REFERENCE)
    model_n = render((n, n), xs, ys, RATIO * fluxes, FWHM_SCIENCE)
    var_r = SIGMA_REFERENCE**2 + model_r
    var_n = SIGMA_SCIENCE**2 + model_n
    reference = model_r + BACKGROUND_REFERENCE + rng.normal(size=(n, n)) * np.sqrt(var_r)
    science = model_n + BACKGROUND_SCIENCE + rng.normal(size=(n, n)) * np.sqrt(var_n)
    return {
        "science": science,
        "reference": reference,
        "var_n": var_n,
        "var_r": var_r,
        "x": xs,
        "y": ys,
    }


def subtract(
    science: NDArray[np.float64], reference: NDArray[np.float64], **kwargs: Any
) -> ZogyResult:
    options: dict[str, Any] = {
        "psf_science": gaussian_stamp(FWHM_SCIENCE),
        "psf_reference": gaussian_stamp(FWHM_REFERENCE),
        "noise_science": SIGMA_SCIENCE,
        "noise_reference": SIGMA_REFERENCE,
        "flux_scale": FluxScale(flux_ratio=RATIO),
    }
    options.update(kwargs)
    return zogy_subtract(science, reference, **options)


def expected_snr(flux_science: float) -> float:
    """S/N of ZOGY's optimal statistic for a new point source (square root of eq. 41
    times α), from the continuous Fourier integral of the analytic Gaussian transfer
    functions: independent of the discrete implementation."""
    f = np.linspace(-0.5, 0.5, 1001)
    fx, fy = np.meshgrid(f, f)
    k2 = fx**2 + fy**2
    s_n, s_r = FWHM_SCIENCE / FWHM_PER_SIGMA, FWHM_REFERENCE / FWHM_PER_SIGMA
    p_n2 = np.exp(-4 * np.pi**2 * s_n**2 * k2)
    p_r2 = np.exp(-4 * np.pi**2 * s_r**2 * k2)
    integrand = (
        RATIO**2 * p_n2 * p_r2 / (SIGMA_SCIENCE**2 * p_r2 + SIGMA_REFERENCE**2 * RATIO**2 * p_n2)
    )
    flux_norm = float(np.trapezoid(np.trapezoid(integrand, f, axis=1), f))
    return flux_science / RATIO * np.sqrt(flux_norm)


def distance(shape: tuple[int, int], x: float, y: float) -> NDArray[np.float64]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.hypot(xx - x, yy - y)


def interior(mask: NDArray[np.bool_], edge: int = 20) -> NDArray[np.bool_]:
    keep = ~mask
    keep[:edge] = keep[-edge:] = False
    keep[:, :edge] = keep[:, -edge:] = False
    return keep


# ----------------------------------------------------------------------------------------
# Noise properties
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def field_pair() -> Field:
    return make_field(512, seed=3)


def test_score_corrected_is_unit_normal_on_two_noise_realisations() -> None:
    # S_corr is correlated over the PSF footprint (~30 pixels): 1024² pixels give an
    # uncertainty of ~0.007 on its mean.
    f = make_field(1024, seed=3, n_stars=240)
    scale = fit_flux_scale(
        f["science"],
        f["reference"],
        x=f["x"],
        y=f["y"],
        psf_science=gaussian_stamp(FWHM_SCIENCE),
        psf_reference=gaussian_stamp(FWHM_REFERENCE),
    )
    result = subtract(
        f["science"],
        f["reference"],
        flux_scale=scale,
        variance_science=f["var_n"],
        variance_reference=f["var_r"],
    )
    keep = interior(result.mask)
    s_corr = result.score_corrected[keep]
    assert abs(float(np.std(s_corr)) - 1.0) < 0.05
    assert abs(float(np.mean(s_corr))) < 0.02
    # Without the source-noise term, S over-counts around the stars.
    assert float(np.abs(result.score[keep]).max()) > 6.0
    assert float(np.abs(s_corr).max()) < 5.5
    assert np.isfinite(result.score_corrected).all()
    assert result.flux_scale is scale


def test_score_and_difference_have_unit_std_on_pure_noise() -> None:
    rng = np.random.default_rng(5)
    science = rng.normal(size=(256, 256)) * SIGMA_SCIENCE + 7.0
    reference = rng.normal(size=(256, 256)) * SIGMA_REFERENCE - 3.0
    result = subtract(
        science,
        reference,
        flux_scale=FluxScale(flux_ratio=RATIO, background_offset=7.0 + 3.0 * RATIO),
    )
    keep = interior(result.mask)
    assert abs(float(np.std(result.score[keep])) - 1.0) < 0.05
    assert abs(float(np.std(result.difference[keep])) - 1.0) < 0.03
    assert abs(float(np.std(result.score_corrected[keep])) - 1.0) < 0.05
    assert abs(float(np.mean(result.difference[keep]))) < 0.02
    # The difference PSF has unit sum and the zero point is eq. 15.
    assert result.difference_psf.stamps[0, 0].sum() == pytest.approx(1.0, abs=1e-5)
    expected_fd = RATIO / np.sqrt(SIGMA_SCIENCE**2 + SIGMA_REFERENCE**2 * RATIO**2)
    assert result.difference_zero_point == pytest.approx(expected_fd, rel=1e-12)
    assert FWHM_REFERENCE < result.difference_psf.fwhm < FWHM_SCIENCE + 0.5


def test_identical_inputs_give_zero_difference(field_pair: Field) -> None:
    image = field_pair["science"]
    psf = gaussian_stamp(FWHM_SCIENCE)
    result = zogy_subtract(
        image,
        image,
        psf_science=psf,
        psf_reference=psf,
        noise_science=SIGMA_SCIENCE,
        noise_reference=SIGMA_SCIENCE,
        flux_scale=FluxScale(flux_ratio=1.0),
    )
    # D has unit noise; identical inputs cancel to float32 round-off.
    assert float(np.abs(result.difference).max()) < 1e-3
    assert float(np.abs(result.score_corrected).max()) < 1e-3


# ----------------------------------------------------------------------------------------
# Point sources
# ----------------------------------------------------------------------------------------


def test_new_point_source_is_detected_with_expected_significance_and_flux() -> None:
    rng = np.random.default_rng(21)
    n = 256
    science = rng.normal(size=(n, n)) * SIGMA_SCIENCE
    reference = rng.normal(size=(n, n)) * SIGMA_REFERENCE
    faint = (70.0, 90.0, 1500.0)  # x, y (0-based), flux in science-image units
    bright = (180.0, 160.0, 8000.0)
    for x, y, flux in (faint, bright):
        science += render((n, n), np.array([x]), np.array([y]), np.array([flux]), FWHM_SCIENCE)
    result = subtract(science, reference)

    # The faint source is the only significant peak, at the right pixel.
    away = distance((n, n), bright[0], bright[1]) > 15
    s_corr = np.where(away, result.score_corrected, 0.0)
    iy, ix = np.unravel_index(np.argmax(s_corr), s_corr.shape)
    assert (ix, iy) == (70, 90)
    expected = expected_snr(faint[2])
    assert 15 < expected < 40
    assert result.score_corrected[iy, ix] == pytest.approx(expected, rel=0.12)
    empty = interior(result.mask) & away & (distance((n, n), faint[0], faint[1]) > 15)
    assert float(np.abs(result.score_corrected[empty]).max()) < 5.5  # no false detection

    # The bright one: flux in science-image units within a few per cent, error consistent.
    bx, by = int(bright[0]), int(bright[1])
    assert result.flux[by, bx] == pytest.approx(bright[2], rel=0.03)
    assert result.flux_error[by, bx] == pytest.approx(bright[2] / expected_snr(bright[2]), rel=0.02)
    assert result.score_corrected[by, bx] == pytest.approx(expected_snr(bright[2]), rel=0.05)


def test_source_brighter_in_reference_has_negative_flux() -> None:
    rng = np.random.default_rng(8)
    n = 128
    science = rng.normal(size=(n, n)) * SIGMA_SCIENCE
    reference = rng.normal(size=(n, n)) * SIGMA_REFERENCE
    reference += render(
        (n, n), np.array([64.0]), np.array([60.0]), np.array([6000.0]), FWHM_REFERENCE
    )
    result = subtract(science, reference)
    # A source of 6000 reference counts is missing 6000 * RATIO science counts.
    assert result.flux[60, 64] == pytest.approx(-6000.0 * RATIO, rel=0.05)
    assert result.score_corrected[60, 64] < -20


def test_matches_direct_evaluation_of_the_paper_equations() -> None:
    """Eqs. 13, 12 and 25 evaluated naively with full complex FFTs on a periodic grid."""
    rng = np.random.default_rng(2)
    n = 64
    xs, ys = np.array([20.0, 40.3, 33.0]), np.array([30.0, 12.6, 50.0])
    fl = np.array([5e3, 2e4, 8e3])
    reference = (
        render((n, n), xs, ys, fl, FWHM_REFERENCE) + rng.normal(size=(n, n)) * SIGMA_REFERENCE
    )
    science = (
        render((n, n), xs, ys, RATIO * fl, FWHM_SCIENCE) + rng.normal(size=(n, n)) * SIGMA_SCIENCE
    )
    science += render((n, n), np.array([10.0]), np.array([10.0]), np.array([3e3]), FWHM_SCIENCE)
    psf_n, psf_r = gaussian_stamp(FWHM_SCIENCE), gaussian_stamp(FWHM_REFERENCE)

    def spectrum(stamp: NDArray[np.float64]) -> NDArray[np.complex128]:
        grid = np.zeros((n, n))
        h = stamp.shape[0] // 2
        grid[: stamp.shape[0], : stamp.shape[1]] = stamp
        return np.fft.fft2(np.roll(grid, (-h, -h), axis=(0, 1)))

    fn, fr, sn, sr = RATIO, 1.0, SIGMA_SCIENCE, SIGMA_REFERENCE
    pn, pr = spectrum(psf_n), spectrum(psf_r)
    den = sn**2 * fr**2 * np.abs(pr) ** 2 + sr**2 * fn**2 * np.abs(pn) ** 2
    d_hat = (fr * pr * np.fft.fft2(science) - fn * pn * np.fft.fft2(reference)) / np.sqrt(den)
    f_d = fr * fn / np.sqrt(sn**2 * fr**2 + sr**2 * fn**2)
    pd_hat = fr * fn * pr * pn / (f_d * np.sqrt(den))
    s_hat = f_d * d_hat * np.conj(pd_hat)  # eq. 12: S = F_D D ⊗ P̄_D
    d_direct = np.fft.ifft2(d_hat).real
    s_direct = np.fft.ifft2(s_hat).real
    kn = np.fft.ifft2(fn * fr**2 * np.conj(pn) * np.abs(pr) ** 2 / den).real
    kr = np.fft.ifft2(fr * fn**2 * np.conj(pr) * np.abs(pn) ** 2 / den).real
    v_s = sn**2 * np.sum(kn**2) + sr**2 * np.sum(kr**2)
    flux_norm = np.sum(fn**2 * fr**2 * np.abs(pn) ** 2 * np.abs(pr) ** 2 / den) / n**2

    result = subtract(science, reference, config=ZogyConfig(dtype="float64", padding=0))
    assert result.flux_normalisation[0, 0] == pytest.approx(flux_norm, rel=1e-9)
    assert v_s == pytest.approx(flux_norm, rel=1e-9)  # V(S) of background noise is F_S
    np.testing.assert_allclose(result.difference, d_direct, atol=1e-9)
    np.testing.assert_allclose(
        result.score * np.sqrt(flux_norm), s_direct, atol=1e-9 * np.abs(s_direct).max()
    )
    np.testing.assert_allclose(result.score_corrected, s_direct / np.sqrt(v_s), atol=1e-8)
    np.testing.assert_allclose(result.flux, s_direct / flux_norm * fn, atol=1e-6)


def test_astrometric_noise_term_absorbs_registration_errors(field_pair: Field) -> None:
    f = field_pair
    shifted = ndimage.shift(f["reference"], (0.0, 0.15), order=3, mode="nearest")
    options = {
        "flux_scale": FluxScale(
            flux_ratio=RATIO, background_offset=BACKGROUND_SCIENCE - RATIO * BACKGROUND_REFERENCE
        ),
        "variance_science": f["var_n"],
        "variance_reference": f["var_r"],
    }
    plain = subtract(f["science"], shifted, **options)
    corrected = subtract(
        f["science"], shifted, astrometric_sigma_x=0.15, astrometric_sigma_y=0.15, **options
    )
    keep = interior(plain.mask)
    assert float(np.abs(plain.score_corrected[keep]).max()) > 7.0
    assert float(np.abs(corrected.score_corrected[keep]).max()) < 5.5
    assert corrected.astrometric_sigma == (0.15, 0.15)
    # The correction only adds variance: |S_corr| never grows.
    assert np.all(np.abs(corrected.score_corrected) <= np.abs(plain.score_corrected) + 1e-4)


# ----------------------------------------------------------------------------------------
# Photometric tie
# ----------------------------------------------------------------------------------------


def test_fit_flux_scale_recovers_ratio_and_offset() -> None:
    f = make_field(384, seed=11, n_stars=50, integer=False)
    scale = fit_flux_scale(
        f["science"],
        f["reference"],
        x=f["x"],
        y=f["y"],
        psf_science=gaussian_stamp(FWHM_SCIENCE),
        psf_reference=PsfModel.gaussian(FWHM_REFERENCE),
    )
    assert scale.flux_ratio == pytest.approx(RATIO, rel=0.01)
    assert abs(scale.flux_ratio - RATIO) < 4 * scale.flux_ratio_error
    expected_offset = BACKGROUND_SCIENCE - RATIO * BACKGROUND_REFERENCE
    assert scale.background_offset == pytest.approx(expected_offset, abs=0.3)
    assert 0 < scale.background_offset_error < 0.2
    assert scale.n_stars >= 40
    assert scale.used.shape == (50,)
    assert int(scale.used.sum()) == scale.n_stars


def test_fit_flux_scale_rejects_a_variable_star_and_needs_enough_stars() -> None:
    f = make_field(256, seed=4, n_stars=30, integer=False)
    science = f["science"].copy()
    # A variable star must be dropped by the clipping.
    variable = 0  # this star brightens by 3e4 counts in the science image
    x0, y0 = f["x"][variable], f["y"][variable]
    science += render((256, 256), np.array([x0]), np.array([y0]), np.array([3e4]), FWHM_SCIENCE)
    scale = fit_flux_scale(
        science,
        f["reference"],
        x=f["x"],
        y=f["y"],
        psf_science=gaussian_stamp(FWHM_SCIENCE),
        psf_reference=gaussian_stamp(FWHM_REFERENCE),
    )
    assert not scale.used[variable]
    assert scale.n_rejected >= 1
    assert scale.flux_ratio == pytest.approx(RATIO, rel=0.01)

    with pytest.raises(StarMatchFailed) as info:
        fit_flux_scale(
            science,
            f["reference"],
            x=np.array([-50.0, 1000.0, 5.0]),
            y=np.array([10.0, 10.0, 1.0]),
            psf_science=gaussian_stamp(FWHM_SCIENCE),
            psf_reference=gaussian_stamp(FWHM_REFERENCE),
        )
    assert info.value.n_matched == 0
    assert info.value.n_required == 5


# ----------------------------------------------------------------------------------------
# Masks, tiles and spatially varying PSFs
# ----------------------------------------------------------------------------------------


def test_nan_blob_and_mask_do_not_ring(field_pair: Field) -> None:
    f = field_pair
    options = {
        "flux_scale": FluxScale(
            flux_ratio=RATIO, background_offset=BACKGROUND_SCIENCE - RATIO * BACKGROUND_REFERENCE
        ),
        "variance_science": f["var_n"],
        "variance_reference": f["var_r"],
    }
    clean = subtract(f["science"], f["reference"], **options)
    science = f["science"].copy()
    science[200:240, 150:200] = np.nan  # a NaN blob in N
    mask_reference = np.zeros(science.shape, dtype=bool)
    mask_reference[300:330, 350:420] = True  # a masked block in R
    result = subtract(science, f["reference"], mask_reference=mask_reference, **options)

    for name in ("difference", "score", "score_corrected", "flux", "flux_error"):
        assert np.isfinite(getattr(result, name)).all(), name
    assert result.mask[200:240, 150:200].all()
    assert result.mask[300:330, 350:420].all()
    keep = interior(result.mask)
    # Outside the grown mask the result is what it was without the blob: no ringing.
    for name in ("difference", "score_corrected"):
        change = np.abs(getattr(result, name) - getattr(clean, name))[keep]
        assert float(change.max()) < 0.05, name
    s_corr = result.score_corrected[keep]
    assert abs(float(np.std(s_corr)) - 1.0) < 0.05
    assert float(np.abs(s_corr).max()) < 5.5
    # Right next to the blob, just outside the grown mask, S_corr is still unit normal.
    ring = ndimage.binary_dilation(result.mask, iterations=6) & ~result.mask
    ring &= interior(np.zeros_like(ring))
    assert abs(float(np.std(result.score_corrected[ring])) - 1.0) < 0.1


def test_tiles_reproduce_the_single_fft_result(field_pair: Field) -> None:
    f = field_pair
    options = {
        "variance_science": f["var_n"],
        "variance_reference": f["var_r"],
        "astrometric_sigma_x": 0.05,
        "astrometric_sigma_y": 0.03,
    }
    whole = subtract(f["science"], f["reference"], **options)
    tiled = subtract(
        f["science"], f["reference"], config=ZogyConfig(tiling="always", tile_size=128), **options
    )
    assert tiled.flux_normalisation.shape == (4, 4)
    keep = ~whole.mask
    for name in ("difference", "score", "score_corrected"):
        diff = np.abs(getattr(tiled, name) - getattr(whole, name))[keep]
        assert float(diff.max()) < 2e-3, name
    np.testing.assert_allclose(tiled.flux[keep], whole.flux[keep], atol=0.05)


def test_offset_refit_equals_a_second_subtraction_with_the_corrected_offset(
    field_pair: Field,
) -> None:
    f = field_pair
    true_offset = BACKGROUND_SCIENCE - RATIO * BACKGROUND_REFERENCE
    science = f["science"].copy()
    science[200:240, 150:200] = np.nan  # masked pixels and tiles: the hard cases
    options: dict[str, Any] = {
        "variance_science": f["var_n"],
        "variance_reference": f["var_r"],
        "astrometric_sigma_x": 0.05,
        "astrometric_sigma_y": 0.03,
    }
    tiles: dict[str, Any] = {"tiling": "always", "tile_size": 128, "psf_error": 0.02}
    wrong = FluxScale(flux_ratio=RATIO, background_offset=true_offset + 3.0)
    refit = subtract(
        science,
        f["reference"],
        flux_scale=wrong,
        config=ZogyConfig(refit_offset=True, **tiles),
        **options,
    )
    # The 3-unit error (0.3 sigma of N) is found on D; what is left is the offset fitted
    # on D, within ~0.1 of the truth (the reference median holds faint star light).
    assert refit.flux_scale.background_offset == pytest.approx(true_offset, abs=0.15)
    rerun = subtract(
        science, f["reference"], flux_scale=refit.flux_scale, config=ZogyConfig(**tiles), **options
    )
    keep = interior(refit.mask)
    assert abs(float(np.median(refit.difference[keep]))) < 0.01
    for name, tolerance in (
        ("difference", 1e-3),
        ("score", 1e-3),
        ("score_corrected", 2e-3),
        ("flux", 0.05),
        ("flux_error", 1e-3),
    ):
        change = np.abs(getattr(refit, name) - getattr(rerun, name))[keep]
        assert float(change.max()) < tolerance, name
    # Far from significant: nothing moves.
    right = subtract(
        science,
        f["reference"],
        flux_scale=refit.flux_scale,
        config=ZogyConfig(refit_offset=True, **tiles),
        **options,
    )
    assert right.flux_scale == refit.flux_scale
    np.testing.assert_array_equal(right.score_corrected, rerun.score_corrected)


def _varying_model(n: int) -> PsfModel:
    grid = np.array([0.0, (n - 1) / 2, n - 1.0])
    fwhm = np.array([[3.0, 3.5, 4.0], [3.5, 4.0, 4.5], [4.0, 4.5, 5.0]])
    stamps = np.stack([np.stack([gaussian_stamp(fw, 21) for fw in row]) for row in fwhm])
    return PsfModel(
        stamps=stamps.astype(np.float32), grid_x=grid, grid_y=grid.copy(), fwhm=4.0, fwhm_grid=fwhm
    )


def test_spatially_varying_psf_tiles_have_no_seams() -> None:
    n, tile = 512, 128
    model = _varying_model(n)
    rng = np.random.default_rng(13)
    science = rng.normal(size=(n, n)) * SIGMA_SCIENCE
    reference = rng.normal(size=(n, n)) * SIGMA_REFERENCE
    # A new source at a tile centre, drawn with the local PSF.
    x0, y0 = 319.0, 191.0  # centre of tile (1, 2) for 4x4 tiles of 128
    fw = model.fwhm_at(x0, y0)
    science += render((n, n), np.array([x0]), np.array([y0]), np.array([5000.0]), fw)
    result = subtract(science, reference, psf_science=model, config=ZogyConfig(tile_size=tile))

    assert result.flux_normalisation.shape == (4, 4)
    assert result.difference_psf.stamps.shape[:2] == (4, 4)
    assert result.difference_psf.fwhm_grid[0, 0] < result.difference_psf.fwhm_grid[-1, -1]
    assert result.flux[int(y0), int(x0)] == pytest.approx(5000.0, rel=0.05)

    away = distance((n, n), x0, y0) > 20
    s_corr = np.where(away, result.score_corrected, 0.0)
    keep = interior(result.mask) & away
    assert abs(float(np.std(s_corr[keep])) - 1.0) < 0.05
    # Bands of ±12 pixels around the tile borders: S_corr is unit normal there too (the
    # pooled band to ±0.05, each border to ±0.1, the scatter of a band being ~0.03).
    bands = np.zeros((n, n), dtype=bool)
    ratios = []
    for border in (128, 256, 384):
        band = np.zeros((n, n), dtype=bool)
        band[border - 12 : border + 12, :] = True
        band[:, border - 12 : border + 12] = True
        bands |= band
        assert abs(float(np.std(s_corr[band & keep])) - 1.0) < 0.1
        # No step across the seam: neighbouring pixels differ about as much as in a tile.
        across = np.abs(s_corr[border, 30:-30] - s_corr[border - 1, 30:-30]).mean()
        inside = np.abs(s_corr[border + 40, 30:-30] - s_corr[border + 39, 30:-30]).mean()
        ratios.append(across / inside)
    assert abs(float(np.std(s_corr[bands & keep])) - 1.0) < 0.05
    assert float(np.mean(ratios)) < 1.3


# ----------------------------------------------------------------------------------------
# Errors and backends
# ----------------------------------------------------------------------------------------


def test_shape_mismatch_is_typed() -> None:
    a = np.zeros((64, 64))
    with pytest.raises(ShapeMismatch) as info:
        subtract(a, np.zeros((64, 65)))
    assert info.value.shapes["reference"] == (64, 65)
    with pytest.raises(ShapeMismatch):
        subtract(a, a, mask_science=np.zeros((32, 32), dtype=bool))


@pytest.mark.parametrize(
    ("stamp", "n_non_finite"),
    [
        (np.ones((4, 4)) / 16, 0),  # even size
        (np.ones((5, 3)) / 15, 0),  # not square
        (np.where(np.eye(5) > 0, np.nan, 0.04), 5),  # non-finite
        (np.zeros((5, 5)), 0),  # zero sum
    ],
)
def test_bad_psf_is_typed(stamp: NDArray[np.float64], n_non_finite: int) -> None:
    a = np.random.default_rng(0).normal(size=(64, 64))
    with pytest.raises(InvalidPsf) as info:
        subtract(a, a, psf_science=stamp)
    assert info.value.which == "psf_science"
    assert info.value.shape == stamp.shape
    assert info.value.n_non_finite == n_non_finite


@pytest.mark.parametrize("backend", ["cupy", "torch"])
def test_missing_gpu_backend_is_an_error_and_auto_falls_back(backend: str) -> None:
    a = np.random.default_rng(0).normal(size=(64, 64))
    if importlib.util.find_spec(backend) is None:
        with pytest.raises(BackendUnavailable) as info:
            subtract(a, a, config=ZogyConfig(backend=backend))  # type: ignore[arg-type]
        assert info.value.backend == backend
    if importlib.util.find_spec("cupy") is None and importlib.util.find_spec("torch") is None:
        assert subtract(a, a, config=ZogyConfig(backend="auto")).backend == "numpy"
