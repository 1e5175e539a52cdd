"""Constraints, defaults and conventions of the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from astrid.store.healpix import healpix_index
from astrid.store.models import (
    Base,
    Candidate,
    Cutout,
    CutoutKind,
    DifferenceImage,
    ModelScore,
    Observation,
    ObservationStatus,
    ReferenceImage,
    SkyObject,
    SubtractionMethod,
    User,
    VettingEvent,
    VettingLabel,
)


def _sha(n: int) -> str:
    return f"{n:064x}"


def _difference(session: Session) -> DifferenceImage:
    science = Observation(sha256=_sha(1), artifact_key="k/science", band="g", mjd=60000.5)
    reference = ReferenceImage(
        band="g", sha256=_sha(2), artifact_key="k/reference", source="coadd", ra=10.0, dec=-5.0
    )
    difference = DifferenceImage(
        science=science,
        reference=reference,
        method=SubtractionMethod.ZOGY,
        artifact_key="k/difference",
    )
    session.add(difference)
    session.flush()
    return difference


def _candidate(difference: DifferenceImage, index: int, **changes: object) -> Candidate:
    values: dict[str, object] = {
        "difference": difference,
        "detection_index": index,
        "ra": 10.0 + index * 1e-3,
        "dec": -5.0,
        "x": 100.0,
        "y": 200.0,
        "flux": 1000.0,
        "flux_err": 50.0,
        "snr": 20.0,
    }
    values.update(changes)
    return Candidate(**values)


def test_every_column_is_documented() -> None:
    undocumented = [
        f"{table.name}.{column.name}"
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if not (column.doc or "").strip()
    ]
    assert undocumented == []


def test_registering_the_same_file_twice_is_refused(session: Session) -> None:
    session.add(Observation(sha256=_sha(7), artifact_key="a"))
    session.commit()
    session.add(Observation(sha256=_sha(7), artifact_key="b"))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Observation)) == 1


def test_duplicate_insert_in_a_savepoint_leaves_the_transaction_usable(
    session: Session,
) -> None:
    session.add(Observation(sha256=_sha(8), artifact_key="a"))
    session.flush()
    with pytest.raises(IntegrityError), session.begin_nested():
        session.add(Observation(sha256=_sha(8), artifact_key="b"))
        session.flush()
    session.add(Observation(sha256=_sha(9), artifact_key="c"))
    session.commit()
    assert session.scalar(select(func.count()).select_from(Observation)) == 2


def test_defaults_healpix_and_utc_timestamps(session: Session) -> None:
    observation = Observation(
        sha256=_sha(3),
        artifact_key="k",
        ra=150.1,
        dec=2.2,
        obs_time=datetime(2024, 3, 1, 5, 0, tzinfo=timezone(timedelta(hours=-3))),
    )
    session.add(observation)
    session.commit()
    session.expire_all()
    stored = session.scalars(select(Observation)).one()
    assert stored.status is ObservationStatus.REGISTERED
    assert stored.healpix == int(healpix_index(150.1, 2.2))
    assert stored.obs_time == datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    assert stored.obs_time.tzinfo is not None and stored.obs_time.utcoffset() == timedelta(0)
    assert stored.created_at.tzinfo is not None
    assert abs(stored.created_at - datetime.now(UTC)) < timedelta(minutes=5)

    stored.ra, stored.dec = 0.5, -89.0
    session.commit()
    assert stored.healpix == int(healpix_index(0.5, -89.0))


def test_naive_datetimes_are_refused(session: Session) -> None:
    session.add(Observation(sha256=_sha(4), artifact_key="k", obs_time=datetime(2024, 1, 1)))
    with pytest.raises(StatementError, match="naive datetime"):
        session.flush()


def test_enum_check_constraint_holds_in_the_database(
    session: Session, migrated_engine: Engine
) -> None:
    session.add(Observation(sha256=_sha(5), artifact_key="k"))
    session.commit()
    with pytest.raises(IntegrityError), migrated_engine.begin() as connection:
        connection.execute(text("UPDATE observations SET status = 'lost'"))
    with pytest.raises(StatementError):
        session.add(Observation(sha256=_sha(6), artifact_key="k", status="lost"))
        session.flush()


def test_candidate_and_score_uniqueness(session: Session) -> None:
    difference = _difference(session)
    session.add_all([_candidate(difference, 0), _candidate(difference, 1)])
    session.commit()
    with pytest.raises(IntegrityError), session.begin_nested():
        session.add(_candidate(difference, 1))
        session.flush()

    candidate = difference.candidates[0]
    session.add(ModelScore(candidate=candidate, model_name="rb", model_version="1", score=0.9))
    session.add(ModelScore(candidate=candidate, model_name="rb", model_version="2", score=0.8))
    session.commit()
    with pytest.raises(IntegrityError), session.begin_nested():
        session.add(ModelScore(candidate=candidate, model_name="rb", model_version="1", score=0.1))
        session.flush()
    assert {s.model_version for s in candidate.scores} == {"1", "2"}


def test_deleting_a_difference_cascades_to_its_candidates(session: Session) -> None:
    difference = _difference(session)
    user = User(username="vera")
    sky_object = SkyObject(ra=10.0, dec=-5.0)
    candidate = _candidate(difference, 0, sky_object=sky_object)
    session.add_all([user, candidate])
    session.flush()
    session.add_all(
        [
            Cutout(candidate=candidate, kind=CutoutKind.DIFFERENCE, artifact_key="c", size=63),
            ModelScore(candidate=candidate, model_name="rb", model_version="1", score=0.5),
            VettingEvent(candidate=candidate, user=user, label=VettingLabel.REAL, note="clear"),
        ]
    )
    session.commit()

    session.delete(difference)
    session.commit()
    for model in (Candidate, Cutout, ModelScore, VettingEvent):
        assert session.scalar(select(func.count()).select_from(model)) == 0
    # The object and the person outlive the detection.
    assert session.scalar(select(func.count()).select_from(SkyObject)) == 1
    assert session.scalar(select(func.count()).select_from(User)) == 1


def test_foreign_keys_are_enforced(session: Session) -> None:
    session.add(Cutout(candidate_id=123456, kind=CutoutKind.SCIENCE, artifact_key="c", size=31))
    with pytest.raises(IntegrityError):
        session.flush()
