"""Observations: register FITS files, move them through the pipeline, report their state.

Registering (``ingest``) a file:

1. hashes its bytes (SHA-256); a file whose hash is already known is not registered
   again, whatever its name or location;
2. reads its headers (not its pixels): metadata (time, band, exposure time, zero point,
   ...), image size and celestial WCS, giving the image centre and footprint;
3. stores the file in the content-addressed artifact store, *before* the database
   transaction that references it;
4. in one transaction, records the ``Observation`` row (metadata, HEALPix of the centre,
   the field it belongs to) and a succeeded ``ingest`` processing run.

A file whose headers cannot be read is still registered, with status ``failed`` and the
reason, so that a batch goes on and the problem stays visible (``astrid status``).

Fields. Observations of one pointing share a :class:`~astrid.store.models.SkyField`: a
new observation joins the nearest field of its survey whose centre lies within
``field_match_fraction`` times its own footprint radius (half its diagonal), and
otherwise starts a new field centred on it. References are chosen per field and band.

Status transitions are compare-and-set (:func:`transition`): the update applies only if
the observation is still in an expected status, which keeps two workers (or a restarted
run and a straggler) from both completing the same stage.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from astrid.errors import AstridError, CorruptFitsFile
from astrid.events import EventBus, ObservationIngested
from astrid.exposure import ExposureMeta
from astrid.io.fits import KEYWORDS, meta_from_header, wcs_from_header
from astrid.services.provenance import code_provenance, idempotency_key, jsonable
from astrid.store.artifacts import ArtifactStore, sha256_file
from astrid.store.cone import cone_search
from astrid.store.models import (
    Instrument,
    Observation,
    ObservationStatus,
    ProcessingRun,
    RunStatus,
    SkyField,
    Survey,
)
from astrid.store.types import utcnow

__all__ = [
    "DEFAULT_SURVEY",
    "FITS_SUFFIXES",
    "FailureRecord",
    "FitsDescription",
    "IngestResult",
    "StatusReport",
    "describe_fits",
    "find_fits_files",
    "ingest_file",
    "ingest_paths",
    "observation_ids",
    "reset_failed",
    "stage_durations",
    "status_report",
    "transition",
    "worker_name",
]

#: Survey that observations registered from local files belong to.
DEFAULT_SURVEY = "local"

#: File name endings taken as FITS images when a folder is ingested.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz")

#: Header keywords kept in ``Observation.header`` besides the metadata keywords.
_HEADER_EXTRA = (
    "NAXIS1",
    "NAXIS2",
    "CTYPE1",
    "CTYPE2",
    "CRVAL1",
    "CRVAL2",
    "RADESYS",
    "EQUINOX",
    "TIMESYS",
    "BUNIT",
    "DATE-OBS",
    "MJD-OBS",
)
_STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "NEXTEND")
_SIDE_PLANES = ("VAR", "VARIANCE", "DQ", "MASK", "BPM", "SKYFIT", "PSF")
_ASTRID_FORMAT = ("AST_FMT", "astrid-exposure-1")


def worker_name() -> str:
    """``host:pid`` of this process, recorded with the runs it makes."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class FitsDescription:
    """What the headers of a FITS image say, without reading its pixels.

    Attributes
    ----------
    meta : ExposureMeta
        Metadata, as :func:`astrid.io.fits.read_exposure` would find it.
    wcs : astropy.wcs.WCS or None
        Celestial WCS (``None`` when the headers have none).
    shape : tuple of int
        ``(ny, nx)`` of the image.
    hdu : int
        Index of the image HDU described.
    header : dict
        Selected header cards (metadata and WCS keywords) as JSON-safe values.
    """

    meta: ExposureMeta
    wcs: WCS | None
    shape: tuple[int, int]
    hdu: int
    header: dict[str, Any]

    def centre(self) -> tuple[float, float] | None:
        """``(ra, dec)`` of the image centre in degrees, or ``None`` without a WCS."""
        if self.wcs is None:
            return None
        ny, nx = self.shape
        ra, dec = self.wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
        return float(ra) % 360.0, float(dec)

    def footprint_radius_deg(self) -> float | None:
        """Largest distance from the centre to a corner, degrees (``None`` without a WCS)."""
        centre = self.centre()
        if centre is None or self.wcs is None:
            return None
        ny, nx = self.shape
        xs = np.array([-0.5, nx - 0.5, -0.5, nx - 0.5])
        ys = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = self.wcs.pixel_to_world_values(xs, ys)
        from astropy.coordinates import angular_separation

        sep = angular_separation(
            np.radians(centre[0]), np.radians(centre[1]), np.radians(ra), np.radians(dec)
        )
        return float(np.degrees(np.max(sep)))


