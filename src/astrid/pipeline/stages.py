"""The runner's stages: load inputs, run the science, store outputs, commit once.

Per observation, in order (each a ``ProcessingRun`` row):

``ingest``
    (:mod:`astrid.services.observations`) register the file.
``calibrate``
    raw file -> :func:`~astrid.science.calibrate.calibrate_exposure` -> calibrated
    exposure in the artifact store; status ``calibrated``.
``characterize``
    background, PSF, depth and the quality gate (:func:`~astrid.pipeline.characterize.
    characterize`) on the calibrated exposure *as stored*; status ``characterized``, or
    ``rejected`` with the gate's reasons.
``subtract``
    align the field's reference onto the observation, subtract it, detect and measure
    candidates (:func:`~astrid.pipeline.difference.difference_pair`); difference, score
    image and cutouts to the artifact store, then the difference image, candidates and
    cutouts in the database; status ``subtracted``. The reference epoch itself is not
    subtracted from itself: its run records that role.
``score``
    real/bogus probabilities from an injected :class:`~astrid.pipeline.config.
    CandidateScorer`; without one, the run records that nothing was scored and no score
    rows are written (never an invented score); status ``processed``.

And per field and band, or over everything:

``reference``
    choose the reference epoch among a field's characterised epochs
    (:func:`~astrid.science.reference.choose_reference`) and record it as a
    ``ReferenceImage``.
``associate``
    group candidates across epochs into objects (:mod:`astrid.services.objects`).

Crash safety. Outputs go to the content-addressed artifact store first (writing the
same bytes again is a no-op), then one database transaction records everything the
stage produced together with its succeeded run row and the observation's new status. A
process killed at any point therefore leaves either the whole stage or none of it in
the database, plus at most some unreferenced files. The status update is a
compare-and-set: if the observation has already moved on (another process did the
stage), the transaction is rolled back and the work discarded, so nothing is recorded
twice.

Failures. A typed error (:class:`~astrid.errors.AstridError`) raised by a stage's
science marks the observation ``failed`` with the stage, error type and message, in one
transaction with a failed run row; the runner goes on with the other observations.
Other exceptions are recorded the same way with their traceback in the run's
provenance (a bug must not stop a night's processing), except database errors, which
stop the run.
"""

from __future__ import annotations

import math
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from astrid import __version__
from astrid.errors import AstridError, CorruptFitsFile
from astrid.events import CandidateCreated, Event, ObservationFailed, ObservationProcessed
from astrid.exposure import Exposure, MaskBit
from astrid.io.fits import read_exposure, write_exposure
from astrid.pipeline.characterize import characterize
from astrid.pipeline.config import CandidateScorer, PipelineConfig
from astrid.pipeline.difference import DifferenceResult, difference_pair, write_difference
from astrid.science.calibrate import calibrate_exposure
from astrid.science.reference import EpochSummary, choose_reference
from astrid.services.candidates import (
    TRIPLET_KINDS,
    DifferenceRecord,
    candidate_triplets,
    insert_difference,
    insert_scores,
    measurable,
    stamp_bytes,
)
from astrid.services.objects import AssociationConflict, AssociationOutcome, associate_candidates
from astrid.services.observations import transition, worker_name
from astrid.services.provenance import code_provenance, idempotency_key, jsonable
from astrid.store.artifacts import ArtifactStore, parse_artifact_key
from astrid.store.models import (
    Candidate,
    DifferenceImage,
    Observation,
    ObservationStatus,
    ProcessingRun,
    ReferenceImage,
    RunStatus,
    SkyField,
)
from astrid.store.types import utcnow

__all__ = [
    "ASSOCIATE",
    "CALIBRATE",
    "CHARACTERIZE",
    "INGEST",
    "REFERENCE",
    "SCORE",
    "STAGES",
    "SUBTRACT",
    "NoReference",
    "ReferenceOutcome",
    "StageContext",
    "TaskResult",
    "associate",
    "choose_references",
    "difference_observation",
    "prepare_observation",
]

INGEST = "ingest"
CALIBRATE = "calibrate"
CHARACTERIZE = "characterize"
REFERENCE = "reference"
SUBTRACT = "subtract"
SCORE = "score"
ASSOCIATE = "associate"
#: Every stage, in pipeline order.
STAGES = (INGEST, CALIBRATE, CHARACTERIZE, REFERENCE, SUBTRACT, SCORE, ASSOCIATE)

S = ObservationStatus
T = TypeVar("T")

#: Attempts at a transaction that SQLite refuses because another process holds the lock.
_LOCK_RETRIES = 20


