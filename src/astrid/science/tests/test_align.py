"""Tests of the alignment stage (``astrid.science.align``).

Synthetic pairs are built here: stars rendered as pixel-integrated Gaussians on a
science grid and on a reference grid related to it by a known affine map, with TAN
WCSs that encode exactly that map. Real pairs come from the shared data.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.special import erf

from astrid.errors import InsufficientOverlap, NoCelestialWcs, ShapeMismatch, StarMatchFailed
from astrid.exposure import Exposure, MaskBit
from astrid.science.align import (
    AlignConfig,
    AlignmentWarning,
    PixelMap,
    align_to,
    match_stars,
    resample_arrays,
)
from astrid.science.background import BackgroundConfig
from astrid.science.stars import StarConfig, find_sources

SCALE = 0.25  # arcsec per science pixel
FWHM = 3.0  # science pixels
SKY = 100.0
NOISE = 5.0


# ---------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------


def tan_wcs(crpix0: np.ndarray, cd: np.ndarray, crval: tuple[float, float] = (150.0, 2.0)) -> WCS:
    """TAN WCS with 0-based reference pixel ``crpix0`` and CD matrix (deg per pixel)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(np.asarray(crpix0, float) + 1.0)
    w.wcs.cd = cd
    return w


def affine(shift: tuple[float, float], rotation_deg: float, scale: float, n: int) -> np.ndarray:
    """3x3 map science pixel -> reference pixel for ``n``-pixel science images.

    Rotates and scales about the science centre, which lands on the reference centre
    (reference of ``n * scale`` pixels) plus ``shift``.
    """
    th = np.deg2rad(rotation_deg)
    a = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.full(2, (n - 1) / 2)
    c_ref = np.full(2, (round(n * scale) - 1) / 2)
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = c_ref + np.asarray(shift) - a @ c
    return m


def apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return (np.column_stack([xy, np.ones(len(xy))]) @ m.T)[:, :2]


def render(shape: tuple[int, int], xy: np.ndarray, flux: np.ndarray, sigma: float) -> np.ndarray:
    """Stars as Gaussians integrated over each pixel, plus the sky."""
    ny, nx = shape
    img = np.full(shape, SKY)
    ex = np.arange(nx + 1) - 0.5
    ey = np.arange(ny + 1) - 0.5
    for (x0, y0), f in zip(xy, flux, strict=True):
        px = np.diff(0.5 * erf((ex - x0) / (np.sqrt(2) * sigma)))
        py = np.diff(0.5 * erf((ey - y0) / (np.sqrt(2) * sigma)))
        img += f * np.outer(py, px)
    return img


def star_positions(n: int, size: int, rng: np.random.Generator, margin: float = 14.0) -> np.ndarray:
    """Positions at least 12 px apart (isolated for the star selection)."""
    out: list[np.ndarray] = []
    while len(out) < n:
        p = rng.uniform(margin, size - 1 - margin, 2)
        if all(np.hypot(*(p - q)) > 12.0 for q in out):
            out.append(p)
    return np.array(out)


