"""``astrid align``: resample a reference image onto a science image's pixel grid."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Literal, cast

import typer

from astrid.cli.errors import friendly_errors

__all__ = ["align"]


class _Method(StrEnum):
    auto = "auto"
    wcs = "wcs"
    wcs_stars = "wcs+stars"
    stars = "stars"


@friendly_errors
def align(
    science: Path = typer.Argument(..., help="Science FITS image: defines the output grid."),
    reference: Path = typer.Argument(..., help="Reference FITS image to resample."),
    output: Path = typer.Option(..., "--output", "-o", help="Aligned reference FITS to write."),
    method: _Method = typer.Option(
        _Method.auto, "--method", help="How to map the pixels: WCS, stars, or both."
    ),
    order: int = typer.Option(3, "--order", help="Interpolation: 3 cubic (default), 1 bilinear."),
    max_wcs_error: float | None = typer.Option(
        None,
        "--max-wcs-error",
        help="With --method auto, WCS error (pixels) before stars fix it "
        "(default: AlignConfig.max_wcs_error_pix, 0.15).",
    ),
    min_stars: int = typer.Option(5, "--min-stars", help="Star pairs needed to use stars."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Align REFERENCE to SCIENCE and write the aligned exposure (data, variance, mask).

    Prints the method used, the number of matched stars and the astrometric residual
    (rms, pixels and arcsec). A file that cannot be read or aligned exits with code 3.
    """
    from astrid.io.fits import read_exposure, write_exposure
    from astrid.science.align import AlignConfig, align_to

    if order not in (1, 3):
        raise typer.BadParameter("must be 1 or 3", param_hint="--order")
    if output.exists() and not overwrite:
        raise typer.BadParameter(f"{output} exists (use --overwrite)", param_hint="--output")
    config = AlignConfig(
        method=cast(Literal["auto", "wcs", "wcs+stars", "stars"], method.value),
        order=cast(Literal[1, 3], order),
        min_matched_stars=min_stars,
    )
    if max_wcs_error is not None:
        config = replace(config, max_wcs_error_pix=max_wcs_error)
    result = align_to(read_exposure(science), read_exposure(reference), config=config)
    write_exposure(result.aligned, output, overwrite=overwrite)
    arcsec = f" ({result.rms_arcsec:.3f} arcsec)" if result.rms_arcsec is not None else ""
    typer.echo(f"method    {result.method}")
    typer.echo(f"matched   {result.n_matched} stars")
    typer.echo(f"residual  {result.rms_pix:.3f} px rms{arcsec}")
    typer.echo(f"overlap   {result.overlap_fraction:.1%}")
    typer.echo(f"wrote     {output}")