class NoReference(AstridError):
    """An observation has no reference to be subtracted from.

    Parameters
    ----------
    reason : str
        Why (no celestial WCS so no field, no band, or no epoch of the field passed the
        quality gate).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"no reference image: {reason}")


class _AlreadyDone(Exception):
    """The observation moved on while this stage ran: roll back and discard the work."""


@dataclass
class StageContext:
    """What a stage needs: database, artifact store, configuration, optional scorer.

    Attributes
    ----------
    sessions : sessionmaker
        Session factory of the database (one per process).
    store : ArtifactStore
        The artifact store.
    config : PipelineConfig
        Stage options.
    scorer : CandidateScorer or None
        Real/bogus model; ``None`` records that nothing was scored.
    fft_threads : int or None
        Threads for the subtraction's FFTs, an execution detail kept out of the
        recorded configuration (``None``: as the configuration says).
    worker : str
        ``host:pid`` recorded with each run.
    """

    sessions: sessionmaker[Session]
    store: ArtifactStore
    config: PipelineConfig
    scorer: CandidateScorer | None = None
    fft_threads: int | None = None
    worker: str = field(default_factory=worker_name)


@dataclass
class TaskResult:
    """What one task (a few stages of one observation) did, for the runner.

    Attributes
    ----------
    observation_id : int
        The observation.
    status : ObservationStatus or None
        Its status afterwards (``None`` if it vanished).
    events : list of Event
        Domain events to publish, in order (after the commits that made them true).
    timings : dict of str to dict of str to float
        Elapsed seconds per stage and part (``load``, ``compute``, ``store``, ``commit``).
    cpu_timings : dict of str to dict of str to float
        CPU seconds of this process (all its threads) per stage and part: unlike
        elapsed time, not inflated when other programs compete for the cores.
    n_candidates : int
        Candidates stored by this task.
    """

    observation_id: int
    status: ObservationStatus | None = None
    events: list[Event] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_timings: dict[str, dict[str, float]] = field(default_factory=dict)
    n_candidates: int = 0

    @contextmanager
    def timing(self, stage: str, part: str) -> Iterator[None]:
        """Add the elapsed and CPU time spent in the block to ``stage``'s ``part``."""
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            for table, spent in (
                (self.timings, time.perf_counter() - start),
                (self.cpu_timings, time.process_time() - cpu_start),
            ):
                parts = table.setdefault(stage, {})
                parts[part] = parts.get(part, 0.0) + spent


@dataclass
class _Snapshot:
    """The columns of an observation the stages need, read in a short transaction."""

    id: int
    sha256: str
    status: ObservationStatus
    artifact_key: str
    calibrated_artifact_key: str | None
    field_id: int | None
    band: str | None
    mjd: float | None
    has_wcs: bool


# --------------------------------------------------------------------------- helpers


def _is_lock_error(error: OperationalError) -> bool:
    text = str(getattr(error, "orig", error)).lower()
    return "locked" in text or "busy" in text


def _write(ctx: StageContext, work: Callable[[Session], T]) -> T | None:
    """Run ``work`` in one transaction; ``None`` if it raised :class:`_AlreadyDone`.

    A SQLite "database is locked" refusal (another process writing) is retried.
    """
    for attempt in range(_LOCK_RETRIES):
        try:
            with ctx.sessions() as session, session.begin():
                return work(session)
        except _AlreadyDone:
            return None
        except OperationalError as error:
            if not _is_lock_error(error) or attempt == _LOCK_RETRIES - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


def _snapshot(ctx: StageContext, observation_id: int) -> _Snapshot | None:
    with ctx.sessions() as session:
        o = session.get(Observation, observation_id)
        if o is None:
            return None
        return _Snapshot(
            id=o.id,
            sha256=o.sha256,
            status=ObservationStatus(o.status),
            artifact_key=o.artifact_key,
            calibrated_artifact_key=o.calibrated_artifact_key,
            field_id=o.field_id,
            band=o.band,
            mjd=o.mjd,
            has_wcs=o.ra is not None,
        )


def _run_row(
    ctx: StageContext,
    stage: str,
    *,
    observation_id: int | None,
    key: str,
    config: Any,
    provenance: dict[str, Any],
    started: Any,
    error: BaseException | None = None,
    error_provenance: dict[str, Any] | None = None,
) -> ProcessingRun:
    code = code_provenance()
    run = ProcessingRun(
        stage=stage,
        status=RunStatus.SUCCEEDED if error is None else RunStatus.FAILED,
        observation_id=observation_id,
        idempotency_key=key,
        config=jsonable(config),
        provenance=jsonable({**provenance, **(error_provenance or {}), **code}),
        code_version=__version__,
        worker=ctx.worker[:255],
        started_at=started,
        finished_at=utcnow(),
    )
    if error is not None:
        run.error_type = type(error).__name__[:128]
        run.error_message = str(error)
    return run


