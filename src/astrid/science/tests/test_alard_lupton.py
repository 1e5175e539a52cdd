"""Alard-Lupton subtraction on synthetic star fields with known seeing, flux ratio and noise.

Each scene is a jittered grid of Gaussian stars (sampled at pixel centres) seen twice with
independent Gaussian noise: a reference and a science image with a different FWHM, a flux
ratio and a background offset. Positions are 0-based pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from numpy.typing import NDArray

from astrid.errors import ShapeMismatch, TooFewStamps, TooFewStarsForPsf
from astrid.science.alard_lupton import (
    AlardLuptonConfig,
    AlardLuptonResult,
    MatchingKernel,
    decorrelation_kernel,
    fit_matching_kernel,
    subtract_alard_lupton,
)
from astrid.science.detect import detect_candidates, psf_photometry
from astrid.science.psf_model import PsfModel, gaussian_fwhm_to_sigma

SIZE = 400
#: Side of the scenes whose noise statistics are tested: the score's mean over the
#: source-free pixels scatters by about sqrt(PSF area / n_pixels) ≈ 0.008 here.
NOISE_SIZE = 1024
TRANSIENT_X, TRANSIENT_Y = 215.0, 195.0


def _render(
    shape: tuple[int, int],
    fwhm: float | NDArray[np.float64],
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    flux: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Unit-sum circular Gaussians (one FWHM per star or one for all) times ``flux``."""
    image = np.zeros(shape)
    fwhms = np.broadcast_to(np.asarray(fwhm, np.float64), np.shape(x))
    for xi, yi, fi, wi in zip(x, y, flux, fwhms, strict=True):
        sigma = gaussian_fwhm_to_sigma(wi)
        h = int(np.ceil(6 * sigma))
        ix, iy = round(xi), round(yi)
        yy, xx = np.mgrid[iy - h : iy + h + 1, ix - h : ix + h + 1]
        g = np.exp(-0.5 * ((xx - xi) ** 2 + (yy - yi) ** 2) / sigma**2) / (2 * np.pi * sigma**2)
        image[iy - h : iy + h + 1, ix - h : ix + h + 1] += fi * g
    return image


@dataclass(frozen=True)
class Scene:
    science: NDArray[np.float64]
    reference: NDArray[np.float64]
    star_x: NDArray[np.float64]
    star_y: NDArray[np.float64]
    fit_x: NDArray[np.float64]
    fit_y: NDArray[np.float64]
    science_fwhm: float
    reference_fwhm: float
    ratio: float
    background: float
    sigma_science: float
    sigma_reference: float
    transient_flux: float


