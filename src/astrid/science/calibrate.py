"""CCD calibration: overscan, bias, dark, flat, saturation and cosmic rays.

The stage turns a raw CCD frame into a calibrated image with an honest variance and a
mask. Each step is a pure kernel over arrays; :func:`calibrate_exposure` applies them to
an :class:`~astrid.exposure.Exposure` in this order:

1. :func:`mask_saturation` on the raw pixels (the saturation level refers to raw
   counts), growing bleed trails along columns and by a small structuring element;
2. :func:`subtract_overscan` using the header's ``BIASSEC`` and trimming to ``TRIMSEC``
   (FITS sections: 1-based, inclusive, ``[x1:x2,y1:y2]``);
3. :func:`apply_calibration`: subtract a master bias and an exposure-time-scaled master
   dark, divide by a normalised master flat, and propagate the variance;
4. :func:`detect_cosmic_rays` with astroscrappy (L.A.Cosmic).

Master frames are built with ccdproc's sigma-clipping :class:`ccdproc.Combiner` by
:func:`combine_frames` (bias, or any plain stack), :func:`make_master_dark` and
:func:`make_master_flat`.

Units. Everything stays in ADU (data units) by default: the calibrated data are ADU,
the variance ADU², and the gain (electrons per ADU) is kept in the metadata and the
header's ``GAIN`` so that electrons can be recovered. ``CalibrationConfig(units=
"electron")`` converts the output to electrons instead (data × gain, variance × gain²),
setting ``GAIN = 1`` and ``BUNIT = 'electron'`` and keeping the original gain as
``ORIGGAIN``. Read noise is always quoted in electrons, as in the header.

Noise model. For a raw frame with overscan- (and bias-) subtracted signal ``s`` in ADU,
gain ``g`` (e-/ADU) and read noise ``r`` (e-), the per-pixel variance in ADU² is
``(r / g)**2 + max(s, 0) / g``. Subtracting a master bias ``B`` adds ``var(B)``;
subtracting a dark ``D`` scaled by ``k = t / t_dark`` adds ``k**2 var(D)``; dividing the
result ``n`` by a flat ``F`` gives ``out = n / F`` with
``var(out) = var(n) / F**2 + out**2 var(F) / F**2`` (first-order propagation).

Pixels are indexed ``[y, x]`` (0-based); FITS section strings are 1-based.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import astroscrappy
import numpy as np
from astropy.nddata import CCDData
from astropy.stats import sigma_clipped_stats
from ccdproc import Combiner
from numpy.typing import NDArray
from scipy import ndimage

from astrid.errors import (
    InvalidSection,
    MissingHeaderKeywords,
    ShapeMismatch,
    TooFewFrames,
)
from astrid.exposure import UNUSABLE, Exposure, MaskBit, check_image, robust_sigma

__all__ = [
    "CalibratedImage",
    "CalibrationConfig",
    "CosmicRayConfig",
    "CosmicRayResult",
    "MasterFrame",
    "OverscanConfig",
    "OverscanResult",
    "SaturationConfig",
    "apply_calibration",
    "calibrate_exposure",
    "combine_frames",
    "detect_cosmic_rays",
    "make_master_dark",
    "make_master_flat",
    "mask_saturation",
    "parse_section",
    "subtract_overscan",
]

_SECTION_AXIS = r"\s*(\*|\d+\s*:\s*\d+)\s*"
_SECTION_RE = re.compile(rf"^\s*\[{_SECTION_AXIS},{_SECTION_AXIS}\]\s*$")

#: Header keywords holding a saturation level in data units (rescaled with the units).
_SATURATION_KEYWORDS = ("SATURATE", "SATURATA", "SATLEVEL", "MAXLIN")

#: Variance of the median of n Gaussian values relative to that of their mean, n → ∞.
_MEDIAN_VARIANCE_FACTOR = math.pi / 2.0


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class OverscanConfig:
    """Options of :func:`subtract_overscan`.

    Attributes
    ----------
    enabled : bool
        Subtract the overscan and trim in :func:`calibrate_exposure` (needs the section
        keywords in the header).
    statistic : {"median", "mean"}
        How the overscan pixels of one row (one readout line) are combined into a level.
    model : {"polynomial", "per_row", "constant"}
        How the per-row levels become the subtracted level: a sigma-clipped Legendre
        polynomial in the row index (smooth, adds almost no noise), each row's own level
        (follows row-to-row jumps, adds the level's noise), or one level for the frame.
    polynomial_order : int
        Order of the polynomial along the readout direction (``model="polynomial"``).
    clip_sigma : float
        Per-row levels further than this many robust sigmas from the polynomial are
        excluded from the fit (iterated five times).
    direction : {"auto", "rows", "columns"}
        ``"rows"``: one level per image row (serial overscan, a strip of columns);
        ``"columns"``: one level per column (parallel overscan, a strip of rows);
        ``"auto"``: rows when the bias section is at least as tall as it is wide.
    bias_section_keyword : str
        Header keyword holding the overscan section.
    trim_section_keywords : tuple of str
        Header keywords searched, in order, for the section to keep.
    """

    enabled: bool = True
    statistic: Literal["median", "mean"] = "median"
    model: Literal["polynomial", "per_row", "constant"] = "polynomial"
    polynomial_order: int = 3
    clip_sigma: float = 3.0
    direction: Literal["auto", "rows", "columns"] = "auto"
    bias_section_keyword: str = "BIASSEC"
    trim_section_keywords: tuple[str, ...] = ("TRIMSEC", "DATASEC")


@dataclass(frozen=True)
class SaturationConfig:
    """Options of :func:`mask_saturation`.

    Attributes
    ----------
    enabled : bool
        Mask saturation in :func:`calibrate_exposure`.
    level : float or None
        Saturation level in raw ADU used when the metadata has none; ``None``: only the
        metadata's level (step skipped with a warning when both are absent).
    level_fraction : float
        Pixels at or above ``level_fraction * saturation`` count as saturated (below 1
        to catch the non-linear regime).
    bleed_growth : int
        Pixels added at both ends of every saturated run along ``bleed_axis``, to cover
        the faint ends of bleed trails.
    bleed_axis : {"y", "x"}
        Direction charge bleeds: along CCD columns (``"y"``, the usual case) or rows.
    grow_radius : int
        Half-size of the square structuring element then dilating the whole mask
        (0: none; 1: a 3x3 element).
    """

    enabled: bool = True
    level: float | None = None
    level_fraction: float = 1.0
    bleed_growth: int = 3
    bleed_axis: Literal["y", "x"] = "y"
    grow_radius: int = 1


@dataclass(frozen=True)
class CosmicRayConfig:
    """Options of :func:`detect_cosmic_rays` (astroscrappy's L.A.Cosmic parameters).

    Attributes
    ----------
    enabled : bool
        Detect cosmic rays in :func:`calibrate_exposure` (needs gain and read noise).
    sigma_clip : float
        Laplacian-to-noise detection limit (astroscrappy ``sigclip``).
    sigma_fraction : float
        Fraction of ``sigma_clip`` used for neighbours of a detection (``sigfrac``).
    object_limit : float
        Minimum contrast between the Laplacian and fine-structure images; raise it if
        star cores are flagged (``objlim``).
    n_iterations : int
        L.A.Cosmic iterations (``niter``).
    separable_median : bool
        Use the faster separable median filter (``sepmed``).
    clean_type : {"meanmask", "medmask", "median", "idw"}
        Interpolation used for the cleaned image (``cleantype``).
    fine_structure_mode : {"median", "convolve"}
        How the fine-structure image is built (``fsmode``).
    psf_model : {"gauss", "gaussx", "gaussy", "moffat"}
        PSF kernel for ``fine_structure_mode="convolve"`` (``psfmodel``).
    psf_fwhm : float
        FWHM in pixels of that kernel (``psffwhm``).
    psf_size : int
        Side in pixels of that kernel, odd (``psfsize``).
    replace : bool
        In :func:`calibrate_exposure`, replace flagged pixels by the cleaned values and
        flag them ``INTERPOLATED`` as well as ``COSMIC_RAY``.
    use_variance : bool
        In :func:`calibrate_exposure`, give astroscrappy the exposure's variance
        instead of its own noise model from gain and read noise.
    """

    enabled: bool = True
    sigma_clip: float = 4.5
    sigma_fraction: float = 0.3
    object_limit: float = 5.0
    n_iterations: int = 4
    separable_median: bool = True
    clean_type: Literal["meanmask", "medmask", "median", "idw"] = "meanmask"
    fine_structure_mode: Literal["median", "convolve"] = "median"
    psf_model: Literal["gauss", "gaussx", "gaussy", "moffat"] = "gauss"
    psf_fwhm: float = 2.5
    psf_size: int = 7
    replace: bool = False
    use_variance: bool = False


@dataclass(frozen=True)
class CalibrationConfig:
    """Options of :func:`calibrate_exposure`.

    Attributes
    ----------
    overscan : OverscanConfig
        Overscan subtraction and trimming.
    saturation : SaturationConfig
        Saturation and bleed-trail masking.
    cosmic_rays : CosmicRayConfig
        Cosmic-ray detection.
    variance : {"model", "input"}
        ``"model"``: build the raw variance from gain and read noise (required in the
        metadata); ``"input"``: take the exposure's variance plane as the raw variance.
    min_flat : float
        Flat values at or below this (or non-finite) mark a pixel ``BAD | NO_DATA``.
    units : {"adu", "electron"}
        Units of the output: ADU with the gain recorded (default) or electrons.
    """

    overscan: OverscanConfig = field(default_factory=OverscanConfig)
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    cosmic_rays: CosmicRayConfig = field(default_factory=CosmicRayConfig)
    variance: Literal["model", "input"] = "model"
    min_flat: float = 0.0
    units: Literal["adu", "electron"] = "adu"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class OverscanResult:
    """Overscan-subtracted, trimmed image.

    Attributes
    ----------
    data : ndarray, shape (ny_trim, nx_trim), float32
        Image after overscan subtraction and trimming, in ADU.
    level : ndarray, shape (ny_trim,) or (nx_trim,), float64
        Overscan level subtracted from each row (``direction == "rows"``) or column of
        ``data``, in ADU.
    direction : {"rows", "columns"}
        Whether ``level`` is per row or per column.
    overscan_median : float
        Median of all pixels of the bias section, in ADU.
    read_noise : float
        Read noise measured in the bias section, in ADU: 4-sigma-clipped standard
        deviation of the differences between neighbouring overscan pixels of the same
        readout line, divided by sqrt(2) (insensitive to the level and its variations).
    trim : tuple of slice
        ``(y_slice, x_slice)`` of the raw frame that ``data`` covers (0-based).
    """

    data: NDArray[np.float32]
    level: NDArray[np.float64]
    direction: Literal["rows", "columns"]
    overscan_median: float
    read_noise: float
    trim: tuple[slice, slice]


@dataclass(frozen=True)
class MasterFrame:
    """A combined calibration frame.

    Attributes
    ----------
    data : ndarray, shape (ny, nx), float32
        Combined values: ADU for a bias, ADU per ``exposure_time`` seconds for a dark,
        dimensionless (median 1) for a flat.
    variance : ndarray, shape (ny, nx), float32
        Variance of ``data`` (its units squared).
    mask : ndarray of bool, shape (ny, nx)
        True where no input value survived masking and clipping (``data`` is NaN).
    n_frames : int
        Frames combined.
    n_rejected : int
        Input pixel values rejected by sigma clipping.
    method : {"median", "average"}
        Combination used.
    exposure_time : float or None
        Seconds that ``data`` corresponds to (1.0 for a dark rate); ``None`` for a bias
        or a flat.
    """

    data: NDArray[np.float32]
    variance: NDArray[np.float32]
    mask: NDArray[np.bool_]
    n_frames: int
    n_rejected: int
    method: Literal["median", "average"]
    exposure_time: float | None = None


@dataclass(frozen=True)
class CalibratedImage:
    """Result of :func:`apply_calibration`.

    Attributes
    ----------
    data : ndarray, shape (ny, nx), float32
        Calibrated pixels in ADU (flat-fielded when a flat was given); NaN where the
        flat is unusable or a master has no value.
    variance : ndarray, shape (ny, nx), float32
        Propagated variance in ADU²; infinite where ``data`` is NaN.
    mask : ndarray, shape (ny, nx), uint16
        Input mask with ``BAD | NO_DATA`` added where a master is unusable.
    steps : tuple of str
        Steps applied, among ``"bias"``, ``"dark"``, ``"flat"``.
    dark_scale : float or None
        Factor the master dark was multiplied by (exposure time over the dark's).
    """

    data: NDArray[np.float32]
    variance: NDArray[np.float32]
    mask: NDArray[np.uint16]
    steps: tuple[str, ...]
    dark_scale: float | None


@dataclass(frozen=True)
class CosmicRayResult:
    """Result of :func:`detect_cosmic_rays`.

    Attributes
    ----------
    mask : ndarray of bool, shape (ny, nx)
        True on pixels hit by a cosmic ray.
    cleaned : ndarray, shape (ny, nx), float32
        The image with flagged pixels replaced by astroscrappy's interpolation (data
        units).
    n_pixels : int
        Pixels flagged.
    n_groups : int
        Connected groups of flagged pixels (8-connectivity): about the number of hits.
    """

    mask: NDArray[np.bool_]
    cleaned: NDArray[np.float32]
    n_pixels: int
    n_groups: int


# --------------------------------------------------------------------------- sections


def parse_section(section: str, *, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Convert a FITS/IRAF image section to numpy slices.

    Parameters
    ----------
    section : str
        ``"[x1:x2,y1:y2]"``, 1-based and inclusive, x (column) first, as in ``BIASSEC``
        and ``TRIMSEC``; ``*`` stands for a whole axis. Spaces are allowed.
    shape : tuple of int
        ``(ny, nx)`` of the image the section applies to.

    Returns
    -------
    tuple of slice
        ``(y_slice, x_slice)``, 0-based, to index an array ``[y, x]``.

    Raises
    ------
    InvalidSection
        Malformed, reversed (flipped) or outside the image.
    """
    match = _SECTION_RE.match(section) if isinstance(section, str) else None
    if match is None:
        raise InvalidSection(str(section), shape, "expected '[x1:x2,y1:y2]'")
    slices: list[slice] = []
    for text, size, axis in ((match.group(1), shape[1], "x"), (match.group(2), shape[0], "y")):
        if text == "*":
            slices.append(slice(0, size))
            continue
        start, stop = (int(v) for v in text.split(":"))
        if start > stop:
            raise InvalidSection(section, shape, f"{axis} range {start}:{stop} is reversed")
        if start < 1 or stop > size:
            raise InvalidSection(section, shape, f"{axis} range {start}:{stop} outside 1:{size}")
        slices.append(slice(start - 1, stop))
    return slices[1], slices[0]


# --------------------------------------------------------------------------- overscan


def _clipped_legendre(
    coords: NDArray[np.float64], values: NDArray[np.float64], order: int, clip: float
) -> np.polynomial.Legendre:
    keep = np.isfinite(values)
    fit = np.polynomial.Legendre.fit(coords[keep], values[keep], order)
    for _ in range(5):
        resid = values - fit(coords)
        sigma = robust_sigma(resid[keep]) if keep.any() else 0.0
        new_keep = np.isfinite(values) & (np.abs(resid) <= clip * sigma if sigma > 0 else keep)
        if new_keep.sum() <= order or np.array_equal(new_keep, keep):
            break
        keep = new_keep
        fit = np.polynomial.Legendre.fit(coords[keep], values[keep], order)
    return fit


def subtract_overscan(
    data: NDArray[np.number],
    *,
    bias_section: str,
    trim_section: str | None = None,
    config: OverscanConfig | None = None,
) -> OverscanResult:
    """Fit the overscan level along the readout direction, subtract it and trim.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Raw frame in ADU, including the overscan strip.
    bias_section : str
        Overscan region as a FITS section (``BIASSEC``), e.g. ``"[4:13,1:520]"``.
    trim_section : str or None
        Region to keep (``TRIMSEC``); ``None`` keeps the whole frame.
    config : OverscanConfig or None
        ``None`` uses the defaults.

    Returns
    -------
    OverscanResult
        Trimmed, overscan-subtracted image, the subtracted level and the read noise
        measured in the overscan.

    Raises
    ------
    BadImageShape, EmptyImage
        ``data`` is not a 2-D image with finite pixels.
    InvalidSection
        A section is malformed or outside the frame, or (``model="per_row"``) the bias
        section does not cover every kept row.
    """
    cfg = config or OverscanConfig()
    frame = check_image(data, "raw frame").astype(np.float64)
    shape = (int(frame.shape[0]), int(frame.shape[1]))
    bias_y, bias_x = parse_section(bias_section, shape=shape)
    if trim_section:
        trim = parse_section(trim_section, shape=shape)
    else:
        trim = (slice(0, shape[0]), slice(0, shape[1]))
    strip = frame[bias_y, bias_x]
    direction: Literal["rows", "columns"]
    if cfg.direction == "auto":
        direction = "rows" if strip.shape[0] >= strip.shape[1] else "columns"
    else:
        direction = cfg.direction
    # Work with one readout line per row of `lines`.
    lines = strip if direction == "rows" else strip.T
    along = bias_y if direction == "rows" else bias_x
    n_full = shape[0] if direction == "rows" else shape[1]
    coords = np.arange(along.start, along.stop, dtype=np.float64)
    collapse = np.nanmedian if cfg.statistic == "median" else np.nanmean
    line_levels = np.asarray(collapse(lines, axis=1), dtype=np.float64)

    level_full = np.full(n_full, np.nan)
    if cfg.model == "constant":
        level_full[:] = float(np.nanmedian(lines))
    elif cfg.model == "per_row":
        level_full[along] = line_levels
    else:
        order = min(cfg.polynomial_order, max(len(coords) - 1, 0))
        fit = _clipped_legendre(coords, line_levels, order, cfg.clip_sigma)
        level_full[:] = fit(np.arange(n_full, dtype=np.float64))

    kept = trim[0] if direction == "rows" else trim[1]
    level = level_full[kept]
    if not np.all(np.isfinite(level)):
        raise InvalidSection(
            bias_section, shape, f"overscan does not cover every {direction[:-1]} kept"
        )
    subtracted = frame - (level_full[:, None] if direction == "rows" else level_full[None, :])

    # Differences of neighbouring pixels cancel the level and its drifts; a clipped
    # standard deviation rather than the MAD, which is quantised for integer raw counts.
    if lines.shape[1] >= 2:
        residual = np.diff(lines, axis=1) / math.sqrt(2.0)
    else:
        residual = lines[:, 0] - level_full[along]
    read_noise = sigma_clipped_stats(residual, sigma=4.0, maxiters=5)[2]
    return OverscanResult(
        data=subtracted[trim].astype(np.float32),
        level=level.astype(np.float64),
        direction=direction,
        overscan_median=float(np.nanmedian(strip)),
        read_noise=float(read_noise),
        trim=trim,
    )


# --------------------------------------------------------------------------- masters


def _stack(
    frames: Sequence[NDArray[np.number]],
    variances: Sequence[NDArray[np.number]] | None,
    masks: Sequence[NDArray[np.bool_]] | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64] | None, NDArray[np.bool_]]:
    if len(frames) < 2:
        raise TooFewFrames(len(frames), 2)
    arrays = [check_image(f, f"frame {i}").astype(np.float64) for i, f in enumerate(frames)]
    shapes = {f"frame {i}": a.shape for i, a in enumerate(arrays)}
    if len(set(shapes.values())) != 1:
        raise ShapeMismatch(shapes)
    cube = np.stack(arrays)
    bad = ~np.isfinite(cube)
    var_cube = None
    if variances is not None:
        if len(variances) != len(frames):
            raise ShapeMismatch({"frames": (len(frames),), "variances": (len(variances),)})
        var_cube = np.stack([np.asarray(v, np.float64) for v in variances])
        if var_cube.shape != cube.shape:
            raise ShapeMismatch({"frames": cube.shape, "variances": var_cube.shape})
        bad |= ~np.isfinite(var_cube)
    if masks is not None:
        mask_cube = np.stack([np.asarray(m, bool) for m in masks])
        if mask_cube.shape != cube.shape:
            raise ShapeMismatch({"frames": cube.shape, "masks": mask_cube.shape})
        bad |= mask_cube
    return cube, var_cube, bad


def _combine_scaled(
    cube: NDArray[np.float64],
    var_cube: NDArray[np.float64] | None,
    bad: NDArray[np.bool_],
    *,
    method: Literal["median", "average"],
    sigma: float | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_], int]:
    """Sigma-clip and combine with ccdproc; the variance is propagated or from scatter."""
    if method not in ("median", "average"):
        raise ValueError(f"method must be 'median' or 'average', got {method!r}")
    ccds = [
        CCDData(np.where(b, 0.0, c), unit="adu", mask=b) for c, b in zip(cube, bad, strict=True)
    ]
    combiner = Combiner(ccds, dtype=np.float64)
    before = np.ma.getmaskarray(combiner.data_arr).copy()
    if sigma is not None:
        # clip about the median with a MAD-based sigma, robust for a handful of frames
        combiner.sigma_clipping(
            low_thresh=sigma, high_thresh=sigma, func="median", dev_func="mad_std"
        )
    rejected = np.ma.getmaskarray(combiner.data_arr)
    n_rejected = int(np.count_nonzero(rejected & ~before))
    with warnings.catch_warnings():
        # pixels with no kept value give empty-slice warnings; they are masked below
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "median":
            combined = combiner.median_combine()
        else:
            combined = combiner.average_combine()
    data = np.asarray(combined.data, np.float64)
    kept = ~rejected
    n_kept = kept.sum(axis=0)
    empty = n_kept == 0
    factor = _MEDIAN_VARIANCE_FACTOR if method == "median" else 1.0
    if var_cube is not None:
        total = np.where(kept, var_cube, 0.0).sum(axis=0)
        variance = factor * total / np.maximum(n_kept, 1) ** 2
    else:
        # ccdproc's uncertainty is the scatter of the kept values over sqrt(n); for the
        # median it omits the median's lower efficiency, restored here.
        assert combined.uncertainty is not None
        variance = factor * np.asarray(combined.uncertainty.array, np.float64) ** 2
    data = np.where(empty, np.nan, data)
    variance = np.where(empty, np.inf, variance)
    return data, variance, empty, n_rejected