@contextmanager
def _warnings_into(sink: list[str]) -> Iterator[None]:
    """Collect the warnings raised in the block (data-quality notes for the provenance)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen: dict[str, None] = {}
    for w in caught:
        seen.setdefault(f"{w.category.__name__}: {w.message}", None)
    sink.extend(seen)


@dataclass
class _StageRun:
    """One stage of one observation: what its run row records and how the stage ends.

    A stage builds one when it starts, runs its science, then ends with :meth:`commit`
    (its outputs, its succeeded run row and the observation's new status, in one
    transaction) or :meth:`fail`.

    Attributes
    ----------
    ctx : StageContext
        Database, store, configuration.
    snapshot : _Snapshot
        The observation; its status follows each commit.
    result : TaskResult
        The task's status, events and timings.
    stage : str
        The stage.
    expected : tuple of ObservationStatus
        The statuses the observation must still be in for the stage to move it on.
    config : Any
        The stage's configuration, as recorded.
    inputs : dict of str to Any or None
        The stage's input artifacts: the provenance starts as ``{"inputs": inputs,
        "warnings": notes}``; ``None``, it starts empty.
    key : str
        The run's idempotency key (default: from the stage and the observation's
        SHA-256).
    notes : list of str
        Warnings collected while the stage runs (in the provenance when ``inputs`` is
        given).
    provenance : dict of str to Any
        The run's provenance, filled in as the stage goes.
    started : datetime
        When the stage started.
    """

    ctx: StageContext
    snapshot: _Snapshot
    result: TaskResult
    stage: str
    expected: tuple[ObservationStatus, ...]
    config: Any
    inputs: dict[str, Any] | None = None
    key: str = ""
    notes: list[str] = field(init=False, default_factory=list)
    provenance: dict[str, Any] = field(init=False, default_factory=dict)
    started: Any = field(init=False, default_factory=utcnow)

    def __post_init__(self) -> None:
        self.key = self.key or idempotency_key(self.stage, self.snapshot.sha256)
        if self.inputs is not None:
            self.provenance.update(inputs=self.inputs, warnings=self.notes)

    @overload
    def commit(
        self,
        status: ObservationStatus,
        *,
        error: BaseException | None = ...,
        error_provenance: dict[str, Any] | None = ...,
        **values: Any,
    ) -> bool: ...

    @overload
    def commit(
        self,
        status: ObservationStatus,
        then: Callable[[Session, ProcessingRun], T],
        *,
        error: BaseException | None = ...,
        error_provenance: dict[str, Any] | None = ...,
        **values: Any,
    ) -> T | None: ...

    def commit(
        self,
        status: ObservationStatus,
        then: Callable[[Session, ProcessingRun], Any] | None = None,
        *,
        error: BaseException | None = None,
        error_provenance: dict[str, Any] | None = None,
        **values: Any,
    ) -> Any:
        """Move the observation to ``status`` and record the run, in one transaction.

        Parameters
        ----------
        status : ObservationStatus
            The new status, set only if the observation is still in ``expected``.
        then : callable, optional
            ``then(session, run)`` writes the stage's outputs once the run row is
            flushed (so it has an id), in the same transaction.
        error : BaseException, optional
            The error of a failed run.
        error_provenance : dict of str to Any, optional
            Added to a failed run's provenance.
        **values
            Other columns of the observation to set with its status.

        Returns
        -------
        bool or object or None
            Without ``then``, whether it was committed; with it, what ``then``
            returned, or ``None`` when the observation had moved on and nothing was
            recorded.
        """

        def work(session: Session) -> Any:
            if not transition(session, self.snapshot.id, self.expected, status, **values):
                raise _AlreadyDone
            run = _run_row(
                self.ctx,
                self.stage,
                observation_id=self.snapshot.id,
                key=self.key,
                config=self.config,
                provenance=self.provenance,
                started=self.started,
                error=error,
                error_provenance=error_provenance,
            )
            session.add(run)
            if then is None:
                return True
            session.flush()
            return then(session, run)

        with self.result.timing(self.stage, "commit"):
            done = _write(self.ctx, work)
        if done is None:
            return None if then is not None else False
        self.snapshot.status = self.result.status = status
        return done

    def fail(self, error: BaseException) -> None:
        """Record a failed stage: failed run row and failed observation, one transaction.

        Errors that must stop the run (see :func:`_guard`) are re-raised instead.
        """
        _guard(error)
        reason = f"{self.stage}: {type(error).__name__}: {error}"
        extra: dict[str, Any] = {}
        if not isinstance(error, AstridError):
            extra = {"unexpected": True, "traceback": traceback.format_exception(error)[-12:]}
        if self.commit(S.FAILED, error=error, error_provenance=extra, failure_reason=reason):
            self.emit_failed(S.FAILED, type(error).__name__, str(error))

    def emit_failed(self, status: ObservationStatus, error_type: str, reason: str) -> None:
        """Add an :class:`~astrid.events.ObservationFailed` event for this stage."""
        self.result.events.append(
            ObservationFailed(
                observation_id=self.snapshot.id,
                stage=self.stage,
                status=status.value,
                error_type=error_type,
                reason=reason,
            )
        )


def _guard(error: BaseException) -> None:
    """Re-raise what must stop the run instead of failing one observation."""
    if isinstance(error, SQLAlchemyError | MemoryError | KeyboardInterrupt | SystemExit):
        raise error


# --------------------------------------------------------------------------- prepare


def prepare_observation(ctx: StageContext, observation_id: int) -> TaskResult:
    """Run ``calibrate`` and ``characterize`` on one observation, where still pending.

    Returns
    -------
    TaskResult
        Status, events and timings.
    """
    result = TaskResult(observation_id)
    snapshot = _snapshot(ctx, observation_id)
    if snapshot is None:
        return result
    result.status = snapshot.status
    exposure: Exposure | None = None
    if snapshot.status == S.REGISTERED:
        exposure = _calibrate(ctx, snapshot, result)
        if exposure is None:
            return result
    if snapshot.status == S.CALIBRATED:
        _characterize(ctx, snapshot, exposure, result)
    return result


def _calibrate(ctx: StageContext, snapshot: _Snapshot, result: TaskResult) -> Exposure | None:
    config = ctx.config.calibration
    run = _StageRun(
        ctx, snapshot, result, CALIBRATE, (S.REGISTERED,), config, {"raw": snapshot.artifact_key}
    )
    provenance = run.provenance
    try:
        with result.timing(CALIBRATE, "load"):
            raw = _read_artifact(ctx.store, snapshot.artifact_key)
        with result.timing(CALIBRATE, "compute"), _warnings_into(run.notes):
            calibrated = calibrate_exposure(raw, config=config)
    except Exception as error:
        run.fail(error)
        return None
    with result.timing(CALIBRATE, "store"), tempfile.TemporaryDirectory(prefix="astrid-") as tmp:
        path = write_exposure(calibrated, Path(tmp) / "calibrated.fits")
        stored_key = ctx.store.put_file(path)
        # The next stage starts from exactly what is stored, as it would after a restart.
        stored = read_exposure(path)
    provenance["outputs"] = {"calibrated": stored_key}
    provenance["steps"] = calibrated.provenance.get("calibrate", "")
    if not run.commit(S.CALIBRATED, calibrated_artifact_key=stored_key):
        return None
    snapshot.calibrated_artifact_key = stored_key
    return stored


def _read_artifact(store: ArtifactStore, key: str) -> Exposure:
    """Read an exposure from the store; errors name the key, not a local path."""
    with store.local_path(key) as path:
        try:
            return read_exposure(path)
        except CorruptFitsFile as error:
            raise CorruptFitsFile(key, error.reason) from error


def _read_calibrated(ctx: StageContext, snapshot: _Snapshot) -> Exposure:
    assert snapshot.calibrated_artifact_key is not None
    return _read_artifact(ctx.store, snapshot.calibrated_artifact_key)


def _characterize(
    ctx: StageContext, snapshot: _Snapshot, exposure: Exposure | None, result: TaskResult
) -> None:
    config = ctx.config.characterize
    inputs = {"calibrated": snapshot.calibrated_artifact_key}
    run = _StageRun(ctx, snapshot, result, CHARACTERIZE, (S.CALIBRATED,), config, inputs)
    try:
        if exposure is None:
            with result.timing(CHARACTERIZE, "load"):
                exposure = _read_calibrated(ctx, snapshot)
        with result.timing(CHARACTERIZE, "compute"), _warnings_into(run.notes):
            measured = characterize(exposure, config=config)
    except Exception as error:
        run.fail(error)
        return
    report = measured.quality
    quality = {**report.as_dict(), "n_sources": len(measured.sources)}
    run.provenance["passed"] = report.passed
    passed = report.passed
    new_status = S.CHARACTERIZED if passed else S.REJECTED
    reason = None if passed else "characterize: quality gate: " + "; ".join(report.reasons)
    values: dict[str, Any] = {
        "quality": jsonable(quality),
        "seeing_fwhm_arcsec": jsonable(report.fwhm_arcsec),
        "limiting_magnitude": None
        if report.limiting_mag_is_instrumental
        else jsonable(report.limiting_mag),
        "failure_reason": reason,
    }
    if run.commit(new_status, **values) and not passed:
        run.emit_failed(S.REJECTED, "QualityGateRejected", "; ".join(report.reasons))


# --------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class ReferenceOutcome:
    """A reference chosen for one field and band.

    Attributes
    ----------
    field_id : int
        The field.
    band : str
        The band.
    reference_id : int or None
        The new ``ReferenceImage`` (``None`` if another process chose one meanwhile).
    observation_id : int
        The epoch chosen.
    reason : str
        The selection rule's outcome, with its numbers.
    """

    field_id: int
    band: str
    reference_id: int | None
    observation_id: int
    reason: str


def _depths(observations: Sequence[Observation]) -> tuple[list[float], str]:
    """Comparable depths: calibrated limiting magnitudes, else exposure-time scaled."""
    quality = [o.quality or {} for o in observations]
    if all(not q.get("limiting_mag_is_instrumental", True) for q in quality):
        return [float(q.get("limiting_mag") or -math.inf) for q in quality], "zero point"
    depths = []
    for o, q in zip(observations, quality, strict=True):
        flux = q.get("limiting_flux")
        exptime = o.exposure_time or 1.0
        depths.append(-2.5 * math.log10(flux / exptime) if flux and flux > 0 else -math.inf)
    return depths, "instrumental, per second of exposure"


def choose_references(ctx: StageContext) -> list[ReferenceOutcome]:
    """Choose and record a reference for every field and band that has none yet.

    The candidates are the field's epochs that passed the quality gate
    (``characterized``); the rule is :func:`~astrid.science.reference.choose_reference`
    (deepest among the sharpest). The reference is that epoch's calibrated exposure.

    Returns
    -------
    list of ReferenceOutcome
        One per reference recorded, by field and band.
    """
    with ctx.sessions() as session:
        pending = session.execute(
            select(Observation.field_id, Observation.band)
            .where(
                Observation.status == S.CHARACTERIZED,
                Observation.field_id.is_not(None),
                Observation.band.is_not(None),
            )
            .distinct()
            .order_by(Observation.field_id, Observation.band)
        ).all()
    outcomes = []
    for field_id, band in pending:
        outcome = _choose_reference(ctx, int(field_id), str(band))
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def _active_reference(session: Session, field_id: int, band: str) -> ReferenceImage | None:
    return session.scalars(
        select(ReferenceImage)
        .where(
            ReferenceImage.field_id == field_id,
            ReferenceImage.band == band,
            ReferenceImage.is_active.is_(True),
        )
        .order_by(ReferenceImage.id.desc())
    ).first()


def _choose_reference(ctx: StageContext, field_id: int, band: str) -> ReferenceOutcome | None:
    started = utcnow()
    config = ctx.config.reference
    with ctx.sessions() as session:
        if _active_reference(session, field_id, band) is not None:
            return None
        field_row = session.get(SkyField, field_id)
        field_name = field_row.name if field_row is not None else str(field_id)
        epochs = list(
            session.scalars(
                select(Observation)
                .where(
                    Observation.field_id == field_id,
                    Observation.band == band,
                    Observation.status == S.CHARACTERIZED,
                )
                .order_by(Observation.sha256)
            )
        )
    depths, depth_scale = _depths(epochs)
    summaries = [
        EpochSummary(
            key=o.sha256,
            fwhm_pix=float((o.quality or {}).get("fwhm_pix") or math.nan),
            limiting_mag=depth,
            passed=True,
        )
        for o, depth in zip(epochs, depths, strict=True)
    ]
    try:
        choice = choose_reference(summaries, config=config)
    except AstridError as error:
        failed = _run_row(
            ctx,
            REFERENCE,
            observation_id=None,
            key=idempotency_key(REFERENCE, field_name, band),
            config=config,
            provenance={"field": field_name, "band": band},
            started=started,
            error=error,
        )
        _write(ctx, lambda session: session.add(failed))
        return None
    chosen = next(o for o in epochs if o.sha256 == choice.keys[0])
    assert chosen.calibrated_artifact_key is not None and chosen.ra is not None
    assert chosen.dec is not None
    sha, _ = parse_artifact_key(chosen.calibrated_artifact_key)
    provenance = {
        "field": field_name,
        "band": band,
        "observation_sha256": chosen.sha256,
        "reason": choice.reason,
        "ranking": list(choice.ranking),
        "depth_scale": depth_scale,
        "inputs": {"calibrated": chosen.calibrated_artifact_key},
    }
    key = idempotency_key(REFERENCE, field_name, band)

    def work(session: Session) -> int:
        reference = ReferenceImage(
            field_id=field_id,
            band=band,
            sha256=sha,
            artifact_key=chosen.calibrated_artifact_key,
            source="observation",
            ra=chosen.ra,
            dec=chosen.dec,
            n_combined=1,
            mjd_start=chosen.mjd,
            mjd_end=None
            if chosen.mjd is None
            else chosen.mjd + (chosen.exposure_time or 0.0) / 86400.0,
            seeing_fwhm_arcsec=chosen.seeing_fwhm_arcsec,
            limiting_magnitude=chosen.limiting_magnitude,
            is_active=True,
            provenance=jsonable({**provenance, **code_provenance()}),
        )
        session.add(reference)
        session.flush()
        session.add(
            _run_row(
                ctx,
                REFERENCE,
                observation_id=None,
                key=key,
                config=config,
                provenance={**provenance, "outputs": {"reference_sha256": sha}},
                started=started,
            )
        )
        return int(reference.id)

    try:
        reference_id = _write(ctx, work)
    except IntegrityError:
        reference_id = None  # the same epoch was recorded as reference concurrently
    return ReferenceOutcome(field_id, band, reference_id, chosen.id, choice.reason)


# --------------------------------------------------------------------------- difference


def _scored(ctx: StageContext, snapshot: _Snapshot) -> bool:
    """Whether a succeeded score run exists for this observation and the current model."""
    key = _score_key(ctx, snapshot)
    with ctx.sessions() as session:
        found = session.scalar(
            select(ProcessingRun.id).where(
                ProcessingRun.idempotency_key == key,
                ProcessingRun.status == RunStatus.SUCCEEDED,
            )
        )
    return found is not None


def _score_key(ctx: StageContext, snapshot: _Snapshot) -> str:
    scorer = ctx.scorer
    model = None if scorer is None else [scorer.model_name, scorer.model_version]
    return idempotency_key(SCORE, snapshot.sha256, model)


def difference_observation(ctx: StageContext, observation_id: int) -> TaskResult:
    """Run ``subtract`` and ``score`` on one observation, where still pending.

    Returns
    -------
    TaskResult
        Status, events (candidates created, then the observation processed or failed)
        and timings.
    """
    result = TaskResult(observation_id)
    snapshot = _snapshot(ctx, observation_id)
    if snapshot is None:
        return result
    result.status = snapshot.status
    triplets: dict[int, NDArray[np.float32]] | None = None
    is_reference = False
    if snapshot.status == S.CHARACTERIZED:
        done = _subtract(ctx, snapshot, result)
        if done is None:
            return result
        triplets, is_reference = done
    needs_score = snapshot.status == S.SUBTRACTED or (
        snapshot.status == S.PROCESSED and ctx.scorer is not None and not _scored(ctx, snapshot)
    )
    if needs_score:
        _score(ctx, snapshot, triplets, is_reference, result)
    return result


def _subtract(
    ctx: StageContext, snapshot: _Snapshot, result: TaskResult
) -> tuple[dict[int, NDArray[np.float32]], bool] | None:
    config = ctx.config.difference
    inputs = {"calibrated": snapshot.calibrated_artifact_key}
    run = _StageRun(ctx, snapshot, result, SUBTRACT, (S.CHARACTERIZED,), config, inputs)
    provenance = run.provenance
    with ctx.sessions() as session:
        reference = (
            _active_reference(session, snapshot.field_id, snapshot.band)
            if snapshot.field_id is not None and snapshot.band is not None
            else None
        )
    if reference is None:
        if not snapshot.has_wcs:
            reason = "the image has no celestial WCS, so no field"
        elif snapshot.band is None:
            reason = "the image's band is unknown"
        else:
            reason = f"no epoch of field {snapshot.field_id} band {snapshot.band} passed the gate"
        run.fail(NoReference(reason))
        return None
    assert snapshot.calibrated_artifact_key is not None
    inputs["reference"] = reference.artifact_key
    run.key = idempotency_key(SUBTRACT, snapshot.sha256, reference.sha256, config.subtract.method)
    own_sha, _ = parse_artifact_key(snapshot.calibrated_artifact_key)
    if own_sha == reference.sha256:
        provenance["role"] = "reference"
        return ({}, True) if run.commit(S.SUBTRACTED) else None

    try:
        with result.timing(SUBTRACT, "load"):
            science = _read_calibrated(ctx, snapshot)
            reference_exposure = _read_artifact(ctx.store, reference.artifact_key)
        run_config = (
            config
            if ctx.fft_threads is None
            else ctx.config.with_fft_threads(ctx.fft_threads).difference
        )
        with result.timing(SUBTRACT, "compute"), _warnings_into(run.notes):
            difference = difference_pair(science, reference_exposure, config=run_config)
    except Exception as error:
        run.fail(error)
        return None
    with result.timing(SUBTRACT, "store"):
        record = _store_difference(ctx.store, difference)
    provenance["outputs"] = {"difference": record.difference_key, "score": record.score_key}
    reference_id = int(reference.id)

    def insert(session: Session, run_row: ProcessingRun) -> list[Candidate]:
        _, candidates = insert_difference(
            session,
            science_observation_id=snapshot.id,
            reference_id=reference_id,
            processing_run_id=run_row.id,
            mjd=snapshot.mjd,
            band=snapshot.band,
            record=record,
        )
        return candidates

    candidates = run.commit(S.SUBTRACTED, insert)
    if candidates is None:
        return None
    result.n_candidates = len(candidates)
    triplets: dict[int, NDArray[np.float32]] = {}
    cutouts = difference.cutouts
    for candidate in candidates:
        row = candidate.detection_index
        triplets[candidate.id] = np.stack(
            [cutouts.science[row], cutouts.reference[row], cutouts.difference[row]]
        )
        result.events.append(
            CandidateCreated(
                candidate_id=candidate.id,
                observation_id=snapshot.id,
                ra=candidate.ra,
                dec=candidate.dec,
                mag=candidate.mag,
                snr=candidate.snr,
                is_negative=candidate.is_negative,
            )
        )
    return triplets, False


def _footprint_flags(mask: NDArray[np.uint16], x: float, y: float, half: int) -> int:
    ny, nx = mask.shape
    cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
    window = mask[
        max(0, cy - half) : min(ny, cy + half + 1), max(0, cx - half) : min(nx, cx + half + 1)
    ]
    return int(np.bitwise_or.reduce(window, axis=None)) if window.size else 0


def _store_difference(store: ArtifactStore, result: DifferenceResult) -> DifferenceRecord:
    """Write a difference's files to the artifact store and describe them for the database."""
    with tempfile.TemporaryDirectory(prefix="astrid-") as folder:
        paths = write_difference(result, Path(folder))
        difference_key = store.put_file(paths["difference"])
        score_key = store.put_file(paths["score"])
    table = result.candidates
    rows = tuple(int(i) for i in np.flatnonzero(measurable(table)))
    cubes = {
        TRIPLET_KINDS[0]: result.cutouts.science,
        TRIPLET_KINDS[1]: result.cutouts.reference,
        TRIPLET_KINDS[2]: result.cutouts.difference,
    }
    mask = result.science.exposure.mask
    half = max(2, math.ceil(float(result.subtraction.psf.fwhm)))
    keys, flags = [], []
    for row in rows:
        x = float(np.asarray(table["x"][row].value))
        y = float(np.asarray(table["y"][row].value))
        flag = _footprint_flags(mask, x, y, half)
        if bool(table["is_edge"][row]):
            flag |= int(MaskBit.EDGE)
        flags.append(flag)
        keys.append(
            {
                kind: store.put_bytes(stamp_bytes(cubes[kind][row], kind, x, y), ".fits")
                for kind in TRIPLET_KINDS
            }
        )
    sub = result.subtraction
    metrics: dict[str, Any] = {
        "flux_ratio": sub.flux_scale.flux_ratio,
        "background_offset": sub.flux_scale.background_offset,
        "flux_conversion": sub.flux_conversion,
        "score_std": sub.quality.score_std,
        "residual_ratio_mean": sub.quality.residual_ratio_mean,
        "residual_ratio_std": sub.quality.residual_ratio_std,
        "gate_stars": sub.quality.n_stars,
        "gate_passed": sub.quality.passed,
        "difference_psf_fwhm_pix": sub.psf.fwhm,
        "details": dict(sub.details),
    }
    if result.alignment is not None:
        metrics["alignment"] = {
            "method": result.alignment.method,
            "n_matched": result.alignment.n_matched,
            "rms_pix": result.alignment.rms_pix,
            "overlap_fraction": result.alignment.overlap_fraction,
        }
    return DifferenceRecord(
        method=sub.method,
        difference_key=difference_key,
        score_key=score_key,
        metrics=jsonable(metrics),
        detections=table,
        rows=rows,
        flags=tuple(flags),
        cutout_keys=tuple(keys),
        cutout_size=int(result.cutouts.size),
    )