def _image_index(hdul: fits.HDUList) -> int:
    key, value = _ASTRID_FORMAT
    if hdul[0].header.get(key) == value:
        return int(hdul.index_of("SCI"))
    for index, hdu in enumerate(hdul):
        header = hdu.header
        name = str(header.get("EXTNAME", "")).strip().upper()
        if name in _SIDE_PLANES:
            continue
        if isinstance(hdu, fits.BinTableHDU | fits.TableHDU):
            continue
        if int(header.get("NAXIS", 0)) >= 2 and int(header.get("NAXIS1", 0)) > 0:
            return index
    raise ValueError("no image data in any HDU")


def _merged_header(hdul: fits.HDUList, index: int) -> fits.Header:
    header = hdul[0].header.copy() if index != 0 else fits.Header()
    for key in _STRUCTURAL:
        header.remove(key, ignore_missing=True, remove_all=True)
    for card in hdul[index].header.cards:
        if card.keyword in ("COMMENT", "HISTORY", ""):
            continue
        try:
            header[card.keyword] = (card.value, card.comment)
        except (ValueError, KeyError, fits.VerifyError):
            continue
    return header


def describe_fits(path: str | Path) -> FitsDescription:
    """Read the metadata, size and WCS of a FITS image from its headers only.

    The image HDU is the ``SCI`` extension of an AstrID file, otherwise the first HDU
    holding a 2-D image that is not a variance or mask plane (as
    :func:`astrid.io.fits.read_exposure` chooses).

    Raises
    ------
    CorruptFitsFile
        The file is not FITS, its headers are damaged, or it holds no image.
    """
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            with fits.open(p, memmap=False, lazy_load_hdus=True) as hdul:
                index = _image_index(hdul)
                header = _merged_header(hdul, index)
                image_header = hdul[index].header
                shape = (int(image_header["NAXIS2"]), int(image_header["NAXIS1"]))
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise CorruptFitsFile(str(p), f"{type(exc).__name__}: {exc}") from exc
    meta = meta_from_header(header)
    wcs, _ = wcs_from_header(header)
    keep = {k for keys in KEYWORDS.values() for k in keys} | set(_HEADER_EXTRA)
    selected = {}
    for key in sorted(keep):
        if key in header:
            value = jsonable(header[key])
            if isinstance(value, str | int | float | bool):
                selected[key] = value
    selected["NAXIS1"], selected["NAXIS2"] = shape[1], shape[0]
    return FitsDescription(meta=meta, wcs=wcs, shape=shape, hdu=index, header=selected)