def combine_frames(
    frames: Sequence[NDArray[np.number]],
    *,
    variances: Sequence[NDArray[np.number]] | None = None,
    masks: Sequence[NDArray[np.bool_]] | None = None,
    method: Literal["median", "average"] = "median",
    sigma: float | None = 3.0,
) -> MasterFrame:
    """Combine frames (e.g. overscan-subtracted biases) into a master frame with ccdproc.

    Values further than ``sigma`` robust standard deviations (MAD-based, about the
    per-pixel median) from the median of the stack are rejected, then the rest are
    median- or average-combined with :class:`ccdproc.Combiner`.

    Parameters
    ----------
    frames : sequence of ndarray, each shape (ny, nx)
        At least two frames, in ADU.
    variances : sequence of ndarray or None
        Per-frame variances (ADU²). Given: the master variance is propagated from them,
        ``sum(var_i) / n**2`` over the kept values (times pi/2 for the median).
        ``None``: it is ccdproc's estimate from the scatter of the kept values,
        ``std**2 / n`` (the median's 1.4826 MAD, times pi/2); noisy for a few frames.
    masks : sequence of ndarray of bool or None
        True where a frame's pixel must not be used.
    method : {"median", "average"}
        Combination of the kept values.
    sigma : float or None
        Clipping threshold, both sides; ``None`` disables clipping.

    Returns
    -------
    MasterFrame
        With ``exposure_time=None``.

    Raises
    ------
    TooFewFrames
        Fewer than two frames.
    ShapeMismatch
        Frames, variances or masks of different shapes.
    """
    cube, var_cube, bad = _stack(frames, variances, masks)
    data, variance, empty, n_rejected = _combine_scaled(
        cube, var_cube, bad, method=method, sigma=sigma
    )
    return MasterFrame(
        data=data.astype(np.float32),
        variance=variance.astype(np.float32),
        mask=empty,
        n_frames=len(frames),
        n_rejected=n_rejected,
        method=method,
    )


