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
4. :func:`detect_cosmic_rays` with astroscrappy (L.A.Cosmic), run only on windows
   around the pixels where a hit can start, with the same result as on the full image.

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

import contextlib
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
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

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

    The defaults differ from astroscrappy's (``sigclip=4.5, objlim=5, niter=4``);
    measured against the simulator's truth on 2048x2048 epochs (0.5 arcsec pixels,
    thin tracks and spots; ``bench/bench_cosmic_rays.py``):

    - one iteration finds the same hits as two or four but about 93 % of their pixels
      instead of 98 % (the fainter pixels beside a hit); over the full image it costs
      a third of four iterations, and with ``tiled`` its windows have a quarter of
      the area of two iterations';
    - ``sigma_clip=6`` drops the isolated noise pixels that 4.5 flags (about 23 per
      megapixel) for about 1 % of the hit pixels;
    - ``object_limit=8`` leaves star cores alone down to a PSF FWHM of 2 pixels; at
      1.6 pixels (0.8 arcsec) L.A.Cosmic flags the cores of bright stars, 140 to 230
      pixels per 4 megapixels, which ``object_limit=20`` brings under 35 at no cost on
      the simulations; but on the real GMOS frame wide hits break up from 10 on;
    - ``fine_structure_mode="convolve"`` with a 3-pixel kernel misses 18 % of the hits
      and 36 % of their pixels (its PSF-matched filter responds to a track as to a
      star); with the PSF's own FWHM and ``object_limit=2`` it equals the median mode
      at 2 arcsec but misses 23 % of the hits at 0.8 arcsec.

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
        star cores are flagged, e.g. for a PSF FWHM under 2 pixels (``objlim``).
    n_iterations : int
        L.A.Cosmic iterations (``niter``); each one more adds the fainter pixels next
        to earlier hits, and widens the windows of ``tiled`` by 18 pixels a side.
    separable_median : bool
        Use the faster separable median filter (``sepmed``).
    clean_type : {"meanmask", "medmask", "median", "idw"}
        Interpolation used for the cleaned image (``cleantype``).
    fine_structure_mode : {"median", "convolve"}
        How the fine-structure image is built (``fsmode``).
    psf_model : {"gauss", "gaussx", "gaussy", "moffat"}
        PSF kernel for ``fine_structure_mode="convolve"`` (``psfmodel``).
    psf_fwhm : float
        FWHM in pixels of that kernel (``psffwhm``), unless :func:`detect_cosmic_rays`
        is given the exposure's own.
    psf_size : int
        Side in pixels of that kernel, odd (``psfsize``).
    replace : bool
        In :func:`calibrate_exposure`, replace flagged pixels by the cleaned values and
        flag them ``INTERPOLATED`` as well as ``COSMIC_RAY``.
    use_variance : bool
        In :func:`calibrate_exposure`, give astroscrappy the exposure's variance
        instead of its own noise model from gain and read noise.
    tiled : bool
        Run astroscrappy only on windows around the pixels where a detection can start
        (found by an exact prefilter; see :func:`detect_cosmic_rays`); the mask and the
        cleaned image are identical to a run over the whole image, which ``False``
        does.
    max_tiled_fraction : float
        With ``tiled``, process the whole image at once when the windows would cover
        more than this fraction of it.
    """

    enabled: bool = True
    sigma_clip: float = 6.0
    sigma_fraction: float = 0.3
    object_limit: float = 8.0
    n_iterations: int = 1
    separable_median: bool = True
    clean_type: Literal["meanmask", "medmask", "median", "idw"] = "meanmask"
    fine_structure_mode: Literal["median", "convolve"] = "median"
    psf_model: Literal["gauss", "gaussx", "gaussy", "moffat"] = "gauss"
    psf_fwhm: float = 2.5
    psf_size: int = 7
    replace: bool = False
    use_variance: bool = False
    tiled: bool = True
    max_tiled_fraction: float = 0.5


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
    n_windows : int
        Windows astroscrappy ran on: 0 when it ran once over the whole image, or when
        no pixel could start a detection (then ``processed_fraction`` is 0).
    processed_fraction : float
        Area of those windows over the image's (1.0 for the whole image; windows may
        overlap).
    """

    mask: NDArray[np.bool_]
    cleaned: NDArray[np.float32]
    n_pixels: int
    n_groups: int
    n_windows: int = 0
    processed_fraction: float = 1.0


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

    bias_data = None if bias is None else bias.data.astype(np.float64)
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
        signal = image if bias_data is None else image - bias_data
        var = np.maximum(signal, 0.0)
        var /= gain
        var += (read_noise / gain) ** 2
    else:
        var = np.asarray(variance, np.float64).copy()
        if var.shape != shape:
            raise ShapeMismatch({"data": shape, "variance": var.shape})

    steps: list[str] = []
    unusable = np.zeros(shape, bool)
    if bias is not None and bias_data is not None:
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
    if unusable.any():
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
        along_y = cfg.bleed_axis == "y"
        grown = _dilate_box(
            grown, cfg.bleed_growth if along_y else 0, 0 if along_y else cfg.bleed_growth
        )
    if cfg.grow_radius > 0:
        grown = _dilate_box(grown, cfg.grow_radius, cfg.grow_radius)
    return grown