def find_fits_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted list of FITS files.

    Parameters
    ----------
    paths : iterable of str or Path
        Files (taken whatever their name) and folders (searched recursively for names
        ending in :data:`FITS_SUFFIXES`, case-insensitively).

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    """
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.name.lower().endswith(FITS_SUFFIXES)
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p.resolve(), None)
    return list(unique)


# --------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class IngestResult:
    """Outcome of registering one file.

    Attributes
    ----------
    path : Path
        The file.
    observation_id : int
        Its observation (the earlier one when the content was already known).
    sha256 : str
        Hex SHA-256 of its bytes.
    is_new : bool
        False when a file with the same bytes was registered before.
    status : ObservationStatus
        The observation's status (``failed`` when its headers could not be read).
    failure_reason : str or None
        Why it failed, if it did.
    """

    path: Path
    observation_id: int
    sha256: str
    is_new: bool
    status: ObservationStatus
    failure_reason: str | None = None


def _get_or_create_survey(session: Session, name: str) -> Survey:
    survey = session.scalars(select(Survey).where(Survey.name == name)).first()
    if survey is None:
        survey = Survey(name=name, description="Observations registered from local files.")
        session.add(survey)
        session.flush()
    return survey


def _get_or_create_instrument(
    session: Session, name: str | None, telescope: str | None
) -> Instrument | None:
    if not name:
        return None
    name = name[:64]
    instrument = session.scalars(select(Instrument).where(Instrument.name == name)).first()
    if instrument is None:
        instrument = Instrument(name=name, telescope=telescope[:128] if telescope else None)
        session.add(instrument)
        session.flush()
    return instrument


def _assign_field(
    session: Session,
    survey: Survey,
    ra: float,
    dec: float,
    radius_deg: float,
    field_match_fraction: float,
) -> SkyField:
    matches = cone_search(
        session,
        SkyField,
        ra,
        dec,
        max(field_match_fraction * radius_deg, 1e-6),
        where=[SkyField.survey_id == survey.id],
        limit=1,
    )
    if matches:
        return matches[0].row
    field = SkyField(
        survey_id=survey.id,
        name=f"J{ra:09.5f}{dec:+09.5f}",
        ra=ra,
        dec=dec,
        radius_deg=radius_deg,
    )
    session.add(field)
    session.flush()
    return field


def _observation_values(description: FitsDescription) -> dict[str, Any]:
    meta = description.meta
    values: dict[str, Any] = {
        "band": meta.band[:32] if meta.band else None,
        "exposure_time": meta.exposure_time,
        "airmass": meta.airmass,
        "zero_point": meta.zero_point,
        "height": description.shape[0],
        "width": description.shape[1],
        "header": description.header,
    }
    if meta.time is not None:
        utc = meta.time.utc
        values["mjd"] = float(utc.mjd)
        values["obs_time"] = utc.to_datetime(timezone=UTC)
    centre = description.centre()
    if centre is not None and all(math.isfinite(c) for c in centre):
        values["ra"], values["dec"] = centre
    return values


def ingest_file(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    path: str | Path,
    *,
    events: EventBus | None = None,
    survey_name: str = DEFAULT_SURVEY,
    field_match_fraction: float = 0.5,
) -> IngestResult:
    """Register one FITS file as an observation (see the module docstring).

    Parameters
    ----------
    sessions : sessionmaker
        Session factory of the database.
    store : ArtifactStore
        Where the file is stored.
    path : str or Path
        The file.
    events : EventBus or None
        Receives :class:`~astrid.events.ObservationIngested` for a new observation.
    survey_name : str
        Survey the observation belongs to (created if absent).
    field_match_fraction : float
        A new observation joins an existing field whose centre lies within this fraction
        of the observation's footprint radius.

    Returns
    -------
    IngestResult
        Whether it was new, its observation and status.
    """
    p = Path(path).resolve()
    sha = sha256_file(p)
    with sessions() as session:
        known = session.scalars(select(Observation).where(Observation.sha256 == sha)).first()
        if known is not None:
            return IngestResult(p, known.id, sha, False, known.status, known.failure_reason)

    started = utcnow()
    description: FitsDescription | None = None
    error: AstridError | None = None
    try:
        description = describe_fits(p)
    except AstridError as exc:
        error = exc
    key = store.put_file(p)
    provenance = {"inputs": {"file_sha256": sha}, "outputs": {"raw": key}, **code_provenance()}

    for attempt in range(2):
        try:
            with sessions() as session, session.begin():
                survey = _get_or_create_survey(session, survey_name)
                observation = Observation(
                    sha256=sha,
                    artifact_key=key,
                    original_name=str(p)[:1024],
                    survey_id=survey.id,
                )
                run = ProcessingRun(
                    stage="ingest",
                    idempotency_key=idempotency_key("ingest", sha),
                    config={"survey": survey_name, "field_match_fraction": field_match_fraction},
                    provenance=provenance,
                    code_version=code_provenance()["astrid"],
                    worker=worker_name(),
                    started_at=started,
                    finished_at=utcnow(),
                )
                if description is not None:
                    for name, value in _observation_values(description).items():
                        setattr(observation, name, value)
                    instrument = _get_or_create_instrument(
                        session, description.meta.instrument, description.meta.telescope
                    )
                    observation.instrument_id = instrument.id if instrument else None
                    radius = description.footprint_radius_deg()
                    if observation.ra is not None and observation.dec is not None and radius:
                        field = _assign_field(
                            session,
                            survey,
                            observation.ra,
                            observation.dec,
                            radius,
                            field_match_fraction,
                        )
                        observation.field_id = field.id
                    observation.status = ObservationStatus.REGISTERED
                    run.status = RunStatus.SUCCEEDED
                else:
                    assert error is not None
                    observation.status = ObservationStatus.FAILED
                    observation.failure_reason = f"ingest: {type(error).__name__}: {error}"
                    run.status = RunStatus.FAILED
                    run.error_type = type(error).__name__
                    run.error_message = str(error)
                session.add(observation)
                session.flush()
                run.observation_id = observation.id
                session.add(run)
                session.flush()
                result = IngestResult(
                    p, observation.id, sha, True, observation.status, observation.failure_reason
                )
            break
        except IntegrityError:
            # Registered concurrently (same bytes), or a survey/field created meanwhile.
            with sessions() as session:
                known = session.scalars(
                    select(Observation).where(Observation.sha256 == sha)
                ).first()
                if known is not None:
                    return IngestResult(p, known.id, sha, False, known.status, known.failure_reason)
            if attempt == 1:
                raise
    if events is not None:
        events.publish(
            ObservationIngested(
                observation_id=result.observation_id, sha256=sha, original_name=str(p)
            )
        )
    return result


def ingest_paths(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    paths: Iterable[str | Path],
    *,
    events: EventBus | None = None,
    survey_name: str = DEFAULT_SURVEY,
    field_match_fraction: float = 0.5,
    on_file: Callable[[IngestResult], None] | None = None,
) -> list[IngestResult]:
    """Register every FITS file under ``paths`` (files and folders), in sorted order.

    Parameters are those of :func:`ingest_file`; ``on_file`` is called after each file
    (for progress displays).

    Returns
    -------
    list of IngestResult
        One per file, in the order registered.
    """
    results = []
    for path in find_fits_files(paths):
        result = ingest_file(
            sessions,
            store,
            path,
            events=events,
            survey_name=survey_name,
            field_match_fraction=field_match_fraction,
        )
        results.append(result)
        if on_file is not None:
            on_file(result)
    return results


# --------------------------------------------------------------------------- status


def transition(
    session: Session,
    observation_id: int,
    expected: Collection[ObservationStatus],
    new: ObservationStatus,
    **values: Any,
) -> bool:
    """Set an observation's status (and other columns) if it is still in ``expected``.

    Returns
    -------
    bool
        True when the row was updated; False when its status had moved on (another
        worker completed the stage), in which case the caller should roll back.
    """
    result = session.execute(
        update(Observation)
        .where(Observation.id == observation_id, Observation.status.in_(list(expected)))
        .values(status=new, **values)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0)) == 1


@dataclass(frozen=True)
class FailureRecord:
    """A failed or rejected observation.

    Attributes
    ----------
    observation_id : int
        The observation.
    status : ObservationStatus
        ``failed`` or ``rejected``.
    reason : str or None
        Stage, error type and message.
    original_name : str or None
        File it was registered from.
    """

    observation_id: int
    status: ObservationStatus
    reason: str | None
    original_name: str | None


@dataclass(frozen=True)
class StatusReport:
    """Counts of observations and processing runs, and the failures.

    Attributes
    ----------
    observations : dict of ObservationStatus to int
        Observations per status (every status, zero included).
    runs : dict of (str, RunStatus) to int
        Processing runs per stage and outcome.
    failures : list of FailureRecord
        Failed and rejected observations, oldest first.
    """

    observations: dict[ObservationStatus, int]
    runs: dict[tuple[str, RunStatus], int]
    failures: list[FailureRecord]

    @property
    def n_observations(self) -> int:
        """All observations."""
        return sum(self.observations.values())


def status_report(session: Session, *, limit_failures: int | None = None) -> StatusReport:
    """Observations per status, runs per stage and outcome, and the failures."""
    counts = dict.fromkeys(ObservationStatus, 0)
    for status, n in session.execute(
        select(Observation.status, func.count()).group_by(Observation.status)
    ):
        counts[ObservationStatus(status)] = int(n)
    runs: dict[tuple[str, RunStatus], int] = {}
    for stage, status, n in session.execute(
        select(ProcessingRun.stage, ProcessingRun.status, func.count()).group_by(
            ProcessingRun.stage, ProcessingRun.status
        )
    ):
        runs[(str(stage), RunStatus(status))] = int(n)
    query = (
        select(Observation)
        .where(Observation.status.in_([ObservationStatus.FAILED, ObservationStatus.REJECTED]))
        .order_by(Observation.id)
    )
    if limit_failures is not None:
        query = query.limit(limit_failures)
    failures = [
        FailureRecord(o.id, o.status, o.failure_reason, o.original_name)
        for o in session.scalars(query)
    ]
    return StatusReport(observations=counts, runs=runs, failures=failures)


def observation_ids(session: Session, statuses: Sequence[ObservationStatus]) -> list[int]:
    """Ids of observations in any of ``statuses``, by time then id."""
    query = (
        select(Observation.id)
        .where(Observation.status.in_(list(statuses)))
        .order_by(Observation.mjd, Observation.id)
    )
    return [int(i) for i in session.scalars(query)]


def stage_durations(session: Session) -> dict[str, tuple[int, float]]:
    """Per stage: number of finished runs and their summed duration in seconds.

    Durations are wall-clock times of each run (start to commit); with several worker
    processes their sum exceeds the elapsed time.
    """
    totals: dict[str, tuple[int, float]] = {}
    query = select(ProcessingRun.stage, ProcessingRun.started_at, ProcessingRun.finished_at).where(
        ProcessingRun.started_at.is_not(None), ProcessingRun.finished_at.is_not(None)
    )
    for stage, started, finished in session.execute(query.execution_options(yield_per=5000)):
        n, seconds = totals.get(stage, (0, 0.0))
        totals[stage] = (n + 1, seconds + (finished - started).total_seconds())
    return totals


#: Status an observation returns to when retried, by the last stage that succeeded.
_RESUME_STATUS = {
    "ingest": ObservationStatus.REGISTERED,
    "calibrate": ObservationStatus.CALIBRATED,
    "characterize": ObservationStatus.CHARACTERIZED,
    "subtract": ObservationStatus.SUBTRACTED,
}


def reset_failed(session: Session) -> list[int]:
    """Make failed observations pending again, from the stage that failed (no commit).

    Each ``failed`` observation returns to the status its last succeeded stage gave it,
    so the runner retries the stage that failed (after a code fix, a config change, a
    missing reference now available). The failed runs stay as history. Observations
    whose headers could not be read at ingest, and those the quality gate rejected, are
    left as they are.

    Returns
    -------
    list of int
        Ids of the observations made pending again.
    """
    failed = session.scalars(
        select(Observation).where(Observation.status == ObservationStatus.FAILED)
    ).all()
    reset = []
    for observation in failed:
        stages = set(
            session.scalars(
                select(ProcessingRun.stage).where(
                    ProcessingRun.observation_id == observation.id,
                    ProcessingRun.status == RunStatus.SUCCEEDED,
                )
            )
        )
        last = [stage for stage in _RESUME_STATUS if stage in stages]
        if not last:
            continue
        if transition(
            session,
            observation.id,
            (ObservationStatus.FAILED,),
            _RESUME_STATUS[last[-1]],
            failure_reason=None,
        ):
            reset.append(observation.id)
    return reset