def make_master_dark(
    frames: Sequence[NDArray[np.number]],
    *,
    exposure_times: Sequence[float],
    variances: Sequence[NDArray[np.number]] | None = None,
    masks: Sequence[NDArray[np.bool_]] | None = None,
    method: Literal["median", "average"] = "median",
    sigma: float | None = 3.0,
) -> MasterFrame:
    """Combine bias-subtracted darks into a dark-current rate (ADU per second).

    Each frame (and its variance) is divided by its exposure time before clipping and
    combining as in :func:`combine_frames`, so darks of different lengths mix.

    Parameters
    ----------
    frames : sequence of ndarray, each shape (ny, nx)
        Bias-subtracted dark frames in ADU.
    exposure_times : sequence of float
        Exposure time of each frame in seconds (positive).
    variances, masks, method, sigma
        As in :func:`combine_frames`.

    Returns
    -------
    MasterFrame
        ``data`` in ADU/s with ``exposure_time=1.0``.
    """
    times = np.asarray(exposure_times, np.float64)
    if times.shape != (len(frames),):
        raise ShapeMismatch({"frames": (len(frames),), "exposure_times": times.shape})
    if not np.all(np.isfinite(times) & (times > 0)):
        raise ValueError(f"exposure times must be positive, got {times.tolist()}")
    cube, var_cube, bad = _stack(frames, variances, masks)
    cube = cube / times[:, None, None]
    if var_cube is not None:
        var_cube = var_cube / times[:, None, None] ** 2
    data, variance, empty, n_rejected = _combine_scaled(
        cube, var_cube, bad, method=method, sigma=sigma
    )
    return MasterFrame(
        data=data.astype(np.float32),
        variance=variance.astype(np.float32),
        mask=empty,
        n_frames=len(frames),
        n_rejected=n_rejected,
        method=method,
        exposure_time=1.0,
    )


