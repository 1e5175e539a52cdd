"""Objects: associate candidates across epochs into light curves, and search them.

:func:`associate_candidates` applies the pure kernel
:func:`astrid.science.associate.associate_positions` to every candidate not yet
associated, against the objects already known near them, and writes the result in the
caller's transaction:

- candidates are taken in a reproducible order, by time of observation, then by the
  observation's content hash, then by detection index (never by row id, which depends
  on the order workers committed), so the same data always gives the same objects;
- new ``SkyObject`` rows are created in that order; objects that gained members get
  their mean position, detection count and first/last times updated;
- each candidate's ``object_id`` is set only if it is still NULL (compare-and-set), so
  two concurrent associations cannot both claim a candidate: the loser sees
  :class:`AssociationConflict` and rolls back.

Associating again finds nothing to do (idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from astropy.coordinates import angular_separation
from astropy.table import Table
from sqlalchemy import Select, case, func, or_, select, update
from sqlalchemy.orm import Session

from astrid.errors import AstridError
from astrid.science.associate import associate_positions
from astrid.services.tables import masked_table
from astrid.store.cone import cone_filter, cone_search
from astrid.store.models import Candidate, DifferenceImage, Observation, SkyObject

__all__ = [
    "AssociationConflict",
    "AssociationOutcome",
    "associate_candidates",
    "objects_in_cone",
    "pending_association",
]


class AssociationConflict(AstridError):
    """Candidates were associated by someone else while this association ran.

    Parameters
    ----------
    n_taken : int
        Candidates that were no longer unassociated.
    """

    def __init__(self, n_taken: int) -> None:
        self.n_taken = int(n_taken)
        super().__init__(f"{self.n_taken} candidates were associated concurrently; retry")


@dataclass(frozen=True)
class AssociationOutcome:
    """What :func:`associate_candidates` did.

    Attributes
    ----------
    n_candidates : int
        Candidates associated.
    n_new_objects : int
        Objects created.
    n_updated_objects : int
        Existing objects that gained detections.
    candidate_keys : tuple of (str, int)
        ``(observation sha256, detection_index)`` of the associated candidates, in the
        order they were taken (a reproducible description of the work).
    """

    n_candidates: int
    n_new_objects: int
    n_updated_objects: int
    candidate_keys: tuple[tuple[str, int], ...]


def _pending_query() -> Select[tuple[Candidate, str]]:
    return (
        select(Candidate, Observation.sha256)
        .join(DifferenceImage, Candidate.difference_id == DifferenceImage.id)
        .join(Observation, DifferenceImage.science_observation_id == Observation.id)
        .where(Candidate.object_id.is_(None))
        .order_by(
            func.coalesce(Candidate.mjd, 1e9),
            Observation.sha256,
            Candidate.detection_index,
            DifferenceImage.id,
        )
    )


def pending_association(session: Session) -> int:
    """Number of candidates not associated with an object yet."""
    return int(
        session.scalar(
            select(func.count()).where(Candidate.object_id.is_(None)).select_from(Candidate)
        )
        or 0
    )


def _nearby_objects(
    session: Session, ra: np.ndarray, dec: np.ndarray, radius_deg: float
) -> list[SkyObject]:
    """Objects that any of the positions could join: cones around groups of them."""
    if len(ra) == 0:
        return []
    # One cone per cluster of nearby positions keeps the HEALPix ranges few.
    conditions = []
    remaining = np.ones(len(ra), bool)
    while remaining.any():
        first = int(np.flatnonzero(remaining)[0])
        sep = np.degrees(
            angular_separation(
                np.radians(ra[first]), np.radians(dec[first]), np.radians(ra), np.radians(dec)
            )
        )
        group = remaining & (sep <= 1.0)
        conditions.append(
            cone_filter(
                SkyObject, float(ra[first]), float(dec[first]), float(sep[group].max()) + radius_deg
            )
        )
        remaining &= ~group
    return list(session.scalars(select(SkyObject).where(or_(*conditions)).order_by(SkyObject.id)))


def associate_candidates(session: Session, *, radius_arcsec: float) -> AssociationOutcome:
    """Associate every unassociated candidate with an object (no commit).

    Parameters
    ----------
    session : Session
        Open session; the caller commits (or rolls back on :class:`AssociationConflict`).
    radius_arcsec : float
        Association radius, arcsec.

    Returns
    -------
    AssociationOutcome
        Counts and the candidates taken.

    Raises
    ------
    AssociationConflict
        If some candidates were associated concurrently.
    """
    rows = session.execute(_pending_query()).all()
    if not rows:
        return AssociationOutcome(0, 0, 0, ())
    candidates = [row[0] for row in rows]
    keys = tuple((str(row[1]), int(row[0].detection_index)) for row in rows)
    ra = np.array([c.ra for c in candidates], np.float64)
    dec = np.array([c.dec for c in candidates], np.float64)
    known = _nearby_objects(session, ra, dec, radius_arcsec / 3600.0)
    association = associate_positions(
        ra,
        dec,
        radius_arcsec=radius_arcsec,
        object_ra=[o.ra for o in known],
        object_dec=[o.dec for o in known],
        object_counts=[max(1, o.n_detections) for o in known],
    )
    objects: list[SkyObject] = list(known)
    for k in range(association.n_existing, len(association.ra)):
        new = SkyObject(ra=float(association.ra[k]), dec=float(association.dec[k]), n_detections=0)
        session.add(new)
        objects.append(new)
    session.flush()

    members: dict[int, list[Candidate]] = {}
    for candidate, k in zip(candidates, association.object_index.tolist(), strict=True):
        members.setdefault(int(k), []).append(candidate)
    n_updated = 0
    for k, group in members.items():
        sky_object = objects[k]
        if k < association.n_existing:
            n_updated += 1
        times = [c.mjd for c in group if c.mjd is not None]
        if sky_object.first_mjd is not None:
            times.append(sky_object.first_mjd)
        if sky_object.last_mjd is not None:
            times.append(sky_object.last_mjd)
        sky_object.ra = float(association.ra[k])
        sky_object.dec = float(association.dec[k])
        sky_object.n_detections = int(association.n_members[k])
        sky_object.first_mjd = min(times) if times else None
        sky_object.last_mjd = max(times) if times else None
        ids = [c.id for c in group]
        result = session.execute(
            update(Candidate)
            .where(Candidate.id.in_(ids), Candidate.object_id.is_(None))
            .values(object_id=sky_object.id)
            .execution_options(synchronize_session=False)
        )
        taken = len(ids) - int(getattr(result, "rowcount", len(ids)))
        if taken:
            raise AssociationConflict(taken)
    session.flush()
    for candidate in candidates:
        session.expire(candidate, ["object_id"])
    return AssociationOutcome(
        n_candidates=len(candidates),
        n_new_objects=association.n_new,
        n_updated_objects=n_updated,
        candidate_keys=keys,
    )


def objects_in_cone(
    session: Session,
    ra: float,
    dec: float,
    radius_arcsec: float,
    *,
    limit: int | None = None,
) -> Table:
    """Objects within a cone, nearest first, as an astropy table.

    Returns
    -------
    astropy.table.Table
        Columns ``id``, ``name`` (masked until assigned), ``ra``, ``dec`` (deg),
        ``separation`` (arcsec), ``n_detections``, ``first_mjd``, ``last_mjd``,
        ``n_positive``, ``n_negative`` (detections brighter / fainter than the
        reference), ``peak_mag`` (brightest difference magnitude of its positive
        detections), ``classification``.
    """
    matches = cone_search(session, SkyObject, ra, dec, radius_arcsec / 3600.0, limit=limit)
    ids = [m.row.id for m in matches]
    stats: dict[int, tuple[int, int, float | None]] = {}
    if ids:
        query = (
            select(
                Candidate.object_id,
                func.sum(case((Candidate.is_negative, 0), else_=1)),
                func.sum(case((Candidate.is_negative, 1), else_=0)),
                func.min(case((Candidate.is_negative, None), else_=Candidate.mag)),
            )
            .where(Candidate.object_id.in_(ids))
            .group_by(Candidate.object_id)
        )
        for object_id, n_pos, n_neg, peak in session.execute(query):
            stats[int(object_id)] = (int(n_pos or 0), int(n_neg or 0), peak)
    rows = []
    for match in matches:
        o = match.row
        n_pos, n_neg, peak = stats.get(o.id, (0, 0, None))
        rows.append(
            (
                o.id,
                o.name,
                o.ra,
                o.dec,
                match.separation_deg * 3600.0,
                o.n_detections,
                o.first_mjd,
                o.last_mjd,
                n_pos,
                n_neg,
                peak,
                o.classification,
            )
        )
    names: Sequence[str] = (
        "id",
        "name",
        "ra",
        "dec",
        "separation",
        "n_detections",
        "first_mjd",
        "last_mjd",
        "n_positive",
        "n_negative",
        "peak_mag",
        "classification",
    )
    return masked_table(
        rows,
        names,
        dtypes=("i8", "U64", "f8", "f8", "f8", "i8", "f8", "f8", "i8", "i8", "f8", "U64"),
        units={"ra": "deg", "dec": "deg", "separation": "arcsec", "peak_mag": "mag"},
        formats={
            "ra": ".6f",
            "dec": ".6f",
            "separation": ".3f",
            "first_mjd": ".5f",
            "last_mjd": ".5f",
            "peak_mag": ".3f",
        },
    )
