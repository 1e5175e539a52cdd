"""The resumable pipeline runner: every pending stage of every observation, in parallel.

The plan is read from the database each time the runner starts, so a run that was
interrupted (even by SIGKILL) is resumed simply by running again:

1. **prepare** -- ``calibrate`` and ``characterize`` every observation still
   ``registered`` or ``calibrated``;
2. **reference** -- choose a reference for every field and band that has none;
3. **difference** -- ``subtract`` and ``score`` every observation still
   ``characterized`` or ``subtracted`` (and, when a scorer is given, those processed
   but not yet scored by it);
4. **associate** -- group the new candidates into objects.

Phases 1 and 3 spread observations over a process pool (``workers`` processes started
with ``spawn``; each opens its own database engine and artifact store from their URLs,
since engines cannot be sent between processes); ``workers=1`` runs everything in this
process. Each stage commits on its own (see :mod:`astrid.pipeline.stages` for the crash
safety and failure rules), a stage already recorded as succeeded is never repeated, and
a failed observation is recorded with its reason while the others go on.

Domain events (:mod:`astrid.events`) are published on the bus passed in, from this
process, after the transactions that made them true: for each observation, its
``CandidateCreated`` events come before its ``ObservationProcessed``.

Scripts that run with ``workers > 1`` must start the runner under
``if __name__ == "__main__":``: ``spawn`` workers import the main module again.

Examples
--------
>>> from astrid.pipeline.runner import PipelineRunner
>>> runner = PipelineRunner("sqlite:///astrid.db", "astrid-data/artifacts", workers=2)
>>> summary = runner.run()  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import Engine, func, make_url, select
from sqlalchemy.orm import Session, sessionmaker

from astrid.events import EventBus
from astrid.pipeline.config import CandidateScorer, PipelineConfig
from astrid.pipeline.stages import (
    SCORE,
    STAGES,
    ReferenceOutcome,
    StageContext,
    TaskResult,
    associate,
    choose_references,
    difference_observation,
    prepare_observation,
)
from astrid.services.objects import AssociationOutcome
from astrid.services.observations import observation_ids
from astrid.services.provenance import idempotency_key
from astrid.store.artifacts import artifact_store_from_url
from astrid.store.db import create_engine, create_session_factory
from astrid.store.models import Observation, ObservationStatus, ProcessingRun, RunStatus

__all__ = [
    "PHASES",
    "PipelineRunner",
    "ProgressReporter",
    "RunSummary",
    "open_engine",
    "pending_counts",
]

S = ObservationStatus

#: Phases of a run, in order, as named to progress reporters.
PHASES = ("prepare", "reference", "difference", "associate")

#: Seconds SQLite waits for another process's write lock before giving up.
_SQLITE_BUSY_TIMEOUT_S = 60.0


def open_engine(url: str) -> Engine:
    """An engine for the runner: SQLite waits up to a minute for other writers."""
    if make_url(url).get_backend_name() == "sqlite":
        return create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})
    return create_engine(url, pool_size=2, max_overflow=2)


class ProgressReporter(Protocol):
    """Receives the runner's progress (a progress bar, a log)."""

    def start(self, phase: str, total: int) -> None:
        """A phase begins with ``total`` units of work."""

    def advance(self, phase: str, done: int = 1) -> None:
        """``done`` more units of ``phase`` finished."""

    def finish(self, phase: str) -> None:
        """The phase is over."""


@dataclass
class RunSummary:
    """What one :meth:`PipelineRunner.run` did.

    Attributes
    ----------
    n_prepared : int
        Observations the prepare phase worked on.
    n_differenced : int
        Observations the difference phase worked on.
    n_processed : int
        Observations that reached ``processed`` in this run.
    n_failed : int
        Observations that failed in this run.
    n_rejected : int
        Observations the quality gate rejected in this run.
    n_candidates : int
        Candidates stored in this run.
    references : list of ReferenceOutcome
        References chosen in this run.
    association : AssociationOutcome or None
        The association of this run's candidates (``None`` if nothing to associate).
    stage_seconds : dict of str to float
        Seconds spent per stage, summed over observations (across all workers).
    stage_parts : dict of str to dict of str to float
        The same split into ``load``, ``compute``, ``store`` and ``commit``.
    stage_cpu_seconds : dict of str to float
        CPU seconds per stage, summed over observations and worker processes (robust to
        other programs competing for the cores).
    phase_seconds : dict of str to float
        Wall-clock seconds per phase.
    wall_seconds : float
        Wall-clock seconds of the whole run.
    workers : int
        Processes used.
    """

    n_prepared: int = 0
    n_differenced: int = 0
    n_processed: int = 0
    n_failed: int = 0
    n_rejected: int = 0
    n_candidates: int = 0
    references: list[ReferenceOutcome] = field(default_factory=list)
    association: AssociationOutcome | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_parts: dict[str, dict[str, float]] = field(default_factory=dict)
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    workers: int = 1

    def _add(self, result: TaskResult) -> None:
        for stage, parts in result.timings.items():
            mine = self.stage_parts.setdefault(stage, {})
            for part, seconds in parts.items():
                mine[part] = mine.get(part, 0.0) + seconds
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + sum(parts.values())
        for stage, parts in result.cpu_timings.items():
            spent = sum(parts.values())
            self.stage_cpu_seconds[stage] = self.stage_cpu_seconds.get(stage, 0.0) + spent
        self.n_candidates += result.n_candidates
        if result.status == S.FAILED:
            self.n_failed += 1
        elif result.status == S.REJECTED:
            self.n_rejected += 1
        elif result.status == S.PROCESSED:
            self.n_processed += 1

    def stage_table(self) -> list[tuple[str, float, float]]:
        """``(stage, seconds, share of the total)`` in pipeline order, stages with time only."""
        total = sum(self.stage_seconds.values()) or 1.0
        return [
            (stage, self.stage_seconds[stage], self.stage_seconds[stage] / total)
            for stage in STAGES
            if stage in self.stage_seconds
        ]


