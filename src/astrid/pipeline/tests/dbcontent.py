"""The content of an AstrID database, independent of row ids and timings.

Two runs of the pipeline over the same files should leave the same content even when
their row ids differ (workers commit in different orders; PostgreSQL sequences skip
numbers after a rollback) and their timestamps differ. :func:`database_content` reads
every table and replaces each surrogate key by a natural key of the row it names
(observation -> its file hash, candidate -> (difference, detection index), object -> its
set of candidates, ...), drops bookkeeping columns (ids, timestamps, worker names), and
returns each table as a sorted list of rows: duplicates stay visible as repeated rows.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, select

from astrid.store.models import Base

__all__ = ["BOOKKEEPING", "database_content"]

#: Columns that legitimately differ between two runs.
BOOKKEEPING = frozenset(
    {"id", "created_at", "updated_at", "started_at", "finished_at", "worker", "occurred_at"}
)


def _rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    out = {}
    with engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            out[table.name] = [dict(r._mapping) for r in connection.execute(select(table))]
    return out


def database_content(engine: Engine) -> dict[str, list[str]]:
    """Every table as a sorted list of canonical rows (JSON text), ids replaced by keys."""
    rows = _rows(engine)
    by_id = {name: {r["id"]: r for r in table} for name, table in rows.items() if table}

    def key_of(table: str, row_id: Any) -> Any:
        if row_id is None:
            return None
        row = by_id.get(table, {}).get(row_id)
        if row is None:
            return f"<missing {table} {row_id}>"
        return natural[table](row)

    def observation(row: dict[str, Any]) -> Any:
        return row["sha256"]

    def difference(row: dict[str, Any]) -> Any:
        return [
            key_of("observations", row["science_observation_id"]),
            key_of("reference_images", row["reference_id"]),
            row["method"],
        ]

    def candidate(row: dict[str, Any]) -> Any:
        return [key_of("difference_images", row["difference_id"]), row["detection_index"]]

    natural = {
        "surveys": lambda r: r["name"],
        "instruments": lambda r: r["name"],
        "fields": lambda r: [key_of("surveys", r["survey_id"]), r["name"]],
        "observations": observation,
        "reference_images": lambda r: r["sha256"],
        "processing_runs": lambda r: [
            r["stage"],
            key_of("observations", r["observation_id"]),
            r["idempotency_key"],
            r["status"],
        ],
        "difference_images": difference,
        "candidates": candidate,
        "objects": lambda r: sorted(members.get(r["id"], []), key=json.dumps),
        "users": lambda r: r["username"],
        "api_keys": lambda r: r["key_hash"],
    }
    members: dict[Any, list[Any]] = {}
    for row in rows.get("candidates", []):
        members.setdefault(row["object_id"], []).append(candidate(row))

    foreign = {
        "survey_id": "surveys",
        "instrument_id": "instruments",
        "field_id": "fields",
        "observation_id": "observations",
        "science_observation_id": "observations",
        "reference_id": "reference_images",
        "processing_run_id": "processing_runs",
        "difference_id": "difference_images",
        "candidate_id": "candidates",
        "object_id": "objects",
        "user_id": "users",
        "api_key_id": "api_keys",
        "confirmed_by_id": "users",
    }
    content: dict[str, list[str]] = {}
    for name, table in rows.items():
        canonical = []
        for row in table:
            item = {}
            for column, value in row.items():
                if column in BOOKKEEPING:
                    continue
                if column in foreign:
                    value = key_of(foreign[column], value)
                item[column] = value
            canonical.append(json.dumps(item, sort_keys=True, default=str))
        content[name] = sorted(canonical)
    return content