def _scene(
    *,
    seed: int,
    science_fwhm: float,
    reference_fwhm: float,
    ratio: float,
    background: float,
    sigma_science: float,
    sigma_reference: float,
    transient_flux: float = 0.0,
    science_fwhm_slope: float = 0.0,
    size: int = SIZE,
) -> Scene:
    """Stars on a jittered grid 40 pixels apart; science = ratio * field + background + transient.

    ``science_fwhm_slope`` makes the science FWHM vary linearly with x (pixels per pixel).
    Every star is a fit star up to 100 stars; beyond that a regular subset of about 150.
    """
    rng = np.random.default_rng(seed)
    grid = np.arange(30.0, size - 20, 40.0)
    gx, gy = np.meshgrid(grid, grid)
    x = gx.ravel() + rng.uniform(-5, 5, gx.size)
    y = gy.ravel() + rng.uniform(-5, 5, gy.size)
    flux = 10 ** rng.uniform(3.5, 4.5, x.size)
    shape = (size, size)
    reference = _render(shape, reference_fwhm, x, y, flux)
    science_fwhms = science_fwhm + science_fwhm_slope * (x - size / 2)
    science = ratio * _render(shape, science_fwhms, x, y, flux) + background
    if transient_flux:
        science += _render(
            shape, science_fwhm, np.array([TRANSIENT_X]), np.array([TRANSIENT_Y]),
            np.array([transient_flux]),
        )  # fmt: skip
    reference += rng.normal(0.0, sigma_reference, shape)
    science += rng.normal(0.0, sigma_science, shape)
    fit = slice(None, None, max(1, x.size // 150) if x.size > 100 else 1)
    return Scene(
        science, reference, x, y, x[fit], y[fit], science_fwhm, reference_fwhm, ratio,
        background, sigma_science, sigma_reference, transient_flux,
    )  # fmt: skip


def _subtract(scene: Scene, config: AlardLuptonConfig | None = None) -> AlardLuptonResult:
    return subtract_alard_lupton(
        scene.science,
        scene.reference,
        science_psf=scene.science_fwhm,
        reference_psf=scene.reference_fwhm,
        star_x=scene.fit_x,
        star_y=scene.fit_y,
        science_variance=scene.sigma_science**2,
        reference_variance=scene.sigma_reference**2,
        config=config,
    )


def _source_free(scene: Scene, result: AlardLuptonResult) -> NDArray[np.bool_]:
    free = ~result.mask
    for x, y in zip(
        np.append(scene.star_x, TRANSIENT_X), np.append(scene.star_y, TRANSIENT_Y), strict=True
    ):
        ix, iy = round(x), round(y)
        free[max(0, iy - 12) : iy + 13, max(0, ix - 12) : ix + 13] = False
    return free


def _lag1(image: NDArray[np.floating], good: NDArray[np.bool_], axis: int) -> float:
    """Normalised autocorrelation at a one-pixel lag along ``axis`` over good pixels."""
    a = np.where(good, np.asarray(image, np.float64), 0.0)
    a = a - a[good].mean() * good
    if axis == 0:
        a, good = a.T, good.T
    pair = good[:, 1:] & good[:, :-1]
    return float(np.sum(a[:, 1:] * a[:, :-1] * pair) / np.sum(a[:, 1:] ** 2 * pair))


def _optimal_snr(scene: Scene, flux: float) -> float:
    """Optimal point-source S/N in the difference, from the true PSFs and noise.

    With the science convolved or not, whitening and matching with the difference PSF
    reaches ``S/N² = f² Σ_k |P̂_N|² / (σ_N² + |κ̂|² σ_R²) / M²`` (reference convolved,
    κ the exact Gaussian matching kernel scaled by the flux ratio) and its mirror image
    when the science is convolved. Computed on an M x M grid.
    """
    m = 128
    k = np.fft.fftfreq(m)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    s_n = gaussian_fwhm_to_sigma(scene.science_fwhm)
    s_r = gaussian_fwhm_to_sigma(scene.reference_fwhm)
    p_n2 = np.exp(-4 * np.pi**2 * k2 * s_n**2)  # |P̂_N|²
    p_r2 = np.exp(-4 * np.pi**2 * k2 * s_r**2)
    var_n, var_r = scene.sigma_science**2, scene.sigma_reference**2
    # Noise PSD of N - ratio * R after matching, in science units, divided by |P̂_N|²:
    # σ_N² / |P̂_N|² + ratio² σ_R² / |P̂_R|², whichever image is convolved.
    inv = 1.0 / (var_n / p_n2 + scene.ratio**2 * var_r / p_r2)
    return float(flux * np.sqrt(inv.sum() / m**2))


def _linear_psf_flux(image: NDArray[np.floating], psf: PsfModel, x: float, y: float) -> float:
    """Least-squares PSF amplitude at a pixel centre, with the PSF's negative values kept."""
    p = np.asarray(psf.at(x, y), np.float64)
    h = p.shape[0] // 2
    ix, iy = round(x), round(y)
    cut = np.asarray(image, np.float64)[iy - h : iy + h + 1, ix - h : ix + h + 1]
    return float(np.sum(cut * p) / np.sum(p * p))


@pytest.fixture(scope="module")
def reference_convolved() -> tuple[Scene, AlardLuptonResult]:
    """Sharper, noisier reference: its convolved noise visibly correlates the difference."""
    scene = _scene(
        seed=1, science_fwhm=4.0, reference_fwhm=2.5, ratio=2.0, background=5.0,
        sigma_science=5.0, sigma_reference=5.0, size=NOISE_SIZE,
    )  # fmt: skip
    return scene, _subtract(scene)


@pytest.fixture(scope="module")
def science_convolved() -> tuple[Scene, AlardLuptonResult]:
    """Sharper, noisier science image with a faint transient; a deep, broad reference."""
    scene = _scene(
        seed=2, science_fwhm=2.5, reference_fwhm=4.0, ratio=1.6, background=-3.0,
        sigma_science=8.0, sigma_reference=2.0, transient_flux=5000.0, size=NOISE_SIZE,
    )  # fmt: skip
    return scene, _subtract(scene)


@pytest.mark.parametrize("case", ["reference_convolved", "science_convolved"])
def test_decorrelated_noise_is_white_with_the_predicted_variance(
    case: str, request: pytest.FixtureRequest
) -> None:
    scene, result = request.getfixturevalue(case)
    free = _source_free(scene, result)
    expected = np.sqrt(np.median(result.variance))
    assert float(np.std(result.decorrelated[free])) / expected == pytest.approx(1.0, abs=0.05)
    assert result.noise_sigma == pytest.approx(expected, rel=1e-3)
    for axis in (0, 1):
        assert abs(_lag1(result.decorrelated, free, axis)) < 0.05
        assert _lag1(result.difference, free, axis) > 0.08  # convolved noise, before
    assert float(np.std(result.score[free])) == pytest.approx(1.0, abs=0.05)
    assert float(np.mean(result.score[free])) == pytest.approx(0.0, abs=0.02)
    assert result.residual_rms == pytest.approx(1.0, abs=0.05)


def test_flux_scale_and_background_are_recovered(
    reference_convolved: tuple[Scene, AlardLuptonResult],
    science_convolved: tuple[Scene, AlardLuptonResult],
) -> None:
    scene, result = reference_convolved
    assert result.convolved == "reference"
    assert result.flux_scale == pytest.approx(scene.ratio, rel=0.01)
    assert result.science_over_reference == pytest.approx(scene.ratio, rel=0.01)
    # Science = ratio * (K ⊗ reference) + background: the offset in science units.
    assert result.background[0] == pytest.approx(scene.background, abs=0.15)
    assert np.all(np.abs(result.background[1:]) < 0.15)  # no gradient was added
    n_stamps = result.n_stamps_used + result.n_stamps_rejected + result.n_stamps_unusable
    assert n_stamps == len(scene.fit_x)

    scene, result = science_convolved
    assert result.convolved == "science"
    assert result.science_over_reference == pytest.approx(scene.ratio, rel=0.01)
    # Reference = K ⊗ science + B: the offset in reference units is -background / ratio.
    assert result.background[0] == pytest.approx(-scene.background / scene.ratio, abs=0.1)


def test_injected_source_has_the_optimal_significance_and_its_flux() -> None:
    # A deep reference, as usual; the transient sits on a pixel centre.
    scene = _scene(
        seed=3, science_fwhm=4.0, reference_fwhm=2.5, ratio=2.0, background=5.0,
        sigma_science=5.0, sigma_reference=1.5, transient_flux=3500.0,
    )  # fmt: skip
    result = _subtract(scene)
    ix, iy = round(TRANSIENT_X), round(TRANSIENT_Y)
    window = result.score[iy - 2 : iy + 3, ix - 2 : ix + 3]
    peak = np.unravel_index(np.argmax(window), window.shape)
    assert (peak[0] - 2, peak[1] - 2) == (0, 0)
    expected = _optimal_snr(scene, scene.transient_flux)
    assert float(window.max()) == pytest.approx(expected, rel=0.1)
    flux, flux_err, _ = psf_photometry(
        result.decorrelated,
        result.variance,
        np.array([TRANSIENT_X]),
        np.array([TRANSIENT_Y]),
        result.psf,
    )
    assert flux[0] == pytest.approx(scene.transient_flux, rel=0.05)
    assert flux_err[0] == pytest.approx(scene.transient_flux / expected, rel=0.1)
    candidates = detect_candidates(
        result.score, result.decorrelated, result.variance, result.psf, mask=result.mask
    )
    assert len(candidates) == 1
    assert candidates["polarity"][0] == 1
    assert float(candidates["x"][0].value) == pytest.approx(TRANSIENT_X, abs=0.5)
    assert float(candidates["y"][0].value) == pytest.approx(TRANSIENT_Y, abs=0.5)


@pytest.mark.parametrize("case", ["reference_convolved", "science_convolved"])
def test_difference_psf_gives_the_exact_flux(case: str, request: pytest.FixtureRequest) -> None:
    """Noiseless response: the same scene with and without a transient, subtracted.

    A linear PSF fit with the result's PSF (negative lobes included) returns the injected
    flux in science units, positive whichever image was convolved.
    """
    scene, result = request.getfixturevalue(case)
    flux = 3000.0
    source = _render(
        scene.science.shape, scene.science_fwhm, np.array([TRANSIENT_X]),
        np.array([TRANSIENT_Y]), np.array([flux]),
    )  # fmt: skip
    with_source = Scene(**{**scene.__dict__, "science": scene.science + source})
    response = _subtract(with_source).decorrelated - result.decorrelated
    fitted = _linear_psf_flux(response, result.psf, TRANSIENT_X, TRANSIENT_Y)
    assert fitted == pytest.approx(flux, rel=0.01)


def test_sharper_science_is_convolved_and_a_transient_stays_positive(
    science_convolved: tuple[Scene, AlardLuptonResult],
) -> None:
    scene, result = science_convolved
    assert result.convolved == "science"
    ix, iy = round(TRANSIENT_X), round(TRANSIENT_Y)
    expected = _optimal_snr(scene, scene.transient_flux)
    assert float(result.score[iy - 2 : iy + 3, ix - 2 : ix + 3].max()) == pytest.approx(
        expected, rel=0.1
    )
    assert float(result.score.min()) > -6.0
    flux, _, _ = psf_photometry(
        result.decorrelated,
        result.variance,
        np.array([TRANSIENT_X]),
        np.array([TRANSIENT_Y]),
        result.psf,
    )
    assert flux[0] > 0
    # psf_photometry clips a PSF's negative values; this noisy science image gives the
    # decorrelated PSF strong negative lobes, so the flux is checked with the full PSF.
    fitted = _linear_psf_flux(result.decorrelated, result.psf, TRANSIENT_X, TRANSIENT_Y)
    assert fitted == pytest.approx(scene.transient_flux, rel=0.05)


def test_spatially_varying_seeing_needs_the_spatial_terms() -> None:
    scene = _scene(
        seed=4, science_fwhm=4.0, reference_fwhm=2.5, ratio=1.0, background=0.0,
        sigma_science=3.0, sigma_reference=1.0, science_fwhm_slope=1.0 / SIZE,
    )  # fmt: skip
    varying = _subtract(scene, config=AlardLuptonConfig(spatial_degree=2))
    constant = _subtract(scene, config=AlardLuptonConfig(spatial_degree=0, clip_sigma=100.0))
    assert varying.residual_rms == pytest.approx(1.0, abs=0.05)
    assert constant.residual_rms > 1.15
    assert varying.flux_scale == pytest.approx(1.0, rel=0.01)
    assert not varying.psf.is_constant


def test_masks_and_variance_maps() -> None:
    """NaN pixels, a masked column and a reference 6x noisier on its right half."""
    scene = _scene(
        seed=6, science_fwhm=4.0, reference_fwhm=2.5, ratio=2.0, background=5.0,
        sigma_science=5.0, sigma_reference=1.0,
    )  # fmt: skip
    rng = np.random.default_rng(9)
    sigma_reference = np.where(np.arange(SIZE) < SIZE // 2, 1.0, 6.0)[None, :].repeat(SIZE, 0)
    reference = scene.reference + rng.normal(0.0, 1.0, scene.reference.shape) * np.sqrt(
        sigma_reference**2 - 1.0
    )
    science = scene.science.copy()
    science[100:110, 300:320] = np.nan
    mask = np.zeros(science.shape, bool)
    mask[:, 50] = True
    result = subtract_alard_lupton(
        science, reference, science_psf=4.0, reference_psf=2.5, star_x=scene.fit_x,
        star_y=scene.fit_y, science_variance=np.full(science.shape, 25.0),
        reference_variance=sigma_reference**2, mask=mask,
    )  # fmt: skip
    for image in (result.difference, result.decorrelated, result.score, result.variance):
        assert np.all(np.isfinite(image))
    assert result.mask[100:110, 300:320].all() and result.mask[:, 50].all()
    assert result.n_stamps_unusable > 0
    free = _source_free(scene, result)
    left = free & (np.arange(SIZE) < SIZE // 2)[None, :]
    for part in (left, free & ~left):
        normalised = result.decorrelated[part] / np.sqrt(result.variance[part])
        assert float(np.std(normalised)) == pytest.approx(1.0, abs=0.05)
        assert float(np.std(result.score[part])) == pytest.approx(1.0, abs=0.05)
        assert float(np.mean(result.score[part])) == pytest.approx(0.0, abs=0.05)


def test_matching_kernel_convolution_matches_a_direct_sum() -> None:
    rng = np.random.default_rng(7)
    shape = (37, 52)
    basis = rng.normal(size=(4, 7, 7))
    kernel = MatchingKernel(
        basis=basis,
        coefficients=rng.normal(size=(4, 6)),
        background=np.zeros(1),
        spatial_degree=2,
        background_degree=0,
        shape=shape,
    )
    image = rng.normal(size=shape)
    fast = kernel.convolve(image)
    padded = np.pad(image, 3)
    direct = np.zeros(shape)
    for y in range(shape[0]):
        for x in range(shape[1]):
            k = kernel.at(x, y)
            # (K ⊗ T)(x, y) = Σ_uv K(u, v) T(x - u, y - v)
            direct[y, x] = np.sum(k[::-1, ::-1] * padded[y : y + 7, x : x + 7])
    np.testing.assert_allclose(fast, direct, atol=1e-4 * np.abs(direct).max())


def test_kernel_basis_separates_the_flux_scale(
    reference_convolved: tuple[Scene, AlardLuptonResult],
) -> None:
    _, result = reference_convolved
    kernel = result.kernel_fit.kernel
    sums = kernel.basis.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-10)
    # Constant flux scale: the first coefficient has no spatial terms.
    np.testing.assert_array_equal(kernel.coefficients[0, 1:], 0.0)
    assert kernel.flux_scale_at(0, 0) == pytest.approx(result.flux_scale)
    assert float(result.kernel.sum()) == pytest.approx(result.flux_scale)
    background = kernel.background_image()
    for x, y in ((0, 0), (1000, 17), (3, 1023), (511, 512)):
        assert background[y, x] == pytest.approx(kernel.background_at(x, y), abs=1e-12)


def test_decorrelation_kernel_limits() -> None:
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    gauss = np.asarray(PsfModel.gaussian(3.0, size=9).stamps[0, 0], np.float64)
    # A noiseless convolved image leaves nothing to decorrelate.
    phi = decorrelation_kernel(gauss, variance_unconvolved=4.0, variance_convolved=0.0)
    np.testing.assert_allclose(phi, delta, atol=1e-12)
    # A pure rescaling (κ = s δ) does not correlate noise either.
    phi = decorrelation_kernel(2.5 * delta, variance_unconvolved=4.0, variance_convolved=9.0)
    np.testing.assert_allclose(phi, delta, atol=1e-12)
    # Otherwise φ sharpens (φ̂ ≥ 1, φ̂(0) = 1): unit sum, a peak above 1, negative lobes.
    phi = decorrelation_kernel(2.0 * gauss, variance_unconvolved=4.0, variance_convolved=9.0)
    assert phi.sum() == pytest.approx(1.0)
    assert phi[4, 4] > 1.0
    assert phi.min() < 0.0


def test_too_few_stamps_is_its_own_error() -> None:
    scene = _scene(
        seed=5, science_fwhm=4.0, reference_fwhm=2.5, ratio=1.0, background=0.0,
        sigma_science=3.0, sigma_reference=3.0,
    )  # fmt: skip
    x = np.append(scene.star_x[:3], [2.0, SIZE - 3.0])  # two stamps off the edge
    y = np.append(scene.star_y[:3], [200.0, 200.0])
    with pytest.raises(TooFewStamps) as info:
        subtract_alard_lupton(
            scene.science, scene.reference, science_psf=4.0, reference_psf=2.5,
            star_x=x, star_y=y,
        )  # fmt: skip
    assert (info.value.n_found, info.value.n_required) == (3, 10)
    assert not isinstance(info.value, TooFewStarsForPsf)
    with pytest.raises(TooFewStamps):
        fit_matching_kernel(
            scene.reference, scene.science, x=x, y=y, template_fwhm=2.5, target_fwhm=4.0,
            config=AlardLuptonConfig(min_stamps=4),
        )  # fmt: skip


def test_shape_mismatches_are_typed() -> None:
    science = np.zeros((64, 64))
    with pytest.raises(ShapeMismatch):
        subtract_alard_lupton(
            science, np.zeros((64, 60)), science_psf=3.0, reference_psf=2.0,
            star_x=[10.0], star_y=[10.0],
        )  # fmt: skip
    with pytest.raises(ShapeMismatch):
        subtract_alard_lupton(
            science, science, science_psf=3.0, reference_psf=2.0, star_x=[10.0],
            star_y=[10.0], science_variance=np.ones((32, 32)),
        )  # fmt: skip
    with pytest.raises(ShapeMismatch):
        subtract_alard_lupton(
            science, science, science_psf=3.0, reference_psf=2.0, star_x=[10.0, 20.0],
            star_y=[10.0],
        )  # fmt: skip