def _dilate_box(mask: NDArray[np.bool_], half_y: int, half_x: int) -> NDArray[np.bool_]:
    """Binary dilation by a ``(2 half_y + 1) x (2 half_x + 1)`` box, pixels beyond the
    edge counting as False (as :func:`scipy.ndimage.binary_dilation`, with shifted ORs,
    which are much faster on large images)."""
    out = mask.copy()
    for axis, half in ((0, half_y), (1, half_x)):
        if half <= 0:
            continue
        source = out.copy()
        for shift in range(1, half + 1):
            if axis == 0:
                out[shift:] |= source[:-shift]
                out[:-shift] |= source[shift:]
            else:
                out[:, shift:] |= source[:, :-shift]
                out[:, :-shift] |= source[:, shift:]
    return out


def detect_cosmic_rays(
    data: NDArray[np.number],
    *,
    gain: float,
    read_noise: float,
    mask: NDArray[np.bool_] | None = None,
    saturation: float | None = None,
    variance: NDArray[np.floating] | None = None,
    background: NDArray[np.floating] | None = None,
    psf_fwhm: float | None = None,
    config: CosmicRayConfig | None = None,
) -> CosmicRayResult:
    """Find cosmic-ray hits with astroscrappy (L.A.Cosmic, van Dokkum 2001).

    With ``config.tiled`` (the default) astroscrappy runs only on windows around the
    pixels where its first iteration can start a detection, and the answer is the
    same, pixel for pixel, as one run over the whole image:

    1. A vectorised bound over the full image: L.A.Cosmic's Laplacian ``L+`` never
       exceeds ``2 c - min(left, right) - min(up, down)`` and its noise is a median of
       the variance over a 7x7 (5x5) window, never below the window's minimum; pixels
       whose bound stays under ``sigma_clip`` cannot be detected.
    2. At the remaining pixels, the first iteration's Laplacian-to-noise ``S'`` and
       fine-structure contrast are computed exactly (the same medians as astroscrappy,
       evaluated only there; thresholds loosened by 1 % for rounding).
    3. Each pixel that passes (a *seed*) gets a window reaching as far as the
       iterations can spread a detection from it, plus the support of every filter
       over all iterations, 14 pixels a side for one iteration with the separable
       median and 32 for two (:func:`_tile_geometry`); astroscrappy runs on each
       window, with one OpenMP thread, and only the part of it beyond that support
       from the window's edges is kept.

    The full image is processed at once instead when the windows would cover more
    than ``config.max_tiled_fraction`` of it, with ``clean_type="median"`` (whose
    in-place cleaning depends on thread order), or when a flagged pixel has no usable
    neighbour in its 5x5 box (astroscrappy then cleans it with an image-wide median
    that a window cannot know). With ``fine_structure_mode="convolve"`` step 2 skips
    the fine-structure test, so stars also seed windows.

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
    psf_fwhm : float or None
        FWHM of this image's PSF in pixels, used for the kernel of
        ``fine_structure_mode="convolve"`` instead of ``config.psf_fwhm`` (the kernel
        side grows to at least ``2 * ceil(1.5 * psf_fwhm) + 1``); ignored in the
        default ``"median"`` mode. ``None``: the configured kernel.
    config : CosmicRayConfig or None
        ``None`` uses the defaults.

    Returns
    -------
    CosmicRayResult
        The cosmic-ray mask, the cleaned image, counts, and how much of the image
        astroscrappy ran on.

    Raises
    ------
    ShapeMismatch
        ``mask``, ``variance`` or ``background`` does not match ``data``.
    ValueError
        ``gain`` or ``psf_fwhm`` is not positive.
    """
    cfg = config or CosmicRayConfig()
    if psf_fwhm is not None:
        if not psf_fwhm > 0:
            raise ValueError(f"psf_fwhm must be positive, got {psf_fwhm}")
        if cfg.fine_structure_mode == "convolve":
            size = max(cfg.psf_size, 2 * math.ceil(1.5 * psf_fwhm) + 1)
            cfg = replace(cfg, psf_fwhm=float(psf_fwhm), psf_size=size)
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
    inputs = _ScrappyInputs(
        data=image,
        ignore=ignore,
        variance=in_var,
        background=in_bkg,
        gain=float(gain),
        read_noise=float(read_noise),
        saturation=float(saturation) * float(gain) if saturation is not None else np.inf,
        config=cfg,
    )
    windows = _tile_windows(inputs) if cfg.tiled and cfg.clean_type != "median" else None
    flagged: NDArray[np.bool_] | None = None
    if windows is not None:
        tiled = _run_windows(inputs, windows)
        if tiled is not None:
            flagged, cleaned = tiled
            n_windows = len(windows)
            processed = sum((w[1] - w[0]) * (w[3] - w[2]) for w in windows) / image.size
    if flagged is None:
        flagged, cleaned = _run_astroscrappy(inputs, (0, shape[0], 0, shape[1]))
        n_windows, processed = 0, 1.0
    return CosmicRayResult(
        mask=flagged,
        cleaned=cleaned,
        n_pixels=int(np.count_nonzero(flagged)),
        n_groups=_count_groups(flagged),
        n_windows=n_windows,
        processed_fraction=float(processed),
    )


