"""The in-process event bus: typed delivery, order, isolation of failing handlers."""

from __future__ import annotations

import logging
import threading

import pytest

from astrid.events import (
    CandidateCreated,
    Event,
    EventBus,
    ObservationFailed,
    ObservationIngested,
    ObservationProcessed,
)


def _ingested(i: int) -> ObservationIngested:
    return ObservationIngested(observation_id=i, sha256=f"{i:064x}")


def test_handlers_receive_their_type_and_subclasses_in_order() -> None:
    bus = EventBus()
    everything: list[Event] = []
    processed: list[ObservationProcessed] = []
    bus.subscribe(everything.append)
    bus.subscribe(processed.append, ObservationProcessed)
    events: list[Event] = [
        _ingested(1),
        CandidateCreated(
            candidate_id=5, observation_id=1, ra=1.0, dec=2.0, mag=20.0, snr=8.0, is_negative=False
        ),
        ObservationProcessed(observation_id=1, n_candidates=1),
        ObservationFailed(
            observation_id=2, stage="calibrate", status="failed", error_type="X", reason="y"
        ),
    ]
    bus.publish_all(events)
    assert everything == events
    assert processed == [events[2]]
    assert events[0].occurred_at.tzinfo is not None


def test_unsubscribe_stops_delivery() -> None:
    bus = EventBus()
    seen: list[Event] = []
    unsubscribe = bus.subscribe(seen.append)
    bus.publish(_ingested(1))
    unsubscribe()
    unsubscribe()  # twice is harmless
    bus.publish(_ingested(2))
    assert [e.observation_id for e in seen if isinstance(e, ObservationIngested)] == [1]


def test_a_failing_handler_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="astrid.events"):
        bus.publish(_ingested(1))
    assert len(seen) == 1
    assert "subscriber bug" in caplog.text


def test_events_are_frozen() -> None:
    event = _ingested(1)
    with pytest.raises(AttributeError):
        event.observation_id = 2  # type: ignore[misc]


def test_publishing_from_threads_delivers_every_event_once_in_one_order() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.subscribe(lambda e: seen.append(e.observation_id), ObservationIngested)

    def publish(start: int) -> None:
        for i in range(start, start + 200):
            bus.publish_all([_ingested(i)])

    threads = [threading.Thread(target=publish, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(k * 1000 + i for k in range(4) for i in range(200))
    # Each thread's own events stay in the order it published them.
    for k in range(4):
        mine = [i for i in seen if k * 1000 <= i < (k + 1) * 1000]
        assert mine == sorted(mine)
