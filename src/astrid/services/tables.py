"""Astropy tables of query results for display and export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.table import Table

__all__ = ["masked_table"]


def masked_table(
    rows: list[tuple[Any, ...]],
    names: Sequence[str],
    *,
    dtypes: Sequence[str],
    units: dict[str, str],
    formats: dict[str, str],
) -> Table:
    """A masked astropy table from rows of Python values, ``None`` cells masked.

    Parameters
    ----------
    rows : list of tuple
        One tuple per row, in the order of ``names``.
    names : sequence of str
        Column names.
    dtypes : sequence of str
        numpy dtype of each column (``"i8"``, ``"f8"``, ``"?"``, ``"U32"``, ...).
    units : dict of str to str
        Units of some columns.
    formats : dict of str to str
        Display formats of some columns.
    """
    if len(names) != len(dtypes):
        raise ValueError(f"{len(names)} names for {len(dtypes)} dtypes")
    columns = []
    for j, dtype in enumerate(dtypes):
        values = [row[j] for row in rows]
        missing = np.array([v is None for v in values], bool)
        fill: Any = "" if dtype.startswith("U") else (False if dtype == "?" else 0)
        data = np.array([fill if v is None else v for v in values], dtype=dtype)
        columns.append(np.ma.MaskedArray(data, mask=missing))
    table = Table(columns, names=list(names), masked=True)
    for name, unit in units.items():
        table[name].unit = unit
    for name, fmt in formats.items():
        table[name].format = fmt
    return table
