"""Tests of the calibration stage: overscan, masters, variance, saturation, cosmic rays."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import astroscrappy
import astroscrappy.utils as scrappy_utils
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import NDArray
from scipy import ndimage

from astrid.errors import (
    BadImageShape,
    InvalidSection,
    MissingHeaderKeywords,
    ShapeMismatch,
    TooFewFrames,
)
from astrid.exposure import Exposure, ExposureMeta, MaskBit
from astrid.io.fits import read_exposure, read_exposures
from astrid.science import calibrate as calibrate_module
from astrid.science.calibrate import (
    CalibrationConfig,
    CosmicRayConfig,
    CosmicRayResult,
    MasterFrame,
    OverscanConfig,
    SaturationConfig,
    apply_calibration,
    calibrate_exposure,
    combine_frames,
    detect_cosmic_rays,
    make_master_dark,
    make_master_flat,
    mask_saturation,
    parse_section,
    subtract_overscan,
)
from astrid.science.simulate import (
    EpochConditions,
    FieldConfig,
    SimulatedExposure,
    simulate_exposure,
    simulate_field,
)

# SAAO 1.0 m raw frame (ccdproc test data): header values.
SAAO_GAIN = 1.9  # e-/ADU
SAAO_READ_NOISE = 5.0  # e-
# GMOS-S cutout (astroscrappy test data): the parameters astroscrappy's own test uses.
GMOS_GAIN = 1.933
GMOS_READ_NOISE = 4.24
# Cosmic rays astroscrappy's test asserts in this cutout, as (y, x) slices.
GMOS_KNOWN_HITS = [(slice(41, 72), slice(142, 161)), (slice(117, 147), slice(35, 43))]


@pytest.fixture(scope="module")
def saao_path(shared_data: Path) -> Path:
    return shared_data / "images_ccdproc_raw" / "a8280271.fits"


@pytest.fixture(scope="module")
def saao(saao_path: Path) -> tuple[NDArray[np.float64], fits.Header]:
    with fits.open(saao_path) as hdul:
        return np.asarray(hdul[0].data, np.float64), hdul[0].header.copy()


@pytest.fixture(scope="module")
def gmos(shared_data: Path) -> tuple[Exposure, NDArray[np.float32]]:
    path = shared_data / "images_astroscrappy_gmos" / "gmos.fits"
    (exposure,) = read_exposures(path)  # SCI with VAR attached; SKYFIT is skipped
    with fits.open(path) as hdul:
        sky = np.asarray(hdul["SKYFIT"].data, np.float32)
    return exposure, sky


def _master(
    data: NDArray[np.floating],
    variance: float | NDArray[np.floating],
    exposure_time: float | None = None,
) -> MasterFrame:
    arr = np.asarray(data, np.float32)
    return MasterFrame(
        data=arr,
        variance=np.broadcast_to(np.asarray(variance, np.float32), arr.shape).copy(),
        mask=np.zeros(arr.shape, bool),
        n_frames=10,
        n_rejected=0,
        method="average",
        exposure_time=exposure_time,
    )


# --------------------------------------------------------------------------- sections


def test_parse_section_is_1_based_inclusive_x_first() -> None:
    ys, xs = parse_section("[  17: 528,   1: 520]", shape=(520, 536))
    assert (ys, xs) == (slice(0, 520), slice(16, 528))
    assert parse_section("[*,2:3]", shape=(5, 7)) == (slice(1, 3), slice(0, 7))


@pytest.mark.parametrize(
    "section", ["17:528,1:520", "[1:10]", "[10:1,1:5]", "[0:5,1:5]", "[1:5,1:99]", "[a:b,1:2]"]
)
def test_parse_section_rejects_bad_sections(section: str) -> None:
    with pytest.raises(InvalidSection) as info:
        parse_section(section, shape=(20, 20))
    assert info.value.shape == (20, 20)


# --------------------------------------------------------------------------- overscan


def test_overscan_on_real_saao_frame(saao: tuple[NDArray[np.float64], fits.Header]) -> None:
    raw, header = saao
    assert raw.shape == (520, 536)
    strip = raw[:, 3:13]  # BIASSEC [4:13,1:520]
    trimmed_raw = raw[:, 16:528]  # TRIMSEC [17:528,1:520]

    result = subtract_overscan(raw, bias_section=header["BIASSEC"], trim_section=header["TRIMSEC"])
    assert result.data.shape == (520, 512)
    assert result.direction == "rows"
    assert result.level.shape == (520,)
    # Default smooth polynomial: its median equals the strip's median (214 ADU) to 0.5 ADU
    # and it wanders by under 1.5 ADU over the frame.
    assert result.overscan_median == pytest.approx(float(np.median(strip)))
    assert float(np.median(result.level)) == pytest.approx(result.overscan_median, abs=0.5)
    assert np.ptp(result.level) < 1.5
    # The sky sat at ~300 ADU raw; after removing the ~214 ADU pedestal it sits at ~86 ADU.
    assert float(np.median(result.data)) == pytest.approx(
        float(np.median(trimmed_raw)) - result.overscan_median, abs=0.5
    )
    assert float(np.median(result.data)) < 0.35 * float(np.median(trimmed_raw))

    # Read noise: 3.06 ADU = 5.8 e- measured versus the nominal RDNOISE 5.0 e- (+16%);
    # accept within 25% of the header, and within 5% of the strip's own scatter.
    read_noise_e = result.read_noise * SAAO_GAIN
    assert read_noise_e == pytest.approx(SAAO_READ_NOISE, rel=0.25)
    per_row = strip - np.median(strip, axis=1, keepdims=True)
    scatter = float(np.std(per_row)) * math.sqrt(10 / 9)  # ddof for 10 pixels per row
    assert result.read_noise == pytest.approx(scatter, rel=0.05)


def test_overscan_constant_and_per_row_models(
    saao: tuple[NDArray[np.float64], fits.Header],
) -> None:
    raw, header = saao
    strip = raw[:, 3:13]
    constant = subtract_overscan(
        raw,
        bias_section=header["BIASSEC"],
        trim_section=header["TRIMSEC"],
        config=OverscanConfig(model="constant"),
    )
    assert np.all(constant.level == np.median(strip))
    np.testing.assert_array_equal(constant.data, raw[:, 16:528] - np.median(strip))

    per_row = subtract_overscan(
        raw, bias_section=header["BIASSEC"], config=OverscanConfig(model="per_row")
    )
    np.testing.assert_array_equal(per_row.level, np.median(strip, axis=1))
    # Without a trim section the frame keeps its shape; its overscan is then ~0.
    assert per_row.data.shape == raw.shape
    assert abs(float(np.median(per_row.data[:, 3:13]))) <= 0.5


def test_overscan_fits_a_gradient_and_column_overscan() -> None:
    rows = np.arange(40, dtype=np.float64)[:, None]
    frame = np.full((40, 30), 500.0) + 0.5 * rows  # level rising along the readout
    frame[:, 25:] = 100.0 + 0.5 * rows  # serial overscan: columns 26..30 (1-based)
    result = subtract_overscan(frame, bias_section="[26:30,1:40]", trim_section="[1:24,1:40]")
    np.testing.assert_allclose(result.level, 100.0 + 0.5 * rows[:, 0], atol=1e-6)
    np.testing.assert_allclose(result.data, 400.0, atol=1e-4)

    # Parallel overscan (a strip of rows) gives one level per column.
    cols = np.arange(30, dtype=np.float64)[None, :]
    frame = np.full((40, 30), 300.0) + 0.2 * cols
    frame[36:, :] = 50.0 + 0.2 * cols
    result = subtract_overscan(frame, bias_section="[1:30,37:40]", trim_section="[1:30,1:35]")
    assert result.direction == "columns"
    assert result.data.shape == (35, 30)
    np.testing.assert_allclose(result.data, 250.0, atol=1e-4)


def test_overscan_bad_input() -> None:
    frame = np.ones((40, 30))
    with pytest.raises(BadImageShape):
        subtract_overscan(np.ones(30), bias_section="[1:3,1:1]")
    with pytest.raises(InvalidSection):
        subtract_overscan(frame, bias_section="[26:31,1:40]")
    with pytest.raises(InvalidSection, match="does not cover"):
        subtract_overscan(
            frame,
            bias_section="[26:30,1:20]",
            trim_section="[1:24,1:40]",
            config=OverscanConfig(model="per_row"),
        )


# --------------------------------------------------------------------------- masters


def test_master_bias_rejects_an_outlier_by_sigma_clipping() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4) + 100.0
    offsets = [0.0, 1.0, -1.0, 0.5, -0.5]
    frames = [base + c for c in offsets]
    frames[3] = frames[3].copy()
    frames[3][1, 2] = 1000.0  # a hot value in one frame

    master = combine_frames(frames, method="average", sigma=3.0)
    assert master.n_frames == 5
    assert master.n_rejected == 1
    expected = base.copy()
    # The pixel keeps offsets 0, 1, -1, -0.5 (the robust sigma of its stack is 1.48;
    # 1000 is 600 sigma off, the rest under 1 sigma): mean -0.125.
    expected[1, 2] += -0.125
    np.testing.assert_allclose(master.data, expected, rtol=0, atol=1e-4)
    # ccdproc's variance: std**2 (ddof 0) of the kept values over their number.
    expected_var = np.full((3, 4), 0.5 / 5)
    expected_var[1, 2] = (2.25 / 4 - 0.125**2) / 4
    np.testing.assert_allclose(master.variance, expected_var, rtol=1e-5)

    unclipped = combine_frames(frames, method="average", sigma=None)
    assert unclipped.data[1, 2] == pytest.approx((4 * base[1, 2] - 0.5 + 1000.0) / 5, rel=1e-6)

    median = combine_frames(frames, method="median")
    assert median.data[1, 2] == pytest.approx(base[1, 2] - 0.25)  # median of 0, 1, -1, -0.5
    np.testing.assert_allclose(np.delete(median.data.ravel(), 6), np.delete(base.ravel(), 6))

    # With per-frame variances the master variance is propagated: sum(var) / n**2.
    propagated = combine_frames(frames, variances=[np.full((3, 4), 4.0)] * 5, method="average")
    expected_var = np.full((3, 4), 4.0 * 5 / 25)
    expected_var[1, 2] = 4.0 * 4 / 16
    np.testing.assert_allclose(propagated.variance, expected_var, rtol=1e-6)
    med_prop = combine_frames(frames, variances=[np.full((3, 4), 4.0)] * 5, method="median")
    assert med_prop.variance[0, 0] == pytest.approx(math.pi / 2 * 0.8, rel=1e-6)


def test_master_respects_input_masks() -> None:
    frames = [np.full((3, 3), v) for v in (10.0, 12.0, 14.0)]
    masks = [np.zeros((3, 3), bool) for _ in frames]
    masks[2][0, 0] = True  # drop 14 at (0, 0)
    for m in masks:
        m[2, 2] = True  # no frame has a value at (2, 2)
    master = combine_frames(frames, masks=masks, method="average", sigma=None)
    assert master.data[0, 0] == pytest.approx(11.0)
    assert master.data[1, 1] == pytest.approx(12.0)
    assert master.mask[2, 2] and np.isnan(master.data[2, 2]) and np.isinf(master.variance[2, 2])
    assert master.mask.sum() == 1
    result = apply_calibration(np.full((3, 3), 20.0), np.ones((3, 3)), bias=master)
    assert result.mask[2, 2] == MaskBit.BAD | MaskBit.NO_DATA and np.isnan(result.data[2, 2])


def test_master_frames_bad_input() -> None:
    with pytest.raises(TooFewFrames) as info:
        combine_frames([np.ones((3, 3))])
    assert (info.value.n_given, info.value.n_required) == (1, 2)
    with pytest.raises(ShapeMismatch):
        combine_frames([np.ones((3, 3)), np.ones((3, 4))])
    with pytest.raises(BadImageShape):
        combine_frames([np.ones(3), np.ones(3)])
    with pytest.raises(ShapeMismatch):
        make_master_dark([np.ones((3, 3))] * 2, exposure_times=[1.0])


def test_master_flat_is_normalised_by_its_median() -> None:
    pattern = 1.3 * np.array([[0.9, 1.0, 1.1, 1.2], [0.8, 1.0, 1.05, 0.95], [1.0, 1.0, 0.7, 1.3]])
    levels = [1000.0, 2000.0, 1500.0]
    frames = [level * pattern for level in levels]
    variances = [level * pattern for level in levels]  # Poisson, in ADU**2
    master = make_master_flat(frames, variances=variances)
    median = float(np.median(pattern))  # 1.3
    np.testing.assert_allclose(master.data, pattern / median, rtol=1e-6)
    assert float(np.median(master.data)) == pytest.approx(1.0)
    # Frame i is divided by its median level_i * 1.3, so its variance by that squared;
    # the median of three has pi/2 times the variance of their mean, sum(var) / 9.
    scaled = [lv * pattern / (lv * median) ** 2 for lv in levels]
    np.testing.assert_allclose(master.variance, math.pi / 2 * sum(scaled) / 9, rtol=1e-5)
    assert master.exposure_time is None
    assert master.n_frames == 3 and master.n_rejected == 0


def test_master_dark_is_a_rate_scaled_by_exposure_time() -> None:
    rate = np.array([[0.1, 0.2, 0.3], [0.0, 5.0, 0.1], [0.2, 0.2, 0.2]])  # ADU/s, one hot pixel
    dark = make_master_dark([rate * t for t in (10.0, 20.0, 40.0)], exposure_times=[10, 20, 40])
    np.testing.assert_allclose(dark.data, rate, rtol=1e-6)
    assert dark.exposure_time == 1.0

    science = np.full((3, 3), 50.0) + rate * 100.0
    result = apply_calibration(science, np.ones((3, 3)), dark=dark, exposure_time=100.0)
    assert result.dark_scale == 100.0
    assert result.steps == ("dark",)
    np.testing.assert_allclose(result.data, 50.0, atol=1e-4)
    with pytest.raises(MissingHeaderKeywords):
        apply_calibration(science, np.ones((3, 3)), dark=dark)


# --------------------------------------------------------------------------- variance


def test_apply_calibration_worked_by_hand() -> None:
    data = np.full((2, 2), 110.0)
    result = apply_calibration(
        data,
        bias=_master(np.full((2, 2), 10.0), 1.0),
        flat=_master(np.full((2, 2), 2.0), 0.01),
        gain=2.0,
        read_noise=4.0,
    )
    # raw variance (4/2)**2 + (110 - 10)/2 = 54 ADU**2; + bias 1 = 55; out = 100/2 = 50;
    # var = 55/2**2 + 50**2 * 0.01/2**2 = 13.75 + 6.25 = 20.
    np.testing.assert_allclose(result.data, 50.0)
    np.testing.assert_allclose(result.variance, 20.0, rtol=1e-6)
    assert result.steps == ("bias", "flat")
    assert not result.mask.any()


def test_variance_propagation_matches_monte_carlo() -> None:
    rng = np.random.default_rng(20240611)
    gain, read_noise, exposure_time = 2.0, 6.0, 100.0  # e-/ADU, e-, s
    ny, nx, n = 3, 4, 20000
    sky = np.linspace(20.0, 2000.0, ny * nx).reshape(ny, nx)  # ADU, flat-fielded
    flat_true = np.linspace(0.8, 1.2, ny * nx).reshape(ny, nx)
    bias_level, dark_rate = 100.0, 0.3  # ADU, ADU/s
    var_bias, var_dark, var_flat = 0.5, 1e-3, 1e-4  # of the masters

    expected = sky * flat_true + dark_rate * exposure_time
    electrons = rng.poisson(expected * gain, size=(n, ny, nx))
    raw = bias_level + electrons / gain + rng.normal(0, read_noise / gain, (n, ny, nx))
    bias = bias_level + rng.normal(0, math.sqrt(var_bias), (n, ny, nx))
    dark = dark_rate + rng.normal(0, math.sqrt(var_dark), (n, ny, nx))
    flat = flat_true + rng.normal(0, math.sqrt(var_flat), (n, ny, nx))

    # Calibration is per pixel, so the n realisations are stacked into one tall image.
    def tall(cube: NDArray[np.floating]) -> NDArray[np.floating]:
        return cube.reshape(n * ny, nx)

    result = apply_calibration(
        tall(raw),
        bias=_master(tall(bias), var_bias),
        dark=_master(tall(dark), var_dark, exposure_time=1.0),
        flat=_master(tall(flat), var_flat),
        exposure_time=exposure_time,
        gain=gain,
        read_noise=read_noise,
    )
    out = result.data.reshape(n, ny, nx).astype(np.float64)
    predicted = result.variance.reshape(n, ny, nx).astype(np.float64).mean(axis=0)
    empirical = out.var(axis=0, ddof=1)
    # Sampling error of the empirical variance is sqrt(2/n) = 1%.
    np.testing.assert_allclose(predicted / empirical, 1.0, atol=0.05)
    # The calibrated mean recovers the sky to within 5 standard errors.
    assert np.all(np.abs(out.mean(axis=0) - sky) < 5 * np.sqrt(empirical / n))


def test_apply_calibration_flags_bad_flat_and_checks_shapes() -> None:
    flat = np.ones((3, 3))
    flat[1, 1] = 0.0
    flat[0, 2] = np.nan
    result = apply_calibration(np.full((3, 3), 10.0), np.ones((3, 3)), flat=_master(flat, 0.0))
    bad = np.zeros((3, 3), bool)
    bad[1, 1] = bad[0, 2] = True
    assert np.all(np.isnan(result.data[bad])) and np.all(np.isinf(result.variance[bad]))
    assert np.all(result.mask[bad] == MaskBit.BAD | MaskBit.NO_DATA)
    assert np.all(result.mask[~bad] == 0) and np.all(result.data[~bad] == 10.0)

    with pytest.raises(ShapeMismatch):
        apply_calibration(np.ones((3, 3)), np.ones((3, 3)), bias=_master(np.ones((3, 4)), 1.0))
    with pytest.raises(ShapeMismatch):
        apply_calibration(np.ones((3, 3)), np.ones((3, 4)))
    with pytest.raises(MissingHeaderKeywords) as info:
        apply_calibration(np.ones((3, 3)), read_noise=5.0)
    assert set(info.value.missing) == {"gain"}
    with pytest.raises(BadImageShape):
        apply_calibration(np.ones((2, 3, 3)), np.ones((2, 3, 3)))


# --------------------------------------------------------------------------- saturation


def test_saturated_star_and_bleed_trail_are_masked() -> None:
    rng = np.random.default_rng(3)
    saturation = 60000.0
    ny, nx = 80, 60
    y, x = np.mgrid[:ny, :nx]
    image = 200.0 + rng.normal(0, 5, (ny, nx))
    image += 4e5 * np.exp(-((x - 30) ** 2 + (y - 40) ** 2) / (2 * 2.0**2))
    image[20:61, 30] += 1e5  # bleed trail along the column...
    image[17:20, 30] = [15000.0, 30000.0, 50000.0]  # ...fading below saturation at its ends
    image[61:64, 30] = [50000.0, 30000.0, 15000.0]
    image = np.minimum(image, saturation)  # the ADC clips

    mask = mask_saturation(image, saturation=saturation)
    assert mask[17:64, 30].all()  # the whole trail, faint ends included
    assert mask[(image >= saturation)].all()
    assert mask[38:43, 28:33].all()  # the star's saturated core with its rim
    # Growth is bounded: nothing further than bleed_growth + grow_radius from a
    # saturated pixel, and the corners are untouched.
    distance = ndimage.distance_transform_cdt(image < saturation, metric="chessboard")
    assert not mask[distance > 4].any()
    assert not mask[:10, :10].any() and not mask[-10:, -10:].any()

    narrow = mask_saturation(
        image, saturation=saturation, config=SaturationConfig(bleed_growth=0, grow_radius=0)
    )
    np.testing.assert_array_equal(narrow, image >= saturation)
    assert not narrow[17:20, 30].any()
    across = mask_saturation(
        image, saturation=saturation, config=SaturationConfig(bleed_axis="x", grow_radius=0)
    )
    assert across[30, 27:34].all() and not across[17, 30]
    low = mask_saturation(image, saturation=saturation, config=SaturationConfig(level_fraction=0.2))
    assert low[17:64, 30].all()


# --------------------------------------------------------------------------- cosmic rays


def test_cosmic_rays_on_real_gmos_frame(gmos: tuple[Exposure, NDArray[np.float32]]) -> None:
    exposure, sky = gmos
    data = exposure.data
    assert data.shape == (150, 200)

    result = detect_cosmic_rays(data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE)
    direct, cleaned = _direct_astroscrappy(data, CosmicRayConfig())
    np.testing.assert_array_equal(result.mask, direct)
    np.testing.assert_array_equal(result.cleaned, cleaned)
    # Two hits: 153 pixels with the defaults (one iteration), 169 with astroscrappy's
    # own (four iterations, areas 74 + 93 plus two diagonal pixels).
    assert 140 <= result.n_pixels <= 200
    assert result.n_groups == 2
    scrappy = CosmicRayConfig(sigma_clip=4.5, object_limit=5.0, n_iterations=4)
    as_astroscrappy = detect_cosmic_rays(
        data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE, config=scrappy
    )
    own, _ = astroscrappy.detect_cosmics(
        data, gain=GMOS_GAIN, readnoise=GMOS_READ_NOISE, satlevel=np.inf
    )
    np.testing.assert_array_equal(as_astroscrappy.mask, own)
    assert result.mask[own].mean() > 0.9 and not result.mask[~own].any()
    labels, _ = ndimage.label(result.mask, structure=np.ones((3, 3)))
    boxes = ndimage.find_objects(labels)
    for ys, xs in GMOS_KNOWN_HITS:
        assert any(
            b[0].start <= ys.start
            and ys.stop <= b[0].stop
            and b[1].start <= xs.start
            and xs.stop <= b[1].stop
            for b in boxes
        )

    # Hit pixels stand far above their neighbourhood (median 22 sigma; clean pixels 0).
    local = ndimage.median_filter(data, size=7)
    significance = (data - local) / np.sqrt(exposure.variance)
    assert float(np.median(significance[result.mask])) > 10.0
    assert abs(float(np.median(significance[~result.mask]))) < 0.5
    # Cleaned values are back near the local level.
    excess = np.abs(result.cleaned - local)[result.mask] / np.sqrt(exposure.variance[result.mask])
    assert float(np.median(excess)) < 3.0

    # Same hits with the sky model subtracted first; a masked hit is not reported.
    with_sky = detect_cosmic_rays(data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE, background=sky)
    assert with_sky.n_groups == 2
    ignore = np.zeros(data.shape, bool)
    ignore[GMOS_KNOWN_HITS[0]] = True
    masked = detect_cosmic_rays(data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE, mask=ignore)
    assert not masked.mask[ignore].any() and masked.mask[GMOS_KNOWN_HITS[1]].any()


def _direct_astroscrappy(
    data: NDArray[np.floating], config: CosmicRayConfig
) -> tuple[NDArray[np.bool_], NDArray[np.float32]]:
    """astroscrappy called directly on the GMOS cutout with the parameters of ``config``."""
    mask, cleaned = astroscrappy.detect_cosmics(
        np.asarray(data, np.float32),
        gain=GMOS_GAIN,
        readnoise=GMOS_READ_NOISE,
        satlevel=np.inf,
        sigclip=config.sigma_clip,
        sigfrac=config.sigma_fraction,
        objlim=config.object_limit,
        niter=config.n_iterations,
        sepmed=config.separable_median,
        cleantype=config.clean_type,
        fsmode=config.fine_structure_mode,
        psfmodel=config.psf_model,
        psffwhm=config.psf_fwhm,
        psfsize=config.psf_size,
    )
    return np.asarray(mask, bool), np.asarray(cleaned, np.float32)


@pytest.fixture(scope="module")
def cosmic_epoch() -> SimulatedExposure:
    """A 512x512 simulated epoch (1.2 arcsec seeing, 0.5 arcsec pixels) with stars
    (six of them saturated, with bleed trails), galaxies, bad columns and about 40
    cosmic-ray hits."""
    config = FieldConfig(
        shape=(512, 512),
        n_stars=400,
        n_galaxies=100,
        star_mag_range=(12.0, 23.5),
        star_power_law_index=1.5,
        cosmic_ray_rate=1.0,
    )
    field = simulate_field(config, seed=11)
    return simulate_exposure(field, EpochConditions(fwhm=1.2, exposure_time=120.0), seed=12)


def _unusable(epoch: SimulatedExposure) -> NDArray[np.bool_]:
    return (epoch.exposure.mask & np.uint16(MaskBit.BAD | MaskBit.SATURATED)) != 0


@pytest.mark.parametrize(
    ("options", "planes"),
    [
        ({}, False),
        ({"n_iterations": 2, "use_variance": True}, True),
        ({"n_iterations": 2, "separable_median": False, "clean_type": "medmask"}, False),
        ({"fine_structure_mode": "convolve", "object_limit": 2.0, "psf_fwhm": 2.4}, False),
        ({"sigma_clip": 4.5, "object_limit": 5.0, "clean_type": "idw"}, True),
    ],
)
def test_tiled_cosmic_rays_equal_the_full_image(
    cosmic_epoch: SimulatedExposure, options: dict[str, Any], planes: bool
) -> None:
    exposure = cosmic_epoch.exposure
    results = {}
    for windows in (True, False):
        # Windows whatever their area (by default, beyond half the image it runs whole).
        config = CosmicRayConfig(tiled=windows, max_tiled_fraction=1.0, **options)
        results[windows] = detect_cosmic_rays(
            exposure.data,
            gain=exposure.meta.gain or 0.0,
            read_noise=exposure.meta.read_noise or 0.0,
            mask=_unusable(cosmic_epoch),
            saturation=exposure.meta.saturation,
            variance=exposure.variance if planes else None,
            background=cosmic_epoch.background if planes else None,
            config=config,
        )
    tiled, full = results[True], results[False]
    # The windows really were used, and covered a small part of the image.
    assert tiled.n_windows > 10 and tiled.processed_fraction < 0.9
    assert full.n_windows == 0 and full.processed_fraction == 1.0
    assert full.n_pixels > 300
    np.testing.assert_array_equal(tiled.mask, full.mask)
    np.testing.assert_array_equal(tiled.cleaned, full.cleaned)
    assert (tiled.n_pixels, tiled.n_groups) == (full.n_pixels, full.n_groups)


def test_tiled_cosmic_rays_need_their_margin(
    cosmic_epoch: SimulatedExposure, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the margin the windows' edges change the answer: the comparison above
    # is sensitive to it.
    exposure = cosmic_epoch.exposure

    def detect(config: CosmicRayConfig) -> CosmicRayResult:
        return detect_cosmic_rays(
            exposure.data,
            gain=exposure.meta.gain or 0.0,
            read_noise=exposure.meta.read_noise or 0.0,
            mask=_unusable(cosmic_epoch),
            saturation=exposure.meta.saturation,
            config=config,
        )

    full = detect(CosmicRayConfig(tiled=False))
    _, margin = calibrate_module._tile_geometry(CosmicRayConfig())
    monkeypatch.setattr(calibrate_module, "_TILE_SAFETY", calibrate_module._TILE_SAFETY - margin)
    cut = detect(CosmicRayConfig())
    assert cut.n_windows > 0
    assert not np.array_equal(cut.mask, full.mask)


def test_cosmic_ray_prefilter_keeps_every_first_iteration_detection(
    cosmic_epoch: SimulatedExposure,
) -> None:
    # L.A.Cosmic's first-iteration detections before growth, computed over the whole
    # image with astroscrappy's own filters, as in astroscrappy.detect_cosmics.
    exposure = cosmic_epoch.exposure
    gain, read_noise = exposure.meta.gain or 0.0, exposure.meta.read_noise or 0.0
    config = CosmicRayConfig()
    electrons = exposure.data.astype(np.float32) * np.float32(gain)
    variance = electrons + np.float32(read_noise) * np.float32(read_noise)
    laplacian = scrappy_utils.laplaceconvolve(scrappy_utils.subsample(electrons))
    laplacian[laplacian < 0] = 0.0
    noise = np.sqrt(np.maximum(scrappy_utils.sepmedfilt7(variance), 1e-5))
    s = scrappy_utils.rebin(laplacian) / (2.0 * noise)
    s_prime = s - scrappy_utils.sepmedfilt7(s)
    fine = scrappy_utils.sepmedfilt5(electrons)
    fine = np.maximum((fine - scrappy_utils.sepmedfilt9(fine)) / noise, 0.01)
    ignored = scrappy_utils.dilate3(_unusable(cosmic_epoch).astype(np.uint8)).astype(bool)
    first = (s_prime > config.sigma_clip) & (s_prime / fine > config.object_limit) & ~ignored
    assert first.sum() > 100

    inputs = calibrate_module._ScrappyInputs(
        data=exposure.data.astype(np.float32),
        ignore=_unusable(cosmic_epoch),
        variance=None,
        background=None,
        gain=gain,
        read_noise=read_noise,
        saturation=np.inf,
        config=config,
    )
    ys, xs = calibrate_module._cosmic_ray_seeds(inputs)
    seeds = np.zeros(first.shape, bool)
    seeds[ys, xs] = True
    assert not (first & ~seeds).any()  # a superset...
    assert seeds.sum() <= 1.2 * first.sum()  # ...barely larger (1 % slack on thresholds)


def test_default_cosmic_rays_against_the_simulated_truth(
    cosmic_epoch: SimulatedExposure,
) -> None:
    exposure = cosmic_epoch.exposure
    result = detect_cosmic_rays(
        exposure.data,
        gain=exposure.meta.gain or 0.0,
        read_noise=exposure.meta.read_noise or 0.0,
        mask=_unusable(cosmic_epoch),
        saturation=exposure.meta.saturation,
    )
    truth = cosmic_epoch.cosmic_rays & ~_unusable(cosmic_epoch)
    labels, n_hits = ndimage.label(truth, structure=np.ones((3, 3), bool))
    found = np.unique(labels[result.mask & truth])
    assert n_hits > 20
    # Nearly every hit is found, and most of its pixels (the defaults' measured
    # 97 % and 94 % on 2048x2048 epochs).
    assert (len(found) - (found[0] == 0)) / n_hits > 0.93
    assert (result.mask & truth).sum() / truth.sum() > 0.88
    # False positives: none except pixels touching a hit, farther than 7 pixels from
    # the edge. (Within 4 pixels of it astroscrappy's 9x9 large-scale median leaves
    # the fine structure unfiltered, so the wings of a bright star cut by the edge at
    # x = 1, y = 428 pass, grown by 2 pixels: 8 pixels, as over the full image.)
    near_hit = ndimage.binary_dilation(cosmic_epoch.cosmic_rays, structure=np.ones((3, 3), bool))
    false = result.mask & ~near_hit
    assert not false[7:-7, 7:-7].any()
    assert false.sum() <= 10


def test_cosmic_rays_psf_fwhm_sets_the_convolution_kernel(
    gmos: tuple[Exposure, NDArray[np.float32]],
) -> None:
    data = gmos[0].data
    config = CosmicRayConfig(fine_structure_mode="convolve", object_limit=2.0)
    given = detect_cosmic_rays(
        data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE, psf_fwhm=4.2, config=config
    )
    # The kernel side grows to 2 * ceil(1.5 * 4.2) + 1 = 15 pixels.
    direct, _ = _direct_astroscrappy(data, replace(config, psf_fwhm=4.2, psf_size=15))
    np.testing.assert_array_equal(given.mask, direct)
    # The median fine-structure mode does not use it.
    median = detect_cosmic_rays(data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE, psf_fwhm=4.2)
    plain = detect_cosmic_rays(data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE)
    np.testing.assert_array_equal(median.mask, plain.mask)
    with pytest.raises(ValueError, match="psf_fwhm"):
        detect_cosmic_rays(data, gain=GMOS_GAIN, read_noise=GMOS_READ_NOISE, psf_fwhm=0.0)


def test_cosmic_rays_bad_input() -> None:
    with pytest.raises(ShapeMismatch):
        detect_cosmic_rays(
            np.ones((10, 10)), gain=1.0, read_noise=5.0, mask=np.zeros((9, 10), bool)
        )
    with pytest.raises(BadImageShape):
        detect_cosmic_rays(np.ones(10), gain=1.0, read_noise=5.0)


# --------------------------------------------------------------------------- exposure


def test_calibrate_exposure_on_real_saao_frame(saao_path: Path) -> None:
    raw = read_exposure(saao_path)
    before = raw.data.copy()
    with pytest.warns(UserWarning, match="saturation level unknown"):
        calibrated = calibrate_exposure(raw)
    np.testing.assert_array_equal(raw.data, before)  # the input is untouched
    assert calibrated.shape == (520, 512)
    assert calibrated.provenance["calibrate"] == "overscan,cosmic_rays"
    assert calibrated.provenance["calibrate_units"] == "adu"
    assert calibrated.provenance["input_path"] == "a8280271.fits"
    assert "BIASSEC" not in calibrated.header and calibrated.header["BUNIT"] == "adu"
    assert calibrated.meta.gain == SAAO_GAIN
    # Noise model in ADU**2: (5.0 / 1.9)**2 + signal / 1.9.
    sky = float(np.median(calibrated.data))
    assert float(np.median(calibrated.variance)) == pytest.approx(
        (SAAO_READ_NOISE / SAAO_GAIN) ** 2 + sky / SAAO_GAIN, rel=0.01
    )
    n_cosmic = int(np.count_nonzero(calibrated.mask & MaskBit.COSMIC_RAY))
    assert n_cosmic == int(calibrated.provenance["calibrate_cosmic_ray_pixels"])
    assert 0 < n_cosmic < 0.01 * calibrated.data.size


def test_calibrate_exposure_masters_saturation_and_electrons(saao_path: Path) -> None:
    raw = read_exposure(saao_path)
    shape = (520, 512)
    flat = np.ones(shape)
    flat[:, :256] = 0.5
    bad_pixels = np.zeros(shape, bool)
    bad_pixels[:, 100] = True
    config = CalibrationConfig(
        saturation=SaturationConfig(level=1000.0),
        cosmic_rays=CosmicRayConfig(replace=True),
        units="electron",
    )
    out = calibrate_exposure(
        raw,
        config=config,
        bias=_master(np.full(shape, 2.0), 0.1),
        flat=_master(flat, 0.0),
        bad_pixels=bad_pixels,
    )
    steps = "saturation,overscan,bad_pixels,bias,flat,cosmic_rays,electrons"
    assert out.provenance["calibrate"] == steps
    assert out.meta.gain == 1.0 and out.header["ORIGGAIN"] == SAAO_GAIN
    assert out.header["BUNIT"] == "electron"
    assert np.all(out.mask[:, 100] & MaskBit.BAD)
    cosmic = (out.mask & MaskBit.COSMIC_RAY) != 0
    assert np.array_equal(cosmic, (out.mask & MaskBit.INTERPOLATED) != 0)
    saturated = (out.mask & MaskBit.SATURATED) != 0
    above = raw.data[:, 16:528] >= 1000.0  # the level is compared with raw counts
    assert above.any() and saturated[above].all()
    assert np.count_nonzero(saturated) > np.count_nonzero(above)  # grown

    adu = calibrate_exposure(
        raw,
        config=CalibrationConfig(
            saturation=SaturationConfig(level=1000.0), cosmic_rays=CosmicRayConfig(enabled=False)
        ),
        bias=_master(np.full(shape, 2.0), 0.1),
        flat=_master(flat, 0.0),
    )
    good = ~cosmic
    np.testing.assert_allclose(out.data[good], adu.data[good] * SAAO_GAIN, rtol=1e-5)
    np.testing.assert_allclose(out.variance[good], adu.variance[good] * SAAO_GAIN**2, rtol=1e-5)
    # The flat halves the left side: the sky there is twice as high in ADU.
    left, right = np.median(adu.data[:, :256]), np.median(adu.data[:, 256:])
    assert left / right == pytest.approx(2.0, rel=0.05)


def test_calibrate_exposure_typed_errors(saao_path: Path) -> None:
    raw = read_exposure(saao_path)
    no_overscan = raw.copy()
    del no_overscan.header["BIASSEC"]
    config = CalibrationConfig(saturation=SaturationConfig(enabled=False))
    with pytest.raises(MissingHeaderKeywords) as info:
        calibrate_exposure(no_overscan, config=config)
    assert info.value.missing == {"bias_section": ("BIASSEC",)}

    with pytest.raises(ShapeMismatch):
        calibrate_exposure(raw, config=config, bias=_master(np.zeros((520, 536)), 1.0))

    anonymous = Exposure.from_arrays(np.full((20, 20), 100.0), meta=ExposureMeta())
    plain = CalibrationConfig(
        overscan=OverscanConfig(enabled=False), saturation=SaturationConfig(enabled=False)
    )
    with pytest.raises(MissingHeaderKeywords) as info:
        calibrate_exposure(anonymous, config=plain)
    assert set(info.value.missing) == {"gain", "read_noise"}
    done = calibrate_exposure(
        anonymous,
        config=CalibrationConfig(
            overscan=OverscanConfig(enabled=False),
            saturation=SaturationConfig(enabled=False),
            cosmic_rays=CosmicRayConfig(enabled=False),
            variance="input",
        ),
    )
    assert done.provenance["calibrate"] == ""
    np.testing.assert_array_equal(done.variance, anonymous.variance)


def test_calibrate_exposure_trims_the_wcs_and_header() -> None:
    frame = np.full((30, 40), 1100.0)
    frame[:, 35:] = 1000.0  # overscan in columns 36..40 (1-based)
    header = fits.Header()
    header["BIASSEC"] = "[36:40,1:30]"
    header["TRIMSEC"] = "[3:34,2:29]"
    header["SATURATE"] = 60000.0
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [20.0, 15.0]
    wcs.wcs.cdelt = [-1e-4, 1e-4]
    meta = ExposureMeta(gain=2.0, read_noise=5.0, saturation=60000.0, zero_point=25.0)
    raw = Exposure.from_arrays(frame, wcs=wcs, meta=meta, noise=1.0)
    raw.header = header
    config = CalibrationConfig(cosmic_rays=CosmicRayConfig(enabled=False), units="electron")
    out = calibrate_exposure(raw, config=config)
    assert out.shape == (28, 32)
    np.testing.assert_allclose(out.data, 200.0, atol=1e-3)  # (1100 - 1000) ADU * 2 e-/ADU
    # Output pixel (0, 0) is raw pixel (x=2, y=1), 0-based.
    assert out.wcs is not None
    assert out.wcs.pixel_to_world(0, 0).separation(wcs.pixel_to_world(2, 1)).arcsec < 1e-6
    assert "TRIMSEC" not in out.header and out.header["SATURATE"] == 120000.0
    assert out.meta.saturation == 120000.0
    assert out.meta.zero_point == pytest.approx(25.0 + 2.5 * math.log10(2.0))
    assert raw.header["TRIMSEC"] == "[3:34,2:29]"