def make_master_flat(
    frames: Sequence[NDArray[np.number]],
    *,
    variances: Sequence[NDArray[np.number]] | None = None,
    masks: Sequence[NDArray[np.bool_]] | None = None,
    method: Literal["median", "average"] = "median",
    sigma: float | None = 3.0,
) -> MasterFrame:
    """Combine bias- (and dark-) subtracted flats into a flat normalised to median 1.

    Each frame is divided by its own median first (so flats of different illumination
    combine), then clipped and combined as in :func:`combine_frames`, and the result
    is divided by its median; variances are scaled by the same factors squared.

    Parameters
    ----------
    frames : sequence of ndarray, each shape (ny, nx)
        Flat frames in ADU, with positive median level.
    variances, masks, method, sigma
        As in :func:`combine_frames`.

    Returns
    -------
    MasterFrame
        Dimensionless ``data`` with median 1 over its valid pixels.
    """
    cube, var_cube, bad = _stack(frames, variances, masks)
    levels = np.array(
        [np.median(c[~b]) if (~b).any() else np.nan for c, b in zip(cube, bad, strict=True)]
    )
    if not np.all(np.isfinite(levels) & (levels > 0)):
        raise ValueError(f"flat frames need a positive median level, got {levels.tolist()}")
    cube = cube / levels[:, None, None]
    if var_cube is not None:
        var_cube = var_cube / levels[:, None, None] ** 2
    data, variance, empty, n_rejected = _combine_scaled(
        cube, var_cube, bad, method=method, sigma=sigma
    )
    norm = float(np.median(data[~empty]))
    return MasterFrame(
        data=(data / norm).astype(np.float32),
        variance=(variance / norm**2).astype(np.float32),
        mask=empty,
        n_frames=len(frames),
        n_rejected=n_rejected,
        method=method,
    )


