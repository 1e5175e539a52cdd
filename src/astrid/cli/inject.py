"""``astrid inject``: completeness, false positives and flux bias of a pair by injection."""

from __future__ import annotations

import json
from dataclasses import replace
from enum import StrEnum
from pathlib import Path

import typer

from astrid.cli.errors import friendly_errors

__all__ = ["inject"]


class _Method(StrEnum):
    zogy = "zogy"
    al = "al"


@friendly_errors
def inject(
    science: Path = typer.Argument(..., help="Science FITS image (the fakes go into it)."),
    reference: Path = typer.Argument(..., help="Reference FITS image of the same field and band."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the results."),
    method: _Method = typer.Option(
        _Method.zogy, "--method", help="zogy (Zackay, Ofek & Gal-Yam 2016) or al (Alard-Lupton)."
    ),
    n_fakes: int = typer.Option(200, "--n-fakes", min=1, help="Fakes per run."),
    runs: int = typer.Option(3, "--runs", min=1, help="Runs, each with fresh positions."),
    seed: int = typer.Option(0, "--seed", help="Seed of positions, fluxes and noise."),
    snr_min: float = typer.Option(
        2.0, "--snr-min", min=0.1, help="Lowest ideal difference S/N of a fake."
    ),
    snr_max: float = typer.Option(
        60.0, "--snr-max", min=0.2, help="Highest ideal difference S/N of a fake."
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
    rescale_score: bool = typer.Option(
        False,
        "--rescale-score",
        help="Threshold the score in units of its measured robust std (correlated noise).",
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG plots."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing results."),
) -> None:
    """Inject fake point sources into SCIENCE, subtract REFERENCE, detect and score them.

    Fakes are drawn with the science PSF the pipeline estimates, with their Poisson noise
    when the gain is known, away from detected sources and from each other; each fake's
    S/N is the ideal PSF-fit S/N it has in the difference (both images' noise counted).
    Writes OUTDIR/summary.json (S/N at 50% completeness, false positives per image and
    per square degree, flux bias, astrometric offsets), OUTDIR/fakes.ecsv (one row per
    fake, 0-based x and y), OUTDIR/false_positives.ecsv, OUTDIR/completeness.ecsv and,
    unless --no-plots, completeness.png, flux_ratio.png and offsets.png.
    """
    from astrid.io.fits import read_exposure
    from astrid.pipeline.difference import DifferenceConfig
    from astrid.pipeline.injection import InjectionConfig, inject_and_recover, plot_injection
    from astrid.science.subtract import SubtractConfig

    if not snr_min < snr_max:
        raise typer.BadParameter("--snr-min must be below --snr-max", param_hint="--snr-min")
    if (output / "summary.json").exists() and not overwrite:
        raise typer.BadParameter(f"{output} holds results (use --overwrite)", param_hint="-o")
    base = DifferenceConfig()
    config = replace(
        base,
        characterize=replace(
            base.characterize, psf=replace(base.characterize.psf, min_stars=min_stars)
        ),
        subtract=SubtractConfig(method=method.value),
        detect=replace(base.detect, rescale_score=rescale_score),
    )
    result = inject_and_recover(
        read_exposure(science),
        read_exposure(reference),
        aligned=aligned,
        config=InjectionConfig(
            n_fakes=n_fakes,
            n_runs=runs,
            snr_range=(snr_min, snr_max),
            n_sigma=threshold,
            seed=seed,
        ),
        difference_config=config,
    )
    output.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    summary["science"] = str(science)
    summary["reference"] = str(reference)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    result.fakes.write(output / "fakes.ecsv", format="ascii.ecsv", overwrite=True)
    result.false_positives.write(
        output / "false_positives.ecsv", format="ascii.ecsv", overwrite=True
    )
    result.completeness.write(output / "completeness.ecsv", format="ascii.ecsv", overwrite=True)
    if plots:
        plot_injection(result, output)

    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    n_rec = summary["n_recovered"]
    typer.echo(f"method              {result.method}")
    typer.echo(f"fakes               {summary['n_fakes']} in {result.n_runs} runs, {n_rec} found")
    typer.echo(
        f"S/N at 50%          {num(summary['snr50'], '.2f')} "
        f"± {num(summary['snr50_error'], '.2f')} (threshold {threshold:g} sigma)"
    )
    typer.echo(
        f"false positives     {result.false_positives_per_image:.2f} per image, "
        f"{num(summary['false_positives_per_deg2'], '.0f')} per deg²"
    )
    bias = summary["flux_bias"]
    bias_err = summary["flux_bias_error"]
    typer.echo(
        f"flux bias           {num(None if bias is None else 100 * bias, '+.2f')} "
        f"± {num(None if bias_err is None else 100 * bias_err, '.2f')} % "
        f"({result.n_flux} fakes of S/N >= {result.config.bright_snr:g})"
    )
    dx, dy = result.offset_median
    rx, ry = result.offset_rms
    typer.echo(f"offsets (px)        median ({dx:+.3f}, {dy:+.3f}), rms ({rx:.3f}, {ry:.3f})")
    typer.echo(f"results             {output}")