def _count_groups(mask: NDArray[np.bool_]) -> int:
    """Connected groups of True pixels (8-connectivity), from the pixels' coordinates
    (as :func:`scipy.ndimage.label`, without labelling the whole image)."""
    flat = np.flatnonzero(mask)
    if len(flat) == 0:
        return 0
    nx = mask.shape[1]
    x = flat % nx
    heads, tails = [], []
    # Each pair once: right, down-left, down, down-right.
    for offset, column_ok in ((1, x < nx - 1), (nx - 1, x > 0), (nx, None), (nx + 1, x < nx - 1)):
        target = flat + offset
        where = np.minimum(np.searchsorted(flat, target), len(flat) - 1)
        linked = flat[where] == target
        if column_ok is not None:
            linked &= column_ok
        heads.append(np.flatnonzero(linked))
        tails.append(where[linked])
    n = len(flat)
    head, tail = np.concatenate(heads), np.concatenate(tails)
    graph = sparse.coo_matrix((np.ones(len(head), np.int8), (head, tail)), shape=(n, n))
    return int(connected_components(graph, directed=False)[0])


# --------------------------------------------------------------------------- cosmic-ray tiles

#: Relative loosening of the prefilter's exact thresholds: rounding differences from
#: astroscrappy's own arithmetic can then only add seeds, never lose one.
_SEED_SLACK = 0.99
#: Seeds in touching cells of this side (pixels) share one window.
_TILE_CELL = 4
#: Pixels added to every window margin beyond the computed support (results were
#: identical without it on every configuration tried; it is insurance).
_TILE_SAFETY = 1
#: Positions per vectorised block of the prefilter's gathers (bounds memory).
_GATHER_BLOCK = 1 << 16
#: Side in pixels of the blocks on which the prefilter bounds the noise: at least the
#: noise median's width, and 8 so that one row of a block's mask is one 64-bit word.
_NOISE_BLOCK = 8


@dataclass(frozen=True)
class _ScrappyInputs:
    """Everything one astroscrappy call takes, prepared once for all windows."""

    data: NDArray[np.float32]
    ignore: NDArray[np.bool_]
    variance: NDArray[np.float32] | None
    background: NDArray[np.float32] | None
    gain: float
    read_noise: float
    saturation: float  # electrons
    config: CosmicRayConfig


def _filter_radii(cfg: CosmicRayConfig) -> tuple[int, int, int]:
    """Half-widths of astroscrappy's medians: noise (and S'), fine structure, large scale."""
    if cfg.separable_median:
        return 3, 2, 4  # sepmedfilt7, sepmedfilt5, sepmedfilt9
    return 2, 1, 3  # medfilt5, medfilt3, medfilt7


def _tile_geometry(cfg: CosmicRayConfig) -> tuple[int, int]:
    """How far detections spread from a seed, and the margin that makes windows exact.

    One L.A.Cosmic iteration flags a pixel from the image and the (cleaned) variance
    within ``detect`` pixels: the Laplacian (1) and the median of its S/N, the noise
    median under it, the fine-structure image and its large-scale median, then two
    3x3 growths (2). The internal mask (saturated cores: a median and two 5x5
    dilations) reaches ``noise + 4``, and cleaning mixes values over 5x5 (2). So after
    ``n`` iterations the mask at a pixel depends on the input within
    ``(n - 1) (detect + 2) + max(detect, noise + 6)`` pixels and the cleaned value
    within 2 more; new detections appear within ``detect`` of the last ones, so all
    flags lie within ``2 + (n - 1) detect`` of the first iteration's seeds.

    Returns
    -------
    reach, margin : int
        Pixels from a seed within which flags can appear, and the margin that a
        window needs beyond them for exact results (``_TILE_SAFETY`` included).
    """
    r_noise, r_fine, r_large = _filter_radii(cfg)
    if cfg.fine_structure_mode == "median":
        fine_data, fine_var = r_fine + r_large, r_noise
    else:
        k = cfg.psf_size // 2
        fine_data, fine_var = k + r_large, r_noise + k + r_large
    detect = max(1 + r_noise, 2 * r_noise, fine_data, fine_var) + 2
    n = max(cfg.n_iterations, 1)
    reach = 2 + (n - 1) * detect
    margin = (n - 1) * (detect + 2) + max(detect, r_noise + 6) + 2 + _TILE_SAFETY
    return reach, margin


