"""Candidates: store difference images, candidates and cutouts; read them back; search.

The pipeline writes a difference's files to the artifact store first, then calls
:func:`insert_difference` with a :class:`DifferenceRecord` (keys, diagnostics, the
detection table) inside the transaction that references them: the ``DifferenceImage``
row, a ``Candidate`` row per measurable detection and its three ``Cutout`` rows.

A detection whose PSF flux, flux error or sky position is not finite (fully masked, or
no WCS) cannot be stored as a candidate (:func:`measurable`); such detections are
counted in the difference image's ``metrics["n_unmeasurable"]`` rather than dropped
silently. Candidates keep the detection's index in the detection table
(``detection_index``), so the indices of stored candidates may have gaps.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import QTable, Table
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from astrid.services.provenance import finite_or_none, jsonable
from astrid.services.tables import masked_table
from astrid.store.artifacts import ArtifactStore
from astrid.store.cone import cone_search
from astrid.store.models import (
    Candidate,
    Cutout,
    CutoutKind,
    DifferenceImage,
    ModelScore,
    SubtractionMethod,
)

__all__ = [
    "TRIPLET_KINDS",
    "DifferenceRecord",
    "candidate_triplets",
    "candidates_in_cone",
    "insert_difference",
    "insert_scores",
    "measurable",
    "stamp_bytes",
]

#: Cutout kinds of a triplet, in the channel order models expect.
TRIPLET_KINDS = (CutoutKind.SCIENCE, CutoutKind.REFERENCE, CutoutKind.DIFFERENCE)

_METHODS = {"zogy": SubtractionMethod.ZOGY, "al": SubtractionMethod.ALARD_LUPTON}


def _column(table: Any, name: str) -> NDArray[np.float64]:
    column = table[name]
    return np.asarray(getattr(column, "value", column), np.float64)


def measurable(detections: QTable) -> NDArray[np.bool_]:
    """Which detections can be stored (finite flux, positive finite error, finite position).

    Parameters
    ----------
    detections : QTable
        A detection table of :func:`astrid.science.detect.detect_candidates`.
    """
    if len(detections) == 0:
        return np.zeros(0, bool)
    flux, flux_err, ra, dec = (_column(detections, n) for n in ("flux", "flux_err", "ra", "dec"))
    ok = np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0)
    return np.asarray(ok & np.isfinite(ra) & np.isfinite(dec), bool)


def stamp_bytes(stamp: NDArray[np.floating], kind: CutoutKind, x: float, y: float) -> bytes:
    """One cutout stamp as the bytes of a FITS file (float32 primary HDU).

    The header names the kind (``CUTKIND``) and the candidate position on the science
    grid (``CANDX``, ``CANDY``, 0-based pixels).
    """
    header = fits.Header()
    header["CUTKIND"] = (kind.value, "image the stamp was cut from")
    header["CANDX"] = (round(float(x), 4), "candidate column on the science grid, 0-based")
    header["CANDY"] = (round(float(y), 4), "candidate row on the science grid, 0-based")
    buffer = io.BytesIO()
    fits.PrimaryHDU(np.asarray(stamp, np.float32), header=header).writeto(buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class DifferenceRecord:
    """Everything stored of one difference image, its files already in the artifact store.

    Attributes
    ----------
    method : str
        ``"zogy"`` or ``"al"``.
    difference_key, score_key : str
        Artifact keys of the difference image and of the score image.
    metrics : dict
        Subtraction diagnostics (JSON-safe).
    detections : QTable
        The detection table (:func:`astrid.science.detect.detect_candidates`).
    rows : tuple of int
        Indices of the detections stored as candidates (the :func:`measurable` ones).
    flags : tuple of int
        For each of ``rows``, the OR of the mask bits within its footprint.
    cutout_keys : tuple of dict
        For each of ``rows``, the key of its stamp of each :data:`TRIPLET_KINDS` kind.
    cutout_size : int
        Side of the stamps, pixels.
    """

    method: str
    difference_key: str
    score_key: str
    metrics: dict[str, Any]
    detections: QTable
    rows: tuple[int, ...]
    flags: tuple[int, ...]
    cutout_keys: tuple[dict[CutoutKind, str], ...]
    cutout_size: int


def _value(table: Any, name: str, row: int) -> Any:
    item = table[name][row]
    return getattr(item, "value", item)


def insert_difference(
    session: Session,
    *,
    science_observation_id: int,
    reference_id: int,
    processing_run_id: int | None,
    mjd: float | None,
    band: str | None,
    record: DifferenceRecord,
) -> tuple[DifferenceImage, list[Candidate]]:
    """Insert a difference image, its candidates and their cutouts (no commit).

    Parameters
    ----------
    session : Session
        Open session; the caller commits.
    science_observation_id, reference_id : int
        The science observation and the reference subtracted.
    processing_run_id : int or None
        Run that made it.
    mjd, band
        Time (MJD, UTC) and band of the science observation, copied to candidates.
    record : DifferenceRecord
        Keys, diagnostics and detections.

    Returns
    -------
    (DifferenceImage, list of Candidate)
        The rows, flushed (their ids are set), candidates in detection order.
    """
    table = record.detections
    metrics = dict(record.metrics)
    metrics["n_detections"] = len(table)
    metrics["n_unmeasurable"] = len(table) - len(record.rows)
    difference = DifferenceImage(
        science_observation_id=science_observation_id,
        reference_id=reference_id,
        processing_run_id=processing_run_id,
        method=_METHODS.get(record.method) or SubtractionMethod(record.method),
        artifact_key=record.difference_key,
        score_artifact_key=record.score_key,
        n_candidates=len(record.rows),
        metrics=jsonable(metrics),
    )
    session.add(difference)
    session.flush()
    candidates = []
    for row, flags in zip(record.rows, record.flags, strict=True):
        flux = float(_value(table, "flux", row))
        flux_err = float(_value(table, "flux_err", row))
        features = {
            "polarity": int(_value(table, "polarity", row)),
            "score_peak": _value(table, "score_peak", row),
            "masked_fraction": _value(table, "masked_fraction", row),
            "ref_distance_pix": _value(table, "ref_distance", row),
            "ref_mag": _value(table, "ref_mag", row),
            "is_edge": bool(_value(table, "is_edge", row)),
        }
        candidates.append(
            Candidate(
                difference_id=difference.id,
                detection_index=int(row),
                ra=float(_value(table, "ra", row)) % 360.0,
                dec=float(_value(table, "dec", row)),
                x=float(_value(table, "x", row)),
                y=float(_value(table, "y", row)),
                mjd=mjd,
                band=band,
                flux=flux,
                flux_err=flux_err,
                snr=flux / flux_err,
                mag=finite_or_none(_value(table, "mag", row)),
                mag_err=finite_or_none(_value(table, "mag_err", row)),
                is_negative=bool(flux < 0),
                is_dipole=bool(_value(table, "is_dipole", row)),
                fwhm_pixels=finite_or_none(_value(table, "fwhm", row)),
                elongation=finite_or_none(_value(table, "elongation", row)),
                flags=int(flags),
                features=jsonable(features),
            )
        )
    session.add_all(candidates)
    session.flush()
    cutouts = [
        Cutout(candidate_id=candidate.id, kind=kind, artifact_key=key, size=record.cutout_size)
        for candidate, keys in zip(candidates, record.cutout_keys, strict=True)
        for kind, key in keys.items()
    ]
    session.add_all(cutouts)
    session.flush()
    return difference, candidates


def candidate_triplets(
    session: Session, store: ArtifactStore, candidate_ids: Sequence[int]
) -> NDArray[np.float32]:
    """Cutout triplets ``(n, 3, size, size)`` (science, reference, difference) of candidates.

    Raises
    ------
    LookupError
        If a candidate lacks one of the three cutouts.
    """
    if not candidate_ids:
        return np.zeros((0, 3, 0, 0), np.float32)
    rows = session.execute(
        select(Cutout.candidate_id, Cutout.kind, Cutout.artifact_key).where(
            Cutout.candidate_id.in_(list(candidate_ids))
        )
    ).all()
    keys = {(int(c), CutoutKind(k)): str(key) for c, k, key in rows}
    stamps = []
    for candidate_id in candidate_ids:
        channels = []
        for kind in TRIPLET_KINDS:
            key = keys.get((int(candidate_id), kind))
            if key is None:
                raise LookupError(f"candidate {candidate_id} has no {kind.value} cutout")
            with fits.open(io.BytesIO(store.get_bytes(key)), memmap=False) as hdul:
                channels.append(np.asarray(hdul[0].data, np.float32))
        stamps.append(np.stack(channels))
    return np.stack(stamps).astype(np.float32)


def insert_scores(
    session: Session,
    candidate_ids: Sequence[int],
    scores: NDArray[np.floating],
    *,
    model_name: str,
    model_version: str,
    processing_run_id: int | None,
) -> list[ModelScore]:
    """Insert one model's scores of candidates (no commit).

    Raises
    ------
    ValueError
        If the numbers of candidates and scores differ or a score is outside [0, 1].
    """
    values = np.asarray(scores, np.float64).reshape(-1)
    if len(values) != len(candidate_ids):
        raise ValueError(f"{len(values)} scores for {len(candidate_ids)} candidates")
    if np.any(~np.isfinite(values)) or np.any((values < 0) | (values > 1)):
        raise ValueError("scores must be probabilities in [0, 1]")
    rows = [
        ModelScore(
            candidate_id=int(candidate_id),
            model_name=model_name,
            model_version=model_version,
            score=float(score),
            processing_run_id=processing_run_id,
        )
        for candidate_id, score in zip(candidate_ids, values, strict=True)
    ]
    session.add_all(rows)
    session.flush()
    return rows


def candidates_in_cone(
    session: Session,
    ra: float,
    dec: float,
    radius_arcsec: float,
    *,
    limit: int | None = None,
) -> Table:
    """Candidates within a cone, nearest first, as an astropy table.

    Parameters
    ----------
    session : Session
        Open session.
    ra, dec : float
        Cone centre, ICRS degrees.
    radius_arcsec : float
        Cone radius, arcsec.
    limit : int or None
        Keep the nearest ``limit``; ``None`` keeps all.

    Returns
    -------
    astropy.table.Table
        Columns ``id``, ``object_id`` (masked when not associated), ``ra``, ``dec``
        (deg), ``separation`` (arcsec), ``mjd``, ``band``, ``mag``, ``mag_err``, ``snr``,
        ``flux``, ``flux_err`` (science ADU), ``is_negative``, ``is_dipole``, ``flags``,
        ``x``, ``y`` (0-based pixels on the science grid), ``score``, ``model`` (the
        latest model score, masked when no model has scored it).
    """
    matches = cone_search(session, Candidate, ra, dec, radius_arcsec / 3600.0, limit=limit)
    candidates = [m.row for m in matches]
    ids = [c.id for c in candidates]
    latest: dict[int, ModelScore] = {}
    if ids:
        for score in session.scalars(
            select(ModelScore)
            .where(ModelScore.candidate_id.in_(ids))
            .order_by(ModelScore.created_at, ModelScore.id)
        ):
            latest[score.candidate_id] = score
    names = (
        "id",
        "object_id",
        "ra",
        "dec",
        "separation",
        "mjd",
        "band",
        "mag",
        "mag_err",
        "snr",
        "flux",
        "flux_err",
        "is_negative",
        "is_dipole",
        "flags",
        "x",
        "y",
        "score",
        "model",
    )
    rows = []
    for match, c in zip(matches, candidates, strict=True):
        best = latest.get(c.id)
        rows.append(
            (
                c.id,
                c.object_id,
                c.ra,
                c.dec,
                match.separation_deg * 3600.0,
                c.mjd,
                c.band,
                c.mag,
                c.mag_err,
                c.snr,
                c.flux,
                c.flux_err,
                c.is_negative,
                c.is_dipole,
                c.flags,
                c.x,
                c.y,
                None if best is None else best.score,
                None if best is None else f"{best.model_name} {best.model_version}",
            )
        )
    return masked_table(
        rows,
        names,
        dtypes=(
            "i8",
            "i8",
            "f8",
            "f8",
            "f8",
            "f8",
            "U32",
            "f8",
            "f8",
            "f8",
            "f8",
            "f8",
            "?",
            "?",
            "i8",
            "f8",
            "f8",
            "f8",
            "U64",
        ),
        units={
            "ra": "deg",
            "dec": "deg",
            "separation": "arcsec",
            "mag": "mag",
            "mag_err": "mag",
            "x": "pix",
            "y": "pix",
        },
        formats={
            "ra": ".6f",
            "dec": ".6f",
            "separation": ".3f",
            "mjd": ".5f",
            "mag": ".3f",
            "mag_err": ".3f",
            "snr": ".1f",
            "flux": ".1f",
            "flux_err": ".1f",
            "x": ".2f",
            "y": ".2f",
            "score": ".3f",
        },
    )
