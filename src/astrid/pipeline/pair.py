"""Prepare an image pair for subtraction: two branches at once, then the alignment.

A science exposure and its reference go through the same steps before they meet: read
the FITS file, calibrate (saturation and bleed masks, variance, cosmic rays), and
characterise (background and noise maps, stars, PSF model, quality). The two branches
are independent, and each is mostly single-threaded (sep and the cosmic-ray search hold
the GIL), so :func:`prepare_pair` runs the reference branch in a child process while
this process runs the science branch, then resamples the reference onto the science
grid using the PSF stars of both. On two cores this halves the time to the alignment.

The child gets the file path and the configurations, not the pixels; only its result
comes back (pickled). Errors raised in the child (corrupt file, too few stars) reach
the caller as the same typed errors.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from astrid.io.fits import read_exposure
from astrid.pipeline.characterize import Characterization, CharacterizeConfig, characterize
from astrid.pipeline.config import reduced_image_calibration
from astrid.science.align import AlignConfig, AlignmentResult, align_to
from astrid.science.calibrate import CalibrationConfig, calibrate_exposure

__all__ = ["PairConfig", "PreparedPair", "prepare_image", "prepare_pair"]


@dataclass(frozen=True)
class PairConfig:
    """Options of :func:`prepare_pair`.

    Attributes
    ----------
    calibration : CalibrationConfig
        Calibration of both images (the default skips the overscan: reduced images).
    characterize : CharacterizeConfig
        Background, stars, PSF and quality of both images.
    align : AlignConfig
        Resampling of the reference onto the science grid.
    parallel : bool
        Run the reference branch in a child process (True) or after the science branch
        in this process (False: one core, or where processes cannot be started).
    """

    calibration: CalibrationConfig = field(default_factory=reduced_image_calibration)
    characterize: CharacterizeConfig = field(default_factory=CharacterizeConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    parallel: bool = True


@dataclass(frozen=True)
class PreparedPair:
    """Both images characterised, and the reference on the science grid.

    Attributes
    ----------
    science : Characterization
        The calibrated science exposure with its background, stars, PSF and quality.
    reference : Characterization
        The same for the reference, on its own grid.
    alignment : AlignmentResult
        The reference resampled onto the science grid, with the astrometric residual.
    seconds : dict of str to float
        Wall-clock seconds of ``"science"`` and ``"reference"`` (each branch, measured
        where it ran), ``"branches"`` (until both were done) and ``"align"``.
    """

    science: Characterization
    reference: Characterization
    alignment: AlignmentResult
    seconds: dict[str, float]


def prepare_image(
    path: str | Path,
    *,
    calibration: CalibrationConfig | None = None,
    config: CharacterizeConfig | None = None,
    threads: int | None = None,
) -> tuple[Characterization, float]:
    """Read, calibrate and characterise one FITS image; returns it and the seconds taken.

    ``threads`` limits the BLAS/OpenMP thread pools while it runs (``None``: as they are).

    Raises
    ------
    CorruptFitsFile, BadImageShape, EmptyImage
        The file cannot be used.
    """
    start = time.perf_counter()
    with threadpool_limits(threads):
        exposure = calibrate_exposure(read_exposure(path), config=calibration)
        measured = characterize(exposure, config=config)
    return measured, time.perf_counter() - start


def _context() -> multiprocessing.context.BaseContext:
    # fork starts the child without importing anything again (about a second of
    # imports saved); spawn where fork does not exist.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def prepare_pair(
    science: str | Path, reference: str | Path, *, config: PairConfig | None = None
) -> PreparedPair:
    """Calibrate and characterise a science image and its reference, then align them.

    Parameters
    ----------
    science : str or Path
        Science FITS file: its grid and WCS are the output's.
    reference : str or Path
        Reference FITS file of the same field.
    config : PairConfig or None
        Options; ``None`` uses the defaults.

    Returns
    -------
    PreparedPair

    Raises
    ------
    CorruptFitsFile, NoCelestialWcs, InsufficientOverlap, StarMatchFailed
        As :func:`prepare_image` and :func:`~astrid.science.align.align_to` raise them.
    """
    cfg = config or PairConfig()
    start = time.perf_counter()
    cal, char = cfg.calibration, cfg.characterize
    if cfg.parallel:
        with ProcessPoolExecutor(max_workers=1, mp_context=_context()) as pool:
            pending: Future[tuple[Characterization, float]] = pool.submit(
                prepare_image, reference, calibration=cal, config=char, threads=1
            )
            try:
                # One thread each: the two branches already fill two cores.
                sci, sci_seconds = prepare_image(science, calibration=cal, config=char, threads=1)
            except BaseException:
                pending.cancel()
                raise
            ref, ref_seconds = pending.result()
    else:
        sci, sci_seconds = prepare_image(science, calibration=cal, config=char)
        ref, ref_seconds = prepare_image(reference, calibration=cal, config=char)
    branches = time.perf_counter() - start
    t0 = time.perf_counter()
    alignment = align_to(
        sci.exposure,
        ref.exposure,
        config=cfg.align,
        science_stars=np.column_stack([sci.stars["x"], sci.stars["y"]]),
        reference_stars=np.column_stack([ref.stars["x"], ref.stars["y"]]),
    )
    seconds = {
        "science": sci_seconds,
        "reference": ref_seconds,
        "branches": branches,
        "align": time.perf_counter() - t0,
    }
    return PreparedPair(science=sci, reference=ref, alignment=alignment, seconds=seconds)
