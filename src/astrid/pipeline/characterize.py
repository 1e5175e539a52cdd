"""Characterise an exposure: background, stars, PSF and quality, in one pass.

This adapter chains the pure science kernels on an in-memory
:class:`~astrid.exposure.Exposure`; the command line and the pipeline runner call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from astropy.table import Table

from astrid.errors import TooFewStarsForPsf
from astrid.exposure import UNUSABLE, Exposure, MaskBit
from astrid.science.background import BackgroundConfig, BackgroundResult, estimate_background
from astrid.science.psf import PsfConfig, estimate_psf
from astrid.science.quality import (
    QualityConfig,
    QualityReport,
    ZeroPointTie,
    gate_quality,
    measure_quality,
)
from astrid.science.stars import StarConfig, find_sources, select_stars

__all__ = ["Characterization", "CharacterizeConfig", "characterize"]


@dataclass(frozen=True)
class CharacterizeConfig:
    """Options of :func:`characterize`, one per stage.

    Attributes
    ----------
    background : BackgroundConfig
        Background mesh.
    stars : StarConfig
        Detection and clean-star selection.
    psf : PsfConfig
        PSF modelling.
    quality : QualityConfig
        Gate thresholds.
    """

    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    stars: StarConfig = field(default_factory=StarConfig)
    psf: PsfConfig = field(default_factory=PsfConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


@dataclass(frozen=True)
class Characterization:
    """What :func:`characterize` measured.

    Attributes
    ----------
    exposure : Exposure
        The input exposure with its PSF attached (``psf`` stays ``None`` when it could
        not be modelled; the report then says why).
    background : BackgroundResult
        Background and noise maps.
    sources : Table
        Every detection (see :func:`astrid.science.stars.find_sources`).
    stars : Table
        The clean stars selected from them.
    quality : QualityReport
        Metrics and the gate's verdict.
    """

    exposure: Exposure
    background: BackgroundResult
    sources: Table
    stars: Table
    quality: QualityReport


def characterize(
    exposure: Exposure,
    *,
    config: CharacterizeConfig | None = None,
    tie: ZeroPointTie | None = None,
) -> Characterization:
    """Measure background, stars, PSF and quality of an exposure and gate it.

    Parameters
    ----------
    exposure : Exposure
        A calibrated exposure.
    config : CharacterizeConfig or None
        Options; ``None`` uses the defaults.
    tie : ZeroPointTie or None
        Photometric tie to the reference, if already measured.

    Returns
    -------
    Characterization
        Too few stars for a PSF is not raised: it fails the gate with the numbers, so
        a run can record the failure and go on.
    """
    cfg = config or CharacterizeConfig()
    unusable = (exposure.mask & np.uint16(UNUSABLE)) != 0
    saturated = (exposure.mask & np.uint16(MaskBit.SATURATED)) != 0
    bkg = estimate_background(exposure.data, mask=unusable, config=cfg.background)
    bad = unusable & ~saturated
    sources = find_sources(
        exposure.data,
        background=bkg.background,
        noise=bkg.rms,
        mask=bad,
        saturated=saturated,
        config=cfg.stars,
    )
    stars = select_stars(sources, exposure.shape, config=cfg.stars)
    psf_model = None
    psf_problem: str | None = None
    try:
        psf_result = estimate_psf(
            exposure.data,
            background=bkg.background,
            noise=bkg.rms,
            mask=bad,
            saturated=saturated,
            sources=sources,
            config=cfg.psf,
        )
        psf_model = psf_result.model
        stars = psf_result.stars
    except TooFewStarsForPsf as exc:
        psf_problem = str(exc)
    report = measure_quality(
        mask=exposure.mask,
        background=bkg.background,
        noise=bkg.rms,
        n_stars=len(stars),
        psf=psf_model,
        zero_point=exposure.meta.zero_point,
        pixel_scale=exposure.pixel_scale,
        tie=tie,
    )
    report = gate_quality(report, cfg.quality)
    if psf_problem is not None:
        report = replace(report, passed=False, reasons=(*report.reasons, psf_problem))
    out = exposure.copy(psf=psf_model) if psf_model is not None else exposure
    return Characterization(
        exposure=out, background=bkg, sources=sources, stars=stars, quality=report
    )
