"""``astrid inspect``: quality metrics of one image."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from astrid.cli.errors import friendly_errors
from astrid.io.fits import read_exposure

__all__ = ["inspect"]


@friendly_errors
def inspect(
    file: Path = typer.Argument(..., help="FITS image to inspect.", exists=False),
    hdu: str | None = typer.Option(
        None, "--hdu", help="HDU index or name holding the image (default: the first image)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
    min_stars: int = typer.Option(
        10, "--min-stars", min=1, help="Clean stars needed for a PSF model and to pass the gate."
    ),
) -> None:
    """Measure seeing, background, noise, depth and star count, and apply the quality gate.

    JSON keys include fwhm_pix, fwhm_arcsec, background, noise, limiting_mag,
    limiting_mag_is_instrumental, n_stars, masked/saturated/cosmic-ray fractions, passed
    and reasons. The exit code is 0 whether or not the gate passes; a file that cannot be
    read exits with code 3.
    """
    from dataclasses import replace

    from astrid.pipeline.characterize import CharacterizeConfig, characterize

    which: int | str | None = None
    if hdu is not None:
        which = int(hdu) if hdu.lstrip("-").isdigit() else hdu
    exposure = read_exposure(file, hdu=which)
    base = CharacterizeConfig()
    config = replace(
        base,
        psf=replace(base.psf, min_stars=min_stars),
        quality=replace(base.quality, min_stars=min_stars),
    )
    result = characterize(exposure, config=config)
    report = result.quality.as_dict()
    report = {
        "file": str(file),
        **report,
        "band": exposure.meta.band,
        "missing_metadata": sorted(exposure.meta.missing),
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        typer.echo(f"{key:<{width}}  {value}")
