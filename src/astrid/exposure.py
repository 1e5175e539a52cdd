"""The exposure: one image with its variance, mask, WCS, PSF and metadata.

Pixel convention: arrays are indexed ``[y, x]`` and positions are 0-based pixel centres
(as numpy and astropy's APE 14 ``pixel_to_world``), unless a name says otherwise; FITS
headers and SExtractor catalogues are 1-based.

Units: data and variance are in the image's own units (ADU unless the header says
otherwise); variance is in those units squared.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntFlag
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from numpy.typing import NDArray

from astrid.errors import BadImageShape, EmptyImage, MissingHeaderKeywords, ShapeMismatch
from astrid.science.psf_model import PsfModel

__all__ = [
    "Exposure",
    "ExposureMeta",
    "MaskBit",
    "check_image",
]


class MaskBit(IntFlag):
    """Bit flags of an exposure's mask plane (``uint16``; 0 means a good pixel).

    The values are written to FITS mask headers as ``MP_<NAME>`` keywords, so a file is
    self-describing.
    """

    BAD = 1
    """Detector defect: hot, dead or bad column, or flagged bad by the data provider."""
    SATURATED = 2
    """At or above the saturation level, including grown bleed trails."""
    COSMIC_RAY = 4
    """Hit by a cosmic ray (detected with astroscrappy or flagged by the provider)."""
    EDGE = 8
    """Within a border of the detector or resampled footprint where results are unreliable."""
    NO_DATA = 16
    """No valid measurement: NaN, infinite, outside the footprint, or zero weight."""
    INTERPOLATED = 32
    """Value was interpolated over (e.g. cosmic ray cleaned); not an independent measurement."""

    @classmethod
    def header_cards(cls) -> list[tuple[str, int, str]]:
        """``(keyword, value, comment)`` cards documenting every bit in a FITS header."""
        return [
            (f"MP_{bit.name}"[:8], int(bit.value), (bit.__doc__ or "").strip()[:46]) for bit in cls
        ]


#: Flags that make a pixel unusable for measurement.
UNUSABLE = MaskBit.BAD | MaskBit.SATURATED | MaskBit.COSMIC_RAY | MaskBit.NO_DATA


@dataclass(frozen=True)
class ExposureMeta:
    """Observation metadata. ``None`` means the header did not say.

    Attributes
    ----------
    time : astropy.time.Time or None
        Start of the exposure, with its time scale (from DATE-OBS/MJD-OBS and TIMESYS;
        UTC when TIMESYS is absent).
    band : str or None
        Filter or band name as the instrument writes it.
    exposure_time : float or None
        Exposure time in seconds.
    gain : float or None
        Gain in electrons per ADU.
    read_noise : float or None
        Read noise in electrons.
    saturation : float or None
        Saturation level in ADU (data units).
    zero_point : float or None
        Magnitude of a source giving 1 ADU in total over the exposure
        (``mag = zero_point - 2.5 log10(flux_adu)``).
    airmass : float or None
        Airmass at the start of the exposure.
    instrument : str or None
        Instrument (camera) name.
    telescope : str or None
        Telescope name.
    object_name : str or None
        Target or field name.
    missing : dict of str to tuple of str
        For each attribute that is ``None``, the header keywords that were searched.
    """

    time: Time | None = None
    band: str | None = None
    exposure_time: float | None = None
    gain: float | None = None
    read_noise: float | None = None
    saturation: float | None = None
    zero_point: float | None = None
    airmass: float | None = None
    instrument: str | None = None
    telescope: str | None = None
    object_name: str | None = None
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def require(self, *names: str, context: str = "") -> None:
        """Raise :class:`MissingHeaderKeywords` naming each of ``names`` that is ``None``."""
        absent = {n: self.missing.get(n, (n.upper(),)) for n in names if getattr(self, n) is None}
        if absent:
            raise MissingHeaderKeywords(absent, context)


@dataclass
class Exposure:
    """A 2-D image with variance, mask, WCS, PSF and metadata.

    Attributes
    ----------
    data : ndarray, shape (ny, nx), float32
        Pixel values. Pixels flagged ``NO_DATA`` may hold NaN.
    variance : ndarray, shape (ny, nx), float32
        Per-pixel variance of ``data`` (data units squared).
    mask : ndarray, shape (ny, nx), uint16
        :class:`MaskBit` flags; 0 is good.
    wcs : astropy.wcs.WCS or None
        Celestial WCS (``None`` when the header has none).
    psf : PsfModel or None
        PSF model, once estimated.
    meta : ExposureMeta
        Observation metadata.
    header : astropy.io.fits.Header
        The original headers (primary merged with the image extension), kept for output.
    provenance : dict of str to str
        Where this exposure came from and what was done to it (input hashes, steps,
        code version); written to FITS as ``HISTORY``/``AST_*`` cards.
    """

    data: NDArray[np.float32]
    variance: NDArray[np.float32]
    mask: NDArray[np.uint16]
    wcs: WCS | None = None
    psf: PsfModel | None = None
    meta: ExposureMeta = field(default_factory=ExposureMeta)
    header: fits.Header = field(default_factory=fits.Header)
    provenance: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = check_image(self.data, "data")
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.uint16)
        shapes = {"data": self.data.shape, "variance": self.variance.shape, "mask": self.mask.shape}
        if len(set(shapes.values())) != 1:
            raise ShapeMismatch(shapes)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return (int(self.data.shape[0]), int(self.data.shape[1]))

    @property
    def good(self) -> NDArray[np.bool_]:
        """Boolean map of usable pixels (finite and not flagged unusable)."""
        return ((self.mask & UNUSABLE) == 0) & np.isfinite(self.data)

    @property
    def pixel_scale(self) -> float | None:
        """Mean pixel scale in arcsec per pixel, from the WCS (``None`` without one)."""
        if self.wcs is None:
            return None
        from astropy.wcs.utils import proj_plane_pixel_scales

        return float(np.mean(proj_plane_pixel_scales(self.wcs.celestial)) * 3600.0)

    def copy(self, **changes: Any) -> Exposure:
        """A deep copy of the arrays, with attributes replaced by ``changes``."""
        base = replace(
            self,
            data=self.data.copy(),
            variance=self.variance.copy(),
            mask=self.mask.copy(),
            wcs=self.wcs.deepcopy() if self.wcs is not None else None,
            header=self.header.copy(),
            provenance=dict(self.provenance),
        )
        return replace(base, **changes) if changes else base

    @classmethod
    def from_arrays(
        cls,
        data: NDArray[np.floating],
        *,
        variance: NDArray[np.floating] | None = None,
        mask: NDArray[np.integer] | None = None,
        wcs: WCS | None = None,
        meta: ExposureMeta | None = None,
        noise: float | None = None,
    ) -> Exposure:
        """Build an exposure from arrays, flagging non-finite pixels ``NO_DATA``.

        Parameters
        ----------
        data : ndarray, shape (ny, nx)
            Pixel values.
        variance : ndarray or None
            Per-pixel variance. ``None`` uses ``noise**2`` if given, else a robust
            estimate of the pixel-to-pixel scatter (1.4826 MAD), constant over the image.
        mask : ndarray or None
            Initial :class:`MaskBit` flags; ``None`` means all good.
        wcs, meta
            As the attributes.
        noise : float or None
            Constant per-pixel noise sigma used when ``variance`` is ``None``.
        """
        arr = check_image(data, "data")
        m = np.zeros(arr.shape, np.uint16) if mask is None else np.asarray(mask, np.uint16)
        if m.shape != arr.shape:
            raise ShapeMismatch({"data": arr.shape, "mask": m.shape})
        bad = ~np.isfinite(arr)
        m = m | np.where(bad, np.uint16(MaskBit.NO_DATA), np.uint16(0)).astype(np.uint16)
        if variance is None:
            sigma = noise if noise is not None else robust_sigma(arr[~bad])
            var = np.full(arr.shape, sigma**2, np.float32)
        else:
            var = np.asarray(variance, np.float32)
        return cls(data=arr, variance=var, mask=m, wcs=wcs, meta=meta or ExposureMeta())


def robust_sigma(values: NDArray[np.floating]) -> float:
    """Gaussian-equivalent standard deviation from the median absolute deviation."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise EmptyImage(0, int(np.asarray(values).size))
    med = np.median(v)
    return float(1.4826 * np.median(np.abs(v - med)))


def check_image(data: Any, name: str = "data", *, min_size: int = 2) -> NDArray[np.float32]:
    """Validate an image array and return it as float32.

    Raises
    ------
    BadImageShape
        If it is not 2-D or smaller than ``min_size`` on a side.
    EmptyImage
        If no pixel is finite.
    """
    arr = np.asarray(data)
    if arr.ndim != 2 or min(arr.shape) < min_size:
        raise BadImageShape(arr.shape, f"{name} as a 2-D image at least {min_size}x{min_size}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise BadImageShape(arr.shape, f"{name} as a real numeric array, got dtype {arr.dtype}")
    out = arr.astype(np.float32, copy=False)
    n_good = int(np.count_nonzero(np.isfinite(out)))
    if n_good == 0:
        raise EmptyImage(0, out.size)
    return out