def _electron_planes(
    inputs: _ScrappyInputs,
) -> tuple[NDArray[np.float32], NDArray[np.float32], np.float32, NDArray[np.float32] | None]:
    """astroscrappy's working planes in electrons.

    Returns the image (background subtracted), a plane and an offset whose sum is
    astroscrappy's variance (the offset is the read noise squared when the variance
    comes from the noise model, whose medians are then those of the image plus the
    offset), and the background (``None`` without one).
    """
    g = np.float32(inputs.gain)
    electrons = inputs.data * g
    bkg = None if inputs.background is None else inputs.background * g
    if bkg is not None:
        electrons -= bkg
    if inputs.variance is None:
        rn = np.float32(inputs.read_noise)
        return electrons, electrons, rn * rn, bkg
    var = inputs.variance * (g * g)
    if bkg is not None:
        var -= bkg
    return electrons, var, np.float32(0.0), bkg


def _pad_to_blocks(plane: NDArray[np.generic], block: int) -> NDArray[np.generic]:
    """``plane`` padded with its edge values to whole ``block`` x ``block`` blocks."""
    ny, nx = plane.shape
    pad_y, pad_x = -ny % block, -nx % block
    if pad_y or pad_x:
        return np.pad(plane, ((0, pad_y), (0, pad_x)), mode="edge")
    return plane


def _block_reduce(
    plane: NDArray[np.generic], function: np.ufunc, block: int
) -> NDArray[np.generic]:
    """``function`` (a ufunc such as ``np.minimum``) reduced over ``block`` x ``block``
    blocks (partial blocks at the far edges padded with their edge values)."""
    padded = _pad_to_blocks(plane, block)
    by, bx = padded.shape[0] // block, padded.shape[1] // block
    rows = function.reduce(padded.reshape(by, block, bx * block), axis=1)
    return np.asarray(function.reduce(rows.reshape(by, bx, block), axis=2))


def _block_noise_floor(
    var: NDArray[np.float32],
    offset: np.float32,
    background: NDArray[np.float32] | None,
    ignore: NDArray[np.bool_],
) -> NDArray[np.float32]:
    """Per ``_NOISE_BLOCK`` block, a lower bound of astroscrappy's noise for its pixels.

    The noise is the square root of a running median of the variance (``var +
    offset``) over 7x7 (5x5) pixels, which lie within the 3x3 blocks around the
    pixel's own. A median is at least the smallest value of its window not counting
    masked pixels as long as at most half of each (row) window is masked; wherever
    some row of a block holds two or more masked pixels (which a window with that
    much masking must contain), the bound counts every pixel instead. Leaving masked
    pixels out keeps dead columns from dragging the floor down.
    """
    block = _NOISE_BLOCK

    def around(blocks: NDArray[np.generic]) -> NDArray[np.float32]:
        return np.asarray(ndimage.minimum_filter(blocks, size=3, mode="nearest"), np.float32)

    if ignore.any():
        kept = np.where(ignore, np.float32(np.inf), var)
        floor = around(_block_reduce(kept, np.minimum, block))
        # Eight mask bytes (0 or 1) read as one integer: v & (v - 1) clears the lowest
        # set bit, so it is non-zero when a row of a block has two masked pixels.
        packed = np.ascontiguousarray(_pad_to_blocks(ignore, block)).view(np.uint64)
        two = (packed & (packed - np.uint64(1))) != 0
        dense = two.reshape(-1, block, two.shape[1]).any(axis=1)
        if dense.any():
            dense = ndimage.binary_dilation(dense, structure=np.ones((3, 3), bool))
            floor = np.where(dense, around(_block_reduce(var, np.minimum, block)), floor)
    else:
        floor = around(_block_reduce(var, np.minimum, block))
    floor = floor + offset
    if background is not None:
        floor = floor + around(_block_reduce(background, np.minimum, block))
    return np.sqrt(np.maximum(floor, np.float32(1e-5)))


