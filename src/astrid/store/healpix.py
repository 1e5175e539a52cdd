"""The HEALPix index stored with every sky position, and the index ranges of a cone.

Every table with a sky position (``ra``, ``dec`` in ICRS degrees) also stores
``healpix``: the index of the HEALPix pixel holding that position, with NESTED ordering at
order :data:`HEALPIX_ORDER` = 29 (``nside = 2**29``, pixels about 0.4 milliarcseconds
across). Order 29 is the finest whose indices fit in a signed 64-bit integer, so the index
loses nothing; and because NESTED indices are hierarchical, the pixel at any coarser
order ``k`` is ``healpix >> (2 * (29 - k))``, and every pixel at order ``k`` is one
contiguous range of order-29 indices. A cone search therefore asks the database for a
handful of ``BETWEEN`` ranges on one ordinary B-tree index (see :func:`cone_ranges`),
then filters exactly by angular separation.
"""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np
from astropy_healpix import HEALPix
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "HEALPIX_NSIDE",
    "HEALPIX_ORDER",
    "cone_ranges",
    "healpix_index",
]

#: NESTED HEALPix order of the stored ``healpix`` columns.
HEALPIX_ORDER = 29
#: ``nside`` of the stored ``healpix`` columns (``2**HEALPIX_ORDER``).
HEALPIX_NSIDE = 2**HEALPIX_ORDER

# Pixel size (square root of the pixel area) at order 0, in degrees.
_ORDER0_RESOLUTION_DEG = math.degrees(math.sqrt(4.0 * math.pi / 12.0))
# Pad for floating-point rounding at the cone's edge; the exact filter removes extras.
_EDGE_PAD_DEG = 1e-9


def healpix_index(ra: ArrayLike, dec: ArrayLike) -> NDArray[np.int64]:
    """HEALPix index (NESTED, order :data:`HEALPIX_ORDER`) of sky positions.

    Parameters
    ----------
    ra, dec : float or array_like
        ICRS right ascension and declination in degrees; any RA is wrapped into
        [0, 360). Arrays broadcast against each other.

    Returns
    -------
    ndarray of int64
        The indices, with the broadcast shape of the inputs (0-d for scalars; use
        ``int(...)`` to store one).

    Raises
    ------
    ValueError
        If a declination is outside [-90, 90] or a value is not finite.
    """
    ra_arr = np.asarray(ra, dtype=np.float64)
    dec_arr = np.asarray(dec, dtype=np.float64)
    if not (np.all(np.isfinite(ra_arr)) and np.all(np.isfinite(dec_arr))):
        raise ValueError("ra and dec must be finite")
    if np.any(np.abs(dec_arr) > 90.0):
        raise ValueError(f"dec must lie in [-90, 90] degrees, got {dec_arr[np.abs(dec_arr) > 90]}")
    grid = HEALPix(nside=HEALPIX_NSIDE, order="nested")
    index = grid.lonlat_to_healpix(np.mod(ra_arr, 360.0) * u.deg, dec_arr * u.deg)
    return np.asarray(index, dtype=np.int64)


def _search_order(radius_deg: float) -> int:
    """Coarsest-enough order: pixels about as large as the radius (a few dozen in a cone)."""
    if radius_deg <= 0:
        return HEALPIX_ORDER
    order = math.floor(math.log2(_ORDER0_RESOLUTION_DEG / radius_deg))
    return min(max(order, 0), HEALPIX_ORDER)


def cone_ranges(ra: float, dec: float, radius_deg: float) -> list[tuple[int, int]]:
    """Inclusive ranges of stored ``healpix`` indices that cover a cone.

    Every position within ``radius_deg`` of (``ra``, ``dec``) has its index in one of the
    ranges; positions slightly outside may too (the caller filters exactly).

    Parameters
    ----------
    ra, dec : float
        Centre of the cone, ICRS degrees.
    radius_deg : float
        Radius in degrees, non-negative. A radius of 180 or more covers the sphere.

    Returns
    -------
    list of (int, int)
        Sorted, non-overlapping, non-adjacent ``(first, last)`` index pairs.

    Raises
    ------
    ValueError
        If the radius is negative or not finite, or the centre is invalid.
    """
    if not math.isfinite(radius_deg) or radius_deg < 0:
        raise ValueError(f"radius_deg must be finite and non-negative, got {radius_deg}")
    if not (math.isfinite(ra) and math.isfinite(dec)) or abs(dec) > 90.0:
        raise ValueError(f"invalid cone centre ra={ra}, dec={dec}")
    n_max = 12 * HEALPIX_NSIDE**2
    if radius_deg >= 180.0:
        return [(0, n_max - 1)]
    order = _search_order(radius_deg)
    grid = HEALPix(nside=2**order, order="nested")
    pixels = np.sort(
        grid.cone_search_lonlat(
            (ra % 360.0) * u.deg, dec * u.deg, (radius_deg + _EDGE_PAD_DEG) * u.deg
        ).astype(np.int64)
    )
    shift = 2 * (HEALPIX_ORDER - order)
    ranges: list[tuple[int, int]] = []
    for pixel in pixels.tolist():
        first, last = pixel << shift, ((pixel + 1) << shift) - 1
        if ranges and ranges[-1][1] + 1 == first:
            ranges[-1] = (ranges[-1][0], last)
        else:
            ranges.append((first, last))
    return ranges