def make_pair(
    *,
    size: int = 256,
    shift: tuple[float, float] = (3.3, -1.7),
    rotation_deg: float = 0.3,
    scale: float = 1.0,
    n_stars: int = 30,
    noise: bool = True,
    seed: int = 3,
) -> tuple[Exposure, Exposure, dict]:
    """Science and reference exposures of one star field.

    ``scale`` is reference pixels per science pixel (2 means reference pixels half as
    large); the reference image has ``size * scale`` pixels on a side.
    """
    rng = np.random.default_rng(seed)
    m = affine(shift, rotation_deg, scale, size)
    xy = star_positions(n_stars, size, rng)
    flux = 10 ** rng.uniform(3.3, 5.0, n_stars)
    sigma = FWHM / 2.3548
    cd_sci = SCALE / 3600 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    crpix_sci = np.array([(size - 1) / 2, (size - 1) / 2])
    sci_wcs = tan_wcs(crpix_sci, cd_sci)
    # reference pixel = A p + b; same sky: CD_ref = CD_sci A^-1, crpix_ref = A crpix_sci + b
    ref_wcs = tan_wcs(apply(m, crpix_sci[None])[0], cd_sci @ np.linalg.inv(m[:2, :2]))
    ref_size = round(size * scale)
    sci_clean = render((size, size), xy, flux, sigma)
    ref_clean = render((ref_size, ref_size), apply(m, xy), flux, sigma * scale)
    sci = sci_clean + (rng.normal(0, NOISE, sci_clean.shape) if noise else 0.0)
    ref = ref_clean + (rng.normal(0, NOISE, ref_clean.shape) if noise else 0.0)
    science = Exposure.from_arrays(sci, wcs=sci_wcs, noise=NOISE)
    reference = Exposure.from_arrays(ref, wcs=ref_wcs, noise=NOISE)
    truth = {"matrix": m, "xy": xy, "flux": flux, "science_clean": sci_clean}
    return science, reference, truth


QUICK_STARS = StarConfig(min_snr=10.0, edge_margin=5, isolation_radius=6.0)


# ---------------------------------------------------------------------------------------
# Pixel map and resampling kernel
# ---------------------------------------------------------------------------------------


def test_pixel_map_reproduces_an_affine_map_exactly() -> None:
    m = affine((3.3, -1.7), 0.3, 1.01, 300)
    pm = PixelMap.from_matrix(m, (300, 310), step=32)
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 299, (500, 2))
    x, y = pm.evaluate(pts[:, 0], pts[:, 1])
    np.testing.assert_allclose(np.column_stack([x, y]), apply(m, pts), atol=1e-9)


def test_pixel_map_from_wcs_matches_per_pixel_wcs() -> None:
    """Coarse map of two TAN WCSs with different tangent points: error < 1e-4 px."""
    size = 1024
    cd = SCALE / 3600 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    out_wcs = tan_wcs(np.array([500.0, 500.0]), cd, crval=(150.0, 60.0))
    th = np.deg2rad(0.7)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    in_wcs = tan_wcs(np.array([700.0, 300.0]), 1.02 * cd @ rot, crval=(150.02, 60.01))
    pm = PixelMap.from_wcs(out_wcs, in_wcs, (size, size), step=32)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, size - 1, (2, 2000))
    exact = in_wcs.world_to_pixel(out_wcs.pixel_to_world(x, y))
    got = pm.evaluate(x, y)
    assert np.max(np.hypot(got[0] - exact[0], got[1] - exact[1])) < 1e-4


@pytest.mark.parametrize("order", [1, 3])
def test_identity_and_integer_shift_are_exact(order: Literal[1, 3]) -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(0, 1, (64, 80)).astype(np.float32)
    var = np.full(data.shape, 2.0, np.float32)
    mask = np.zeros(data.shape, np.uint16)
    shift = np.eye(3)
    shift[:2, 2] = [3.0, -2.0]  # output (x, y) shows input (x + 3, y - 2)
    out = resample_arrays(
        data, var, mask, pixel_map=PixelMap.from_matrix(shift, data.shape), order=order
    )
    np.testing.assert_array_equal(out.data[2:, : 80 - 3], data[:-2, 3:])
    np.testing.assert_allclose(out.variance[2:, : 80 - 3], 2.0, rtol=1e-6)
    assert np.all(out.mask[:2] & MaskBit.NO_DATA)
    assert np.all(out.mask[:, 80 - 2 :] & MaskBit.NO_DATA)
    assert np.isnan(out.data[0, 0]) and np.isinf(out.variance[0, 0])
    assert out.overlap_fraction == pytest.approx((62 * 77) / (64 * 80), abs=0.005)