def _neighbourhood(
    ys: NDArray[np.intp],
    xs: NDArray[np.intp],
    reach_y: int,
    reach_x: int,
    shape: tuple[int, int],
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Pixels within ``reach_y`` rows and ``reach_x`` columns of any of ``(ys, xs)``,
    each once, clipped to the image."""
    marked = np.zeros(shape, bool)
    for dy in range(-reach_y, reach_y + 1):
        yy = np.clip(ys + dy, 0, shape[0] - 1)
        for dx in range(-reach_x, reach_x + 1):
            marked[yy, np.clip(xs + dx, 0, shape[1] - 1)] = True
    flat = np.flatnonzero(marked)
    return flat // shape[1], flat % shape[1]


def _median_at(
    plane: NDArray[np.float32],
    ys: NDArray[np.intp],
    xs: NDArray[np.intp],
    width: int,
    separable: bool,
) -> NDArray[np.float32]:
    """astroscrappy's (separable) running median of ``plane``, only at ``(ys, xs)``.

    The separable median takes the median along each row (x) of the window, then the
    median of those down the column; pixels within ``width // 2`` of the edge keep
    their own value, as astroscrappy's filters leave them.
    """
    half = width // 2
    ny, nx = plane.shape
    flat = plane.reshape(-1)
    out = flat[ys * nx + xs]
    inner = np.flatnonzero((ys >= half) & (ys < ny - half) & (xs >= half) & (xs < nx - half))
    offsets = (np.arange(-half, half + 1)[:, None] * nx + np.arange(-half, half + 1)).ravel()
    for start in range(0, len(inner), _GATHER_BLOCK):
        sel = inner[start : start + _GATHER_BLOCK]
        window = flat[(ys[sel] * nx + xs[sel])[:, None] + offsets]
        if separable:
            rows = np.partition(window.reshape(-1, width, width), half, axis=2)[:, :, half]
            out[sel] = np.partition(rows, half, axis=1)[:, half]
        else:
            out[sel] = np.partition(window, len(offsets) // 2, axis=1)[:, len(offsets) // 2]
    return out


def _laplacian_at(
    electrons: NDArray[np.float32], ys: NDArray[np.intp], xs: NDArray[np.intp]
) -> NDArray[np.float32]:
    """L.A.Cosmic's ``L+`` at ``(ys, xs)``: the positive Laplacian of the 2x2-subsampled
    image, rebinned (neighbours beyond the edge count as 0, as astroscrappy's)."""
    ny, nx = electrons.shape
    zero = np.float32(0.0)

    def at(dy: int, dx: int) -> NDArray[np.float32]:
        yy, xx = ys + dy, xs + dx
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        values = electrons[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)]
        return np.where(inside, values, zero)

    c = electrons[ys, xs]
    left, right, up, down = at(0, -1), at(0, 1), at(-1, 0), at(1, 0)
    twice = c + c
    total = np.maximum(twice - left - up, zero)
    total += np.maximum(twice - left - down, zero)
    total += np.maximum(twice - right - down, zero)
    total += np.maximum(twice - right - up, zero)
    return total * np.float32(0.25)


#: Row (and column) offsets whose pixels bound the large-scale median from above.
_FAR_OFFSETS = np.array([-6, -5, -4, -3, -2, 3, 4, 5, 6])


def _large_scale_ceiling(
    electrons: NDArray[np.float32], ys: NDArray[np.intp], xs: NDArray[np.intp]
) -> NDArray[np.float32]:
    """An upper bound of the separable 9x9 median of the separable 5x5 median at
    ``(ys, xs)`` (astroscrappy's large-scale fine-structure level) from pixels at
    least 2 rows and 2 columns away.

    A median of 9 values is at most the largest of any 5 of them and a median of 5 at
    most the largest of any 3; keeping the 5 rows ``-4, -3, -2, 3, 4`` (and columns)
    of the 9x9 window and, for each, the 3 rows of the 5x5 window on the side away
    from the centre leaves the pixels at offsets ``_FAR_OFFSETS`` in both directions.
    Pixels beyond the edge are replaced by edge pixels, which only adds candidates
    to the maximum (the filters copy edge pixels unchanged, and those are included).
    """
    ny, nx = electrons.shape
    out = np.empty(len(ys), np.float32)
    for start in range(0, len(ys), _GATHER_BLOCK):
        y = ys[start : start + _GATHER_BLOCK, None, None] + _FAR_OFFSETS[:, None]
        x = xs[start : start + _GATHER_BLOCK, None, None] + _FAR_OFFSETS
        window = electrons[np.clip(y, 0, ny - 1), np.clip(x, 0, nx - 1)]
        out[start : start + _GATHER_BLOCK] = window.max(axis=(1, 2))
    return out


def _cosmic_ray_seeds(inputs: _ScrappyInputs) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Pixels where L.A.Cosmic's first iteration may detect a cosmic ray (a superset).

    A seed needs ``S' > sigma_clip`` and, in the median fine-structure mode,
    ``S' / F > object_limit`` (astroscrappy's notation) on a pixel it does not ignore;
    pixels within the noise median's half-width of the edge have ``S' = 0``.
    """
    cfg = inputs.config
    separable = cfg.separable_median
    r_noise, r_fine, r_large = _filter_radii(cfg)
    electrons, var, offset, bkg = _electron_planes(inputs)
    ny, nx = electrons.shape
    empty = np.zeros(0, np.intp)
    b = r_noise
    if ny <= 2 * b or nx <= 2 * b:
        return empty, empty
    floor = np.float32(1e-5)
    clip = np.float32(cfg.sigma_clip * _SEED_SLACK)

    # 1. A bound over the image: L+ <= 2 c - min(left, right) - min(up, down), S' <= S.
    noise_floor = _block_noise_floor(var, offset, bkg, inputs.ignore)
    limit = np.repeat(
        np.repeat((np.float32(2.0) * clip) * noise_floor, _NOISE_BLOCK, 0), _NOISE_BLOCK, 1
    )
    c = electrons[b:-b, b:-b]
    bound = c + c
    bound -= np.minimum(electrons[b:-b, b - 1 : -b - 1], electrons[b:-b, b + 1 : nx - b + 1])
    bound -= np.minimum(electrons[b - 1 : -b - 1, b:-b], electrons[b + 1 : ny - b + 1, b:-b])
    hits = np.flatnonzero(bound > limit[b : ny - b, b : nx - b])
    ys, xs = hits // (nx - 2 * b) + b, hits % (nx - 2 * b) + b
    # astroscrappy ignores the input mask grown by one pixel (its dilate3).
    good = np.ones(len(ys), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            good &= ~inputs.ignore[ys + dy, xs + dx]
    ys, xs = ys[good], xs[good]
    if len(ys) == 0:
        return empty, empty

    # 2. Exact S = L+ / (2 noise) at each pixel (S' <= S) and, for the median fine
    # structure, a lower bound of its contrast from an upper bound of its large-scale
    # median (see _large_scale_ceiling).
    noise = _median_at(var, ys, xs, 2 * r_noise + 1, separable) + offset
    if bkg is not None:
        noise += bkg[ys, xs]
    noise = np.sqrt(np.maximum(noise, floor))
    s_ceiling = _laplacian_at(electrons, ys, xs) / (np.float32(2.0) * noise)
    keep = s_ceiling > clip
    if cfg.fine_structure_mode == "median" and separable:
        ys, xs, noise, s_ceiling = ys[keep], xs[keep], noise[keep], s_ceiling[keep]
        fine = _median_at(electrons, ys, xs, 2 * r_fine + 1, separable)
        contrast = (fine - _large_scale_ceiling(electrons, ys, xs)) / noise
        contrast = np.maximum(contrast, np.float32(0.01))
        near_edge = (ys < r_large) | (ys >= ny - r_large) | (xs < r_large) | (xs >= nx - r_large)
        contrast[near_edge] = np.float32(0.01)
        keep = s_ceiling / contrast > np.float32(cfg.object_limit * _SEED_SLACK)
    ys, xs = ys[keep], xs[keep]
    if len(ys) == 0:
        return empty, empty

    # 3. The first iteration's S' exactly at those pixels, then the fine-structure test.
    near_y, near_x = _neighbourhood(ys, xs, r_noise, r_noise, (ny, nx))
    m5 = _median_at(var, near_y, near_x, 2 * r_noise + 1, separable) + offset
    if bkg is not None:
        m5 += bkg[near_y, near_x]
    noise_near = np.sqrt(np.maximum(m5, floor))
    scratch = np.empty((ny, nx), np.float32)
    scratch[near_y, near_x] = _laplacian_at(electrons, near_y, near_x) / (
        np.float32(2.0) * noise_near
    )
    s_prime = scratch[ys, xs] - _median_at(scratch, ys, xs, 2 * r_noise + 1, separable)
    keep = s_prime > clip
    ys, xs, s_prime = ys[keep], xs[keep], s_prime[keep]
    if cfg.fine_structure_mode != "median" or len(ys) == 0:
        return ys, xs
    scratch[near_y, near_x] = noise_near
    noise = scratch[ys, xs]
    fy, fx = _neighbourhood(ys, xs, r_large, r_large, (ny, nx))
    scratch[fy, fx] = _median_at(electrons, fy, fx, 2 * r_fine + 1, separable)
    fine = scratch[ys, xs]
    contrast = (fine - _median_at(scratch, ys, xs, 2 * r_large + 1, separable)) / noise
    contrast = np.maximum(contrast, np.float32(0.01))
    keep = s_prime / contrast > np.float32(cfg.object_limit * _SEED_SLACK)
    return ys[keep], xs[keep]


def _tile_windows(inputs: _ScrappyInputs) -> list[tuple[int, int, int, int]] | None:
    """Windows ``(y0, y1, x0, x1)`` to run astroscrappy on; ``None``: run on the full image.

    Seeds closer than a few pixels (touching ``_TILE_CELL`` cells) form one group;
    each group's bounding box grows by the reach plus the margin of
    :func:`_tile_geometry`, and boxes that overlap are merged when their union costs
    no more than the two.
    """
    cfg = inputs.config
    ny, nx = inputs.data.shape
    ys, xs = _cosmic_ray_seeds(inputs)
    if len(ys) == 0:
        return []
    reach, margin = _tile_geometry(cfg)
    grow = reach + margin
    cell = _TILE_CELL
    grid = np.zeros((-(-ny // cell), -(-nx // cell)), bool)
    grid[ys // cell, xs // cell] = True
    labels, n_groups = ndimage.label(grid, structure=np.ones((3, 3), bool))
    group = labels[ys // cell, xs // cell] - 1
    top = np.full(n_groups, ny, np.intp)
    bottom = np.zeros(n_groups, np.intp)
    left = np.full(n_groups, nx, np.intp)
    right = np.zeros(n_groups, np.intp)
    np.minimum.at(top, group, ys)
    np.maximum.at(bottom, group, ys)
    np.minimum.at(left, group, xs)
    np.maximum.at(right, group, xs)
    boxes = [
        [max(t - grow, 0), min(b + grow + 1, ny), max(lf - grow, 0), min(r + grow + 1, nx)]
        for t, b, lf, r in zip(top, bottom, left, right, strict=True)
    ]
    windows = _merge_boxes(boxes)
    area = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in windows)
    if area > cfg.max_tiled_fraction * ny * nx:
        return None
    return windows


def _merge_boxes(boxes: list[list[int]]) -> list[tuple[int, int, int, int]]:
    """Merge overlapping boxes ``[y0, y1, x0, x1]`` while the union is no larger than
    the two boxes together (boxes overlapping none are kept as they are)."""
    if not boxes:
        return []
    edges = np.asarray(boxes)
    y0, y1, x0, x1 = (edges[:, k] for k in range(4))
    overlap = (
        (y0[:, None] < y1[None, :])
        & (y0[None, :] < y1[:, None])
        & (x0[:, None] < x1[None, :])
        & (x0[None, :] < x1[:, None])
    )
    lonely = overlap.sum(axis=1) == 1  # each box overlaps itself
    kept = [tuple(int(v) for v in edges[k]) for k in np.flatnonzero(lonely)]
    pending = [list(map(int, edges[k])) for k in np.flatnonzero(~lonely)]

    def area(box: list[int]) -> int:
        return (box[1] - box[0]) * (box[3] - box[2])

    merged = True
    while merged:
        merged = False
        pending.sort()
        done: list[list[int]] = []
        for box in pending:
            for other in done:
                if (
                    box[0] < other[1]
                    and other[0] < box[1]
                    and box[2] < other[3]
                    and other[2] < box[3]
                ):
                    union = [
                        min(box[0], other[0]),
                        max(box[1], other[1]),
                        min(box[2], other[2]),
                        max(box[3], other[3]),
                    ]
                    if area(union) <= area(box) + area(other):
                        other[:] = union
                        merged = True
                        break
            else:
                done.append(box)
        pending = done
    return [(b[0], b[1], b[2], b[3]) for b in kept] + [(b[0], b[1], b[2], b[3]) for b in pending]


def _run_astroscrappy(
    inputs: _ScrappyInputs, window: tuple[int, int, int, int]
) -> tuple[NDArray[np.bool_], NDArray[np.float32]]:
    """astroscrappy on ``data[y0:y1, x0:x1]`` (the whole image for the full window)."""
    cfg = inputs.config
    y0, y1, x0, x1 = window
    box = (slice(y0, y1), slice(x0, x1))

    def cut(plane: NDArray[np.floating] | None) -> NDArray[np.floating] | None:
        return None if plane is None else np.ascontiguousarray(plane[box])

    ignore = inputs.ignore[box]
    cr_mask, cleaned = astroscrappy.detect_cosmics(
        cut(inputs.data),
        inmask=np.ascontiguousarray(ignore) if ignore.any() else None,
        inbkg=cut(inputs.background),
        invar=cut(inputs.variance),
        sigclip=cfg.sigma_clip,
        sigfrac=cfg.sigma_fraction,
        objlim=cfg.object_limit,
        gain=inputs.gain,
        readnoise=inputs.read_noise,
        satlevel=inputs.saturation,
        niter=cfg.n_iterations,
        sepmed=cfg.separable_median,
        cleantype=cfg.clean_type,
        fsmode=cfg.fine_structure_mode,
        psfmodel=cfg.psf_model,
        psffwhm=cfg.psf_fwhm,
        psfsize=cfg.psf_size,
    )
    return np.asarray(cr_mask, bool), np.asarray(cleaned, np.float32)


def _cleaning_fell_back(
    inputs: _ScrappyInputs, window: tuple[int, int, int, int], flagged: NDArray[np.bool_]
) -> bool:
    """Whether astroscrappy may have cleaned a flagged pixel with its image-wide level.

    That happens when no pixel of the 5x5 box around it is usable (all flagged or in
    astroscrappy's mask, which lies within the 3x3-grown input mask and 9x9 boxes
    around saturated pixels); the level is the median of the array it was given, so a
    window would differ from the full image there.
    """
    y0, y1, x0, x1 = window
    if flagged.shape[0] < 5 or flagged.shape[1] < 5 or not flagged.any():
        return False
    covered = flagged.copy()
    ignore = inputs.ignore[y0:y1, x0:x1]
    if ignore.any():
        covered |= ndimage.binary_dilation(ignore, structure=np.ones((3, 3), bool))
    if math.isfinite(inputs.saturation):
        hot = inputs.data[y0:y1, x0:x1] * np.float32(inputs.gain) >= inputs.saturation
        if hot.any():
            covered |= ndimage.binary_dilation(hot, structure=np.ones((9, 9), bool))
    if np.count_nonzero(covered) < 25:
        return False
    alone = ndimage.binary_erosion(covered, structure=np.ones((5, 5), bool), border_value=1)
    alone &= flagged
    return bool(alone[2:-2, 2:-2].any())


def _one_openmp_thread() -> contextlib.AbstractContextManager[object]:
    """Limit astroscrappy's OpenMP to one thread while it runs on small windows.

    Its filters start an OpenMP team per call; on windows of a few thousand pixels
    that costs more than the work, and far more on a busy machine. Without
    threadpoolctl (which scikit-learn installs) the threads are left as they are.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="openmp")