def _score(
    ctx: StageContext,
    snapshot: _Snapshot,
    triplets: dict[int, NDArray[np.float32]] | None,
    is_reference: bool,
    result: TaskResult,
) -> None:
    scorer = ctx.scorer
    config = {"model": None if scorer is None else [scorer.model_name, scorer.model_version]}
    expected = (S.SUBTRACTED, S.PROCESSED)
    run = _StageRun(ctx, snapshot, result, SCORE, expected, config, key=_score_key(ctx, snapshot))
    provenance = run.provenance
    with ctx.sessions() as session:
        ids = [
            int(i)
            for i in session.scalars(
                select(Candidate.id)
                .join(DifferenceImage, Candidate.difference_id == DifferenceImage.id)
                .where(DifferenceImage.science_observation_id == snapshot.id)
                .order_by(DifferenceImage.id, Candidate.detection_index)
            )
        ]
        if not is_reference and snapshot.field_id is not None and snapshot.band is not None:
            reference = _active_reference(session, snapshot.field_id, snapshot.band)
            is_reference = (
                reference is not None
                and snapshot.calibrated_artifact_key is not None
                and parse_artifact_key(snapshot.calibrated_artifact_key)[0] == reference.sha256
            )
    scores: NDArray[np.float64] | None = None
    if scorer is None:
        provenance.update(
            scored=False,
            reason="no real/bogus model is configured: no score was computed or stored",
            n_candidates=len(ids),
        )
    else:
        provenance.update(scored=True, model=config["model"], n_candidates=len(ids))
        try:
            with result.timing(SCORE, "load"):
                if triplets is not None and all(i in triplets for i in ids):
                    stack = (
                        np.stack([triplets[i] for i in ids]).astype(np.float32)
                        if ids
                        else np.zeros((0, 3, 1, 1), np.float32)
                    )
                else:
                    with ctx.sessions() as session:
                        stack = candidate_triplets(session, ctx.store, ids)
            with result.timing(SCORE, "compute"):
                scores = (
                    np.asarray(scorer.score(stack), np.float64) if ids else np.zeros(0, np.float64)
                )
        except Exception as error:
            run.fail(error)
            return

    def insert(session: Session, run_row: ProcessingRun) -> bool:
        if scorer is not None and scores is not None and ids:
            insert_scores(
                session,
                ids,
                scores,
                model_name=scorer.model_name,
                model_version=scorer.model_version,
                processing_run_id=run_row.id,
            )
        return True

    try:
        if run.commit(S.PROCESSED, insert) is None:
            return
    except IntegrityError:
        return  # scored by this model concurrently
    result.events.append(
        ObservationProcessed(
            observation_id=snapshot.id, n_candidates=len(ids), is_reference=bool(is_reference)
        )
    )


# --------------------------------------------------------------------------- associate


def associate(ctx: StageContext) -> AssociationOutcome:
    """Associate every unassociated candidate into objects and record the run.

    Returns
    -------
    AssociationOutcome
        What was done (zero counts when every candidate was associated already, in
        which case no run is recorded).
    """
    started = utcnow()
    radius = ctx.config.association_radius_arcsec
    config = {"radius_arcsec": radius}

    def work(session: Session) -> AssociationOutcome:
        outcome = associate_candidates(session, radius_arcsec=radius)
        if outcome.n_candidates:
            session.add(
                _run_row(
                    ctx,
                    ASSOCIATE,
                    observation_id=None,
                    key=idempotency_key(ASSOCIATE, [list(k) for k in outcome.candidate_keys]),
                    config=config,
                    provenance={
                        "n_candidates": outcome.n_candidates,
                        "n_new_objects": outcome.n_new_objects,
                        "n_updated_objects": outcome.n_updated_objects,
                    },
                    started=started,
                )
            )
        return outcome

    for attempt in range(3):
        try:
            outcome = _write(ctx, work)
            assert outcome is not None
            return outcome
        except AssociationConflict:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
