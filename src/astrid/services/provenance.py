"""Provenance helpers: JSON-safe values, code and library versions, idempotency keys.

Every :class:`~astrid.store.models.ProcessingRun` records its configuration and
provenance as JSON. PostgreSQL's ``JSONB`` refuses NaN and infinities, and SQLite turns
NaN floats into NULL, so values go through :func:`jsonable` first: non-finite floats
become ``None``, numpy scalars and arrays become Python numbers and lists, tuples become
lists, enums their values, dataclasses dictionaries.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from functools import lru_cache
from importlib import metadata
from pathlib import PurePath
from typing import Any

import numpy as np

from astrid import __version__

__all__ = ["code_provenance", "finite_or_none", "idempotency_key", "jsonable"]

#: Libraries whose versions can change a result, recorded with every run.
_LIBRARIES = ("numpy", "scipy", "astropy", "sep", "photutils", "astroscrappy", "reproject")


def finite_or_none(value: Any) -> float | None:
    """``float(value)``, or ``None`` when it is missing, masked or not finite."""
    if value is None or value is np.ma.masked:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of ``value`` (see the module docstring for the rules)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [jsonable(v) for v in items]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_or_none(value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if value is None or isinstance(value, str):
        return value
    return str(value)


@lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def code_provenance() -> dict[str, Any]:
    """``{"astrid": version, "libraries": {name: version}}`` of the running code."""
    return {"astrid": __version__, "libraries": dict(_library_versions())}


def idempotency_key(stage: str, *parts: Any) -> str:
    """Hex SHA-256 naming one unit of work: a stage applied to given inputs.

    Parameters
    ----------
    stage : str
        Stage name.
    *parts
        What identifies the inputs (content hashes, a model name and version, ...);
        anything :func:`jsonable` accepts.
    """
    text = json.dumps([stage, *jsonable(list(parts))], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
