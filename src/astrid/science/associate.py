"""Associate detections across epochs into objects by sky position.

The rule (the sequential nearest-object association of survey pipelines): detections are
taken in the order given (the caller sorts them by time); each joins the *nearest* object
whose current mean position lies within ``radius_arcsec`` of it, and that object's mean
position is updated; a detection with no object in reach starts a new object. Objects
known beforehand (from earlier runs) take part with their mean positions and member
counts, so associating new detections later gives the same objects as associating
everything at once in the same order.

Mean positions are means of unit vectors (renormalised), so they are exact across
RA = 0/360 and near the poles. Neighbour look-ups use a hash grid over the unit sphere
with cells one chord-radius wide, so the cost is linear in the number of detections.
Ties in distance go to the object with the lower index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Association", "associate_positions"]


@dataclass(frozen=True)
class Association:
    """Objects formed by :func:`associate_positions`.

    Attributes
    ----------
    object_index : ndarray of int64, shape (n,)
        For each detection, the index of its object: indices below ``n_existing`` are
        the objects passed in (in their order), the rest are new objects in order of
        creation.
    ra, dec : ndarray of float64, shape (m,)
        Mean position of every object after association, ICRS degrees (existing objects
        first).
    n_members : ndarray of int64, shape (m,)
        Members of each object: its earlier count plus the detections that joined.
    n_existing : int
        Objects passed in.
    """

    object_index: NDArray[np.int64]
    ra: NDArray[np.float64]
    dec: NDArray[np.float64]
    n_members: NDArray[np.int64]
    n_existing: int

    @property
    def n_new(self) -> int:
        """Objects created."""
        return len(self.ra) - self.n_existing


def _unit_vectors(ra: NDArray[np.float64], dec: NDArray[np.float64]) -> NDArray[np.float64]:
    a, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])


def _positions(name: str, ra: ArrayLike, dec: ArrayLike) -> tuple[NDArray[np.float64], ...]:
    r = np.atleast_1d(np.asarray(ra, np.float64))
    d = np.atleast_1d(np.asarray(dec, np.float64))
    if r.shape != d.shape or r.ndim != 1:
        raise ValueError(f"{name} ra and dec must be 1-D of one length, got {r.shape}, {d.shape}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(d))):
        raise ValueError(f"{name} positions must be finite")
    if np.any(np.abs(d) > 90.0):
        raise ValueError(f"{name} declinations must lie in [-90, 90] degrees")
    return r, d


def associate_positions(
    ra: ArrayLike,
    dec: ArrayLike,
    *,
    radius_arcsec: float,
    object_ra: ArrayLike | None = None,
    object_dec: ArrayLike | None = None,
    object_counts: ArrayLike | None = None,
) -> Association:
    """Group detections into objects (see the module docstring for the rule).

    Parameters
    ----------
    ra, dec : array_like, shape (n,)
        Detection positions, ICRS degrees, in the order they are to be associated
        (oldest first).
    radius_arcsec : float
        Association radius, arcsec (positive).
    object_ra, object_dec : array_like, shape (m,), or None
        Mean positions of already known objects; ``None`` for none.
    object_counts : array_like of int, shape (m,), or None
        Detections already in each known object (their weight in the mean); ``None``
        counts 1 each.

    Returns
    -------
    Association
        The object of every detection and every object's mean position and size.

    Raises
    ------
    ValueError
        For a non-positive radius or invalid positions or counts.

    Examples
    --------
    >>> a = associate_positions([10.0, 10.0001, 10.01], [0.0, 0.0, 0.0], radius_arcsec=1.0)
    >>> a.object_index.tolist(), a.n_members.tolist()
    ([0, 0, 1], [2, 1])
    """
    if not (math.isfinite(radius_arcsec) and radius_arcsec > 0):
        raise ValueError(f"radius_arcsec must be positive, got {radius_arcsec}")
    det_ra, det_dec = _positions("detection", ra, dec)
    if object_ra is None or object_dec is None:
        obj_ra = obj_dec = np.zeros(0, np.float64)
    else:
        obj_ra, obj_dec = _positions("object", object_ra, object_dec)
    n_existing = len(obj_ra)
    counts = (
        np.ones(n_existing, np.int64)
        if object_counts is None
        else np.atleast_1d(np.asarray(object_counts, np.int64))
    )
    if counts.shape != (n_existing,) or np.any(counts < 1):
        raise ValueError("object_counts must give a positive count for every object")

    # Chord length of the radius: two unit vectors within the radius differ by at most
    # this much in every coordinate, so neighbours lie in adjacent grid cells.
    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    chord_squared = chord * chord
    sums: list[NDArray[np.float64]] = []
    members: list[int] = []
    means: list[NDArray[np.float64]] = []
    cell_of: list[tuple[int, int, int]] = []
    grid: dict[tuple[int, int, int], list[int]] = {}

    def cell(vector: NDArray[np.float64]) -> tuple[int, int, int]:
        c = np.floor(vector / chord).astype(np.int64)
        return int(c[0]), int(c[1]), int(c[2])

    def place(index: int, vector: NDArray[np.float64]) -> None:
        key = cell(vector)
        if index < len(cell_of):
            old = cell_of[index]
            if old == key:
                return
            grid[old].remove(index)
            cell_of[index] = key
        else:
            cell_of.append(key)
        grid.setdefault(key, []).append(index)

    for vector, count in zip(_unit_vectors(obj_ra, obj_dec), counts, strict=True):
        sums.append(vector * float(count))
        members.append(int(count))
        means.append(vector)
        place(len(means) - 1, vector)

    offsets = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]
    object_index = np.empty(len(det_ra), np.int64)
    for n, vector in enumerate(_unit_vectors(det_ra, det_dec)):
        cx, cy, cz = cell(vector)
        best, best_distance = -1, math.inf
        for dx, dy, dz in offsets:
            for candidate in grid.get((cx + dx, cy + dy, cz + dz), ()):
                # Squared chord, computed from differences: exact for tiny separations.
                distance = float(np.sum((means[candidate] - vector) ** 2))
                if distance > chord_squared:
                    continue
                if distance < best_distance or (distance == best_distance and candidate < best):
                    best, best_distance = candidate, distance
        if best < 0:
            sums.append(vector.copy())
            members.append(1)
            means.append(vector)
            place(len(means) - 1, vector)
            object_index[n] = len(means) - 1
            continue
        sums[best] = sums[best] + vector
        members[best] += 1
        means[best] = sums[best] / np.linalg.norm(sums[best])
        place(best, means[best])
        object_index[n] = best

    mean_array = np.array(means, np.float64).reshape(-1, 3)
    out_ra = np.degrees(np.arctan2(mean_array[:, 1], mean_array[:, 0])) % 360.0
    out_dec = np.degrees(np.arcsin(np.clip(mean_array[:, 2], -1.0, 1.0)))
    return Association(
        object_index=object_index,
        ra=out_ra,
        dec=out_dec,
        n_members=np.array(members, np.int64),
        n_existing=n_existing,
    )
