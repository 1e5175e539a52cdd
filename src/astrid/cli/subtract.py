"""``astrid subtract``: difference image, score image, candidates and cutouts for a pair."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from pathlib import Path

import typer

from astrid.cli.errors import friendly_errors

__all__ = ["subtract"]


class _Method(StrEnum):
    zogy = "zogy"
    al = "al"


@friendly_errors
def subtract(
    science: Path = typer.Argument(..., help="Science FITS image (defines the output grid)."),
    reference: Path = typer.Argument(..., help="Reference FITS image of the same field and band."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the products."),
    method: _Method = typer.Option(
        _Method.zogy, "--method", help="zogy (Zackay, Ofek & Gal-Yam 2016) or al (Alard-Lupton)."
    ),
    threshold: float = typer.Option(
        5.0, "--threshold", min=0.5, help="Detection threshold on the score image, in sigma."
    ),
    aligned: bool = typer.Option(
        False, "--aligned", help="The reference is already on the science pixel grid."
    ),
    min_stars: int = typer.Option(
        10, "--min-stars", min=3, help="Clean stars needed for each image's PSF model."
    ),
    force: bool = typer.Option(
        False, "--force", help="Write the products even when the bad-subtraction gate refuses."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing products."),
) -> None:
    """Subtract REFERENCE from SCIENCE and detect and measure the candidates.

    Writes OUTDIR/difference.fits (with VARIANCE, MASK and PSF extensions),
    OUTDIR/score.fits (S_corr for ZOGY, decorrelated D/sigma for Alard-Lupton),
    OUTDIR/candidates.ecsv (0-based x and y, ra, dec, flux, flux_err, snr, mag, is_dipole,
    ...) and OUTDIR/cutouts.fits (63x63 science, reference and difference stamps per
    candidate). Without --aligned the reference is aligned first. A refused subtraction
    (score std above 2.5 or residuals around stars above LSST's limits) exits with code 3
    unless --force.
    """
    from astrid.io.fits import read_exposure
    from astrid.pipeline.difference import DifferenceConfig, difference_pair, write_difference
    from astrid.science.subtract import SubtractConfig

    if (output / "candidates.ecsv").exists() and not overwrite:
        raise typer.BadParameter(f"{output} holds products (use --overwrite)", param_hint="-o")
    base = DifferenceConfig()
    config = replace(
        base,
        characterize=replace(
            base.characterize, psf=replace(base.characterize.psf, min_stars=min_stars)
        ),
        subtract=SubtractConfig(method=method.value),
        detect=replace(base.detect, n_sigma=threshold),
        enforce_gate=not force,
    )
    result = difference_pair(
        read_exposure(science), read_exposure(reference), aligned=aligned, config=config
    )
    paths = write_difference(result, output, overwrite=overwrite)
    q = result.subtraction.quality
    n = len(result.candidates)
    n_pos = int((result.candidates["polarity"] > 0).sum()) if n else 0
    typer.echo(f"method          {method.value}")
    if result.alignment is not None:
        typer.echo(
            f"alignment       {result.alignment.method}, {result.alignment.n_matched} stars, "
            f"rms {result.alignment.rms_pix:.3f} px"
        )
    typer.echo(f"flux ratio      {result.subtraction.flux_scale.flux_ratio:.4f}")
    typer.echo(f"score std       {q.score_std:.3f}")
    typer.echo(
        f"residual ratio  {q.residual_ratio_mean:.3f} (mean), {q.residual_ratio_std:.3f} (std) "
        f"over {q.n_stars} stars"
    )
    typer.echo(f"gate            {'passed' if q.passed else 'REFUSED: ' + '; '.join(q.reasons)}")
    typer.echo(f"candidates      {n} ({n_pos} positive, {n - n_pos} negative)")
    for kind, path in paths.items():
        typer.echo(f"{kind:<15} {path}")