# --------------------------------------------------------------------------- workers

# The stage context of a pool worker process, set by its initializer (never at import).
_worker_context: StageContext | None = None


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this worker when the runner dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(
    database_url: str,
    artifact_url: str,
    config: PipelineConfig,
    scorer: CandidateScorer | None,
    fft_threads: int | None,
    parent_pid: int,
) -> None:
    """Pool initializer: a database engine and an artifact store of this process's own."""
    global _worker_context
    _die_with_parent(parent_pid)
    if scorer is not None and fft_threads is not None and "torch" in sys.modules:
        # A scorer built on torch: its threads share the worker's cores with the FFTs.
        sys.modules["torch"].set_num_threads(max(1, fft_threads))
    engine = open_engine(database_url)
    _worker_context = StageContext(
        sessions=create_session_factory(engine),
        store=artifact_store_from_url(artifact_url),
        config=config,
        scorer=scorer,
        fft_threads=fft_threads,
    )


def _worker_prepare(observation_id: int) -> TaskResult:
    assert _worker_context is not None, "worker not initialised"
    return prepare_observation(_worker_context, observation_id)


def _worker_difference(observation_id: int) -> TaskResult:
    assert _worker_context is not None, "worker not initialised"
    return difference_observation(_worker_context, observation_id)


# --------------------------------------------------------------------------- runner


def pending_counts(session: Session) -> dict[str, int]:
    """Observations waiting for each phase (``prepare``, ``difference``) right now."""
    counts: dict[ObservationStatus, int] = {
        ObservationStatus(status): int(n)
        for status, n in session.execute(
            select(Observation.status, func.count()).group_by(Observation.status)
        )
    }
    return {
        "prepare": int(counts.get(S.REGISTERED, 0)) + int(counts.get(S.CALIBRATED, 0)),
        "difference": int(counts.get(S.CHARACTERIZED, 0)) + int(counts.get(S.SUBTRACTED, 0)),
    }


