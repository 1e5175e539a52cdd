"""Tests of the seeded sky simulator."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from astropy.time import Time

from astrid.exposure import MaskBit
from astrid.science.psf_model import PsfModel
from astrid.science.simulate import (
    EpochConditions,
    FieldConfig,
    SimulatedField,
    TransientSpec,
    add_point_sources,
    point_source_snr,
    random_conditions,
    render_point_sources,
    simulate_exposure,
    simulate_field,
    simulate_survey,
)

#: A small field without detector defects, for tests that need clean pixels.
CLEAN = FieldConfig(shape=(128, 128), n_stars=0, n_galaxies=0, n_bad_columns=0, cosmic_ray_rate=0.0)


def _noise_free(result, config: FieldConfig) -> np.ndarray:
    """The expected image (sky + sources), recovered from the true variance."""
    var = result.exposure.variance.astype(np.float64)
    return var * config.gain - config.read_noise**2 / config.gain


def _one_star(config: FieldConfig, x: float, y: float, mag: float) -> SimulatedField:
    field = simulate_field(dataclasses.replace(config, n_stars=1), seed=0)
    stars = field.stars.copy()
    stars["x"], stars["y"], stars["mag"] = x, y, mag
    ra, dec = field.wcs.pixel_to_world_values(x, y)
    stars["ra"], stars["dec"] = ra, dec
    return dataclasses.replace(field, stars=stars)


def test_same_seed_gives_identical_survey_and_another_seed_does_not() -> None:
    config = FieldConfig(shape=(96, 96), n_stars=60, n_galaxies=15)
    a = simulate_survey(config, seed=7, n_epochs=2, n_transients=3)
    b = simulate_survey(config, seed=7, n_epochs=2, n_transients=3)
    c = simulate_survey(config, seed=8, n_epochs=2, n_transients=3)
    for ea, eb in zip(a.epochs, b.epochs, strict=True):
        np.testing.assert_array_equal(ea.exposure.data, eb.exposure.data)
        np.testing.assert_array_equal(ea.exposure.variance, eb.exposure.variance)
        np.testing.assert_array_equal(ea.exposure.mask, eb.exposure.mask)
        np.testing.assert_array_equal(ea.cosmic_rays, eb.cosmic_rays)
        np.testing.assert_array_equal(ea.true_psf.stamps, eb.true_psf.stamps)
    assert a.conditions == b.conditions
    assert a.transient_specs == b.transient_specs
    assert np.array_equal(np.asarray(a.transients["flux"]), np.asarray(b.transients["flux"]))
    assert not np.array_equal(a.exposures[0].data, c.exposures[0].data)
    # the survey's field is the field of the same seed; without random transients (whose
    # times depend on the epochs) adding an epoch leaves the earlier ones unchanged
    assert np.array_equal(
        np.asarray(a.stars["ra"]), np.asarray(simulate_field(config, seed=7).stars["ra"])
    )
    short = simulate_survey(config, seed=7, conditions=a.conditions)
    longer = simulate_survey(config, seed=7, conditions=[*a.conditions, EpochConditions()])
    np.testing.assert_array_equal(longer.exposures[1].data, short.exposures[1].data)


def test_star_count_and_flux_distribution_follow_the_config() -> None:
    alpha = 2.5
    config = dataclasses.replace(
        CLEAN, n_stars=20000, star_power_law_index=alpha, star_mag_range=(16.0, 22.0)
    )
    field = simulate_field(config, seed=3)
    assert len(field.stars) == 20000
    mag = np.asarray(field.stars["mag"])
    assert mag.min() >= 16.0 and mag.max() <= 22.0
    # dN/dF ∝ F**-alpha  <=>  log10 dN/dmag rises with slope 0.4 (alpha - 1)
    counts, edges = np.histogram(mag, bins=12, range=(16.0, 22.0))
    centres = 0.5 * (edges[1:] + edges[:-1])
    slope = np.polyfit(centres, np.log10(counts), 1, w=np.sqrt(counts))[0]
    assert slope == pytest.approx(0.4 * (alpha - 1.0), abs=0.03)
    # stars fill the detector plus its margin uniformly
    x = np.asarray(field.stars["x"])
    assert x.min() >= -0.5 - config.margin and x.max() <= 127.5 + config.margin


@pytest.mark.parametrize("sky_brightness", [20.5, 27.0])  # normal and exact-Poisson regimes
def test_noise_in_empty_sky_matches_the_variance_plane(sky_brightness: float) -> None:
    config = dataclasses.replace(CLEAN, shape=(256, 256))
    field = simulate_field(config, seed=1)
    result = simulate_exposure(field, EpochConditions(sky_brightness=sky_brightness), seed=2)
    exposure = result.exposure
    expected = _noise_free(result, config)
    np.testing.assert_allclose(expected, result.background, rtol=1e-4, atol=1e-2)
    pull = (exposure.data - result.background) / np.sqrt(exposure.variance)
    assert float(np.std(pull)) == pytest.approx(1.0, abs=0.05)
    assert abs(float(np.mean(pull))) < 0.02
    # variance = sky / gain + (read_noise / gain)**2
    centre = result.sky_level / config.gain + (config.read_noise / config.gain) ** 2
    assert float(exposure.variance[128, 128]) == pytest.approx(centre, rel=0.01)


def test_saturated_star_bleeds_along_its_column_and_is_masked() -> None:
    config = dataclasses.replace(CLEAN, n_bad_columns=2)
    field = _one_star(config, 64.2, 63.7, 11.5)
    result = simulate_exposure(field, EpochConditions(fwhm=1.0), seed=4)
    exposure = result.exposure
    saturated = (exposure.mask & MaskBit.SATURATED) != 0
    assert exposure.data.max() <= config.saturation_level
    assert np.all(saturated[exposure.data >= config.saturation_level])
    assert bool(result.stars["saturated"][0])
    rows, cols = np.nonzero(saturated)
    # a bleed trail: much longer along the column (y) than across it
    assert np.ptp(rows) > 3 * np.ptp(cols) and np.ptp(rows) >= 10
    assert saturated[int(rows.min()) : int(rows.max()) + 1, 64].all()
    # bleeding moves charge, it does not destroy it (clipping loses only read noise)
    box = (exposure.data - result.background)[:, 40:90]
    assert float(box.sum()) == pytest.approx(float(result.stars["flux"][0]), rel=0.02)
    # bad columns are flagged BAD over the rows they cover
    for row in field.bad_columns:
        column = exposure.mask[int(row["y_start"]) : int(row["y_stop"]), int(row["x"])]
        assert np.all(column & MaskBit.BAD)


def test_cosmic_rays_are_in_the_truth_but_not_in_the_mask() -> None:
    config = dataclasses.replace(CLEAN, cosmic_ray_rate=20.0)
    field = simulate_field(config, seed=5)
    result = simulate_exposure(field, EpochConditions(), seed=6)
    assert result.n_cosmic_rays > 5
    hit = result.cosmic_rays
    assert hit.any()
    assert not np.any(result.exposure.mask & MaskBit.COSMIC_RAY)
    excess = (result.exposure.data - result.background) / np.sqrt(result.exposure.variance)
    assert float(np.median(excess[hit])) > 10.0


def test_satellite_trail_is_a_psf_wide_line_and_changes_nothing_else() -> None:
    field = simulate_field(CLEAN, seed=5)
    plain = simulate_exposure(field, EpochConditions(fwhm=2.0), seed=6)
    trailed = simulate_exposure(field, EpochConditions(fwhm=2.0, satellite_trails=1), seed=6)
    # The same seed: the noise is the same, so only the trail's pixels differ.
    model = _noise_free(trailed, CLEAN) - _noise_free(plain, CLEAN)
    lit = model != 0
    assert 0 < lit.sum() < 0.5 * lit.size
    np.testing.assert_array_equal(trailed.exposure.data[~lit], plain.exposure.data[~lit])
    # The lit pixels lie along one straight line, about as wide as the PSF.
    yy, xx = np.nonzero(model > 0.5 * model.max())
    coords = np.stack([xx, yy]).astype(float)
    coords -= coords.mean(axis=1, keepdims=True)
    minor, major = np.sqrt(np.linalg.eigvalsh(np.cov(coords)))
    assert major > 20.0 and minor < 2.0
    # Its peak is 0.5-10 times the sky noise.
    sky_sigma = float(np.sqrt(np.median(plain.exposure.variance)))
    assert 0.4 * sky_sigma < model.max() < 11.0 * sky_sigma
    # The truth keeps the trail's core: lit pixels, the brightest of the trail's.
    assert not plain.trails.any()
    core = trailed.trails
    assert 0 < core.sum() < lit.sum() and np.all(lit[core])
    assert float(np.mean(model[core])) > 2.0 * float(np.mean(model[lit & ~core]))
    with pytest.raises(ValueError, match="satellite_trails"):
        EpochConditions(satellite_trails=-1)


def test_each_epoch_wcs_follows_its_pointing_offset() -> None:
    config = dataclasses.replace(CLEAN, shape=(100, 140), n_stars=40)
    field = simulate_field(config, seed=9)
    cx, cy = (140 - 1) / 2.0, (100 - 1) / 2.0
    ra, dec = np.asarray(field.stars["ra"]), np.asarray(field.stars["dec"])
    x_ref, y_ref = field.wcs.world_to_pixel_values(ra, dec)
    np.testing.assert_allclose(x_ref, field.stars["x"], atol=1e-6)
    assert field.wcs.pixel_to_world_values(cx, cy) == pytest.approx((config.ra, config.dec))
    for dx, dy, rot in [(0.0, 0.0, 0.0), (2.6, -1.3, 0.0), (-0.4, 0.7, 0.05)]:
        conditions = EpochConditions(dx=dx, dy=dy, rotation=rot)
        result = simulate_exposure(field, conditions, seed=1)
        a = math.radians(rot)
        u, v = x_ref - cx, y_ref - cy
        x_expected = math.cos(a) * u - math.sin(a) * v + cx + dx
        y_expected = math.sin(a) * u + math.cos(a) * v + cy + dy
        wcs = result.exposure.wcs
        assert wcs is not None
        x, y = wcs.world_to_pixel_values(ra, dec)
        np.testing.assert_allclose(x, x_expected, atol=0.01)
        np.testing.assert_allclose(y, y_expected, atol=0.01)
        ids = np.asarray(result.stars["id"])
        np.testing.assert_allclose(result.stars["x"], x[ids], atol=0.01)
        np.testing.assert_allclose(result.stars["y"], y[ids], atol=0.01)
        assert result.exposure.pixel_scale == pytest.approx(config.pixel_scale)


def test_metadata_and_photometric_zero_point() -> None:
    config = dataclasses.replace(CLEAN, band="g")
    field = _one_star(config, 60.0, 61.0, 18.0)
    conditions = EpochConditions(
        exposure_time=90.0, transparency=0.8, airmass=1.3, mjd=60123.25, fwhm=1.5
    )
    result = simulate_exposure(field, conditions, seed=3)
    meta = result.exposure.meta
    zp = config.zero_point - config.extinction * 1.3 + 2.5 * math.log10(90.0 * 0.8)
    assert meta.zero_point == pytest.approx(zp)
    assert result.stars["flux"][0] == pytest.approx(10 ** (-0.4 * (18.0 - zp)))
    assert meta.time == Time(60123.25, format="mjd", scale="utc") and meta.time.scale == "utc"
    assert (meta.band, meta.exposure_time, meta.airmass) == ("g", 90.0, 1.3)
    assert (meta.gain, meta.read_noise) == (config.gain, config.read_noise)
    assert meta.saturation == config.saturation_level
    assert meta.instrument == "AstrID simulator"
    assert result.exposure.psf is None
    assert result.exposure.data.dtype == np.float32
    # the true PSF: unit-sum stamps with the requested seeing at the centre
    psf = result.true_psf
    assert isinstance(psf, PsfModel) and psf.stamps.shape[:2] == (5, 5)
    np.testing.assert_allclose(psf.stamps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    assert psf.fwhm_at(63.5, 63.5) == pytest.approx(1.5 / config.pixel_scale, rel=0.05)


def test_true_psf_reproduces_a_rendered_star() -> None:
    config = dataclasses.replace(CLEAN, psf_variation=0.1, psf_ellipticity=0.1)
    field = _one_star(config, 50.3, 70.8, 17.0)
    result = simulate_exposure(field, EpochConditions(fwhm=1.3), seed=8)
    star = result.stars[0]
    sources = _noise_free(result, config) - result.background
    model = render_point_sources(
        result.exposure.shape, star["x"], star["y"], star["flux"], result.true_psf
    )
    assert float(sources.sum()) == pytest.approx(float(star["flux"]), rel=0.01)
    assert np.abs(sources - model).max() < 0.03 * sources.max()


def test_transients_are_where_the_truth_says() -> None:
    config = dataclasses.replace(CLEAN, shape=(160, 160), n_stars=30, n_galaxies=10)
    conditions = [
        EpochConditions(mjd=60000.0, fwhm=1.0),
        EpochConditions(mjd=60010.0, fwhm=1.4, dx=1.7, dy=-2.2, rotation=0.03),
        EpochConditions(mjd=60020.0, fwhm=1.1, dx=-0.6, dy=0.9),
    ]
    field = simulate_field(config, seed=11)
    ra, dec = field.wcs.pixel_to_world_values(40.0, 100.0)
    explicit = TransientSpec("appearing", float(ra), float(dec), 18.5, t0=60005.0)
    survey = simulate_survey(
        config, seed=11, conditions=conditions, transients=[explicit], n_transients=5
    )
    truth = survey.transients
    assert set(truth.colnames) >= {"id", "epoch", "x", "y", "ra", "dec", "flux", "snr", "kind"}
    assert set(truth["kind"]) == {"appearing", "supernova", "variable"}
    assert 0 not in truth[truth["id"] == 0]["epoch"]  # not there before t0
    assert np.any(truth["host_galaxy"] >= 0) and np.any(truth["host_star"] >= 0)
    # each bright, isolated transient is a flux excess centred where the truth puts it:
    # the same epoch rendered without transients (same seed, same noise) differs by it
    checked = 0
    for row in truth[truth["snr"] > 15]:
        same_epoch = truth[truth["epoch"] == row["epoch"]]
        distance = np.hypot(same_epoch["x"] - row["x"], same_epoch["y"] - row["y"])
        if np.sum(distance < 12) > 1:
            continue
        epoch = survey.epochs[int(row["epoch"])]
        without = simulate_exposure(survey.field, epoch.conditions, seed=epoch.seed)
        difference = epoch.exposure.data - without.exposure.data
        ix, iy = round(float(row["x"])), round(float(row["y"]))
        cut = difference[iy - 6 : iy + 7, ix - 6 : ix + 7]
        checked += 1
        if row["kind"] == "variable":
            # a variable replaces its host star, drawn at its catalogue magnitude without it
            host = epoch.stars[epoch.stars["id"] == row["host_star"]]
            assert host["variable"][0] and host["flux"][0] == pytest.approx(row["flux"])
            catalogue_mag = survey.stars["mag"][int(row["host_star"])]
            change = float(row["flux"]) - 10 ** (-0.4 * (catalogue_mag - epoch.zero_point))
            assert float(cut.sum()) == pytest.approx(change, abs=0.1 * float(row["flux"]))
            continue
        peak_y, peak_x = np.unravel_index(np.argmax(cut), cut.shape)
        assert abs(peak_x - 6) <= 1 and abs(peak_y - 6) <= 1
        assert float(cut.sum()) == pytest.approx(float(row["flux"]), rel=0.1)
    assert checked >= 3
    # positions are consistent with the epoch's WCS
    for row in truth:
        wcs = survey.epochs[int(row["epoch"])].exposure.wcs
        assert wcs is not None
        x, y = wcs.world_to_pixel_values(row["ra"], row["dec"])
        assert (float(x), float(y)) == pytest.approx((row["x"], row["y"]), abs=0.01)


def test_snr_column_is_the_ideal_psf_fit_snr() -> None:
    config = dataclasses.replace(CLEAN, shape=(160, 160), psf_variation=0.0, psf_ellipticity=0.0)
    field = simulate_field(config, seed=2)
    specs = []
    for x, y, mag in [(40.2, 50.7, 19.0), (100.6, 110.1, 21.0), (120.0, 30.0, 22.5)]:
        ra, dec = field.wcs.pixel_to_world_values(x, y)
        specs.append(TransientSpec("appearing", float(ra), float(dec), mag, t0=0.0))
    survey = simulate_survey(config, seed=2, conditions=[EpochConditions()], transients=specs)
    epoch = survey.epochs[0]
    truth = survey.transients
    assert len(truth) == 3
    expected = point_source_snr(
        epoch.exposure.variance, truth["x"], truth["y"], truth["flux"], epoch.true_psf
    )
    np.testing.assert_allclose(truth["snr"], expected, rtol=0.03)
    assert truth["snr"][0] > truth["snr"][1] > truth["snr"][2] > 0


def test_point_source_snr_by_hand() -> None:
    psf = PsfModel.gaussian(3.0)
    sigma = 2.0
    variance = np.full((64, 64), sigma**2, np.float32)
    snr = point_source_snr(variance, [30.0], [31.0], [500.0], psf)
    p = psf.stamps[0, 0].astype(np.float64)
    assert snr[0] == pytest.approx(500.0 * math.sqrt(float(np.sum(p**2))) / sigma, rel=1e-6)


def test_add_point_sources_is_pure_and_conserves_flux() -> None:
    psf = PsfModel.gaussian(2.5)
    data = np.full((50, 60), 10.0, np.float32)
    before = data.copy()
    out = add_point_sources(data, [20.3, 40.6], [25.5, 10.2], [1000.0, 250.0], psf)
    np.testing.assert_array_equal(data, before)
    assert out.dtype == np.float32
    assert float((out - data).sum()) == pytest.approx(1250.0, rel=1e-4)
    iy, ix = np.unravel_index(np.argmax(out - data), data.shape)
    assert (ix, iy) == (20, 25) or (ix, iy) == (20, 26)
    noisy = add_point_sources(data, 20.3, 25.5, 1000.0, psf, gain=2.0, seed=1)
    again = add_point_sources(data, 20.3, 25.5, 1000.0, psf, gain=2.0, seed=1)
    np.testing.assert_array_equal(noisy, again)
    assert not np.array_equal(noisy, add_point_sources(data, 20.3, 25.5, 1000.0, psf))
    with pytest.raises(ValueError, match="seed"):
        add_point_sources(data, 20.3, 25.5, 1000.0, psf, gain=2.0)


def test_light_curves() -> None:
    appear = TransientSpec("appearing", 0.0, 0.0, 20.0, t0=100.0)
    assert math.isinf(appear.magnitude_at(99.9)) and appear.magnitude_at(100.0) == 20.0
    assert appear.flux_at(99.0, 30.0) == 0.0
    assert appear.flux_at(101.0, 30.0) == pytest.approx(10**4)
    sn = TransientSpec("supernova", 0.0, 0.0, 19.0, t0=100.0, rise_time=10.0, decline_rate=0.05)
    assert math.isinf(sn.magnitude_at(100.0))
    assert sn.magnitude_at(105.0) == pytest.approx(19.0 + 5.0 * math.log10(2.0))
    assert sn.magnitude_at(110.0) == pytest.approx(19.0)
    assert sn.magnitude_at(130.0) == pytest.approx(20.0)
    var = TransientSpec("variable", 0.0, 0.0, 18.0, t0=100.0, period=2.0, amplitude=0.4)
    assert var.magnitude_at(100.0) == pytest.approx(18.0)
    assert var.magnitude_at(100.5) == pytest.approx(18.4)
    assert var.magnitude_at(101.5) == pytest.approx(17.6)
    restricted = dataclasses.replace(appear, epochs=(2,))
    assert restricted.injected_in(2) and not restricted.injected_in(1)
    with pytest.raises(ValueError):
        TransientSpec("flare", 0.0, 0.0, 18.0)  # type: ignore[arg-type]


def test_random_conditions_are_seeded_and_varied() -> None:
    a = random_conditions(6, seed=4)
    assert a == random_conditions(6, seed=4)
    assert len({c.fwhm for c in a}) == 6
    assert all(abs(c.dx) <= 3 and abs(c.dy) <= 3 and abs(c.rotation) <= 0.05 for c in a)
    assert [c.mjd for c in a] == sorted(c.mjd for c in a)


def test_invalid_options_raise() -> None:
    with pytest.raises(ValueError):
        FieldConfig(shape=(8, 8))
    with pytest.raises(ValueError):
        FieldConfig(star_mag_range=(22.0, 14.0))
    with pytest.raises(ValueError):
        EpochConditions(transparency=1.5)
    with pytest.raises(ValueError, match="n_epochs"):
        simulate_survey(CLEAN, seed=0, n_epochs=3, conditions=[EpochConditions()])