def _run_windows(
    inputs: _ScrappyInputs, windows: list[tuple[int, int, int, int]]
) -> tuple[NDArray[np.bool_], NDArray[np.float32]] | None:
    """Run astroscrappy on each window and keep the exact part; ``None`` on a fallback."""
    ny, nx = inputs.data.shape
    _, margin = _tile_geometry(inputs.config)
    flagged = np.zeros((ny, nx), bool)
    # Unflagged pixels come back from astroscrappy scaled to electrons and back.
    g = np.float32(inputs.gain)
    cleaned = inputs.data * g
    if inputs.background is not None:
        bkg = inputs.background * g
        cleaned -= bkg
        cleaned += bkg
    cleaned /= g
    results = []
    with _one_openmp_thread():
        for window in windows:
            results.append(_run_astroscrappy(inputs, window))
    for window, (mask_w, cleaned_w) in zip(windows, results, strict=True):
        y0, y1, x0, x1 = window
        if _cleaning_fell_back(inputs, window, mask_w):
            return None
        vy0 = y0 + margin if y0 > 0 else 0
        vy1 = y1 - margin if y1 < ny else ny
        vx0 = x0 + margin if x0 > 0 else 0
        vx1 = x1 - margin if x1 < nx else nx
        if vy0 >= vy1 or vx0 >= vx1:
            continue
        local = (slice(vy0 - y0, vy1 - y0), slice(vx0 - x0, vx1 - x0))
        flagged[vy0:vy1, vx0:vx1] |= mask_w[local]
        cleaned[vy0:vy1, vx0:vx1] = cleaned_w[local]
    return flagged, cleaned


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
    psf_fwhm: float | None = None,
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
    psf_fwhm : float or None
        FWHM of the exposure's PSF in pixels for the cosmic-ray kernel of
        ``fine_structure_mode="convolve"`` (see :func:`detect_cosmic_rays`); ``None``
        takes the exposure's PSF model's when it has one, else the configured value.

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
            psf_fwhm=psf_fwhm
            if psf_fwhm is not None
            else (exposure.psf.fwhm if exposure.psf is not None else None),
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