class PipelineRunner:
    """Runs every pending stage of every observation of a database (see the module docs).

    Parameters
    ----------
    database_url : str
        Database URL (SQLite file or PostgreSQL), already migrated to the latest schema.
    artifact_url : str
        Artifact store URL or folder.
    config : PipelineConfig or None
        Stage options; ``None`` uses the defaults.
    workers : int
        Worker processes; 1 runs in this process.
    events : EventBus or None
        Receives the domain events.
    scorer : CandidateScorer or None
        Real/bogus model; ``None`` stores no scores and records that none were computed.
    progress : ProgressReporter or None
        Receives progress per phase.
    """

    def __init__(
        self,
        database_url: str,
        artifact_url: str,
        *,
        config: PipelineConfig | None = None,
        workers: int = 1,
        events: EventBus | None = None,
        scorer: CandidateScorer | None = None,
        progress: ProgressReporter | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.database_url = database_url
        self.artifact_url = artifact_url
        self.workers = int(workers)
        self.config = config or PipelineConfig()
        # Processes share the cores: each one's FFTs get its share of threads.
        self.fft_threads = (
            max(1, (os.cpu_count() or 1) // self.workers) if self.workers > 1 else None
        )
        self.events = events
        self.scorer = scorer
        self.progress = progress

    def run(self) -> RunSummary:
        """Run every pending stage; returns what was done.

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            When the database fails (observations are not marked failed for that).
        BrokenProcessPool
            When a worker process dies (out of memory, killed).
        """
        summary = RunSummary(workers=self.workers)
        started = time.perf_counter()
        engine = open_engine(self.database_url)
        pool: ProcessPoolExecutor | None = None
        try:
            context = StageContext(
                sessions=create_session_factory(engine),
                store=artifact_store_from_url(self.artifact_url),
                config=self.config,
                scorer=self.scorer,
                fft_threads=self.fft_threads,
            )

            def get_pool() -> ProcessPoolExecutor:
                nonlocal pool
                if pool is None:
                    pool = ProcessPoolExecutor(
                        max_workers=self.workers,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=_init_worker,
                        initargs=(
                            self.database_url,
                            self.artifact_url,
                            self.config,
                            self.scorer,
                            self.fft_threads,
                            os.getpid(),
                        ),
                    )
                return pool

            prepare_ids = self._ids(context.sessions, (S.REGISTERED, S.CALIBRATED))
            summary.n_prepared = len(prepare_ids)
            self._phase(
                "prepare",
                prepare_ids,
                context,
                prepare_observation,
                _worker_prepare,
                get_pool,
                summary,
            )

            t0 = time.perf_counter()
            self._start("reference", 1)
            summary.references = choose_references(context)
            self._advance("reference")
            self._finish("reference")
            summary.phase_seconds["reference"] = time.perf_counter() - t0
            summary.stage_seconds["reference"] = summary.phase_seconds["reference"]

            difference_ids = self._difference_ids(context)
            summary.n_differenced = len(difference_ids)
            self._phase(
                "difference",
                difference_ids,
                context,
                difference_observation,
                _worker_difference,
                get_pool,
                summary,
            )

            t0 = time.perf_counter()
            self._start("associate", 1)
            outcome = associate(context)
            summary.association = outcome if outcome.n_candidates else None
            self._advance("associate")
            self._finish("associate")
            summary.phase_seconds["associate"] = time.perf_counter() - t0
            summary.stage_seconds["associate"] = summary.phase_seconds["associate"]
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            engine.dispose()
        summary.wall_seconds = time.perf_counter() - started
        return summary

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _ids(sessions: sessionmaker[Session], statuses: Sequence[ObservationStatus]) -> list[int]:
        with sessions() as session:
            return observation_ids(session, statuses)

    def _difference_ids(self, context: StageContext) -> list[int]:
        ids = self._ids(context.sessions, (S.CHARACTERIZED, S.SUBTRACTED))
        if self.scorer is None:
            return ids
        # Processed observations not yet scored by this model get their score stage.
        with context.sessions() as session:
            processed = session.execute(
                select(Observation.id, Observation.sha256)
                .where(Observation.status == S.PROCESSED)
                .order_by(Observation.mjd, Observation.id)
            ).all()
            done = set(
                session.scalars(
                    select(ProcessingRun.idempotency_key).where(
                        ProcessingRun.stage == SCORE,
                        ProcessingRun.status == RunStatus.SUCCEEDED,
                    )
                )
            )
        model = [self.scorer.model_name, self.scorer.model_version]
        extra = [int(i) for i, sha in processed if idempotency_key(SCORE, sha, model) not in done]
        return ids + extra

    def _start(self, phase: str, total: int) -> None:
        if self.progress is not None:
            self.progress.start(phase, total)

    def _advance(self, phase: str) -> None:
        if self.progress is not None:
            self.progress.advance(phase, 1)

    def _finish(self, phase: str) -> None:
        if self.progress is not None:
            self.progress.finish(phase)

    def _deliver(self, phase: str, result: TaskResult, summary: RunSummary) -> None:
        summary._add(result)
        if self.events is not None and result.events:
            self.events.publish_all(result.events)
        self._advance(phase)

    def _phase(
        self,
        phase: str,
        ids: list[int],
        context: StageContext,
        local: Callable[[StageContext, int], TaskResult],
        remote: Callable[[int], TaskResult],
        get_pool: Callable[[], ProcessPoolExecutor],
        summary: RunSummary,
    ) -> None:
        t0 = time.perf_counter()
        self._start(phase, len(ids))
        try:
            if self.workers == 1 or len(ids) <= 1:
                for observation_id in ids:
                    self._deliver(phase, local(context, observation_id), summary)
                return
            pool = get_pool()
            futures: list[Future[TaskResult]] = [pool.submit(remote, i) for i in ids]
            try:
                for future in as_completed(futures):
                    self._deliver(phase, future.result(), summary)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        except BrokenProcessPool as error:
            raise BrokenProcessPool(
                f"a worker process died during the {phase} phase (out of memory, or killed); "
                "completed stages are saved: run again to resume"
            ) from error
        finally:
            self._finish(phase)
            summary.phase_seconds[phase] = time.perf_counter() - t0