# --------------------------------------------------------------------------- apply


def _check_master(name: str, master: MasterFrame, shape: tuple[int, ...]) -> None:
    shapes = {
        "data": shape,
        f"{name}": tuple(master.data.shape),
        f"{name} variance": tuple(master.variance.shape),
    }
    if len(set(shapes.values())) != 1:
        raise ShapeMismatch(shapes)


def apply_calibration(
    data: NDArray[np.number],
    variance: NDArray[np.floating] | None = None,
    mask: NDArray[np.integer] | None = None,
    *,
    bias: MasterFrame | None = None,
    dark: MasterFrame | None = None,
    flat: MasterFrame | None = None,
    exposure_time: float | None = None,
    gain: float | None = None,
    read_noise: float | None = None,
    min_flat: float = 0.0,
) -> CalibratedImage:
    """Subtract bias and scaled dark, divide by the flat, and propagate the variance.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Overscan-subtracted, trimmed frame in ADU.
    variance : ndarray, shape (ny, nx), or None
        Variance of ``data`` in ADU² (read plus Poisson noise). ``None``: built from the
        noise model ``(read_noise / gain)**2 + max(data - bias, 0) / gain``.
    mask : ndarray, shape (ny, nx), integer, or None
        :class:`~astrid.exposure.MaskBit` flags carried to the output; ``None``: all good.
    bias : MasterFrame or None
        Master bias in ADU; ``None``: none subtracted (the overscan is the only bias).
    dark : MasterFrame or None
        Master dark; scaled by ``exposure_time / dark.exposure_time``.
    flat : MasterFrame or None
        Normalised master flat.
    exposure_time : float or None
        Exposure time of ``data`` in seconds; required with a dark.
    gain : float or None
        Electrons per ADU; required when ``variance`` is ``None``.
    read_noise : float or None
        Read noise in electrons; required when ``variance`` is ``None``.
    min_flat : float
        Flat values at or below this, or non-finite, make the pixel ``BAD | NO_DATA``.

    Returns
    -------
    CalibratedImage
        Calibrated data (ADU), variance (ADU²) and mask.

    Raises
    ------
    ShapeMismatch
        A plane or master has a different shape from ``data``.
    MissingHeaderKeywords
        ``gain``/``read_noise`` absent without a variance, or ``exposure_time`` absent
        with a dark.
    """
    image = check_image(data, "data").astype(np.float64)
    shape = image.shape
    out_mask = np.zeros(shape, np.uint16) if mask is None else np.asarray(mask, np.uint16).copy()
    if out_mask.shape != shape:
        raise ShapeMismatch({"data": shape, "mask": out_mask.shape})
    for name, master in (("bias", bias), ("dark", dark), ("flat", flat)):
        if master is not None:
            _check_master(name, master, shape)

    bias_data = np.zeros(shape) if bias is None else bias.data.astype(np.float64)
    if variance is None:
        absent: dict[str, tuple[str, ...]] = {
            n: (k,)
            for n, k, v in (("gain", "GAIN", gain), ("read_noise", "RDNOISE", read_noise))
            if v is None
        }
        if absent:
            raise MissingHeaderKeywords(absent, "the calibration noise model")
        assert gain is not None and read_noise is not None
        if gain <= 0:
            raise ValueError(f"gain must be positive, got {gain}")
        var = (read_noise / gain) ** 2 + np.clip(image - bias_data, 0.0, None) / gain
    else:
        var = np.asarray(variance, np.float64).copy()
        if var.shape != shape:
            raise ShapeMismatch({"data": shape, "variance": var.shape})

    steps: list[str] = []
    unusable = np.zeros(shape, bool)
    if bias is not None:
        image -= bias_data
        var += bias.variance
        unusable |= bias.mask
        steps.append("bias")
    dark_scale: float | None = None
    if dark is not None:
        if exposure_time is None:
            needed: dict[str, tuple[str, ...]] = {"exposure_time": ("EXPTIME",)}
            raise MissingHeaderKeywords(needed, "dark scaling")
        if dark.exposure_time is None or not dark.exposure_time > 0:
            raise ValueError(
                f"master dark needs a positive exposure_time, not {dark.exposure_time}"
            )
        dark_scale = float(exposure_time) / float(dark.exposure_time)
        image -= dark_scale * dark.data
        var += dark_scale**2 * dark.variance
        unusable |= dark.mask
        steps.append("dark")
    if flat is not None:
        f = flat.data.astype(np.float64)
        bad_flat = ~np.isfinite(f) | (f <= min_flat) | flat.mask
        f = np.where(bad_flat, 1.0, f)
        image = image / f
        var = var / f**2 + image**2 * flat.variance / f**2
        unusable |= bad_flat
        steps.append("flat")
    unusable |= ~np.isfinite(image) | ~np.isfinite(var)
    image[unusable] = np.nan
    var[unusable] = np.inf
    out_mask[unusable] |= np.uint16(MaskBit.BAD | MaskBit.NO_DATA)
    return CalibratedImage(
        data=image.astype(np.float32),
        variance=var.astype(np.float32),
        mask=out_mask,
        steps=tuple(steps),
        dark_scale=dark_scale,
    )


