"""``astrid alerts-info``: list the alerts of ZTF and Rubin alert packets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import typer
from astropy.table import MaskedColumn, Table

from astrid.cli.errors import friendly_errors
from astrid.ml.alerts import Alert, read_alerts

__all__ = ["alerts_info", "alerts_table"]

#: Real/bogus score columns, in table order; an alert lacking one has it masked.
_SCORE_NAMES = ("rb", "drb", "reliability")

#: Columns printed on the terminal (the CSV also has id_name, time_scale and source).
_PRINTED = (
    "alert_id",
    "survey",
    "object_id",
    "ra",
    "dec",
    "mjd",
    "band",
    *_SCORE_NAMES,
    "science",
    "reference",
    "difference",
)


def alerts_table(alerts: Sequence[Alert]) -> Table:
    """One row per alert: ids, position, time, band, scores and cutout shapes.

    Parameters
    ----------
    alerts : sequence of Alert
        The alerts, in row order.

    Returns
    -------
    astropy.table.Table
        Columns ``alert_id``, ``id_name``, ``survey``, ``object_id`` (text; empty when the
        packet names none), ``ra``, ``dec`` (deg), ``mjd`` (in ``time_scale``: ``utc`` for
        ZTF, ``tai`` for Rubin), ``time_scale``, ``band``, ``rb``, ``drb``, ``reliability``
        (masked where the packet lacks the score), ``science``, ``reference``,
        ``difference`` (cutout shapes as ``"ny x nx"``) and ``source`` (the file).
    """
    table = Table()
    table["alert_id"] = np.array([a.alert_id for a in alerts], dtype=np.int64)
    table["id_name"] = np.array([a.id_name for a in alerts], dtype=str)
    table["survey"] = np.array([a.survey for a in alerts], dtype=str)
    table["object_id"] = np.array(
        ["" if a.object_id is None else str(a.object_id) for a in alerts], dtype=str
    )
    table["ra"] = np.array([a.ra for a in alerts], dtype=float)
    table["ra"].unit = "deg"
    table["dec"] = np.array([a.dec for a in alerts], dtype=float)
    table["dec"].unit = "deg"
    table["mjd"] = np.array([a.mjd for a in alerts], dtype=float)
    table["mjd"].unit = "d"
    table["time_scale"] = np.array([a.time_scale for a in alerts], dtype=str)
    table["band"] = np.array([a.band for a in alerts], dtype=str)
    for name in _SCORE_NAMES:
        values = np.array([a.scores.get(name, np.nan) for a in alerts], dtype=float)
        table[name] = MaskedColumn(values, mask=np.isnan(values))
    for name in ("science", "reference", "difference"):
        shapes = [" x ".join(str(n) for n in getattr(a, name).shape) for a in alerts]
        table[name] = np.array(shapes, dtype=str)
    table["source"] = np.array([a.source for a in alerts], dtype=str)
    return table


@friendly_errors
def alerts_info(
    paths: list[Path] = typer.Argument(
        ..., help="Alert packet files (.avro, Kowalski .json) or folders searched recursively."
    ),
    csv: Path | None = typer.Option(
        None, "--csv", help="Also write the table, with id_name, time_scale and source, as CSV."
    ),
    skip_bad: bool = typer.Option(
        False,
        "--skip-bad",
        help="Skip files that are not readable alert packets (listed on stderr) instead of "
        "stopping at the first.",
    ),
) -> None:
    """List every alert: id, survey, position, time, band, real/bogus scores, cutout shapes.

    Reads ZTF Avro packets (schemas 2.x to 4.x), ZTF Kowalski JSON exports and Rubin/LSST
    Avro packets. MJD is UTC for ZTF (exposure start) and TAI for Rubin (exposure middle).
    A file that is not a readable packet exits with code 3, unless --skip-bad is given.
    """
    reader = read_alerts(paths, errors="skip" if skip_bad else "raise")
    alerts = list(reader)
    table = alerts_table(alerts)
    shown = table[list(_PRINTED)]
    for name, digits in (("ra", 6), ("dec", 6), ("mjd", 6), *((n, 4) for n in _SCORE_NAMES)):
        shown[name].format = f".{digits}f"
    for line in shown.pformat(max_lines=-1, max_width=-1):
        typer.echo(line)
    for failure in reader.failures:
        typer.echo(f"skipped {failure.path}: {failure.reason}", err=True)
    files = len({a.source for a in alerts})
    typer.echo(
        f"{len(alerts)} alerts from {files} files; files skipped: {len(reader.failures)}",
        err=True,
    )
    if csv is not None:
        table.write(csv, format="ascii.csv", overwrite=True)
        typer.echo(f"wrote {csv}", err=True)
