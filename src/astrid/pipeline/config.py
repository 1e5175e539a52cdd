"""Configuration of the pipeline runner, and the interface a candidate scorer implements.

:class:`PipelineConfig` nests one typed config per stage; entry points build it (from
:class:`astrid.settings.Settings`, or by hand) and pass it to the runner, which records
each stage's part with every processing run.

A scorer is anything with the :class:`CandidateScorer` shape: a name and version, and a
``score`` method mapping cutout triplets to probabilities. No scorer means no scores:
the score stage then records that nothing was scored and stores no ``ModelScore`` rows.
A scorer is given to the runner when one exists; the runner never makes one up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from astrid.pipeline.characterize import CharacterizeConfig
from astrid.pipeline.difference import DifferenceConfig
from astrid.science.calibrate import CalibrationConfig, OverscanConfig
from astrid.science.reference import ReferenceConfig

__all__ = ["CandidateScorer", "PipelineConfig", "reduced_image_calibration"]


def reduced_image_calibration() -> CalibrationConfig:
    """Calibration for already-reduced images (no overscan strip), as most users bring."""
    return CalibrationConfig(overscan=OverscanConfig(enabled=False))


@dataclass(frozen=True)
class PipelineConfig:
    """Options of every stage of the runner.

    Attributes
    ----------
    calibration : CalibrationConfig
        Calibration (overscan off by default: for already-reduced images).
    characterize : CharacterizeConfig
        Background, stars, PSF and the quality gate of each observation.
    reference : ReferenceConfig
        Reference selection among a field's characterised epochs (one epoch is chosen;
        ``n_coadd`` must be 1).
    difference : DifferenceConfig
        Alignment, subtraction, detection, measurement and cutouts.
    association_radius_arcsec : float
        Detections within this distance of an object's mean position join it.
    field_match_fraction : float
        At ingest, an observation joins an existing field whose centre lies within this
        fraction of its footprint radius.
    """

    calibration: CalibrationConfig = field(default_factory=reduced_image_calibration)
    characterize: CharacterizeConfig = field(default_factory=CharacterizeConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    difference: DifferenceConfig = field(default_factory=DifferenceConfig)
    association_radius_arcsec: float = 1.0
    field_match_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.reference.n_coadd != 1:
            raise ValueError(
                f"the runner uses one epoch as the reference; n_coadd={self.reference.n_coadd}"
            )
        if not self.association_radius_arcsec > 0:
            raise ValueError("association_radius_arcsec must be positive")
        if not self.field_match_fraction > 0:
            raise ValueError("field_match_fraction must be positive")

    def with_fft_threads(self, threads: int) -> PipelineConfig:
        """A copy whose ZOGY FFTs use ``threads`` threads (``-1``: all cores)."""
        subtract = self.difference.subtract
        return replace(
            self,
            difference=replace(
                self.difference,
                subtract=replace(subtract, zogy=replace(subtract.zogy, workers=threads)),
            ),
        )


@runtime_checkable
class CandidateScorer(Protocol):
    """A trained real/bogus model as the score stage uses it.

    Attributes
    ----------
    model_name : str
        Registered model name, stored with every score.
    model_version : str
        Exact version of the weights, stored with every score.
    """

    @property
    def model_name(self) -> str:
        """Registered model name, stored with every score."""
        ...

    @property
    def model_version(self) -> str:
        """Exact version of the weights, stored with every score."""
        ...

    def score(self, triplets: NDArray[np.float32]) -> NDArray[np.float64]:
        """Probabilities in [0, 1] that each candidate is real.

        Parameters
        ----------
        triplets : ndarray, shape (n, 3, size, size), float32
            Science, reference and difference cutouts of each candidate (NaN beyond the
            image edge).
        """
        ...