def test_cubic_reproduces_a_quadratic_surface_under_rotation() -> None:
    """Keys cubic convolution is exact on quadratics: a smooth sky survives resampling."""
    y, x = np.mgrid[0:128, 0:128].astype(float)
    data = 50 + 0.3 * x - 0.2 * y + 1e-3 * (x - 60) ** 2 + 5e-4 * x * y
    m = affine((1.37, -0.61), 2.0, 1.0, 128)
    out = resample_arrays(
        data,
        np.ones_like(data),
        np.zeros(data.shape, np.uint16),
        pixel_map=PixelMap.from_matrix(m, data.shape),
        conserve_flux=False,
    )
    xx, yy = apply(m, np.column_stack([x.ravel(), y.ravel()])).T
    expected = (50 + 0.3 * xx - 0.2 * yy + 1e-3 * (xx - 60) ** 2 + 5e-4 * xx * yy).reshape(
        data.shape
    )
    good = out.mask == 0
    assert good.mean() > 0.9
    np.testing.assert_allclose(out.data[good], expected[good], atol=1e-3)


@pytest.mark.parametrize(("order", "first", "taps"), [(3, -1, 4), (1, 0, 2)])
def test_mask_bits_reach_every_output_pixel_whose_kernel_touches_them(
    order: Literal[1, 3], first: int, taps: int
) -> None:
    size = 96
    m = affine((3.3, -1.7), 0.3, 1.0, size)
    data = np.full((size, size), 10.0)
    mask = np.zeros((size, size), np.uint16)
    bad_xy, nan_xy = (40, 50), (60, 30)
    mask[bad_xy[1], bad_xy[0]] = MaskBit.BAD
    data[nan_xy[1], nan_xy[0]] = np.nan
    out = resample_arrays(
        data, np.ones_like(data), mask, pixel_map=PixelMap.from_matrix(m, (size, size)), order=order
    )
    y, x = np.mgrid[0:size, 0:size]
    fx, fy = apply(m, np.column_stack([x.ravel(), y.ravel()])).T
    ix = np.floor(fx).reshape(size, size) + first
    iy = np.floor(fy).reshape(size, size) + first

    def touched(px: int, py: int) -> np.ndarray:
        return (ix <= px) & (px < ix + taps) & (iy <= py) & (py < iy + taps)

    flagged_bad = (out.mask & MaskBit.BAD) != 0
    np.testing.assert_array_equal(flagged_bad, touched(*bad_xy))
    assert taps**2 / 4 <= flagged_bad.sum() <= taps**2
    no_data = ((out.mask & MaskBit.NO_DATA) != 0) & ((out.mask & MaskBit.EDGE) == 0)
    interior = (ix >= 4) & (ix < size - 8) & (iy >= 4) & (iy < size - 8)
    np.testing.assert_array_equal(no_data & interior, touched(*nan_xy) & interior)
    assert np.all(np.isnan(out.data[touched(*nan_xy)]))
    # everything else is finite and equal to the constant input
    clean = out.mask == 0
    np.testing.assert_allclose(out.data[clean], 10.0, rtol=1e-6)


