"""Detect and measure candidates on a difference image's score map.

Detection runs on a significance image (ZOGY's ``S_corr`` or a decorrelated
``D / sigma``) in both polarities with sep; each candidate is then measured on the
difference image ``D`` with its PSF: a PSF fit at the detected position gives the flux
and its error, from which S/N and magnitude follow. Positions are 0-based pixels.

PSF-fit flux at a fixed position (a linear least-squares fit of the PSF amplitude)::

    flux = sum(P * D / V) / sum(P**2 / V),   flux_err = 1 / sqrt(sum(P**2 / V))

with ``P`` the unit-sum PSF stamp and ``V`` the per-pixel variance of ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import astropy.units as u
import numpy as np
import sep
from astropy.table import QTable, Table
from astropy.wcs import WCS
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from astrid.errors import ShapeMismatch
from astrid.exposure import check_image
from astrid.science.psf_model import PsfModel

__all__ = ["Cutouts", "DetectConfig", "detect_candidates", "make_cutouts", "psf_photometry"]


@dataclass(frozen=True)
class DetectConfig:
    """Options of :func:`detect_candidates`.

    Attributes
    ----------
    n_sigma : float
        Detection threshold on the score image, in sigma (the score is already in
        units of its noise).
    min_area : int
        Connected pixels above threshold required.
    deblend_contrast : float
        sep ``deblend_cont``; 1.0 switches deblending off.
    edge_margin : int
        Candidates closer than this to the image edge or to no-data pixels get
        ``is_edge``.
    dipole_radius_fwhm : float
        Search radius, in FWHM, for an opposite-polarity lobe that makes a dipole.
    dipole_ratio : float
        The opposite lobe must reach this fraction of the candidate's peak |score|.
    reference_match_radius : float
        Radius (pixels) out to which the nearest reference source is reported.
    """

    n_sigma: float = 5.0
    min_area: int = 3
    deblend_contrast: float = 0.005
    edge_margin: int = 10
    dipole_radius_fwhm: float = 1.5
    dipole_ratio: float = 0.5
    reference_match_radius: float = 30.0


def psf_photometry(
    difference: NDArray[np.floating],
    variance: NDArray[np.floating],
    x: NDArray[np.floating],
    y: NDArray[np.floating],
    psf: PsfModel,
    *,
    mask: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """PSF-fit fluxes at fixed positions.

    Parameters
    ----------
    difference : ndarray, shape (ny, nx)
        Image to measure.
    variance : ndarray, shape (ny, nx)
        Its per-pixel variance.
    x, y : ndarray, shape (n,)
        0-based positions; the PSF is shifted to each by sub-pixel interpolation.
    psf : PsfModel
        PSF of ``difference``.
    mask : ndarray of bool or None
        True for pixels to leave out of the fit.

    Returns
    -------
    flux, flux_err, masked_fraction : ndarray, shape (n,)
        Fluxes (data units), their 1-sigma errors, and the PSF-weighted fraction of the
        fit footprint that was masked.
    """
    from scipy.ndimage import shift as nd_shift

    d = np.asarray(difference, np.float64)
    v = np.asarray(variance, np.float64)
    bad = ~np.isfinite(d) | ~np.isfinite(v) | (v <= 0)
    if mask is not None:
        bad |= np.asarray(mask, bool)
    ny, nx = d.shape
    n = len(x)
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    frac = np.ones(n)
    half = psf.size // 2
    for i in range(n):
        xi, yi = float(x[i]), float(y[i])
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        stamp = np.asarray(psf.at(xi, yi), np.float64)
        has_negative_lobes = bool((stamp < 0).any())  # e.g. a decorrelated difference PSF
        stamp = nd_shift(stamp, (yi - iy, xi - ix), order=3, mode="constant")
        if not has_negative_lobes:
            stamp = np.clip(stamp, 0.0, None)  # remove the cubic shift's ringing only
        stamp /= stamp.sum()
        y0, y1 = iy - half, iy + half + 1
        x0, x1 = ix - half, ix + half + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1 = stamp.shape[0] - max(0, y1 - ny)
        sx1 = stamp.shape[1] - max(0, x1 - nx)
        if sy1 <= sy0 or sx1 <= sx0:
            continue
        p = stamp[sy0:sy1, sx0:sx1]
        sl = (slice(max(0, y0), min(ny, y1)), slice(max(0, x0), min(nx, x1)))
        good = ~bad[sl]
        frac[i] = 1.0 - float(p[good].sum())
        if not good.any():
            continue
        w = p[good] / v[sl][good]
        denom = float(np.sum(p[good] * w))
        if denom <= 0:
            continue
        flux[i] = float(np.sum(w * d[sl][good])) / denom
        err[i] = 1.0 / np.sqrt(denom)
    return flux, err, frac


def detect_candidates(
    score: NDArray[np.floating],
    difference: NDArray[np.floating],
    variance: NDArray[np.floating],
    psf: PsfModel,
    *,
    mask: NDArray[np.bool_] | None = None,
    wcs: WCS | None = None,
    zero_point: float | None = None,
    reference_sources: Table | None = None,
    flux_conversion: float = 1.0,
    config: DetectConfig | None = None,
) -> QTable:
    """Find positive and negative candidates on a score image and measure them on D.

    Parameters
    ----------
    score : ndarray, shape (ny, nx)
        Significance image (unit variance on noise), e.g. ZOGY ``S_corr``.
    difference : ndarray, shape (ny, nx)
        Difference image in which fluxes are measured.
    variance : ndarray, shape (ny, nx)
        Per-pixel variance of ``difference``.
    psf : PsfModel
        PSF of ``difference``.
    mask : ndarray of bool or None
        True for unusable pixels (not detected on, excluded from fits).
    wcs : WCS or None
        Celestial WCS of the grid, for ``ra``/``dec`` (NaN without one).
    zero_point : float or None
        Magnitude of 1 data unit of flux in ``difference``; ``mag`` is NaN without one.
    reference_sources : Table or None
        Sources of the reference on the same grid (``x``, ``y``, ``flux`` in data units
        of the image ``zero_point`` applies to) for the nearest-source columns.
    flux_conversion : float
        Factor taking a PSF-fit flux on ``difference`` to the data units ``zero_point``
        refers to (e.g. ZOGY's ``flux_ratio / F_D``); ``flux`` and ``flux_err`` are
        reported after it.
    config : DetectConfig or None
        Options.

    Returns
    -------
    astropy.table.QTable
        One row per candidate: ``x``, ``y`` (0-based pix), ``ra``, ``dec`` (deg),
        ``polarity`` (+1 brighter in science, -1 fainter), ``score_peak``, ``flux``,
        ``flux_err`` (signed; data units of D times ``flux_conversion``), ``snr``,
        ``mag``, ``mag_err`` (of |flux|),
        ``fwhm`` (pix), ``elongation``, ``is_dipole``, ``masked_fraction``,
        ``ref_distance`` (pix), ``ref_mag``, ``is_edge``.
    """
    cfg = config or DetectConfig()
    s = check_image(score, "score").astype(np.float32)
    d = check_image(difference, "difference")
    shapes = {"score": s.shape, "difference": d.shape, "variance": np.shape(variance)}
    if mask is not None:
        shapes["mask"] = np.shape(mask)
    if len(set(shapes.values())) != 1:
        raise ShapeMismatch(shapes)
    bad = ~np.isfinite(s)
    if mask is not None:
        bad |= np.asarray(mask, bool)
    clean = np.ascontiguousarray(np.where(bad, 0.0, s), np.float32)
    sep.set_extract_pixstack(max(300000, clean.size // 2))
    found = []
    for polarity in (+1, -1):
        img = np.ascontiguousarray(polarity * clean, np.float32)
        objs = sep.extract(
            img,
            cfg.n_sigma,
            err=None,
            mask=bad,
            minarea=cfg.min_area,
            deblend_cont=cfg.deblend_contrast,
            filter_kernel=None,
        )
        for o in objs:
            found.append((polarity, o))
    n = len(found)
    x = np.array([o["x"] for _, o in found], np.float64)
    y = np.array([o["y"] for _, o in found], np.float64)
    pol = np.array([p for p, _ in found], np.int8)
    peak = np.array([p * o["peak"] for p, o in found], np.float64)
    a = np.array([o["a"] for _, o in found], np.float64)
    b = np.array([o["b"] for _, o in found], np.float64)
    flux, flux_err, masked_frac = psf_photometry(d, variance, x, y, psf, mask=bad)
    flux = flux * flux_conversion
    flux_err = flux_err * abs(flux_conversion)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / flux_err
        elong = np.where(b > 0, a / b, np.inf)
        mag = (
            zero_point - 2.5 * np.log10(np.abs(flux))
            if zero_point is not None
            else np.full(n, np.nan)
        )
        mag_err = 2.5 / np.log(10.0) * flux_err / np.abs(flux)
    fwhm = 2.0 * np.sqrt(np.log(2.0) * (a**2 + b**2))
    is_dipole = _dipoles(x, y, pol, peak, psf.fwhm, cfg)
    is_edge = _near_edge(x, y, bad, cfg.edge_margin)
    ref_dist = np.full(n, np.nan)
    ref_mag = np.full(n, np.nan)
    if reference_sources is not None and len(reference_sources) and n:
        rx = np.asarray(reference_sources["x"], np.float64)
        ry = np.asarray(reference_sources["y"], np.float64)
        dist, j = cKDTree(np.column_stack([rx, ry])).query(
            np.column_stack([x, y]), distance_upper_bound=cfg.reference_match_radius
        )
        hit = np.isfinite(dist)
        ref_dist[hit] = dist[hit]
        rflux = np.asarray(reference_sources["flux"], np.float64)[j[hit]]
        if zero_point is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                ref_mag[hit] = np.where(rflux > 0, zero_point - 2.5 * np.log10(rflux), np.nan)
    if wcs is not None and n:
        sky = wcs.pixel_to_world(x, y)
        ra, dec = sky.ra.deg, sky.dec.deg
    else:
        ra = dec = np.full(n, np.nan)
    table = QTable()
    table["x"] = x * u.pix
    table["y"] = y * u.pix
    table["ra"] = np.asarray(ra, np.float64) * u.deg
    table["dec"] = np.asarray(dec, np.float64) * u.deg
    table["polarity"] = pol
    table["score_peak"] = peak
    table["flux"] = flux
    table["flux_err"] = flux_err
    table["snr"] = snr
    table["mag"] = mag * u.mag
    table["mag_err"] = mag_err * u.mag
    table["fwhm"] = fwhm * u.pix
    table["elongation"] = elong
    table["is_dipole"] = is_dipole
    table["masked_fraction"] = masked_frac
    table["ref_distance"] = ref_dist * u.pix
    table["ref_mag"] = ref_mag * u.mag
    table["is_edge"] = is_edge
    table.meta["n_sigma"] = cfg.n_sigma
    table.meta["pixel_origin"] = 0
    return table


def _dipoles(
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    pol: NDArray[np.int8],
    peak: NDArray[np.float64],
    fwhm: float,
    cfg: DetectConfig,
) -> NDArray[np.bool_]:
    """A candidate is a dipole when an opposite lobe of comparable strength sits close."""
    out = np.zeros(len(x), bool)
    if len(x) < 2:
        return out
    radius = cfg.dipole_radius_fwhm * max(fwhm, 1.0)
    tree = cKDTree(np.column_stack([x, y]))
    for i, js in enumerate(tree.query_ball_point(np.column_stack([x, y]), radius)):
        for j in js:
            if pol[j] != pol[i] and abs(peak[j]) >= cfg.dipole_ratio * abs(peak[i]):
                out[i] = True
                break
    return out


def _near_edge(
    x: NDArray[np.float64], y: NDArray[np.float64], bad: NDArray[np.bool_], margin: int
) -> NDArray[np.bool_]:
    ny, nx = bad.shape
    edge = (x < margin) | (y < margin) | (x >= nx - margin) | (y >= ny - margin)
    if bad.any() and len(x):
        from scipy.ndimage import distance_transform_edt

        dist = distance_transform_edt(~bad)
        ix = np.clip(np.round(x).astype(int), 0, nx - 1)
        iy = np.clip(np.round(y).astype(int), 0, ny - 1)
        edge |= dist[iy, ix] < margin
    return np.asarray(edge, bool)


@dataclass(frozen=True)
class Cutouts:
    """Cutout triplets, one per candidate.

    Attributes
    ----------
    science, reference, difference : ndarray, shape (n, size, size), float32
        Stamps centred on each candidate's nearest pixel; pixels beyond the image are NaN.
    size : int
        Side in pixels.
    """

    science: NDArray[np.float32]
    reference: NDArray[np.float32]
    difference: NDArray[np.float32]
    size: int


def make_cutouts(
    science: NDArray[np.floating],
    reference: NDArray[np.floating],
    difference: NDArray[np.floating],
    x: NDArray[np.floating],
    y: NDArray[np.floating],
    *,
    size: int = 63,
) -> Cutouts:
    """Cut ``size`` x ``size`` stamps (63 by default, as ZTF) around each position.

    Parameters
    ----------
    science, reference, difference : ndarray, shape (ny, nx)
        Images on one grid.
    x, y : ndarray, shape (n,)
        0-based positions; each stamp's central pixel is the nearest pixel.
    size : int
        Odd stamp side.
    """
    if size % 2 != 1:
        raise ValueError(f"cutout size must be odd, got {size}")
    images = [np.asarray(im, np.float32) for im in (science, reference, difference)]
    shapes = {
        "science": images[0].shape,
        "reference": images[1].shape,
        "difference": images[2].shape,
    }
    if len(set(shapes.values())) != 1:
        raise ShapeMismatch(shapes)
    ny, nx = images[0].shape
    half = size // 2
    out = [np.full((len(x), size, size), np.nan, np.float32) for _ in images]
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        cx, cy = int(np.floor(float(xi) + 0.5)), int(np.floor(float(yi) + 0.5))
        y0, x0 = cy - half, cx - half
        ys = slice(max(0, y0), min(ny, y0 + size))
        xs = slice(max(0, x0), min(nx, x0 + size))
        ty = slice(ys.start - y0, ys.stop - y0)
        tx = slice(xs.start - x0, xs.stop - x0)
        for k, im in enumerate(images):
            out[k][i, ty, tx] = im[ys, xs]
    return Cutouts(science=out[0], reference=out[1], difference=out[2], size=size)