# --------------------------------------------------------------------------- masks


def mask_saturation(
    data: NDArray[np.number],
    *,
    saturation: float,
    config: SaturationConfig | None = None,
) -> NDArray[np.bool_]:
    """Mask saturated pixels and grow them over bleed trails.

    Pixels at or above ``config.level_fraction * saturation`` are flagged; the mask is
    then dilated by ``bleed_growth`` pixels both ways along the bleed axis (the faint
    ends of a trail) and by a ``(2 * grow_radius + 1)`` square (the saturated star's
    wings and the trail's edges), with :func:`scipy.ndimage.binary_dilation`.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Raw pixels in the units of ``saturation`` (ADU before any bias subtraction).
    saturation : float
        Saturation level.
    config : SaturationConfig or None
        ``None`` uses the defaults.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        True on saturated and grown pixels.
    """
    cfg = config or SaturationConfig()
    image = check_image(data, "data")
    with np.errstate(invalid="ignore"):
        saturated = np.isfinite(image) & (image >= cfg.level_fraction * saturation)
    if not saturated.any():
        return saturated
    grown = saturated
    if cfg.bleed_growth > 0:
        length = 2 * cfg.bleed_growth + 1
        line = np.ones((length, 1) if cfg.bleed_axis == "y" else (1, length), bool)
        grown = ndimage.binary_dilation(grown, structure=line)
    if cfg.grow_radius > 0:
        square = np.ones((2 * cfg.grow_radius + 1,) * 2, bool)
        grown = ndimage.binary_dilation(grown, structure=square)
    return np.asarray(grown, dtype=bool)


