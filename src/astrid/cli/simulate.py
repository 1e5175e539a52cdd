"""``astrid simulate``: write a seeded simulated survey as FITS files with its truth."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from astrid.cli.errors import friendly_errors

__all__ = ["simulate"]

#: Stars and galaxies per 1024x1024 pixels when not given.
_STARS_PER_MPIX = 1000
_GALAXIES_PER_MPIX = 300


class PsfProfileChoice(StrEnum):
    """PSF profile of the simulated images."""

    moffat = "moffat"
    gaussian = "gaussian"


@friendly_errors
def simulate(
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Folder for epoch_NNN.fits, transients.csv, stars.csv, galaxies.csv and "
        "epochs.csv (created if missing).",
    ),
    size: int = typer.Option(
        1024, "--size", min=64, max=16384, help="Side of the square images, pixels."
    ),
    epochs: int = typer.Option(3, "--epochs", min=1, help="Number of epochs of the field."),
    transients: int = typer.Option(
        5,
        "--transients",
        min=0,
        help="Random transients (appearing, supernova and variable in turn) to inject.",
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Random seed; the same seed writes identical files."
    ),
    stars: int | None = typer.Option(
        None, "--stars", min=0, help="Stars in the field (default: 1000 per 1024x1024 pixels)."
    ),
    galaxies: int | None = typer.Option(
        None, "--galaxies", min=0, help="Galaxies in the field (default: 300 per 1024x1024 pixels)."
    ),
    pixel_scale: float = typer.Option(
        0.5, "--pixel-scale", min=0.01, help="Pixel scale, arcsec per pixel."
    ),
    psf: PsfProfileChoice = typer.Option(
        PsfProfileChoice.moffat, "--psf", help="Radial profile of the PSF."
    ),
    true_psf: bool = typer.Option(
        False,
        "--true-psf/--no-true-psf",
        help="Store each epoch's true PSF model in its file (by default the files carry "
        "no PSF, as raw images do).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
) -> None:
    """Simulate a field at several epochs, with transients; write images and truth.

    One AstrID FITS file per epoch (epoch_000.fits, ...: data in ADU with
    the sky, variance, mask, TAN WCS, metadata); transients.csv, one row per
    transient per epoch it is in (id, epoch, kind, 0-based x and y in that
    epoch's image, ra, dec, flux in ADU, ideal PSF-fit snr, ...); stars.csv
    and galaxies.csv (ra, dec, mag, 0-based x and y on the nominal grid);
    epochs.csv (conditions, zero point, sky level, PSF FWHM of each epoch).
    """
    from astrid.io.fits import write_exposure
    from astrid.science.simulate import FieldConfig, simulate_survey

    area = (size / 1024.0) ** 2
    n_stars = stars if stars is not None else round(_STARS_PER_MPIX * area)
    n_galaxies = galaxies if galaxies is not None else round(_GALAXIES_PER_MPIX * area)
    config = FieldConfig(
        shape=(size, size),
        pixel_scale=pixel_scale,
        n_stars=n_stars,
        n_galaxies=n_galaxies,
        psf_profile=psf.value,
    )
    image_paths = [output / f"epoch_{i:03d}.fits" for i in range(epochs)]
    table_paths = {
        name: output / f"{name}.csv" for name in ("transients", "stars", "galaxies", "epochs")
    }
    if not overwrite:
        existing = [p for p in [*image_paths, *table_paths.values()] if p.exists()]
        if existing:
            raise typer.BadParameter(
                f"{existing[0]} exists; pass --overwrite to replace it", param_hint="--output"
            )

    survey = simulate_survey(config, seed=seed, n_epochs=epochs, n_transients=transients)

    output.mkdir(parents=True, exist_ok=True)
    for epoch, path in zip(survey.epochs, image_paths, strict=True):
        exposure = epoch.exposure
        if true_psf:
            exposure = exposure.copy(psf=epoch.true_psf)
        write_exposure(exposure, path, overwrite=overwrite)
    tables = {
        "transients": survey.transients,
        "stars": survey.stars,
        "galaxies": survey.galaxies,
        "epochs": survey.epoch_table,
    }
    for name, table in tables.items():
        table.write(table_paths[name], format="ascii.csv", overwrite=True)
    typer.echo(
        f"wrote {epochs} epochs of {size}x{size} pixels, {len(survey.transient_specs)} "
        f"transients ({len(survey.transients)} epoch detections) to {output}"
    )
