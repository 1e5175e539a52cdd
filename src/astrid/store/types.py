"""Portable column types shared by the models (the same on SQLite and PostgreSQL).

- :class:`UtcDateTime`: timezone-aware UTC timestamps on every engine (SQLite stores
  no time zone, so values are normalised to UTC on the way in and marked UTC on the way
  out; naive datetimes are refused rather than guessed).
- :data:`JSON_TYPE`: ``JSON`` everywhere, ``JSONB`` on PostgreSQL (indexable, compact).
- :data:`ID_TYPE`: 64-bit integer keys on PostgreSQL, SQLite's ``INTEGER`` (the rowid
  alias, which is also 64-bit) so that autoincrement keeps working there.
- :func:`string_enum`: a Python enum stored as its string values with a named ``CHECK``
  constraint, instead of a native database enum that needs its own migrations.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Enum, Integer
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ID_TYPE",
    "JSON_TYPE",
    "UtcDateTime",
    "string_enum",
    "utcnow",
]

#: Primary and foreign key type: BIGINT on PostgreSQL, INTEGER (64-bit rowid) on SQLite.
ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")

#: JSON document type: JSONB on PostgreSQL, JSON (text) elsewhere.
JSON_TYPE = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    Binding a naive datetime raises :class:`ValueError`: a time without a zone is
    ambiguous, and guessing would silently shift it. Aware datetimes in any zone are
    converted to UTC. On SQLite (no time-zone storage) the UTC wall time is stored and
    marked UTC when read back; on PostgreSQL the column is ``timestamp with time zone``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Check the zone and convert to UTC before writing."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given for a UTC timestamp column; "
                "attach a time zone (e.g. datetime.now(UTC))"
            )
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return the stored time as an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def string_enum(enum_class: type[enum.Enum], name: str, *, length: int = 32) -> Enum:
    """Column type storing ``enum_class`` by value as a string with a ``CHECK`` constraint.

    Parameters
    ----------
    enum_class : type of enum.Enum
        The Python enum; its members' ``value`` strings are what the database holds.
    name : str
        Name of the ``CHECK`` constraint (prefixed ``ck_<table>_`` by the naming
        convention).
    length : int
        Width of the ``VARCHAR``: room for values added later without altering the
        column type.

    Returns
    -------
    sqlalchemy.Enum
        A non-native enum type that refuses unknown strings in Python as well.
    """

    def values(members: Any) -> list[str]:
        return [str(member.value) for member in members]

    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=length,
        validate_strings=True,
        values_callable=values,
    )