def test_footprint_no_data_and_edge_bands() -> None:
    size = 80
    m = np.eye(3)
    m[0, 2] = 20.25  # output x shows input x + 20.25: the right 20 columns fall outside
    out = resample_arrays(
        np.ones((size, size)),
        np.ones((size, size)),
        np.zeros((size, size), np.uint16),
        pixel_map=PixelMap.from_matrix(m, (size, size)),
        edge_width=2.0,
    )
    fx = np.arange(size) + 20.25
    outside = fx > size - 0.5
    edge = ~outside & ((fx > size - 2.5) | (fx < 1.5))
    row = out.mask[size // 2]
    np.testing.assert_array_equal((row & MaskBit.NO_DATA) != 0, outside)
    np.testing.assert_array_equal((row & MaskBit.EDGE) != 0, edge)
    # the top and bottom rows are within 2 px of the input border
    assert np.all(out.mask[:2, ~outside] & MaskBit.EDGE)
    assert out.overlap_fraction == pytest.approx(np.mean(~outside))


def test_propagated_variance_is_right_for_sums_not_single_pixels() -> None:
    """White noise shifted by half a pixel: the documented variance approximation.

    Per pixel, cubic convolution at phase (0.5, 0.5) leaves sum(w**2) = 0.41 of the
    variance while the propagated variance stays 1; over 32x32 boxes the covariances add
    back and the sums have the variance the propagated plane predicts (measured 0.95).
    """
    rng = np.random.default_rng(0)
    n = 1024
    noise = rng.normal(0.0, 1.0, (n, n))
    m = np.eye(3)
    m[:2, 2] = [0.5, 0.5]
    out = resample_arrays(
        noise,
        np.ones_like(noise),
        np.zeros(noise.shape, np.uint16),
        pixel_map=PixelMap.from_matrix(m, noise.shape),
    )
    inner = out.data[8:-24, 8:-24]
    assert inner.var() == pytest.approx(0.41, abs=0.01)
    np.testing.assert_allclose(out.variance[8:-24, 8:-24], 1.0, rtol=1e-6)
    sums = inner.reshape(31, 32, 31, 32).sum(axis=(1, 3))
    assert sums.var() / out.variance[8:-24, 8:-24][:32, :32].sum() == pytest.approx(1.0, abs=0.12)


def test_threads_give_identical_results() -> None:
    science, reference, _ = make_pair(size=128, n_stars=8)
    pm = PixelMap.from_wcs(science.wcs, reference.wcs, science.shape, step=32)
    args = (reference.data, reference.variance, reference.mask)
    one = resample_arrays(*args, pixel_map=pm, workers=1)
    two = resample_arrays(*args, pixel_map=pm, workers=2)
    np.testing.assert_array_equal(one.data, two.data)
    np.testing.assert_array_equal(one.mask, two.mask)


def test_resample_rejects_mismatched_planes() -> None:
    with pytest.raises(ShapeMismatch):
        resample_arrays(
            np.zeros((10, 10)),
            np.zeros((10, 11)),
            np.zeros((10, 10), np.uint16),
            pixel_map=PixelMap.from_matrix(np.eye(3), (10, 10)),
        )


# ---------------------------------------------------------------------------------------
# Star matching
# ---------------------------------------------------------------------------------------


def test_match_stars_recovers_a_similarity_transform() -> None:
    rng = np.random.default_rng(4)
    ref = rng.uniform(0, 500, (40, 2))
    truth = affine((7.2, -3.1), 1.5, 1.002, 500)
    sci = apply(truth, ref) + rng.normal(0, 0.02, ref.shape)
    sci = np.vstack([sci[5:], rng.uniform(0, 500, (8, 2))])  # 5 lost, 8 spurious
    result = match_stars(ref, sci, min_matched=10)
    assert result.n_matched == 35
    assert result.rotation_deg == pytest.approx(1.5, abs=0.005)
    assert result.scale == pytest.approx(1.002, abs=1e-4)
    corners = np.array([[0, 0], [500, 0], [0, 500], [500, 500]], float)
    assert np.max(np.abs(apply(result.transform, corners) - apply(truth, corners))) < 0.03
    assert result.rms_pix == pytest.approx(0.02 * np.sqrt(2), rel=0.3)


def test_match_stars_too_few_raises_with_numbers() -> None:
    with pytest.raises(StarMatchFailed) as info:
        match_stars(np.array([[1.0, 2.0], [5.0, 9.0]]), np.array([[1.0, 2.0]]), min_matched=5)
    assert info.value.n_required == 5


# ---------------------------------------------------------------------------------------
# The stage on synthetic pairs
# ---------------------------------------------------------------------------------------


def centroids(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """sep barycentres of the detections nearest to ``xy`` (same method on every image)."""
    table = find_sources(image, background=SKY, noise=NOISE, config=StarConfig(n_sigma=3.0))
    found = np.column_stack([table["x"], table["y"]])
    nearest = np.argmin(np.hypot(*(found[None] - xy[:, None]).transpose(2, 0, 1)), axis=1)
    return found[nearest]


def test_wcs_alignment_matches_the_truth_image() -> None:
    """Shift (3.3, -1.7) px and rotation 0.3 deg in the WCS: noiseless truth comparison."""
    science, reference, truth = make_pair(noise=False)
    result = align_to(science, reference, config=AlignConfig(stars=QUICK_STARS))
    assert result.method == "wcs"
    assert result.transform is None
    aligned = result.aligned
    assert aligned.shape == science.shape
    assert aligned.wcs is not None
    good = aligned.mask == 0
    assert good.mean() > 0.95
    peak = np.max(truth["science_clean"] - SKY)
    diff = np.abs(aligned.data - truth["science_clean"])[good]
    assert diff.max() < 0.04 * peak  # cubic convolution of a 3 px FWHM star: 2.6%
    # star positions, measured the same way on the truth and on the aligned image
    xy = truth["xy"]
    offsets = centroids(aligned.data, xy) - centroids(truth["science_clean"], xy)
    assert np.max(np.abs(offsets)) < 0.05
    assert np.all(np.abs(np.mean(offsets, axis=0)) < 0.01)
    # residual from stars: noiseless, so only centroiding and interpolation errors
    assert result.n_matched >= 20
    assert result.rms_pix < 0.05
    assert result.rms_arcsec == pytest.approx(result.rms_pix * SCALE, rel=1e-3)


def test_wcs_alignment_residual_with_noise() -> None:
    science, reference, _ = make_pair()
    result = align_to(science, reference, config=AlignConfig(stars=QUICK_STARS))
    assert result.method == "wcs"
    assert result.n_matched >= 20
    assert result.rms_pix < 0.1
    assert result.wcs_error_pix is not None and result.wcs_error_pix < 0.1
    assert result.overlap_fraction > 0.97
    # the aligned variance is the reference's (constant) variance, NO_DATA aside
    good = (result.aligned.mask & MaskBit.NO_DATA) == 0
    np.testing.assert_allclose(result.aligned.variance[good], NOISE**2, rtol=1e-4)


def _assert_recovered(result, science, truth) -> None:
    """Aligned star positions within 0.05 px of the truth."""
    aligned = result.aligned
    bright = truth["flux"] > 3e3
    xy = truth["xy"][bright]
    got = centroids(np.nan_to_num(aligned.data, nan=SKY), xy)
    ref_method = centroids(truth["science_clean"], xy)
    offsets = got - ref_method
    # measured: median (-0.004, -0.002) px, rms 0.016 px (noise included)
    assert np.all(np.abs(np.median(offsets, axis=0)) < 0.02), np.median(offsets, axis=0)
    assert np.sqrt(np.mean(np.sum(offsets**2, axis=1))) < 0.05


def test_reference_without_wcs_is_aligned_by_stars() -> None:
    science, reference, truth = make_pair()
    reference = reference.copy(wcs=None)
    result = align_to(science, reference, config=AlignConfig(stars=QUICK_STARS))
    assert result.method == "stars"
    assert result.transform is not None
    expected = np.linalg.inv(truth["matrix"])  # reference -> science
    corners = np.array([[0, 0], [255, 0], [0, 255], [255, 255], [127.5, 127.5]], float)
    err = np.hypot(*(apply(result.transform, corners) - apply(expected, corners)).T)
    assert err[-1] < 0.02  # shift at the centre
    assert err.max() < 0.05  # rotation: 0.05 px at 180 px is 0.016 deg
    rotation = np.degrees(np.arctan2(result.transform[1, 0], result.transform[0, 0]))
    assert rotation == pytest.approx(-0.3, abs=0.01)
    assert result.n_matched >= 20
    assert result.rms_pix < 0.1
    _assert_recovered(result, science, truth)


def test_wcs_wrong_by_a_third_of_a_pixel_is_corrected_by_stars() -> None:
    """Errors of a few tenths of a pixel leave ZOGY dipoles on stars: "auto" fixes them."""
    science, reference, truth = make_pair()
    wrong = reference.copy()
    assert wrong.wcs is not None
    wrong.wcs.wcs.crpix = wrong.wcs.wcs.crpix + np.array([0.24, 0.18])
    result = align_to(science, wrong, config=AlignConfig(stars=QUICK_STARS))
    assert result.method == "wcs+stars"
    assert result.wcs_error_pix == pytest.approx(0.3, abs=0.06)
    assert result.rms_pix < 0.1
    _assert_recovered(result, science, truth)
    lenient = align_to(science, wrong, config=AlignConfig(stars=QUICK_STARS, max_wcs_error_pix=0.5))
    assert lenient.method == "wcs"
    assert lenient.wcs_error_pix == pytest.approx(0.3, abs=0.06)


def test_wcs_wrong_by_five_pixels_is_corrected_by_stars() -> None:
    science, reference, truth = make_pair()
    wrong = reference.copy()
    assert wrong.wcs is not None
    wrong.wcs.wcs.crpix = wrong.wcs.wcs.crpix + np.array([5.0, 0.0])
    result = align_to(science, wrong, config=AlignConfig(stars=QUICK_STARS))
    assert result.method == "wcs+stars"
    assert result.wcs_error_pix == pytest.approx(5.0, abs=0.1)
    assert result.transform is not None
    centre = apply(result.transform, np.array([[127.5, 127.5]]))[0] - 127.5
    assert np.hypot(*centre) == pytest.approx(5.0, abs=0.05)
    assert result.rms_pix < 0.1
    _assert_recovered(result, science, truth)
    # forcing the WCS alone leaves every star more than 2 px off: no residual, a warning
    with pytest.warns(AlignmentWarning, match="no star pair"):
        forced = align_to(science, wrong, config=AlignConfig(method="wcs", stars=QUICK_STARS))
    assert forced.n_matched == 0
    assert np.isnan(forced.rms_pix)


def test_flux_is_conserved_across_pixel_scales() -> None:
    """Reference pixels half the size of the science pixels: same total star flux."""
    science, reference, truth = make_pair(size=128, scale=2.0, n_stars=10, noise=False)
    kept = align_to(science, reference, config=AlignConfig(stars=QUICK_STARS))
    plain = align_to(science, reference, config=AlignConfig(stars=QUICK_STARS, conserve_flux=False))
    y, x = np.mgrid[0:128, 0:128]
    for (x0, y0), f in zip(truth["xy"], truth["flux"], strict=True):
        aperture = np.hypot(x - x0, y - y0) < 8
        total = np.sum(kept.aligned.data[aperture] - SKY * 4)
        assert total == pytest.approx(f, rel=0.01)
        ratio = np.sum(plain.aligned.data[aperture]) / np.sum(kept.aligned.data[aperture])
        assert ratio == pytest.approx(0.25, rel=1e-3)


def test_reference_bad_pixel_lands_flagged_at_the_right_place() -> None:
    science, reference, truth = make_pair(noise=False)
    bad_ref = (100, 120)  # (x, y) in the reference
    reference.mask[bad_ref[1], bad_ref[0]] |= MaskBit.BAD
    result = align_to(science, reference, config=AlignConfig(stars=QUICK_STARS))
    flagged = np.argwhere(result.aligned.mask & MaskBit.BAD)[:, ::-1]
    where = apply(np.linalg.inv(truth["matrix"]), np.array([bad_ref], float))[0]
    assert 4 <= len(flagged) <= 16
    assert np.all(np.abs(flagged - where) < 2.5)
    assert tuple(np.round(where).astype(int)) in {tuple(p) for p in flagged}


def test_non_overlapping_pair_raises() -> None:
    science, reference, _ = make_pair(size=128, n_stars=5)
    far = reference.copy()
    assert far.wcs is not None
    far.wcs.wcs.crval = far.wcs.wcs.crval + np.array([0.0, 1.0])
    for method in ("auto", "wcs"):
        with pytest.raises(InsufficientOverlap) as info:
            align_to(science, far, config=AlignConfig(method=method))
        assert info.value.overlap_fraction == 0.0


def test_method_wcs_without_wcs_raises() -> None:
    science, reference, _ = make_pair(size=64, n_stars=3)
    with pytest.raises(NoCelestialWcs):
        align_to(science, reference.copy(wcs=None), config=AlignConfig(method="wcs"))


def test_stars_method_on_empty_fields_raises() -> None:
    rng = np.random.default_rng(5)
    science = Exposure.from_arrays(rng.normal(SKY, NOISE, (96, 96)), noise=NOISE)
    reference = Exposure.from_arrays(rng.normal(SKY, NOISE, (96, 96)), noise=NOISE)
    with pytest.raises(StarMatchFailed) as info:
        align_to(science, reference, config=AlignConfig(method="stars"))
    assert info.value.n_required == AlignConfig().min_matched_stars


def test_given_star_lists_skip_detection() -> None:
    science, reference, truth = make_pair()
    ref_xy = apply(truth["matrix"], truth["xy"])
    result = align_to(
        science,
        reference.copy(wcs=None),
        science_stars=truth["xy"],
        reference_stars=ref_xy,
    )
    assert result.method == "stars"
    assert result.n_matched == len(truth["xy"])
    assert result.rms_pix < 1e-6


# ---------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------

LEGACY = Path("images_legacypipe")
DECAM_G = (
    LEGACY / "testcase6/images/decam/CP/V4.8.2a/CP20181103/c4d_181104_072440_ooi_g_ls9.S4.fits",
    LEGACY / "testcase6/images/decam/CP/V4.8.2a/CP20181213/c4d_181214_050844_ooi_g_ls9.S9.fits",
)
MOSAIC_Z = (
    LEGACY / "mzlsbass3/images/mosaic/CP20160310v2/k4m_160311_103249_ooi_zd_v2-ccd3.fits",
    LEGACY / "mzlsbass3/images/mosaic/CP20160312v2/k4m_160313_102424_ooi_zd_v2-ccd3.fits",
)
SFFT = Path("images_sfft_decam/input_data")
#: Star selection for tiles of ~100-256 px with a handful of stars.
TILE_STARS = StarConfig(min_snr=10.0, edge_margin=3, isolation_radius=6.0, max_elongation=2.0)


def _read(shared_data: Path, relative: Path) -> Exposure:
    from astrid.io.fits import read_exposure

    path = shared_data / relative
    if not path.is_file():
        pytest.skip(f"{relative} not in the shared data")
    return read_exposure(path)


def _halo_centre(exposure: Exposure, guess: tuple[float, float], core: float = 3.0) -> np.ndarray:
    """Centre (x, y) of a power-law halo ``sky + amp (r^2 + core^2)^-power`` fitted to the
    unflagged pixels."""
    from scipy.optimize import least_squares

    data = exposure.data.astype(float)
    y, x = np.mgrid[0 : data.shape[0], 0 : data.shape[1]]
    good = (exposure.mask == 0) & np.isfinite(data)
    d, xg, yg = data[good], x[good], y[good]
    weight = 1.0 / np.sqrt(exposure.variance.astype(float)[good])

    def residuals(p: np.ndarray) -> np.ndarray:
        x0, y0, sky, log_amp, power = p
        r2 = (xg - x0) ** 2 + (yg - y0) ** 2 + core**2
        return (d - sky - np.exp(log_amp - power * np.log(r2))) * weight

    start = [guess[0], guess[1], np.median(d), np.log(d.max()) + 2 * np.log(20.0), 2.0]
    return least_squares(residuals, start).x[:2]


def test_real_decam_g_pair_aligned_with_wcs(shared_data: Path) -> None:
    """Two g epochs on different CCDs (S4, S9) and grids, ~100 px, TPV WCS.

    The patch holds one saturated star with a bleed trail and no other star common to
    both epochs, so the star residual cannot be measured (0 pairs, a warning). The
    registration is measured on the star's halo instead: the centre of a symmetric
    power-law profile fitted to the unflagged pixels is (50.005, 54.491) on the science
    image and 0.025 px (0.007 arcsec) away, (0.025, 0.003), on the aligned reference.
    Fitting the reference on its own grid and mapping the centre through the WCSs lands
    (-0.12, -0.16) px from the science centre instead: the halo fit's systematic error
    (different masks and halo asymmetries) is about 0.2 px, which bounds what this pair
    can show. Moving the reference WCS by 1 px moves the fitted offset by 1.00 px, so the
    measurement is sensitive.
    """
    science = _read(shared_data, DECAM_G[0])
    reference = _read(shared_data, DECAM_G[1])
    config = AlignConfig(method="wcs", stars=TILE_STARS, background=BackgroundConfig(box_size=32))
    with pytest.warns(AlignmentWarning, match="no star pair"):
        result = align_to(science, reference, config=config)
    assert result.method == "wcs"
    assert result.n_matched == 0
    assert result.overlap_fraction > 0.98
    aligned = result.aligned
    # the reference bleed trail (NO_DATA) lands on the science grid flagged, data NaN
    trail = (aligned.mask & MaskBit.NO_DATA) != 0
    assert 0.15 < trail.mean() < 0.3
    assert np.all(np.isnan(aligned.data[trail]))
    centre = _halo_centre(science, (50.0, 55.0))
    offset = _halo_centre(aligned, (50.0, 55.0)) - centre
    assert np.all(np.abs(offset) < 0.1), offset
    moved = reference.copy()
    assert moved.wcs is not None
    moved.wcs.wcs.crpix = moved.wcs.wcs.crpix + np.array([1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlignmentWarning)
        shifted = align_to(science, moved, config=config).aligned
    moved_offset = _halo_centre(shifted, (50.0, 55.0)) - centre
    assert moved_offset == pytest.approx([-1.0, 0.0], abs=0.1)


def test_real_mosaic_z_pair_star_residual(shared_data: Path) -> None:
    """Mosaic3 z, two nights, ccd3 tiles of ~100 px: one clean star in common.

    Measured residual after WCS alignment: 1 star, 0.31 px (0.079 arcsec).
    """
    science = _read(shared_data, MOSAIC_Z[0])
    reference = _read(shared_data, MOSAIC_Z[1])
    result = align_to(science, reference, config=AlignConfig(method="wcs", stars=TILE_STARS))
    assert result.n_matched >= 1
    assert result.rms_pix < 0.4
    assert result.rms_arcsec is not None and result.rms_arcsec < 0.1
    assert result.overlap_fraction > 0.98


def test_real_sfft_decam_pair_wcs_and_stars(shared_data: Path) -> None:
    """DECam i, two visits already on one grid (identical TPV WCS), 256x256 px.

    The stars of the two visits are offset by about (-0.6, -0.3) px despite the
    identical WCSs. Measured: WCS alone, 6 stars, rms 0.68 px (0.18 arcsec); "auto"
    corrects the WCS with the matched stars ("wcs+stars"): rms 0.14 px (0.036 arcsec);
    without the reference WCS the star solution gives the same.
    """
    science = _read(shared_data, SFFT / "DEC-OBS04a.mini.fits")
    reference = _read(shared_data, SFFT / "DEC-OBS18a.mini.fits")
    base = AlignConfig(stars=TILE_STARS, min_matched_stars=4)
    wcs_only = align_to(science, reference, config=replace(base, method="wcs"))
    assert wcs_only.n_matched >= 5
    assert 0.4 < wcs_only.rms_pix < 0.9
    auto = align_to(science, reference, config=base)
    assert auto.method == "wcs+stars"
    assert auto.n_matched >= 5
    assert auto.rms_pix < 0.3
    assert auto.rms_arcsec is not None and auto.rms_arcsec < 0.08
    assert auto.wcs_error_pix == pytest.approx(0.67, abs=0.15)
    stars = align_to(science, reference.copy(wcs=None), config=base)
    assert stars.method == "stars"
    assert stars.rms_pix == pytest.approx(auto.rms_pix, abs=0.05)