def detect_cosmic_rays(
    data: NDArray[np.number],
    *,
    gain: float,
    read_noise: float,
    mask: NDArray[np.bool_] | None = None,
    saturation: float | None = None,
    variance: NDArray[np.floating] | None = None,
    background: NDArray[np.floating] | None = None,
    config: CosmicRayConfig | None = None,
) -> CosmicRayResult:
    """Find cosmic-ray hits with astroscrappy (L.A.Cosmic, van Dokkum 2001).

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Image in ADU *including* its sky (astroscrappy's noise model needs it).
        Non-finite pixels are ignored (filled with the median and masked).
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise in electrons.
    mask : ndarray of bool, shape (ny, nx), or None
        True on pixels astroscrappy must ignore (bad, saturated); ``None``: none.
    saturation : float or None
        Saturation level in ADU (converted to electrons for astroscrappy, which then
        masks saturated stars); ``None``: no level (astroscrappy's is set to infinity).
    variance : ndarray, shape (ny, nx), or None
        Variance in ADU² used instead of the gain/read-noise model (``invar``).
    background : ndarray, shape (ny, nx), or None
        Smooth background in ADU subtracted before detection (``inbkg``), e.g. a sky
        model for spectra.
    config : CosmicRayConfig or None
        ``None`` uses the defaults.

    Returns
    -------
    CosmicRayResult
        The cosmic-ray mask, the cleaned image and counts.
    """
    cfg = config or CosmicRayConfig()
    image = check_image(data, "data").astype(np.float32)
    shape = image.shape
    ignore = np.zeros(shape, bool) if mask is None else np.asarray(mask, bool)
    planes = {"data": shape, "mask": ignore.shape}
    for name, plane in (("variance", variance), ("background", background)):
        if plane is not None:
            planes[name] = np.shape(plane)
    if len(set(planes.values())) != 1:
        raise ShapeMismatch(planes)
    if gain <= 0:
        raise ValueError(f"gain must be positive, got {gain}")
    finite = np.isfinite(image)
    if not finite.all():
        image = np.where(finite, image, np.median(image[finite])).astype(np.float32)
        ignore = ignore | ~finite
    in_var = None
    if variance is not None:
        v = np.asarray(variance, np.float32)
        good_var = np.isfinite(v) & (v > 0)
        in_var = np.where(good_var, v, np.median(v[good_var]) if good_var.any() else 1.0)
        in_var = np.asarray(in_var, np.float32)
        ignore = ignore | ~good_var
    in_bkg = None if background is None else np.asarray(background, np.float32)
    cr_mask, cleaned = astroscrappy.detect_cosmics(
        image,
        inmask=ignore if ignore.any() else None,
        inbkg=in_bkg,
        invar=in_var,
        sigclip=cfg.sigma_clip,
        sigfrac=cfg.sigma_fraction,
        objlim=cfg.object_limit,
        gain=float(gain),
        readnoise=float(read_noise),
        satlevel=float(saturation) * float(gain) if saturation is not None else np.inf,
        niter=cfg.n_iterations,
        sepmed=cfg.separable_median,
        cleantype=cfg.clean_type,
        fsmode=cfg.fine_structure_mode,
        psfmodel=cfg.psf_model,
        psffwhm=cfg.psf_fwhm,
        psfsize=cfg.psf_size,
    )
    flagged = np.asarray(cr_mask, bool)
    _, n_groups = ndimage.label(flagged, structure=np.ones((3, 3), bool))
    return CosmicRayResult(
        mask=flagged,
        cleaned=np.asarray(cleaned, np.float32),
        n_pixels=int(np.count_nonzero(flagged)),
        n_groups=int(n_groups),
    )


# --------------------------------------------------------------------------- exposure


def _bits(selected: NDArray[np.bool_], bits: MaskBit) -> NDArray[np.uint16]:
    return np.where(selected, np.uint16(bits), np.uint16(0)).astype(np.uint16)


def _section_from_header(exposure: Exposure, keys: Sequence[str]) -> tuple[str | None, str]:
    for key in keys:
        value = exposure.header.get(key)
        if isinstance(value, str) and value.strip():
            return value, key
    return None, ""


