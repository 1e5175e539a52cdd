"""Cone search over any table with a sky position.

A model qualifies when it has ``ra`` and ``dec`` columns (ICRS degrees) and the
``healpix`` column kept in step with them (:mod:`astrid.store.healpix`). The search asks
the database for the rows whose HEALPix index lies in the few index ranges covering the
cone (one B-tree index, on SQLite and PostgreSQL alike), then keeps those whose exact
great-circle separation (Vincenty formula, as astropy's ``SkyCoord.separation``) is
within the radius. Rows without a position (``healpix`` NULL) never match.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
from astropy.coordinates import angular_separation
from sqlalchemy import ColumnElement, and_, false, inspect, or_, select
from sqlalchemy.orm import Session

from astrid.store.healpix import cone_ranges

__all__ = [
    "ConeMatch",
    "cone_filter",
    "cone_search",
]

T = TypeVar("T")


class ConeMatch(NamedTuple, Generic[T]):
    """One row found by :func:`cone_search`."""

    row: T
    """The mapped object (an instance of the searched model)."""
    separation_deg: float
    """Great-circle distance from the cone centre, degrees."""


def _position_columns(model: Any) -> tuple[Any, Any, Any]:
    missing = [name for name in ("ra", "dec", "healpix") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{model!r} has no {', '.join(missing)} column(s) for a cone search")
    return model.ra, model.dec, model.healpix


def _primary_key(model: Any) -> tuple[Any, ...]:
    mapper = inspect(model, raiseerr=False)
    return tuple(mapper.primary_key) if mapper is not None else ()


def cone_filter(model: Any, ra: float, dec: float, radius_deg: float) -> ColumnElement[bool]:
    """SQL condition selecting the rows of ``model`` that may lie within a cone.

    Every row within ``radius_deg`` of (``ra``, ``dec``) satisfies it; some rows just
    outside may too, so filter the results exactly (as :func:`cone_search` does). Use it
    to combine a sky region with other conditions, joins or ordering in your own query.

    Parameters
    ----------
    model : mapped class
        A model with ``ra``, ``dec`` and ``healpix`` columns.
    ra, dec : float
        Cone centre, ICRS degrees.
    radius_deg : float
        Cone radius, degrees.

    Returns
    -------
    sqlalchemy.ColumnElement
        An OR of ``healpix BETWEEN first AND last`` ranges.
    """
    _, _, healpix = _position_columns(model)
    ranges = cone_ranges(ra, dec, radius_deg)
    if not ranges:
        return false()
    return or_(*(healpix.between(first, last) for first, last in ranges))


def cone_search(
    session: Session,
    model: type[T],
    ra: float,
    dec: float,
    radius_deg: float,
    *,
    where: Iterable[ColumnElement[bool]] = (),
    limit: int | None = None,
) -> list[ConeMatch[T]]:
    """Rows of ``model`` within ``radius_deg`` of a position, nearest first.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        Session to query with.
    model : mapped class
        A model with ``ra``, ``dec`` and ``healpix`` columns (``Candidate``,
        ``SkyObject``, ``Observation``, ``CatalogEntry``, ...).
    ra, dec : float
        Cone centre, ICRS degrees (any RA is wrapped into [0, 360)).
    radius_deg : float
        Cone radius in degrees, non-negative.
    where : iterable of SQL conditions
        Further conditions on the rows (``Candidate.band == "g"``).
    limit : int or None
        Keep only the nearest ``limit`` matches; ``None`` keeps all.

    Returns
    -------
    list of ConeMatch
        ``(row, separation_deg)`` pairs sorted by separation, then by primary key.

    Raises
    ------
    ValueError
        If the centre or radius is invalid.
    TypeError
        If ``model`` lacks the position columns.
    """
    ra_column, dec_column, _ = _position_columns(model)
    statement = (
        select(model, ra_column, dec_column)
        .where(and_(cone_filter(model, ra, dec, radius_deg), *where))
        .order_by(*_primary_key(model))
    )
    result = session.execute(statement).all()
    if not result:
        return []
    rows = [record[0] for record in result]
    ras = np.radians(np.array([record[1] for record in result], dtype=np.float64))
    decs = np.radians(np.array([record[2] for record in result], dtype=np.float64))
    separation = np.degrees(angular_separation(np.radians(ra % 360.0), np.radians(dec), ras, decs))
    keep = np.flatnonzero(separation <= radius_deg)
    keep = keep[np.argsort(separation[keep], kind="stable")]
    if limit is not None:
        keep = keep[:limit]
    return [ConeMatch(rows[i], float(separation[i])) for i in keep]
