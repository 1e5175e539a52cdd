"""Source detection on a direct image and selection of clean stars.

Detection is sep's SExtractor-style thresholding with deblending on the
background-subtracted image; fluxes are in data units, positions 0-based pixel
centres. ``select_stars`` keeps the point-like, isolated, unsaturated, unmasked
detections that PSF modelling, alignment and photometric calibration rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import sep
from astropy.table import Table
from numpy.typing import NDArray

from astrid.errors import ShapeMismatch
from astrid.exposure import check_image

__all__ = ["StarConfig", "find_sources", "select_stars"]

#: sep's flag for a detection with pixels in the given mask.
_SEP_MASKED = 0x0100  # not a native sep flag; set by find_sources


@dataclass(frozen=True)
class StarConfig:
    """Options of :func:`find_sources` and :func:`select_stars`.

    Attributes
    ----------
    n_sigma : float
        Detection threshold in units of the per-pixel noise.
    min_area : int
        Minimum connected pixels above threshold.
    deblend_contrast : float
        sep/SExtractor ``DEBLEND_MINCONT``.
    filter_fwhm : float or None
        FWHM (pixels) of the Gaussian matched filter used for detection; ``None`` uses
        sep's default 3x3 kernel (SExtractor's ``default.conv``).
    filter_type : {"matched", "conv"}
        How the filter is applied (sep's ``filter_type``): ``"matched"`` weights by the
        per-pixel noise, the optimal detection statistic when the noise varies;
        ``"conv"`` is SExtractor's plain convolution with thresholds on the unfiltered
        noise, to reproduce a SExtractor catalogue.
    aperture_radius : float
        Circular aperture radius in pixels for the ``flux`` column; scaled by the
        measured FWHM in :func:`select_stars` callers when needed.
    min_snr : float
        Stars below this S/N are not selected.
    size_tolerance : float
        A star's half-light radius must lie within this fraction of the typical value
        of the candidate stars around it (rejects galaxies, blends and cosmic rays).
    isolation_radius : float
        A star with a neighbouring detection closer than this (pixels) is not selected.
    max_elongation : float
        Upper limit on a/b for a star.
    edge_margin : int
        Stars closer than this to the image edge (pixels) are not selected.
    """

    n_sigma: float = 5.0
    min_area: int = 5
    deblend_contrast: float = 0.005
    filter_fwhm: float | None = None
    filter_type: Literal["matched", "conv"] = "matched"
    aperture_radius: float = 5.0
    min_snr: float = 20.0
    size_tolerance: float = 0.25
    isolation_radius: float = 10.0
    max_elongation: float = 1.5
    edge_margin: int = 10


def _gaussian_kernel(fwhm: float) -> NDArray[np.float32]:
    sigma = fwhm / 2.3548
    half = max(1, int(np.ceil(2.0 * sigma)))
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    k = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return (k / k.sum()).astype(np.float32)


def find_sources(
    data: NDArray[np.floating],
    *,
    background: NDArray[np.floating] | float = 0.0,
    noise: NDArray[np.floating] | float,
    mask: NDArray[np.bool_] | None = None,
    saturated: NDArray[np.bool_] | None = None,
    config: StarConfig | None = None,
) -> Table:
    """Detect sources and measure their shapes and aperture fluxes.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Image, background included.
    background : ndarray or float
        Background to subtract (same units as ``data``).
    noise : ndarray or float
        Per-pixel 1-sigma noise (same units), e.g. the background RMS map or
        ``sqrt(variance)``.
    mask : ndarray of bool or None
        True for pixels to ignore (bad, no data).
    saturated : ndarray of bool or None
        True for saturated pixels; detections touching one get ``saturated=True``.
    config : StarConfig or None
        Options.

    Returns
    -------
    astropy.table.Table
        One row per detection: ``x``, ``y`` (0-based pixels), ``flux`` and ``flux_err``
        (aperture, data units), ``snr``, ``peak`` (background-subtracted), ``a``, ``b``,
        ``theta`` (radians), ``fwhm`` (pixels, from the second moments of the pixels
        above threshold, so it grows with brightness), ``half_light_radius`` (pixels,
        radius holding half the flux within ``6 a``, nearly independent of brightness;
        twice it is the FWHM for a Gaussian), ``elongation`` (a/b), ``npix``,
        ``sep_flag``, ``masked`` and ``saturated`` (bool), and ``nearest_neighbour``
        (pixels to the closest other detection).

    Raises
    ------
    ShapeMismatch
        If ``mask`` or ``saturated`` differ from ``data`` in shape.
    """
    cfg = config or StarConfig()
    arr = check_image(data, "data")
    shape = arr.shape
    # New float32 arrays that may be edited in place below (the caller's are never).
    sub = np.ascontiguousarray(arr - np.asarray(background, dtype=np.float32), np.float32)
    err = np.array(np.broadcast_to(np.asarray(noise, dtype=np.float32), shape), np.float32)
    bad = ~np.isfinite(sub)
    bad |= ~(np.isfinite(err) & (err > 0))
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != shape:
            raise ShapeMismatch({"data": shape, "mask": m.shape})
        bad |= m
    sat = None
    if saturated is not None:
        sat = np.asarray(saturated, dtype=bool)
        if sat.shape != shape:
            raise ShapeMismatch({"data": shape, "saturated": sat.shape})
        if not sat.any():
            sat = None
    any_bad = bool(bad.any())
    if any_bad:
        sub[bad] = 0.0
        err[bad] = np.inf
    # Saturated pixels are kept for detection (a bright star is a source) but flagged.
    detect_mask = bad & ~sat if sat is not None else bad
    kernel = _gaussian_kernel(cfg.filter_fwhm) if cfg.filter_fwhm else None
    kwargs = {} if kernel is None else {"filter_kernel": kernel}
    sep.set_extract_pixstack(max(300000, sub.size // 2))
    sep.set_sub_object_limit(4096)
    objects = sep.extract(
        sub,
        cfg.n_sigma,
        err=err,
        mask=detect_mask if any_bad else None,
        minarea=cfg.min_area,
        deblend_cont=cfg.deblend_contrast,
        filter_type=cfg.filter_type,
        **kwargs,
    )
    n = len(objects)
    x = objects["x"].astype(np.float64)
    y = objects["y"].astype(np.float64)
    n_bad = n_sat = np.zeros(n)
    if any_bad:
        err[bad] = 0.0  # masked below; the aperture error must not see the infinities
    if n:
        flux, flux_err, _ = sep.sum_circle(
            sub,
            x,
            y,
            cfg.aperture_radius,
            err=err,
            mask=bad if any_bad else None,
            subpix=5,
        )
        # Pixels touched: count mask/saturation inside the aperture.
        if any_bad:
            n_bad, _, _ = sep.sum_circle(bad.astype(np.float32), x, y, cfg.aperture_radius)
        if sat is not None:
            r_sat = 2.0 + cfg.aperture_radius / 2
            n_sat, _, _ = sep.sum_circle(sat.astype(np.float32), x, y, r_sat)
    else:
        flux = flux_err = np.zeros(0)
    a = objects["a"].astype(np.float64)
    b = objects["b"].astype(np.float64)
    half_light = _half_light_radius(sub, bad if any_bad else None, x, y, a)
    fwhm = 2.0 * np.sqrt(np.log(2.0) * (a**2 + b**2))
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(flux_err > 0, flux / flux_err, 0.0)
        elong = np.where(b > 0, a / b, np.inf)
    nn = _nearest_neighbour(x, y)
    return Table(
        {
            "x": x,
            "y": y,
            "flux": flux,
            "flux_err": flux_err,
            "snr": snr,
            "peak": objects["peak"].astype(np.float64),
            "a": a,
            "b": b,
            "theta": objects["theta"].astype(np.float64),
            "fwhm": fwhm,
            "half_light_radius": half_light,
            "elongation": elong,
            "npix": objects["npix"].astype(np.int64),
            "sep_flag": objects["flag"].astype(np.int64),
            "masked": np.asarray(n_bad) > 0,
            "saturated": np.asarray(n_sat) > 0,
            "nearest_neighbour": nn,
        }
    )


def _half_light_radius(
    image: NDArray[np.float32],
    bad: NDArray[np.bool_] | None,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    a: NDArray[np.float64],
) -> NDArray[np.float64]:
    """SExtractor's ``FLUX_RADIUS`` at 50%, normalised to the flux within ``6 a``."""
    if len(x) == 0:
        return np.zeros(0)
    rmax = np.maximum(6.0 * a, 3.0)
    radius, _ = sep.flux_radius(image, x, y, rmax, 0.5, mask=bad, subpix=5)
    radius = np.asarray(radius, dtype=np.float64)
    return np.where(np.isfinite(radius) & (radius > 0), radius, np.nan)


def _nearest_neighbour(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    if len(x) < 2:
        return np.full(len(x), np.inf)
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([x, y]))
    d, _ = tree.query(np.column_stack([x, y]), k=2)
    return np.asarray(d[:, 1], dtype=np.float64)


#: Neighbouring candidates whose median size a star is compared with in select_stars.
_N_LOCAL = 15


def _local_median(
    values: NDArray[np.float64],
    x_ref: NDArray[np.float64],
    y_ref: NDArray[np.float64],
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    k: int,
) -> NDArray[np.float64]:
    """Median of ``values`` over the ``k`` reference points nearest each ``(x, y)``.

    With fewer than ``2 k`` reference points, the global median (a local one would
    then mostly reflect the same stars anyway, with more noise).
    """
    if len(values) < 2 * k:
        return np.full(len(x), float(np.median(values)))
    from scipy.spatial import cKDTree

    _, idx = cKDTree(np.column_stack([x_ref, y_ref])).query(np.column_stack([x, y]), k=k)
    return np.asarray(np.median(values[idx], axis=1), dtype=np.float64)


def select_stars(
    sources: Table,
    shape: tuple[int, int],
    *,
    config: StarConfig | None = None,
) -> Table:
    """Keep isolated, point-like, unsaturated, unmasked, high-S/N detections.

    Point-like means ``elongation <= max_elongation`` and a half-light radius within
    ``size_tolerance`` of the median over the 15 nearest candidates that pass the other
    cuts (all of them when there are fewer than 30), which rejects galaxies, blends and
    cosmic rays while following a PSF that varies over the field. Tables without a
    ``half_light_radius`` column are judged on ``fwhm`` instead.

    Parameters
    ----------
    sources : Table
        Output of :func:`find_sources`.
    shape : tuple of int
        ``(ny, nx)`` of the image, for the edge margin.
    config : StarConfig or None
        Options.

    Returns
    -------
    Table
        The selected rows, brightest first.
    """
    cfg = config or StarConfig()
    if len(sources) == 0:
        return sources.copy()
    ny, nx = shape
    x = np.asarray(sources["x"])
    y = np.asarray(sources["y"])
    ok = (
        (np.asarray(sources["snr"]) >= cfg.min_snr)
        & ~np.asarray(sources["saturated"])
        & ~np.asarray(sources["masked"])
        & (np.asarray(sources["sep_flag"]) & (sep.OBJ_MERGED | sep.OBJ_TRUNC) == 0)
        & (np.asarray(sources["nearest_neighbour"]) >= cfg.isolation_radius)
        & (np.asarray(sources["elongation"]) <= cfg.max_elongation)
        & (x >= cfg.edge_margin)
        & (x < nx - cfg.edge_margin)
        & (y >= cfg.edge_margin)
        & (y < ny - cfg.edge_margin)
    )
    size_column = "half_light_radius" if "half_light_radius" in sources.colnames else "fwhm"
    size = np.asarray(sources[size_column], dtype=np.float64)
    ok &= np.isfinite(size)
    if np.count_nonzero(ok) >= 3:
        typical = _local_median(size[ok], x[ok], y[ok], x, y, _N_LOCAL)
        ok &= np.abs(size - typical) <= cfg.size_tolerance * typical
    selected = sources[ok]
    selected.sort("flux", reverse=True)
    return selected
