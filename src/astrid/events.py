"""Domain events and a small, typed, thread-safe in-process event bus.

The pipeline publishes what happens to observations and candidates as frozen dataclass
events; anything interested (a progress display, the API's event stream, a test)
subscribes to the event types it wants. There is no global bus: an entry point creates
one :class:`EventBus` and passes it to the code that publishes.

Events are published after the database transaction that made them true has committed,
so a subscriber can always read the rows they name. Delivery is synchronous, in the
publishing thread, in publication order; a lock makes the order one total order when
several threads publish. A subscriber that raises is logged and skipped: it never stops
the pipeline or the other subscribers.

Examples
--------
>>> bus = EventBus()
>>> seen: list[Event] = []
>>> unsubscribe = bus.subscribe(seen.append, ObservationIngested)
>>> bus.publish(ObservationIngested(observation_id=1, sha256="ab" * 32, original_name="a.fits"))
>>> [type(e).__name__ for e in seen]
['ObservationIngested']
>>> unsubscribe()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

__all__ = [
    "CandidateCreated",
    "Event",
    "EventBus",
    "ObservationFailed",
    "ObservationIngested",
    "ObservationProcessed",
]

_log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base class of every domain event.

    Attributes
    ----------
    occurred_at : datetime
        When the event was created (aware UTC).
    """

    occurred_at: datetime = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class ObservationIngested(Event):
    """A new file was registered as an observation (already-known files publish nothing).

    Attributes
    ----------
    observation_id : int
        Primary key of the new observation.
    sha256 : str
        Hex SHA-256 of the file's bytes.
    original_name : str or None
        Path or URI it was registered from.
    """

    observation_id: int
    sha256: str
    original_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class ObservationProcessed(Event):
    """An observation went through every per-observation stage.

    Attributes
    ----------
    observation_id : int
        The observation.
    n_candidates : int
        Candidates stored from its difference image (0 for a field's reference).
    is_reference : bool
        Whether it is its field's reference (nothing was subtracted from it).
    """

    observation_id: int
    n_candidates: int
    is_reference: bool = False


@dataclass(frozen=True, kw_only=True)
class ObservationFailed(Event):
    """A stage failed for an observation, or the quality gate rejected it.

    Attributes
    ----------
    observation_id : int
        The observation.
    stage : str
        Stage that failed (``"calibrate"``, ``"subtract"``, ...).
    status : str
        The observation's new status: ``"failed"`` or ``"rejected"`` (quality gate).
    error_type : str
        Class name of the error (``"TooFewStarsForPsf"``, ``"QualityGateFailed"``).
    reason : str
        The error's message, with its numbers.
    """

    observation_id: int
    stage: str
    status: str
    error_type: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class CandidateCreated(Event):
    """A candidate was stored.

    Attributes
    ----------
    candidate_id : int
        Primary key of the candidate.
    observation_id : int
        Science observation it was detected on.
    ra, dec : float
        Position, ICRS degrees.
    mag : float or None
        Difference magnitude (``None`` without a zero point).
    snr : float
        Signal-to-noise ratio of its PSF flux.
    is_negative : bool
        Whether the source got fainter than in the reference.
    """

    candidate_id: int
    observation_id: int
    ra: float
    dec: float
    mag: float | None
    snr: float
    is_negative: bool


E = TypeVar("E", bound=Event)
Handler = Callable[[Any], None]


class EventBus:
    """Publish events to the handlers subscribed to their type (or a base type)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._handlers: list[tuple[type[Event], Handler]] = []

    @overload
    def subscribe(self, handler: Callable[[Event], None]) -> Callable[[], None]: ...

    @overload
    def subscribe(
        self, handler: Callable[[E], None], event_type: type[E]
    ) -> Callable[[], None]: ...

    def subscribe(self, handler: Handler, event_type: type[Event] = Event) -> Callable[[], None]:
        """Call ``handler(event)`` for every published instance of ``event_type``.

        Parameters
        ----------
        handler : callable
            Receives each matching event; runs in the publishing thread.
        event_type : type of Event
            Events of this class or a subclass are delivered; :class:`Event` (the
            default) receives everything.

        Returns
        -------
        callable
            Calling it unsubscribes the handler (calling it again does nothing).
        """
        entry: tuple[type[Event], Handler] = (event_type, handler)
        with self._lock:
            self._handlers.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._handlers:
                    self._handlers.remove(entry)

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every matching handler, in subscription order."""
        with self._lock:
            handlers = list(self._handlers)
            for event_type, handler in handlers:
                if not isinstance(event, event_type):
                    continue
                try:
                    handler(event)
                except Exception:
                    _log.exception(
                        "event handler %r failed on %s; continuing", handler, type(event).__name__
                    )

    def publish_all(self, events: list[Event] | tuple[Event, ...]) -> None:
        """Publish several events in order, with no other publisher in between."""
        with self._lock:
            for event in events:
                self.publish(event)