def calibrate_exposure(
    exposure: Exposure,
    *,
    config: CalibrationConfig | None = None,
    bias: MasterFrame | None = None,
    dark: MasterFrame | None = None,
    flat: MasterFrame | None = None,
    bad_pixels: NDArray[np.bool_] | None = None,
) -> Exposure:
    """Calibrate a raw exposure: saturation, overscan, bias, dark, flat, cosmic rays.

    Parameters
    ----------
    exposure : Exposure
        Raw frame in ADU with its header (``BIASSEC``/``TRIMSEC`` when the overscan is
        enabled) and metadata (gain and read noise for the noise model and cosmic
        rays, exposure time with a dark, saturation for the saturation mask).
    config : CalibrationConfig or None
        ``None`` uses the defaults.
    bias, dark, flat : MasterFrame or None
        Masters on the trimmed pixel grid (see :func:`combine_frames`,
        :func:`make_master_dark`, :func:`make_master_flat`); ``None`` skips the step.
    bad_pixels : ndarray of bool, shape of the trimmed image, or None
        Known detector defects, flagged ``BAD``.

    Returns
    -------
    Exposure
        A new exposure on the trimmed grid (WCS shifted accordingly), in ADU unless
        ``config.units == "electron"``, with the mask bits ``SATURATED``, ``BAD``,
        ``NO_DATA``, ``COSMIC_RAY`` (and ``INTERPOLATED`` when cleaned) added and
        provenance entries ``calibrate`` (the steps, comma-separated) and
        ``calibrate_*`` (levels, counts, units). The input is not modified.

    Raises
    ------
    MissingHeaderKeywords
        A section keyword, the gain or read noise (noise model, cosmic rays) or the
        exposure time (dark) is needed but absent.
    InvalidSection
        A section keyword is malformed or outside the frame.
    ShapeMismatch
        A master or ``bad_pixels`` does not match the trimmed image.
    """
    cfg = config or CalibrationConfig()
    meta = exposure.meta
    raw = exposure.data
    provenance = dict(exposure.provenance)
    steps: list[str] = []
    header = exposure.header.copy()

    saturated = np.zeros(raw.shape, bool)
    saturation = meta.saturation if meta.saturation is not None else cfg.saturation.level
    if cfg.saturation.enabled:
        if saturation is None:
            warnings.warn(
                "saturation level unknown (no SATURATE keyword and no "
                "SaturationConfig.level): saturation not masked",
                stacklevel=2,
            )
            provenance["calibrate_saturation"] = "skipped: level unknown"
        else:
            saturated = mask_saturation(raw, saturation=saturation, config=cfg.saturation)
            steps.append("saturation")
            provenance["calibrate_saturation_level"] = f"{saturation:g}"

    trim = (slice(0, raw.shape[0]), slice(0, raw.shape[1]))
    data: NDArray[np.float32] = raw
    overscan_level = 0.0
    if cfg.overscan.enabled:
        bias_section, _ = _section_from_header(exposure, (cfg.overscan.bias_section_keyword,))
        trim_section, trim_key = _section_from_header(exposure, cfg.overscan.trim_section_keywords)
        absent: dict[str, tuple[str, ...]] = {}
        if bias_section is None:
            absent["bias_section"] = (cfg.overscan.bias_section_keyword,)
        if trim_section is None:
            absent["trim_section"] = tuple(cfg.overscan.trim_section_keywords)
        if absent:
            raise MissingHeaderKeywords(absent, "overscan subtraction")
        assert bias_section is not None and trim_section is not None
        overscan = subtract_overscan(
            raw, bias_section=bias_section, trim_section=trim_section, config=cfg.overscan
        )
        data, trim = overscan.data, overscan.trim
        overscan_level = overscan.overscan_median
        steps.append("overscan")
        provenance["calibrate_overscan_level"] = f"{float(np.median(overscan.level)):.3f}"
        provenance["calibrate_overscan_read_noise_adu"] = f"{overscan.read_noise:.3f}"
        provenance["calibrate_bias_section"] = bias_section.replace(" ", "")
        provenance["calibrate_trim_section"] = trim_section.replace(" ", "")
        for key in (cfg.overscan.bias_section_keyword, trim_key, "DATASEC"):
            header.remove(key, ignore_missing=True, remove_all=True)

    shape = data.shape
    mask = exposure.mask[trim].copy()
    mask |= _bits(saturated[trim], MaskBit.SATURATED)
    if bad_pixels is not None:
        bad = np.asarray(bad_pixels, bool)
        if bad.shape != shape:
            raise ShapeMismatch({"data": shape, "bad_pixels": bad.shape})
        mask |= _bits(bad, MaskBit.BAD)
        steps.append("bad_pixels")

    if cfg.variance == "model":
        meta.require("gain", "read_noise", context="the calibration noise model")
        raw_variance = None
    else:
        raw_variance = exposure.variance[trim]
    calibrated = apply_calibration(
        data,
        raw_variance,
        mask,
        bias=bias,
        dark=dark,
        flat=flat,
        exposure_time=meta.exposure_time,
        gain=meta.gain,
        read_noise=meta.read_noise,
        min_flat=cfg.min_flat,
    )
    out_data = calibrated.data
    out_variance = calibrated.variance
    out_mask = calibrated.mask
    steps.extend(calibrated.steps)
    for name, master in (("bias", bias), ("dark", dark), ("flat", flat)):
        if master is not None:
            provenance[f"calibrate_{name}_n_frames"] = str(master.n_frames)
    if calibrated.dark_scale is not None:
        provenance["calibrate_dark_scale"] = f"{calibrated.dark_scale:.6g}"

    if cfg.cosmic_rays.enabled:
        meta.require("gain", "read_noise", context="cosmic-ray detection")
        assert meta.gain is not None and meta.read_noise is not None
        cosmic = detect_cosmic_rays(
            out_data,
            gain=meta.gain,
            read_noise=meta.read_noise,
            mask=(out_mask & np.uint16(UNUSABLE)) != 0,
            saturation=None if saturation is None else saturation - overscan_level,
            variance=out_variance if cfg.cosmic_rays.use_variance else None,
            config=cfg.cosmic_rays,
        )
        out_mask = out_mask | _bits(cosmic.mask, MaskBit.COSMIC_RAY)
        if cfg.cosmic_rays.replace:
            out_data = np.where(cosmic.mask, cosmic.cleaned, out_data).astype(np.float32)
            out_mask |= _bits(cosmic.mask, MaskBit.INTERPOLATED)
        steps.append("cosmic_rays")
        provenance["calibrate_cosmic_ray_pixels"] = str(cosmic.n_pixels)

    new_meta = meta
    if cfg.units == "electron":
        meta.require("gain", context="conversion to electrons")
        assert meta.gain is not None
        gain = meta.gain
        out_data = (out_data * gain).astype(np.float32)
        out_variance = (out_variance * gain**2).astype(np.float32)
        new_meta = replace(
            meta,
            gain=1.0,
            saturation=None if meta.saturation is None else meta.saturation * gain,
            zero_point=None
            if meta.zero_point is None
            else meta.zero_point + 2.5 * math.log10(gain),
        )
        for key in _SATURATION_KEYWORDS:
            value = header.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                header[key] = value * gain
        header["ORIGGAIN"] = (gain, "gain [e-/ADU] before conversion to electrons")
        header["GAIN"] = (1.0, "e-/ADU (data in electrons)")
        header["BUNIT"] = ("electron", "data units")
        steps.append("electrons")
    elif meta.gain is not None:
        header["BUNIT"] = ("adu", "data units; GAIN converts to electrons")
    provenance["calibrate_units"] = cfg.units
    if meta.gain is not None:
        provenance["calibrate_gain"] = f"{meta.gain:g}"
    provenance["calibrate"] = ",".join(steps)

    wcs = exposure.wcs.slice(trim) if exposure.wcs is not None else None
    return Exposure(
        data=out_data,
        variance=out_variance,
        mask=out_mask,
        wcs=wcs,
        psf=exposure.psf if not cfg.overscan.enabled else None,
        meta=new_meta,
        header=header,
        provenance=provenance,
    )
