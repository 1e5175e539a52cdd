"""Source detection on a direct image and selection of clean stars.

Detection is sep's SExtractor-style thresholding with deblending on the
background-subtracted image; fluxes are in data units, positions 0-based pixel
centres. ``select_stars`` keeps the point-like, isolated, unsaturated, unmasked
detections that PSF modelling, alignment and photometric calibration rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        sep's default 3x3 kernel.
    aperture_radius : float
        Circular aperture radius in pixels for the ``flux`` column; scaled by the
        measured FWHM in :func:`select_stars` callers when needed.
    min_snr : float
        Stars below this S/N are not selected.
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
    aperture_radius: float = 5.0
    min_snr: float = 20.0
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
        ``theta`` (radians), ``fwhm`` (pixels, from the second moments), ``elongation``
        (a/b), ``npix``, ``sep_flag``, ``masked`` and ``saturated`` (bool), and
        ``nearest_neighbour`` (pixels to the closest other detection).
    """
    cfg = config or StarConfig()
    arr = check_image(data, "data").astype(np.float32)
    sub = np.ascontiguousarray(arr - np.asarray(background, dtype=np.float32), np.float32)
    err = np.broadcast_to(np.asarray(noise, dtype=np.float32), sub.shape)
    err = np.ascontiguousarray(err, np.float32)
    bad = ~np.isfinite(sub) | ~np.isfinite(err) | (err <= 0)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != sub.shape:
            raise ShapeMismatch({"data": sub.shape, "mask": m.shape})
        bad |= m
    sat = np.zeros(sub.shape, bool) if saturated is None else np.asarray(saturated, dtype=bool)
    # Saturated pixels are kept for detection (a bright star is a source) but flagged.
    detect_mask = bad & ~sat
    sub_clean = np.where(bad, 0.0, sub).astype(np.float32)
    err_clean = np.where(bad, np.inf, err).astype(np.float32)
    kernel = _gaussian_kernel(cfg.filter_fwhm) if cfg.filter_fwhm else None
    kwargs = {} if kernel is None else {"filter_kernel": kernel}
    sep.set_extract_pixstack(max(300000, sub.size // 2))
    sep.set_sub_object_limit(4096)
    objects = sep.extract(
        sub_clean,
        cfg.n_sigma,
        err=err_clean,
        mask=detect_mask,
        minarea=cfg.min_area,
        deblend_cont=cfg.deblend_contrast,
        **kwargs,
    )
    n = len(objects)
    x = objects["x"].astype(np.float64)
    y = objects["y"].astype(np.float64)
    if n:
        flux, flux_err, _ = sep.sum_circle(
            sub_clean,
            x,
            y,
            cfg.aperture_radius,
            err=np.where(bad, 0.0, err_clean),
            mask=bad,
            subpix=5,
        )
        # Pixels touched: count mask/saturation inside the aperture.
        n_bad, _, _ = sep.sum_circle(bad.astype(np.float32), x, y, cfg.aperture_radius)
        n_sat, _, _ = sep.sum_circle(sat.astype(np.float32), x, y, 2.0 + cfg.aperture_radius / 2)
    else:
        flux = flux_err = n_bad = n_sat = np.zeros(0)
    a = objects["a"].astype(np.float64)
    b = objects["b"].astype(np.float64)
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
            "elongation": elong,
            "npix": objects["npix"].astype(np.int64),
            "sep_flag": objects["flag"].astype(np.int64),
            "masked": np.asarray(n_bad) > 0,
            "saturated": np.asarray(n_sat) > 0,
            "nearest_neighbour": nn,
        }
    )


def _nearest_neighbour(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    if len(x) < 2:
        return np.full(len(x), np.inf)
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([x, y]))
    d, _ = tree.query(np.column_stack([x, y]), k=2)
    return np.asarray(d[:, 1], dtype=np.float64)


def select_stars(
    sources: Table,
    shape: tuple[int, int],
    *,
    config: StarConfig | None = None,
) -> Table:
    """Keep isolated, point-like, unsaturated, unmasked, high-S/N detections.

    Point-like means a FWHM within 25% of the median FWHM of the bright detections
    (which rejects galaxies and cosmic rays) and ``elongation <= max_elongation``.

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
    fwhm = np.asarray(sources["fwhm"])
    if np.count_nonzero(ok) >= 3:
        typical = float(np.median(fwhm[ok]))
        ok &= np.abs(fwhm - typical) <= 0.25 * typical
    selected = sources[ok]
    selected.sort("flux", reverse=True)
    return selected
