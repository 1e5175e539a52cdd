"""``astrid candidates``: cone search over candidates or objects, as an astropy table."""

from __future__ import annotations

from pathlib import Path

import typer

from astrid.cli.context import (
    ARTIFACT_URL_OPTION,
    DATA_DIR_OPTION,
    DATABASE_URL_OPTION,
    load_settings,
    open_database,
)
from astrid.cli.errors import friendly_errors

__all__ = ["candidates"]


@friendly_errors
def candidates(
    ra: float = typer.Option(
        ..., "--ra", min=-360.0, max=720.0, help="Right ascension of the centre, ICRS degrees."
    ),
    dec: float = typer.Option(
        ..., "--dec", min=-90.0, max=90.0, help="Declination of the centre, ICRS degrees."
    ),
    radius: float = typer.Option(5.0, "--radius", "-r", min=0.0, help="Search radius in arcsec."),
    objects: bool = typer.Option(
        False, "--objects", help="Search objects (detections associated across epochs)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Show only the nearest N rows."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Also write the table to this file; the format follows the extension "
        "(.ecsv, .fits, .vot/.xml, .csv).",
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
    database_url: str | None = DATABASE_URL_OPTION,
    artifact_url: str | None = ARTIFACT_URL_OPTION,
) -> None:
    """List the candidates (or objects) within RADIUS arcsec of RA, DEC, nearest first.

    Candidate columns: id, object_id, ra, dec, separation (arcsec), mjd, band, mag,
    mag_err, snr, flux, flux_err (science ADU; negative when the source faded),
    is_negative, is_dipole, flags (mask bits), x, y (0-based pixels), score and model
    (empty until a real/bogus model has scored them). Object columns: id, name, ra, dec,
    separation, n_detections, first_mjd, last_mjd, n_positive, n_negative, peak_mag,
    classification.
    """
    from astrid.services.candidates import candidates_in_cone
    from astrid.services.objects import objects_in_cone

    settings = load_settings(
        data_dir=data_dir, database_url=database_url, artifact_url=artifact_url
    )
    with open_database(settings) as db, db.sessions() as session:
        search = objects_in_cone if objects else candidates_in_cone
        table = search(session, ra % 360.0, dec, radius, limit=limit)
    what = "objects" if objects else "candidates"
    typer.echo(f"{len(table)} {what} within {radius:g} arcsec of ra={ra:.6f} dec={dec:+.6f}")
    if len(table):
        for line in table.pformat(max_lines=-1, max_width=-1):
            typer.echo(line)
    if output is not None:
        formats = {".vot": "votable", ".xml": "votable", ".csv": "ascii.csv"}
        table.write(output, format=formats.get(output.suffix.lower()), overwrite=True)
        typer.echo(f"wrote {output}")
