"""Reading every shared real image, round trips, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from astrid.errors import (
    BadImageShape,
    CorruptFitsFile,
    EmptyImage,
    MissingHeaderKeywords,
    ShapeMismatch,
)
from astrid.exposure import Exposure, ExposureMeta, MaskBit
from astrid.io.fits import meta_from_header, read_exposure, read_exposures, write_exposure
from astrid.science.psf_model import PsfModel

LEGACY = "images_legacypipe"


def _images(shared: Path) -> list[Path]:
    out = []
    for p in sorted(shared.glob("images_*/**/*.fits")):
        name = p.name
        if "_ood_" in name or "_oow_" in name or "Kernel" in name:
            continue
        if p.parent.name == "images_sep" and name != "image.fits":
            continue  # SExtractor check images, not exposures
        out.append(p)
    return out


def test_every_shared_image_loads(shared_data: Path) -> None:
    paths = _images(shared_data)
    assert len(paths) >= 30
    for path in paths:
        exposures = read_exposures(path)
        assert exposures, path
        for e in exposures:
            assert e.data.ndim == 2 and e.data.dtype == np.float32
            assert e.variance.shape == e.data.shape == e.mask.shape
            assert np.all(e.variance[e.good] > 0)
            has_ctype = str(e.header.get("CTYPE1", "")).startswith("RA")
            assert (e.wcs is not None) == has_ctype, path
            if e.wcs is None:
                assert "wcs" in e.meta.missing
            assert e.provenance["input_image_sha256"]


def test_legacypipe_wcs_and_siblings(shared_data: Path) -> None:
    path = next(shared_data.joinpath(LEGACY).rglob("c4d_181104_072440_ooi_g_ls9.S4.fits"))
    e = read_exposure(path)
    # The TPV distortion is kept: agreement with astropy reading the header directly.
    direct = WCS(fits.getheader(path, 1))
    assert e.wcs is not None
    for x, y in [(0, 0), (50, 50), (99, 99)]:
        sep = e.wcs.pixel_to_world(x, y).separation(direct.pixel_to_world(x, y)).arcsec
        assert sep < 1e-6
    assert e.meta.band == "g"
    assert e.meta.instrument == "DECam"
    assert e.meta.time is not None and e.meta.time.scale == "utc"
    assert e.meta.time.isot.startswith("2018-11-04T07:24:40")
    assert e.pixel_scale == pytest.approx(0.262, abs=0.002)
    # DQ code 1 (bad) from the *_ood_* sibling lands in the mask; variance from *_oow_*.
    dq = fits.getdata(str(path).replace("_ooi_", "_ood_"), 1)
    w = fits.getdata(str(path).replace("_ooi_", "_oow_"), 1)
    assert np.all(e.mask[dq == 1] & MaskBit.BAD)
    assert np.all(e.mask[dq == 3] & MaskBit.SATURATED)
    pos = w > 0
    np.testing.assert_allclose(e.variance[pos], 1.0 / w[pos], rtol=1e-5)
    assert "input_dq_sha256" in e.provenance and "input_weight_sha256" in e.provenance


def test_gmos_multi_extension_uses_var_plane(shared_data: Path) -> None:
    path = shared_data / "images_astroscrappy_gmos" / "gmos.fits"
    exposures = read_exposures(path)
    assert len(exposures) == 1  # SCI; its VAR plane attached, the SKYFIT model skipped
    with fits.open(path) as h:
        np.testing.assert_allclose(exposures[0].variance, h["VAR"].data, rtol=1e-6)
    assert exposures[0].wcs is None
    assert exposures[0].meta.exposure_time == 90.0


def test_saao_raw_metadata(shared_data: Path) -> None:
    e = read_exposure(shared_data / "images_ccdproc_raw" / "a8280271.fits")
    assert e.shape == (520, 536)
    assert e.meta.gain == 1.9 and e.meta.read_noise == 5.0
    with pytest.raises(MissingHeaderKeywords) as info:
        e.meta.require("gain", "saturation", context="calibration")
    assert "saturation" in info.value.missing and "gain" not in info.value.missing
    assert "SATURATE" in str(info.value)


def test_round_trip_keeps_planes_wcs_psf_and_provenance(shared_data: Path, tmp_path: Path) -> None:
    path = next(shared_data.joinpath(LEGACY).rglob("c4d_150110_053718_ooi_z_ls9.S4.fits"))
    e = read_exposure(path)
    e.psf = PsfModel.gaussian(3.5)
    e.provenance["step"] = "test"
    out = write_exposure(e, tmp_path / "e.fits")
    back = read_exposure(out)
    np.testing.assert_array_equal(back.data, e.data)
    np.testing.assert_array_equal(back.variance, e.variance)
    np.testing.assert_array_equal(back.mask, e.mask)
    assert back.wcs is not None and e.wcs is not None
    assert back.wcs.pixel_to_world(10, 20).separation(e.wcs.pixel_to_world(10, 20)).arcsec < 1e-6
    assert back.psf is not None
    np.testing.assert_allclose(back.psf.stamps, e.psf.stamps)
    assert back.psf.fwhm == pytest.approx(3.5)
    assert back.provenance["step"] == "test"
    assert back.provenance["input_image_sha256"] == e.provenance["input_image_sha256"]
    assert back.meta.band == "z" and back.meta.gain == e.meta.gain
    assert back.meta.time is not None and e.meta.time is not None
    assert abs((back.meta.time - e.meta.time).sec) < 1e-3
    with fits.open(out) as h:
        assert h["MASK"].header["MP_SATUR"] == int(MaskBit.SATURATED)


def test_truncated_file(tmp_path: Path) -> None:
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(np.ones((100, 100), np.float32)).writeto(good)
    bad = tmp_path / "truncated.fits"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CorruptFitsFile, match="truncated"):
        read_exposure(bad)


@pytest.mark.parametrize("keep_bytes", [5000, 20000])
def test_truncated_astrid_file(tmp_path: Path, keep_bytes: int) -> None:
    own = tmp_path / "own.fits"
    plane = np.ones((64, 64), np.float32)
    write_exposure(Exposure(data=plane, variance=plane, mask=np.zeros((64, 64), np.uint16)), own)
    bad = tmp_path / "cut.fits"
    bad.write_bytes(own.read_bytes()[:keep_bytes])
    with pytest.raises(CorruptFitsFile, match="truncated"):
        read_exposure(bad)


def test_not_fits_and_missing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.fits"
    junk.write_text("this is not a FITS file\n" * 100)
    with pytest.raises(CorruptFitsFile):
        read_exposure(junk)
    with pytest.raises(CorruptFitsFile, match="no such file"):
        read_exposure(tmp_path / "absent.fits")


def test_header_only_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.fits"
    fits.PrimaryHDU().writeto(p)
    with pytest.raises(CorruptFitsFile, match="no image data"):
        read_exposure(p)


def test_all_nan_and_one_d(tmp_path: Path) -> None:
    p = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((20, 20), np.nan, np.float32)).writeto(p)
    with pytest.raises(EmptyImage) as info:
        read_exposure(p)
    assert info.value.n_good == 0 and info.value.n_total == 400
    with pytest.raises(BadImageShape) as info2:
        Exposure.from_arrays(np.ones(10))
    assert info2.value.shape == (10,)


def test_mismatched_planes() -> None:
    with pytest.raises(ShapeMismatch) as info:
        Exposure(
            data=np.zeros((4, 4), np.float32),
            variance=np.ones((4, 5), np.float32),
            mask=np.zeros((4, 4), np.uint16),
        )
    assert info.value.shapes["variance"] == (4, 5)


def test_no_celestial_wcs_is_described(tmp_path: Path) -> None:
    h = fits.Header()
    h["CTYPE1"] = "LINEAR"
    h["CTYPE2"] = "LINEAR"
    p = tmp_path / "linear.fits"
    fits.PrimaryHDU(np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32), h).writeto(p)
    e = read_exposure(p)
    assert e.wcs is None
    assert "not celestial" in e.meta.missing["wcs"][0]


def test_from_arrays_flags_nan_and_estimates_noise() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(0.0, 2.0, (200, 200)).astype(np.float32)
    data[5, 7] = np.nan
    e = Exposure.from_arrays(data)
    assert e.mask[5, 7] & MaskBit.NO_DATA
    assert not e.good[5, 7]
    assert np.sqrt(e.variance[0, 0]) == pytest.approx(2.0, rel=0.03)


def test_meta_time_scale_and_band_normalisation() -> None:
    h = fits.Header()
    h["DATE-OBS"] = "2020-01-02T03:04:05.5"
    h["TIMESYS"] = "TAI"
    h["FILTER"] = "r DECam SDSS c0002 6415.0 1480.0"
    meta = meta_from_header(h)
    assert meta.time is not None and meta.time.scale == "tai"
    assert meta.band == "r"
    assert isinstance(meta, ExposureMeta)
    assert "gain" in meta.missing and "GAIN" in meta.missing["gain"]
