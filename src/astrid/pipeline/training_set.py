"""Build the real/bogus training set: fakes and imperfect pairs through the pair pipeline.

Every example is a candidate that :func:`astrid.pipeline.difference.difference_pair`
detected and cut out, exactly as production candidates are; labels come from what was
injected (:func:`astrid.ml.dataset.label_candidates`). Two kinds of pairs feed it:

Simulated pairs (:class:`SimulatedPairSpec`)
    A field is drawn once (stars down to saturation, galaxies, bad columns) on a detector
    like ZTF's (1"/px, 1.3-3.2 px FWHM), DECam's (0.263"/px), Rubin's (0.2"/px, 3-5.5 px)
    or a generic one, so the science FWHM spans about 1.3-6 pixels; each of its pairs is a
    deep reference and a shallower science epoch with their own seeing, sky, transparency
    and depth, and none holds a real transient. Each pair follows one recipe:

    ``resampled``
        Different pointings (offsets of up to 15 px and a small rotation): the pipeline
        aligns the reference by resampling, as in production.
    ``misaligned``
        The same pointing but the science shifted by 0.3-1 px while the pipeline is told
        the pair is aligned: every star leaves a dipole.
    ``psf-mismatch``
        Aligned, but the reference PSF handed to the subtraction is the true one
        stretched by 8-25 %: every bright star leaves a ring.

    Imperfections on top, drawn per pair: cosmic rays left in the science (no
    calibration, so nothing masks them) and sometimes in the reference, saturated stars
    with bleed trails, bad columns left unmasked, candidates at image edges.

Real pairs (:class:`RealPairSpec`)
    The DECam pair of the sfft test data (exposures of two visits resampled onto one
    grid, yet offset by about 0.6 px, so the pipeline registers them with their stars:
    builder version 4; version 3 took them as aligned and every star left a dipole). A
    source at the centre of its cut-outs changed between the visits; its candidates are
    left out rather than called bogus (:data:`SFFT_DECAM_KNOWN_SOURCES`, builder version
    8). The Legacy Surveys test cut-outs are tried too but hold 0-2 stars, so the
    pipeline refuses them (:class:`~astrid.errors.TooFewStarsForPsf`); they are listed in
    the manifest as skipped with that reason.

Fakes are point sources drawn with the image's PSF (the true one for simulations, the
pipeline's estimate for real images) with Poisson noise, at S/N (ideal, in the
difference) log-uniform between 3 and 200: in the science image (positive candidates:
new sources, brightenings) or in the reference (negative ones: sources that faded),
isolated, on galaxies (offset from the nucleus) or on stars (variables; the host is one
of the brightest 20 % of the field's stars, each equally likely, or with
``FakeConfig(star_hosts="magnitude")`` drawn uniformly in magnitude, so that changes of a
few per cent of a bright star's flux are as common as changes on faint stars). A
candidate on a fake that something else at the spot outweighs (a star's residual, a
dipole lobe) is left out, not labelled real (``FakeConfig.dominated_snr``, builder
version 7).

Results are cached per pair (a content-addressed ``.npz`` under ``cache/``), so a
rebuild only runs the pairs whose specification or the builder's version changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
from astropy.table import Table
from numpy.typing import NDArray
from scipy import ndimage

from astrid import __version__
from astrid.errors import AstridError
from astrid.exposure import Exposure, MaskBit
from astrid.ml.dataset import (
    AMBIGUOUS,
    BOGUS,
    REAL,
    TrainingSet,
    assign_splits,
    label_candidates,
)
from astrid.pipeline.difference import DifferenceConfig, DifferenceResult, difference_pair
from astrid.pipeline.injection import ideal_difference_snr
from astrid.science.psf_model import PsfModel
from astrid.science.simulate import (
    EpochConditions,
    FieldConfig,
    SimulatedExposure,
    SimulatedField,
    add_point_sources,
    render_point_sources,
    simulate_exposure,
    simulate_field,
)
from astrid.science.subtract import SubtractConfig

__all__ = [
    "BUILDER_VERSION",
    "SFFT_DECAM_KNOWN_SOURCES",
    "PairOutcome",
    "RealPairSpec",
    "SimulatedPairSpec",
    "TrainingSetConfig",
    "build_training_set",
    "few_star_difference_config",
    "load_training_set",
    "real_pair_baseline",
    "real_pair_specs",
    "run_real_pair",
    "run_simulated_pair",
    "save_training_set",
    "simulate_pair",
    "simulated_pair_specs",
]

BUILDER_VERSION = "9"
"""Version of the recipes and of the pipeline behaviour they rely on (5: WCS errors above
0.15 px corrected with stars, ``AlignConfig.max_wcs_error_pix``; 6: that decision taken on
the fitted correction; 7: candidates that something else at a fake's spot outweighs are
left out, ``FakeConfig.dominated_snr``, and the fakes table records each fake's measured
S/N, placement and whether it was outweighed; 8: candidates on a source of a real pair
that changed between its visits are left out, not labelled bogus,
``RealPairSpec.known_sources``, which changes real pairs only, though every pair is
rebuilt; 9: the fakes table records whether a simulated fake lies on a cosmic ray, a bad
column or a satellite trail of either epoch, ``on_artefact``; examples and labels as
version 8); part of every cache key, so changing it rebuilds every pair."""

Recipe = Literal["resampled", "misaligned", "psf-mismatch"]
Profile = Literal["ztf", "decam", "rubin", "generic"]

_RECIPES: tuple[Recipe, ...] = ("resampled", "misaligned", "psf-mismatch")
_PROFILES: tuple[Profile, ...] = ("ztf", "decam", "rubin", "generic")

#: Where fakes sit, in the order of ``FakeConfig.placement``.
_PLACEMENTS = ("isolated", "galaxy", "star")

#: Images of the sfft DECam test data, relative to the shared data folder.
_SFFT = "images_sfft_decam/input_data/DEC-OBS{visit}{exposure}.mini.fits"

#: Sources of the sfft DECam cut-outs that changed between the two visits (RA, Dec in
#: degrees). The pair pipeline finds this one, at the centre of the cut-outs, in all ten
#: exposure pairs (every exposure of visit OBS04 against two of visit OBS18: independent
#: noise, cosmic rays and seeing), brighter in OBS04, at S/N 13-23 and within 0.07
#: arcsec of one position: an astrophysical change, not an artefact
#: (``bench/ml_eval.py real-pair-sources`` repeats the check). Builder versions up to 7
#: labelled its candidates bogus.
SFFT_DECAM_KNOWN_SOURCES: tuple[tuple[float, float], ...] = ((318.108232, -66.015712),)

#: Same-band pairs of the Legacy Surveys test cut-outs (science, reference).
_LEGACY = "images_legacypipe/"
LEGACY_PAIRS: tuple[tuple[str, str, str], ...] = (
    (
        "legacypipe-testcase6",
        "testcase6/images/decam/CP/V4.8.2a/CP20181213/c4d_181214_050844_ooi_g_ls9.S9.fits",
        "testcase6/images/decam/CP/V4.8.2a/CP20181103/c4d_181104_072440_ooi_g_ls9.S4.fits",
    ),
    (
        "legacypipe-testcase6",
        "testcase6/images/decam/CP/V4.8.2a/CP20181214/c4d_181215_051332_ooi_r_ls9.S9.fits",
        "testcase6/images/decam/CP/V4.8.2a/CP20171112/c4d_171113_061941_ooi_r_ls9.S4.fits",
    ),
    (
        "legacypipe-testcase6",
        "testcase6/images/decam/CP/V4.8.2a/CP20181214/c4d_181215_045000_ooi_z_ls9.S9.fits",
        "testcase6/images/decam/CP/V4.8.2a/CP20150109/c4d_150110_053718_ooi_z_ls9.S4.fits",
    ),
    (
        "legacypipe-mzlsbass3",
        "mzlsbass3/images/90prime/CP20160405/ksb_160406_094107_ooi_r_v1-ccd3.fits",
        "mzlsbass3/images/90prime/CP20160202/ksb_160203_115029_ooi_r_v1-ccd2.fits",
    ),
    (
        "legacypipe-mzlsbass3",
        "mzlsbass3/images/mosaic/CP20160312v2/k4m_160313_102424_ooi_zd_v2-ccd3.fits",
        "mzlsbass3/images/mosaic/CP20160310v2/k4m_160311_103249_ooi_zd_v2-ccd3.fits",
    ),
)
"""``(field, science, reference)`` of the Legacy Surveys test pairs, paths relative to
``images_legacypipe``."""


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class FakeConfig:
    """How fakes are drawn into a pair.

    Attributes
    ----------
    n_fakes : tuple of int
        Range of the number of fakes per pair (uniform, inclusive).
    snr_range : tuple of float
        Range of their ideal S/N in the difference (log-uniform).
    reference_fraction : float
        Share of fakes put into the reference (negative candidates).
    placement : tuple of float
        Shares of isolated fakes, fakes on galaxies and fakes on stars.
    min_separation_fwhm : float
        Least distance between two fakes, in science FWHM.
    match_radius_fwhm : float
        A candidate within this many science FWHM of a fake of its polarity is real.
    max_bogus : int
        At most this many bogus candidates are kept per pair (a random subset), so
        that one badly misaligned pair's hundreds of near-identical dipoles do not
        swamp the rest.
    star_hosts : {"uniform", "magnitude"}
        How the host of a fake on a star is chosen among the visible stars (the
        brightest 20 % of the field). ``"uniform"`` (the default, the recipe of the
        shipped model): every visible star equally likely, which puts most variables on
        the faint hosts, which are many. ``"magnitude"``: a magnitude is drawn uniformly
        between the brightest and the faintest of them and the star nearest to it in
        magnitude hosts the fake, so bright hosts (few in number) are as common per
        magnitude as faint ones (see ``docs/ml.md`` for what it changes).
    dominated_snr : float or None
        A candidate matched to a fake is left out (ambiguous, not real) when the part of
        its measured S/N that the fake does not explain reaches this and the fake's own
        S/N: a star's residual or a dipole lobe that the pipeline detects anyway and
        that outweighs the fake (:func:`astrid.ml.dataset.label_candidates`). The
        default is the detection threshold, 5; None labels every matched candidate real
        (the rule of builder versions up to 6).
    on_artefact : {"real", "ambiguous"}
        What becomes of a candidate on a simulated fake with a cosmic ray, a bad column
        or a satellite trail's core of either epoch within 1 FWHM (the fakes table's
        ``on_artefact``). ``"real"`` (the default; every set before this option): it is
        real, as on any other fake. ``"ambiguous"``: it is left out, as a candidate an
        artefact outweighs is. A training choice, which did not pay (``docs/ml.md``):
        the set's own test split loses those candidates too, so a set that measures a
        model keeps the default. Fakes in real images, whose artefacts are not known,
        keep their label.
    """

    n_fakes: tuple[int, int] = (40, 80)
    snr_range: tuple[float, float] = (3.0, 200.0)
    reference_fraction: float = 0.35
    placement: tuple[float, float, float] = (0.55, 0.25, 0.2)
    min_separation_fwhm: float = 4.0
    match_radius_fwhm: float = 1.0
    max_bogus: int = 100
    star_hosts: Literal["uniform", "magnitude"] = "uniform"
    dominated_snr: float | None = 5.0
    on_artefact: Literal["real", "ambiguous"] = "real"

    def __post_init__(self) -> None:
        if self.on_artefact not in ("real", "ambiguous"):
            raise ValueError(f"on_artefact must be 'real' or 'ambiguous', not {self.on_artefact!r}")
        if self.star_hosts not in ("uniform", "magnitude"):
            raise ValueError(
                f"star_hosts must be 'uniform' or 'magnitude', not {self.star_hosts!r}"
            )
        if self.dominated_snr is not None and not self.dominated_snr > 0:
            raise ValueError(f"dominated_snr must be positive or None, not {self.dominated_snr}")


@dataclass(frozen=True)
class TrainingSetConfig:
    """What :func:`build_training_set` builds.

    Attributes
    ----------
    name : str
        Name of the data set files (``<name>.npz``, ``<name>.manifest.json``).
    n_fields : int
        Simulated fields; each is one group of the split.
    pairs_per_field : int
        Simulated pairs per field (different epochs and recipes of the same sky).
    shape : tuple of int
        Simulated image shape ``(ny, nx)``.
    n_stars : tuple of int
        Range of the number of stars per simulated field (uniform).
    star_mags : tuple of float or None
        ``(brightest, faintest)`` star magnitude of every field; None draws the
        brightest in 11.5-14.5 per field (some saturate) with the faintest 23.5.
    seed : int
        Seed of everything drawn (recipes, images, fakes, the split of fields).
    fakes : FakeConfig
        Fakes per pair.
    real_pairs : bool
        Include the real image pairs of the shared data (when the folder is given).
    real_runs : int
        Injection runs (fresh fake positions) per real pair.
    fractions : tuple of float
        Shares of the simulated fields' examples in training, validation and test.
    fixed_splits : tuple of (str, str)
        Groups whose split is fixed: the real DECam pair is kept for testing, so the test
        set holds real pixels no model was trained on.
    difference : DifferenceConfig
        Pipeline options for the simulated pairs (the production default; tiny test
        images need :func:`few_star_difference_config`).
    trail_fractions : tuple of float
        Shares of the science and of the reference epochs crossed by a satellite trail
        (bogus streaks; one in the reference leaves a negative streak). Drawn from their
        own stream, so they change nothing else about a pair.
    """

    name: str = "real-bogus"
    n_fields: int = 50
    pairs_per_field: int = 3
    shape: tuple[int, int] = (400, 400)
    n_stars: tuple[int, int] = (1500, 3500)
    star_mags: tuple[float, float] | None = None
    seed: int = 2024
    fakes: FakeConfig = field(default_factory=FakeConfig)
    real_pairs: bool = True
    real_runs: int = 3
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    fixed_splits: tuple[tuple[str, str], ...] = (("sfft-decam", "test"),)
    difference: DifferenceConfig = field(default_factory=DifferenceConfig)
    trail_fractions: tuple[float, float] = (0.2, 0.05)


@dataclass(frozen=True)
class SimulatedPairSpec:
    """Everything that determines one simulated pair and its fakes.

    Attributes
    ----------
    group : str
        Field id (``"sim-0007"``), the group of the split.
    profile : str
        Detector-like profile of the field (``"ztf"``, ``"decam"``, ``"rubin"``,
        ``"generic"``).
    recipe : str
        ``"resampled"``, ``"misaligned"`` or ``"psf-mismatch"`` (module docstring).
    field_config : FieldConfig
        The field (the science image's cosmic-ray rate).
    field_seed : int
        Seed of the field.
    science, reference : EpochConditions
        Conditions of the two epochs.
    science_seed, reference_seed : int
        Seeds of the two exposures.
    reference_cosmic_ray_rate : float
        Cosmic-ray rate of the reference (0 for a clean coadd).
    reference_bad_columns : bool
        Whether the reference shows the detector's bad columns (a single exposure) or
        not (a dithered coadd).
    unmask_bad_columns : bool
        Clear the ``BAD`` flag of bad columns, so the pipeline sees them as data.
    psf_scale : float
        Stretch of the reference PSF handed to the subtraction (1 for the true PSF, or
        the pipeline's own estimate when the recipe is not ``psf-mismatch``).
    fakes : FakeConfig
        Fakes to draw.
    fake_seed : int
        Seed of the fakes.
    """

    group: str
    profile: str
    recipe: str
    field_config: FieldConfig
    field_seed: int
    science: EpochConditions
    reference: EpochConditions
    science_seed: int
    reference_seed: int
    reference_cosmic_ray_rate: float
    reference_bad_columns: bool
    unmask_bad_columns: bool
    psf_scale: float
    fakes: FakeConfig
    fake_seed: int

    def key(self, config: DifferenceConfig | None = None) -> str:
        """Cache key: SHA-256 of the specification, the pipeline options (when not the
        default) and :data:`BUILDER_VERSION`."""
        payload: dict[str, Any] = {"kind": "simulated", "spec": asdict(self)}
        if config is not None and config != DifferenceConfig():
            payload["difference"] = asdict(config)
        return _key(payload)


@dataclass(frozen=True)
class RealPairSpec:
    """A real image pair with fakes injected.

    Attributes
    ----------
    group : str
        Field id (``"sfft-decam"``).
    source : str
        Name of the data set (``"sfft-decam"``, ``"legacypipe"``).
    science, reference : str
        Paths of the two images relative to the shared data folder.
    aligned : bool
        The two are already on one pixel grid.
    few_stars : bool
        Use :func:`few_star_difference_config` (cut-outs with a handful of stars).
    run : int
        Injection run: fresh fake positions per run.
    keep_bogus : bool
        Keep the bogus candidates (only in one run per pair: they repeat between runs).
    fakes : FakeConfig
        Fakes to draw.
    seed : int
        Seed of the fakes.
    known_sources : tuple of (float, float)
        Sky positions (RA, Dec, degrees) of sources that changed between the two
        epochs: real astrophysical changes that no fake explains. A candidate within two
        FWHM of one is left out (ambiguous), not labelled bogus.
    """

    group: str
    source: str
    science: str
    reference: str
    aligned: bool
    few_stars: bool
    run: int
    keep_bogus: bool
    fakes: FakeConfig
    seed: int
    known_sources: tuple[tuple[float, float], ...] = ()

    def key(self, data_dir: Path) -> str:
        """Cache key: the specification, the two files' sizes and :data:`BUILDER_VERSION`."""
        sizes = [
            (data_dir / p).stat().st_size if (data_dir / p).is_file() else -1
            for p in (self.science, self.reference)
        ]
        return _key({"kind": "real", "spec": asdict(self), "sizes": sizes})


def _key(payload: dict[str, Any]) -> str:
    text = json.dumps({"builder": BUILDER_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def few_star_difference_config(base: DifferenceConfig | None = None) -> DifferenceConfig:
    """Pipeline options for cut-outs with only a handful of stars (5-6 clean ones).

    A constant PSF from 3 stars and the photometric tie from 3, as the subtraction
    benchmark uses for the sfft DECam pair.
    """
    base = base or DifferenceConfig()
    psf = replace(base.characterize.psf, min_stars=3, grid=(1, 1))
    return replace(
        base,
        characterize=replace(base.characterize, psf=psf),
        subtract=replace(
            base.subtract,
            flux_scale=replace(base.subtract.flux_scale, min_stars=3),
        ),
    )


def _single_threaded(config: DifferenceConfig) -> DifferenceConfig:
    sub: SubtractConfig = config.subtract
    return replace(config, subtract=replace(sub, zogy=replace(sub.zogy, workers=1)))


# --------------------------------------------------------------------------------------
# drawing the specifications


def _profile_field(
    profile: Profile, rng: np.random.Generator, config: TrainingSetConfig
) -> tuple[FieldConfig, tuple[float, float], tuple[float, float]]:
    """Field config and the science and reference seeing ranges (arcsec) of a profile."""
    # Seeing reaches down to about 1.2 pixels: real alerts of well-sampled-looking
    # surveys include nights where a point source is barely wider than a cosmic ray.
    if profile == "ztf":
        scale, science, reference = 1.0, (1.2, 3.2), (1.2, 2.5)
    elif profile == "decam":
        scale, science, reference = 0.263, (0.8, 1.5), (0.7, 1.2)
    elif profile == "rubin":
        scale, science, reference = 0.2, (0.6, 1.1), (0.55, 0.9)
    else:
        scale = float(rng.uniform(0.4, 0.8))
        science = (1.2 * scale, 6.0 * scale)
        reference = (1.2 * scale, 4.5 * scale)
    moffat = rng.random() < 0.8
    field_config = FieldConfig(
        shape=config.shape,
        pixel_scale=scale,
        ra=float(rng.uniform(0.0, 360.0)),
        dec=float(rng.uniform(-60.0, 60.0)),
        n_stars=int(rng.integers(*config.n_stars)),
        star_mag_range=(
            (float(rng.uniform(11.5, 14.5)), 23.5) if config.star_mags is None else config.star_mags
        ),
        n_galaxies=int(rng.integers(100, 400)),
        n_bad_columns=int(rng.integers(0, 5)),
        cosmic_ray_rate=float(rng.uniform(0.3, 3.0)),
        sky_gradient=float(rng.uniform(0.0, 0.05)),
        psf_profile="moffat" if moffat else "gaussian",
        moffat_beta=float(rng.uniform(2.5, 4.5)),
        psf_variation=float(rng.uniform(0.0, 0.15)),
        psf_ellipticity=float(rng.uniform(0.0, 0.12)),
    )
    return field_config, science, reference


def simulated_pair_specs(config: TrainingSetConfig) -> list[SimulatedPairSpec]:
    """The simulated pairs of a training set, drawn deterministically from its seed.

    Parameters
    ----------
    config : TrainingSetConfig
        Number of fields and pairs, image shape, fakes, seed.

    Returns
    -------
    list of SimulatedPairSpec
        ``n_fields * pairs_per_field`` pairs, field by field.
    """
    specs: list[SimulatedPairSpec] = []
    for field_index in range(config.n_fields):
        rng = np.random.default_rng([config.seed, field_index])
        profile = _PROFILES[int(rng.choice(len(_PROFILES), p=[0.4, 0.2, 0.2, 0.2]))]
        field_config, science_seeing, reference_seeing = _profile_field(profile, rng, config)
        field_seed = int(rng.integers(2**31))
        for pair in range(config.pairs_per_field):
            recipe = _RECIPES[int(rng.choice(len(_RECIPES), p=[0.5, 0.25, 0.25]))]
            exposure = float(rng.uniform(30.0, 120.0))
            mjd = 60000.0 + 30.0 * pair
            reference = EpochConditions(
                fwhm=float(rng.uniform(*reference_seeing)),
                sky_brightness=float(rng.uniform(20.0, 21.5)),
                exposure_time=exposure * float(rng.uniform(2.0, 8.0)),
                transparency=float(rng.uniform(0.8, 1.0)),
                mjd=mjd,
                airmass=float(rng.uniform(1.0, 1.3)),
            )
            if recipe == "resampled":
                dx, dy = rng.uniform(-15.0, 15.0, 2)
                rotation = float(rng.uniform(-0.05, 0.05))
            elif recipe == "misaligned":
                angle = rng.uniform(0.0, 2.0 * math.pi)
                length = rng.uniform(0.3, 1.0)
                dx, dy = length * math.cos(angle), length * math.sin(angle)
                rotation = 0.0
            else:
                dx = dy = rotation = 0.0
            science = EpochConditions(
                fwhm=float(rng.uniform(*science_seeing)),
                sky_brightness=float(rng.uniform(19.5, 21.5)),
                exposure_time=exposure,
                transparency=float(rng.uniform(0.6, 1.0)),
                dx=float(dx),
                dy=float(dy),
                rotation=rotation,
                mjd=mjd + 5.0,
                airmass=float(rng.uniform(1.0, 1.8)),
            )
            trails = np.random.default_rng([config.seed, field_index, pair, 1])
            science_trail, reference_trail = trails.random(2) < config.trail_fractions
            science = replace(science, satellite_trails=int(science_trail))
            reference = replace(reference, satellite_trails=int(reference_trail))
            psf_scale = 1.0
            if recipe == "psf-mismatch":
                stretch = float(rng.uniform(1.08, 1.25))
                psf_scale = stretch if rng.random() < 0.5 else 1.0 / stretch
            specs.append(
                SimulatedPairSpec(
                    group=f"sim-{field_index:04d}",
                    profile=profile,
                    recipe=recipe,
                    field_config=field_config,
                    field_seed=field_seed,
                    science=science,
                    reference=reference,
                    science_seed=int(rng.integers(2**31)),
                    reference_seed=int(rng.integers(2**31)),
                    reference_cosmic_ray_rate=(
                        float(rng.uniform(0.1, 1.0)) if rng.random() < 0.3 else 0.0
                    ),
                    reference_bad_columns=bool(rng.random() < 0.3),
                    unmask_bad_columns=bool(rng.random() < 0.4),
                    psf_scale=psf_scale,
                    fakes=config.fakes,
                    fake_seed=int(rng.integers(2**31)),
                )
            )
    return specs


def real_pair_specs(config: TrainingSetConfig) -> list[RealPairSpec]:
    """The real image pairs: the sfft DECam visits crossed, and the Legacy Surveys pairs.

    Each sfft science exposure (visit OBS04) is paired with each reference exposure
    (visit OBS18) of the same letter and the next one, ``config.real_runs`` injection
    runs each; the Legacy Surveys pairs get one run (they are refused for lack of stars).
    """
    specs: list[RealPairSpec] = []
    letters = "abcde"
    for i, science in enumerate(letters):
        for reference in (letters[i], letters[(i + 1) % len(letters)]):
            for run in range(config.real_runs):
                specs.append(
                    RealPairSpec(
                        group="sfft-decam",
                        source="sfft-decam",
                        science=_SFFT.format(visit="04", exposure=science),
                        reference=_SFFT.format(visit="18", exposure=reference),
                        # One pixel grid, but the stars of the two visits are offset by
                        # about 0.6 px: registered with the stars, as production does.
                        aligned=False,
                        few_stars=True,
                        run=run,
                        keep_bogus=run == 0,
                        fakes=replace(config.fakes, n_fakes=(25, 35)),
                        seed=config.seed + 1000 * i + 100 * letters.index(reference) + run,
                        known_sources=SFFT_DECAM_KNOWN_SOURCES,
                    )
                )
    for k, (group, science_path, reference_path) in enumerate(LEGACY_PAIRS):
        specs.append(
            RealPairSpec(
                group=group,
                source="legacypipe",
                science=_LEGACY + science_path,
                reference=_LEGACY + reference_path,
                aligned=False,
                few_stars=True,
                run=0,
                keep_bogus=True,
                fakes=replace(config.fakes, n_fakes=(3, 5)),
                seed=config.seed + 50000 + k,
            )
        )
    return specs


# --------------------------------------------------------------------------------------
# running one pair


@dataclass(frozen=True)
class PairOutcome:
    """Examples of one pair, or why it gave none.

    Attributes
    ----------
    key : str
        Cache key of the pair.
    group : str
        Its field.
    source : str
        ``"simulated"`` or the real data set's name.
    status : str
        ``"ok"``, or ``"skipped: <Error>: <reason>"``.
    arrays : dict of str to ndarray
        Per-example columns (``triplets``, ``labels``, ``kind``, ``snr``, ``polarity``,
        ``fwhm``, ``pixel_scale``) and per-fake ones (``fake_snr``, ``fake_polarity``,
        ``fake_detected``, ``fake_masked``, ``fake_measured_snr``, ``fake_dominated``,
        ``fake_where``, ``fake_on_artefact``); empty when skipped.
        :func:`build_training_set` keeps the outcomes without ``triplets``, which stay in
        each pair's cache file until the set is joined.
    n_candidates : int
        Candidates the pipeline found.
    n_ambiguous : int
        Of those, left out as ambiguous.
    seconds : float
        Time the pair took.
    """

    key: str
    group: str
    source: str
    status: str
    arrays: dict[str, NDArray[Any]]
    n_candidates: int = 0
    n_ambiguous: int = 0
    seconds: float = 0.0


def _scaled_psf(psf: PsfModel, scale: float) -> PsfModel:
    """The PSF stretched by ``scale`` about each stamp's centre (unit sum kept)."""
    if scale == 1.0:
        return psf
    size = psf.size
    centre = (size - 1) / 2.0
    stamps = np.empty_like(psf.stamps)
    for iy in range(psf.stamps.shape[0]):
        for ix in range(psf.stamps.shape[1]):
            stretched = ndimage.affine_transform(
                psf.stamps[iy, ix].astype(np.float64),
                np.diag([1.0 / scale, 1.0 / scale]),
                offset=centre - centre / scale,
                order=3,
                mode="constant",
            )
            stretched = np.clip(stretched, 0.0, None)
            stamps[iy, ix] = stretched / stretched.sum()
    return replace(
        psf,
        stamps=stamps.astype(np.float32),
        fwhm=psf.fwhm * scale,
        fwhm_grid=psf.fwhm_grid * scale,
    )


def _choose_positions(
    rng: np.random.Generator,
    n: int,
    shape: tuple[int, int],
    separation: float,
    galaxies: Table,
    stars: Table,
    placement: tuple[float, float, float],
    pixel_scale: float,
    margin: float,
    star_hosts: str = "uniform",
) -> tuple[NDArray[np.float64], NDArray[np.float64], list[str]]:
    """Fake positions (science grid) and where each sits, at least ``separation`` apart.

    Hosts of fakes on stars are drawn as :attr:`FakeConfig.star_hosts` says.
    """
    ny, nx = shape
    xs: list[float] = []
    ys: list[float] = []
    where: list[str] = []

    def inside(x: float, y: float) -> bool:
        return margin <= x <= nx - 1 - margin and margin <= y <= ny - 1 - margin

    g_x, g_y = np.asarray(galaxies["x"], float), np.asarray(galaxies["y"], float)
    g_ok = np.array([inside(a, b) for a, b in zip(g_x, g_y, strict=True)], bool)
    s_x, s_y = np.asarray(stars["x"], float), np.asarray(stars["y"], float)
    s_flux = np.asarray(stars["flux"], float) if "flux" in stars.colnames else np.ones(len(s_x))
    s_ok = np.array([inside(a, b) for a, b in zip(s_x, s_y, strict=True)], bool)
    if len(s_flux):
        s_ok &= s_flux >= np.percentile(s_flux, 80)  # a visible star, not the faint crowd
    hosts = np.flatnonzero(s_ok)
    # The same stars ordered by magnitude, for hosts drawn uniformly in magnitude.
    by_mag = hosts[np.argsort(-s_flux[hosts], kind="stable")]
    mag = -2.5 * np.log10(np.maximum(s_flux[by_mag], 1e-30))
    r_eff = (
        np.asarray(galaxies["r_eff"], float) / pixel_scale
        if "r_eff" in galaxies.colnames
        else np.full(len(g_x), 2.0)
    )
    tries = 0
    while len(xs) < n and tries < 50 * n:
        tries += 1
        choice = _PLACEMENTS[int(rng.choice(3, p=placement))]
        if choice == "galaxy" and g_ok.any():
            k = int(rng.choice(np.flatnonzero(g_ok)))
            angle = rng.uniform(0.0, 2.0 * math.pi)
            radius = rng.uniform(0.0, 1.0) * r_eff[k]
            x, y = g_x[k] + radius * math.cos(angle), g_y[k] + radius * math.sin(angle)
        elif choice == "star" and len(hosts):
            if star_hosts == "magnitude":
                m = rng.uniform(mag[0], mag[-1])
                i = int(np.searchsorted(mag, m))
                if i == len(mag) or (i > 0 and m - mag[i - 1] < mag[i] - m):
                    i -= 1
                k = int(by_mag[i])
            else:
                k = int(rng.choice(hosts))
            x, y = s_x[k] + rng.normal(0.0, 0.05), s_y[k] + rng.normal(0.0, 0.05)
        else:
            choice = "isolated"
            x, y = rng.uniform(margin, nx - 1 - margin), rng.uniform(margin, ny - 1 - margin)
        if not inside(x, y):
            continue
        if xs and np.min(np.hypot(np.asarray(xs) - x, np.asarray(ys) - y)) < separation:
            continue
        xs.append(float(x))
        ys.append(float(y))
        where.append(choice)
    return np.asarray(xs), np.asarray(ys), where


def _inject(
    exposure: Exposure,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    flux: NDArray[np.float64],
    psf: PsfModel,
    seed: int,
) -> Exposure:
    """``exposure`` with point sources added, their Poisson noise and variance included."""
    if len(x) == 0:
        return exposure
    gain = exposure.meta.gain
    data = add_point_sources(exposure.data, x, y, flux, psf, gain=gain, seed=seed)
    variance = exposure.variance
    if gain is not None:
        model = render_point_sources(exposure.shape, x, y, flux, psf)
        variance = variance + model / np.float32(gain)
    return exposure.copy(data=data, variance=np.asarray(variance, np.float32))


def _to_grid(
    source: Exposure, target: Exposure, x: NDArray[np.float64], y: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Positions on ``source``'s pixel grid mapped to ``target``'s through their WCSs."""
    if source.wcs is None or target.wcs is None or len(x) == 0:
        return x, y
    world = source.wcs.pixel_to_world(x, y)
    tx, ty = target.wcs.world_to_pixel(world)
    return np.asarray(tx, np.float64), np.asarray(ty, np.float64)


@dataclass
class _Fakes:
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    snr: NDArray[np.float64]
    polarity: NDArray[np.int8]
    where: list[str]
    # A simulated pair's truth: a cosmic ray, bad column or trail within a FWHM (False
    # elsewhere).
    on_artefact: NDArray[np.bool_] | None = None


def _near_pixels(
    pixels: NDArray[np.bool_], x: NDArray[np.float64], y: NDArray[np.float64], radius: float
) -> NDArray[np.bool_]:
    """Whether any flagged pixel lies within ``radius`` of each position.

    Parameters
    ----------
    pixels : ndarray of bool, shape (ny, nx)
        Flagged pixels (a simulated epoch's cosmic rays, bad columns, trails).
    x, y : ndarray
        0-based positions on that grid; positions off it see only the pixels on it.
    radius : float
        Distance from a position to a pixel centre, pixels.

    Returns
    -------
    ndarray of bool
    """
    ny, nx = pixels.shape
    out = np.zeros(len(x), dtype=bool)
    r = math.ceil(radius)
    for i, (px, py) in enumerate(zip(np.asarray(x, float), np.asarray(y, float), strict=True)):
        if not (np.isfinite(px) and np.isfinite(py)):
            continue
        cx, cy = round(px), round(py)
        x0, x1 = max(cx - r, 0), min(cx + r + 1, nx)
        y0, y1 = max(cy - r, 0), min(cy + r + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = (xx - px) ** 2 + (yy - py) ** 2 <= radius**2
        out[i] = bool(np.any(pixels[y0:y1, x0:x1] & inside))
    return out


def _artefact_pixels(epoch: SimulatedExposure) -> NDArray[np.bool_]:
    """A simulated epoch's cosmic-ray, bad-column and trail-core pixels (the truth,
    masked or not)."""
    bad = (epoch.exposure.mask & np.uint16(MaskBit.BAD)) != 0
    return np.asarray(epoch.cosmic_rays, dtype=bool) | bad | np.asarray(epoch.trails, bool)


def _draw_fakes(
    rng: np.random.Generator,
    cfg: FakeConfig,
    science: Exposure,
    reference: Exposure,
    *,
    science_psf: PsfModel,
    reference_psf: PsfModel,
    reference_on_grid: Exposure,
    flux_ratio: float,
    galaxies: Table,
    stars: Table,
    pixel_scale: float,
) -> tuple[Exposure, Exposure, _Fakes]:
    """Place fakes, give them fluxes for their target S/N and inject them."""
    fwhm = float(science_psf.fwhm)
    n = int(rng.integers(cfg.n_fakes[0], cfg.n_fakes[1] + 1))
    x, y, where = _choose_positions(
        rng,
        n,
        science.shape,
        cfg.min_separation_fwhm * fwhm,
        galaxies,
        stars,
        cfg.placement,
        pixel_scale,
        margin=2.0,
        star_hosts=cfg.star_hosts,
    )
    lo, hi = cfg.snr_range
    target = np.exp(rng.uniform(math.log(lo), math.log(hi), len(x)))
    # The reference variance is read where each fake falls on that image's own grid:
    # a resampled pair's reference is offset and rotated from the science.
    gx, gy = _to_grid(science, reference_on_grid, x, y)
    per_flux = ideal_difference_snr(
        1.0,
        x,
        y,
        science_psf=science_psf,
        science_variance=science.variance,
        reference_psf=reference_psf,
        reference_variance=reference_on_grid.variance,
        flux_ratio=flux_ratio,
        reference_x=gx,
        reference_y=gy,
    )
    good = np.isfinite(per_flux) & (per_flux > 0)
    x, y, target, per_flux = x[good], y[good], target[good], per_flux[good]
    where = [w for w, g in zip(where, good, strict=True) if g]
    polarity = np.where(rng.random(len(x)) < cfg.reference_fraction, -1, 1).astype(np.int8)
    flux = target / per_flux  # science units
    pos, neg = polarity > 0, polarity < 0
    science = _inject(science, x[pos], y[pos], flux[pos], science_psf, int(rng.integers(2**31)))
    rx, ry = _to_grid(science, reference, x[neg], y[neg])
    reference = _inject(
        reference,
        rx,
        ry,
        flux[neg] / flux_ratio,
        reference_psf,
        int(rng.integers(2**31)),
    )
    return science, reference, _Fakes(x, y, target, polarity, where)


def _examples(
    result: DifferenceResult,
    fakes: _Fakes,
    cfg: FakeConfig,
    *,
    kind: str,
    pixel_scale: float,
    rng: np.random.Generator,
    keep_bogus: bool = True,
    known_x: NDArray[np.float64] | None = None,
    known_y: NDArray[np.float64] | None = None,
) -> tuple[dict[str, NDArray[Any]], int, int]:
    """Label the candidates of a pair and collect their raw triplets and columns.

    Bogus candidates within two FWHM of a known changed source (``known_x``,
    ``known_y``: science-grid positions) are left out as ambiguous.
    """
    cands = result.candidates
    psf = result.science.exposure.psf
    assert psf is not None
    cx = np.asarray(getattr(cands["x"], "value", cands["x"]), float)
    cy = np.asarray(getattr(cands["y"], "value", cands["y"]), float)
    polarity = np.asarray(cands["polarity"], np.int8)
    measured = np.abs(np.asarray(cands["snr"], float))
    fake_fwhm = np.array([psf.fwhm_at(a, b) for a, b in zip(fakes.x, fakes.y, strict=True)])
    labelled = label_candidates(
        cx,
        cy,
        polarity,
        fakes.x,
        fakes.y,
        fakes.polarity,
        cfg.match_radius_fwhm * fake_fwhm if len(fake_fwhm) else 1.0,
        candidate_snr=measured,
        fake_snr=fakes.snr,
        dominated_snr=cfg.dominated_snr,
    )
    # Each fake's matched candidate's measured S/N (NaN where none matched).
    fake_measured = np.full(len(fakes.x), np.nan)
    matched = labelled.fake_index >= 0
    fake_measured[labelled.fake_index[matched]] = measured[matched]
    all_labels = labelled.labels.copy()
    if known_x is not None and known_y is not None and len(known_x) and len(cx):
        cand_fwhm = np.array([psf.fwhm_at(a, b) for a, b in zip(cx, cy, strict=True)])
        near = np.min(np.hypot(cx[:, None] - known_x, cy[:, None] - known_y), axis=1)
        on_known = (all_labels == BOGUS) & (near <= 2.0 * cand_fwhm)
        all_labels[on_known] = AMBIGUOUS
    if cfg.on_artefact == "ambiguous" and fakes.on_artefact is not None:
        matched_fake = labelled.fake_index
        on_art = np.zeros(len(all_labels), dtype=bool)
        has = (all_labels == REAL) & (matched_fake >= 0)
        on_art[has] = np.asarray(fakes.on_artefact, dtype=bool)[matched_fake[has]]
        all_labels[on_art] = AMBIGUOUS
    keep = all_labels != AMBIGUOUS
    bogus = np.flatnonzero(all_labels == BOGUS)
    if not keep_bogus:
        keep[bogus] = False
    elif len(bogus) > cfg.max_bogus:
        keep[rng.choice(bogus, len(bogus) - cfg.max_bogus, replace=False)] = False
    idx = np.flatnonzero(keep)
    cut = result.cutouts
    triplets = np.stack([cut.science[idx], cut.reference[idx], cut.difference[idx]], axis=1)
    labels = all_labels[idx]
    match = labelled.fake_index[idx]
    snr = measured[idx]
    real = labels == 1
    snr[real] = fakes.snr[match[real]]
    kinds = np.array(
        [
            f"{kind}+{fakes.where[m]}" if lab == 1 else kind
            for lab, m in zip(labels.tolist(), match.tolist(), strict=True)
        ],
        dtype=str,
    )
    fwhm = np.array([psf.fwhm_at(a, b) for a, b in zip(cx[idx], cy[idx], strict=True)])
    arrays: dict[str, NDArray[Any]] = {
        "triplets": triplets.astype(np.float32),
        "labels": labels.astype(np.int8),
        "kind": kinds,
        "snr": snr.astype(np.float64),
        "polarity": polarity[idx],
        "fwhm": fwhm.astype(np.float32),
        "pixel_scale": np.full(len(idx), pixel_scale, np.float32),
        "fake_snr": fakes.snr.astype(np.float64),
        "fake_polarity": fakes.polarity.astype(np.int8),
        "fake_detected": labelled.detected,
        "fake_masked": _on_mask(result.subtraction.mask, fakes.x, fakes.y),
        "fake_measured_snr": fake_measured,
        "fake_dominated": labelled.dominated,
        "fake_where": np.asarray(fakes.where, dtype=str).reshape(-1),
        "fake_on_artefact": (
            np.zeros(len(fakes.x), dtype=bool)
            if fakes.on_artefact is None
            else np.asarray(fakes.on_artefact, dtype=bool)
        ),
    }
    return arrays, len(cands), int(np.sum(all_labels == AMBIGUOUS))


def _on_mask(
    mask: NDArray[np.bool_], x: NDArray[np.float64], y: NDArray[np.float64]
) -> NDArray[np.bool_]:
    """Whether each position's pixel is masked in the subtraction (or off the image).

    The subtraction's mask (saturated stars, bleed trails, bad columns, the reference's
    footprint, a border of half a PSF stamp, all grown) is where detection does not
    look: a fake centred there is found only when it shows at the mask's edge.
    """
    ix, iy = np.round(x).astype(np.intp), np.round(y).astype(np.intp)
    ny, nx = mask.shape
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    out = np.ones(len(ix), dtype=bool)
    out[inside] = mask[iy[inside], ix[inside]]
    return out


def simulate_pair(spec: SimulatedPairSpec) -> tuple[SimulatedExposure, SimulatedExposure]:
    """The science and reference epochs of a simulated pair, before any fake.

    Parameters
    ----------
    spec : SimulatedPairSpec
        The pair.

    Returns
    -------
    science, reference : SimulatedExposure
        The two epochs (the reference with its own cosmic-ray rate and, unless
        ``spec.reference_bad_columns``, without the field's bad columns).
    """
    sky: SimulatedField = simulate_field(spec.field_config, seed=spec.field_seed)
    science = simulate_exposure(sky, spec.science, seed=spec.science_seed, epoch=1)
    ref_sky = replace(
        sky,
        config=replace(spec.field_config, cosmic_ray_rate=spec.reference_cosmic_ray_rate),
        bad_columns=sky.bad_columns if spec.reference_bad_columns else sky.bad_columns[:0],
    )
    reference = simulate_exposure(ref_sky, spec.reference, seed=spec.reference_seed, epoch=0)
    return science, reference


def _unmask(exposure: Exposure) -> Exposure:
    mask = exposure.mask & ~np.uint16(MaskBit.BAD)
    return exposure.copy(mask=mask.astype(np.uint16))


def run_simulated_pair(
    spec: SimulatedPairSpec, *, config: DifferenceConfig | None = None
) -> PairOutcome:
    """Simulate a pair, inject fakes, run the pair pipeline and label its candidates.

    Parameters
    ----------
    spec : SimulatedPairSpec
        The pair.
    config : DifferenceConfig or None
        Pipeline options; None uses the production default.

    Returns
    -------
    PairOutcome
        The pair's examples, or a ``skipped`` status with the pipeline's typed error
        (a gate refusal, too few stars).
    """
    started = time.perf_counter()
    key = spec.key(config)
    cfg = _single_threaded(config or DifferenceConfig())
    sim_science, sim_reference = simulate_pair(spec)
    science, reference = sim_science.exposure, sim_reference.exposure
    if spec.unmask_bad_columns:
        science, reference = _unmask(science), _unmask(reference)
    aligned = spec.recipe != "resampled"
    ratio = 10.0 ** (0.4 * (sim_science.zero_point - sim_reference.zero_point))
    rng = np.random.default_rng(spec.fake_seed)
    science, reference, fakes = _draw_fakes(
        rng,
        spec.fakes,
        science,
        reference,
        science_psf=sim_science.true_psf,
        reference_psf=sim_reference.true_psf,
        reference_on_grid=reference,
        flux_ratio=ratio,
        galaxies=sim_science.galaxies,
        stars=sim_science.stars,
        pixel_scale=spec.field_config.pixel_scale,
    )
    # The truth the stamps cannot show: a cosmic ray, bad column or trail of either epoch
    # within a FWHM of the fake (the reference's looked up on its own grid).
    rx, ry = _to_grid(science, reference, fakes.x, fakes.y)
    fakes.on_artefact = _near_pixels(
        _artefact_pixels(sim_science), fakes.x, fakes.y, float(sim_science.true_psf.fwhm)
    ) | _near_pixels(_artefact_pixels(sim_reference), rx, ry, float(sim_reference.true_psf.fwhm))
    psf_args: dict[str, PsfModel] = {}
    if spec.recipe == "psf-mismatch":
        psf_args = {
            "science_psf": sim_science.true_psf,
            "reference_psf": _scaled_psf(sim_reference.true_psf, spec.psf_scale),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = difference_pair(science, reference, aligned=aligned, config=cfg, **psf_args)
    except AstridError as exc:
        return PairOutcome(
            key,
            spec.group,
            "simulated",
            f"skipped: {type(exc).__name__}: {exc}",
            {},
            seconds=time.perf_counter() - started,
        )
    arrays, n_candidates, n_ambiguous = _examples(
        result,
        fakes,
        spec.fakes,
        kind=spec.recipe,
        pixel_scale=spec.field_config.pixel_scale,
        rng=rng,
    )
    return PairOutcome(
        key,
        spec.group,
        "simulated",
        "ok",
        arrays,
        n_candidates,
        n_ambiguous,
        time.perf_counter() - started,
    )


def _real_pair_config(spec: RealPairSpec, config: DifferenceConfig | None) -> DifferenceConfig:
    """Pipeline options of a real pair: the few-star ones where it needs them, one thread."""
    cfg = config or DifferenceConfig()
    if spec.few_stars:
        cfg = few_star_difference_config(cfg)
    return _single_threaded(cfg)


def real_pair_baseline(
    spec: RealPairSpec, data_dir: str | Path, *, config: DifferenceConfig | None = None
) -> tuple[Exposure, Exposure, DifferenceResult]:
    """Read a real pair and run the pair pipeline on it as it is, without fakes.

    Parameters
    ----------
    spec : RealPairSpec
        The pair.
    data_dir : str or Path
        The shared data folder the spec's paths are relative to.
    config : DifferenceConfig or None
        Pipeline options, as for :func:`run_real_pair`.

    Returns
    -------
    science, reference : Exposure
        The two images as read.
    baseline : DifferenceResult
        The pipeline's result on them: what is there before any fake.

    Raises
    ------
    AstridError
        When the pipeline refuses the pair.
    """
    from astrid.io.fits import read_exposure

    folder = Path(data_dir)
    science = read_exposure(folder / spec.science)
    reference = read_exposure(folder / spec.reference)
    cfg = _real_pair_config(spec, config)
    return science, reference, difference_pair(science, reference, aligned=spec.aligned, config=cfg)


def run_real_pair(
    spec: RealPairSpec, data_dir: str | Path, *, config: DifferenceConfig | None = None
) -> PairOutcome:
    """Inject fakes into a real pair, run the pair pipeline and label its candidates.

    The pipeline first runs on the pair as it is, which gives the PSFs the fakes are
    drawn with, the flux ratio and the reference on the science grid; then on the pair
    with fakes, re-estimating everything as in production.

    Parameters
    ----------
    spec : RealPairSpec
        The pair.
    data_dir : str or Path
        The shared data folder the spec's paths are relative to.
    config : DifferenceConfig or None
        Pipeline options; None uses the production default (with the few-star options
        when ``spec.few_stars``).

    Returns
    -------
    PairOutcome
        The examples, or a ``skipped`` status with the typed error.
    """
    started = time.perf_counter()
    folder = Path(data_dir)
    key = spec.key(folder)
    cfg = _real_pair_config(spec, config)
    source = spec.source

    def skipped(exc: Exception) -> PairOutcome:
        return PairOutcome(
            key,
            spec.group,
            source,
            f"skipped: {type(exc).__name__}: {exc}",
            {},
            seconds=time.perf_counter() - started,
        )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            science, reference, baseline = real_pair_baseline(spec, folder, config=config)
            psf_n = baseline.science.exposure.psf
            psf_r = baseline.reference.exposure.psf
            assert psf_n is not None and psf_r is not None
            scale = _pixel_scale(science)
            rng = np.random.default_rng(spec.seed)
            injected_science, injected_reference, fakes = _draw_fakes(
                rng,
                spec.fakes,
                science,
                reference,
                science_psf=psf_n,
                reference_psf=psf_r,
                reference_on_grid=baseline.reference.exposure,
                flux_ratio=float(baseline.subtraction.flux_scale.flux_ratio),
                galaxies=Table({"x": np.zeros(0), "y": np.zeros(0)}),
                stars=baseline.science.sources,
                pixel_scale=scale,
            )
            result = difference_pair(
                injected_science, injected_reference, aligned=spec.aligned, config=cfg
            )
            known_x, known_y = _known_positions(result.science.exposure, spec.known_sources)
    except AstridError as exc:
        return skipped(exc)
    arrays, n_candidates, n_ambiguous = _examples(
        result,
        fakes,
        spec.fakes,
        kind="real",
        pixel_scale=scale,
        rng=rng,
        keep_bogus=spec.keep_bogus,
        known_x=known_x,
        known_y=known_y,
    )
    return PairOutcome(
        key,
        spec.group,
        source,
        "ok",
        arrays,
        n_candidates,
        n_ambiguous,
        time.perf_counter() - started,
    )


def _known_positions(
    exposure: Exposure, sources: Sequence[tuple[float, float]]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pixel positions on ``exposure``'s grid of sky positions (RA, Dec in degrees).

    Parameters
    ----------
    exposure : Exposure
        The image whose grid the positions are wanted on (its WCS places them).
    sources : sequence of (float, float)
        RA and Dec of each source, degrees.

    Returns
    -------
    x, y : ndarray of float64
        0-based pixel positions, one per source (empty when there are none).

    Raises
    ------
    AstridError
        If there are sources but the exposure has no WCS to place them.
    """
    if not sources:
        return np.zeros(0), np.zeros(0)
    if exposure.wcs is None:
        raise AstridError("known sources of a real pair need the science image's WCS")
    from astropy.coordinates import SkyCoord

    ra, dec = np.asarray(sources, np.float64).T
    x, y = exposure.wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg"))
    return np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)


def _pixel_scale(exposure: Exposure) -> float:
    if exposure.wcs is None:
        return float("nan")
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(exposure.wcs.celestial)) * 3600.0)


# --------------------------------------------------------------------------------------
# cache and parallel building


def _write_outcome(path: Path, outcome: PairOutcome) -> None:
    meta = {
        "key": outcome.key,
        "group": outcome.group,
        "source": outcome.source,
        "status": outcome.status,
        "n_candidates": outcome.n_candidates,
        "n_ambiguous": outcome.n_ambiguous,
        "seconds": outcome.seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    arrays: dict[str, Any] = {"meta": np.asarray(json.dumps(meta)), **outcome.arrays}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _read_outcome(path: Path, *, stamps: bool = True) -> PairOutcome:
    """Read a pair's cache file; without ``stamps``, all but its ``triplets``."""
    skip = {"meta"} if stamps else {"meta", "triplets"}
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {k: data[k] for k in data.files if k not in skip}
    return PairOutcome(
        meta["key"],
        meta["group"],
        meta["source"],
        meta["status"],
        arrays,
        meta["n_candidates"],
        meta["n_ambiguous"],
        meta["seconds"],
    )


_Task = tuple[str, Any, str | None, Path, DifferenceConfig]


def _run(task: _Task) -> PairOutcome:
    """Worker entry point: run one pair, write its cache file, return it without stamps.

    The stamps are most of a pair's memory; they are read back from the cache file when
    the set is joined (:func:`_assemble`), so the builder never holds every pair's stamps
    besides the joined set.
    """
    kind, spec, data_dir, path, difference = task
    if kind == "simulated":
        outcome = run_simulated_pair(spec, config=difference)
    else:
        assert data_dir is not None
        outcome = run_real_pair(spec, data_dir)
    _write_outcome(path, outcome)
    arrays = {k: v for k, v in outcome.arrays.items() if k != "triplets"}
    return replace(outcome, arrays=arrays)


def _init_worker() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


ProgressCallback = Callable[[int, int, PairOutcome], None]


def build_training_set(
    config: TrainingSetConfig,
    output_dir: str | Path,
    *,
    shared_data: str | Path | None = None,
    workers: int = 1,
    progress: ProgressCallback | None = None,
    specs: Sequence[SimulatedPairSpec] | None = None,
) -> tuple[TrainingSet, dict[str, Any]]:
    """Build (or complete from the cache) a training set and write it with its manifest.

    Parameters
    ----------
    config : TrainingSetConfig
        What to build.
    output_dir : str or Path
        Folder of ``<name>.npz``, ``<name>.manifest.json`` and ``cache/``.
    shared_data : str or Path or None
        The shared real-data folder (with ``images_sfft_decam``, ``images_legacypipe``);
        None builds from simulations only.
    workers : int
        Processes running pairs in parallel (each single-threaded).
    progress : callable or None
        Called as ``progress(done, total, outcome)`` after each pair.
    specs : sequence of SimulatedPairSpec or None
        Simulated pairs to use instead of those drawn from ``config``
        (:func:`simulated_pair_specs`).

    Returns
    -------
    training_set : TrainingSet
        The examples, split by field.
    manifest : dict
        Counts per class, split, source, recipe and field; skipped pairs with their
        reasons; the content hash; the configuration; build time.
    """
    started = time.perf_counter()
    out = Path(output_dir)
    cache = out / "cache"
    tasks: list[_Task] = [
        ("simulated", spec, None, cache / f"{spec.key(config.difference)}.npz", config.difference)
        for spec in (simulated_pair_specs(config) if specs is None else specs)
    ]
    if config.real_pairs and shared_data is not None:
        folder = Path(shared_data)
        tasks += [
            ("real", spec, str(folder), cache / f"{spec.key(folder)}.npz", DifferenceConfig())
            for spec in real_pair_specs(config)
        ]
    outcomes: dict[Path, PairOutcome] = {}
    pending = []
    for task in tasks:
        path = task[3]
        if path.is_file():
            outcomes[path] = _read_outcome(path, stamps=False)
        else:
            pending.append(task)
    done = len(outcomes)
    if progress is not None:
        for outcome in list(outcomes.values()):
            progress(done, len(tasks), outcome)
    if pending:
        if workers <= 1:
            for task in pending:
                outcome = _run(task)
                outcomes[task[3]] = outcome
                done += 1
                if progress is not None:
                    progress(done, len(tasks), outcome)
        else:
            context = get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
                futures = {pool.submit(_run, task): task[3] for task in pending}
                for future in as_completed(futures):
                    outcome = future.result()
                    outcomes[futures[future]] = outcome
                    done += 1
                    if progress is not None:
                        progress(done, len(tasks), outcome)
    ordered = [outcomes[task[3]] for task in tasks]
    training_set = _assemble(ordered, config, [task[3] for task in tasks])
    manifest = _manifest(training_set, ordered, config, time.perf_counter() - started)
    save_training_set(training_set, out / f"{config.name}.npz", manifest=manifest)
    return training_set, manifest


def _assemble(
    outcomes: Sequence[PairOutcome], config: TrainingSetConfig, paths: Sequence[Path]
) -> TrainingSet:
    """Join the pairs' examples into one set, their stamps read from the cache files."""
    usable = [
        (o, path)
        for o, path in zip(outcomes, paths, strict=True)
        if o.status == "ok" and len(o.arrays.get("labels", ()))
    ]
    used = [o for o, _ in usable]
    if not used:
        raise ValueError("no pair gave any example")
    groups = np.concatenate([np.full(len(o.arrays["labels"]), o.group) for o in used])
    split = assign_splits(
        groups, fractions=config.fractions, seed=config.seed, fixed=dict(config.fixed_splits)
    )
    group_split = dict(zip(groups.tolist(), split.tolist(), strict=True))
    fake_groups = np.concatenate([np.full(len(o.arrays["fake_snr"]), o.group) for o in used])
    fakes = {
        "group": fake_groups,
        "split": np.array([group_split[g] for g in fake_groups.tolist()], np.int8),
        "snr": np.concatenate([o.arrays["fake_snr"] for o in used]),
        "polarity": np.concatenate([o.arrays["fake_polarity"] for o in used]),
        "detected": np.concatenate([o.arrays["fake_detected"] for o in used]),
        "masked": np.concatenate([o.arrays["fake_masked"] for o in used]),
        "measured_snr": np.concatenate([o.arrays["fake_measured_snr"] for o in used]),
        "dominated": np.concatenate([o.arrays["fake_dominated"] for o in used]),
        "where": np.concatenate([o.arrays["fake_where"] for o in used]),
        "on_artefact": np.concatenate([o.arrays["fake_on_artefact"] for o in used]),
    }

    def cat(name: str) -> NDArray[Any]:
        return np.concatenate([o.arrays[name] for o in used])

    # The stamps are most of the memory: read pair by pair into the joined array, so
    # the set is held once.
    triplets: NDArray[np.float32] | None = None
    start = 0
    for o, path in usable:
        with np.load(path, allow_pickle=False) as data:
            stamps = data["triplets"]
        if len(stamps) != len(o.arrays["labels"]):
            raise ValueError(f"{path}: {len(stamps)} stamps for {len(o.arrays['labels'])} labels")
        if triplets is None:
            triplets = np.empty((len(groups), *stamps.shape[1:]), dtype=np.float32)
        triplets[start : start + len(stamps)] = stamps
        start += len(stamps)
    assert triplets is not None
    return TrainingSet(
        triplets=triplets,
        labels=cat("labels"),
        groups=groups,
        split=split,
        source=np.concatenate([np.full(len(o.arrays["labels"]), o.source) for o in used]),
        kind=cat("kind"),
        snr=cat("snr"),
        polarity=cat("polarity"),
        fwhm=cat("fwhm"),
        pixel_scale=cat("pixel_scale"),
        fakes=fakes,
    )


def _manifest(
    training_set: TrainingSet,
    outcomes: Sequence[PairOutcome],
    config: TrainingSetConfig,
    seconds: float,
) -> dict[str, Any]:
    skipped: dict[str, int] = {}
    for o in outcomes:
        if o.status != "ok":
            reason = f"{o.group}: {o.status}"
            skipped[reason] = skipped.get(reason, 0) + 1
    fakes = training_set.fakes
    return {
        "name": config.name,
        "content_sha256": training_set.content_hash(),
        "astrid_version": __version__,
        "builder_version": BUILDER_VERSION,
        "config": asdict(config),
        "n_pairs": len(outcomes),
        "n_pairs_used": sum(o.status == "ok" for o in outcomes),
        "skipped_pairs": skipped,
        "n_candidates": int(sum(o.n_candidates for o in outcomes)),
        "n_ambiguous_dropped": int(sum(o.n_ambiguous for o in outcomes)),
        "n_fakes_injected": len(fakes.get("snr", ())),
        "n_fakes_detected": int(np.sum(fakes.get("detected", np.zeros(0, bool)))),
        "n_fakes_masked": int(np.sum(fakes.get("masked", np.zeros(0, bool)))),
        "n_fakes_dominated": int(np.sum(fakes.get("dominated", np.zeros(0, bool)))),
        "n_fakes_on_artefact": int(np.sum(fakes.get("on_artefact", np.zeros(0, bool)))),
        "pair_seconds": round(float(sum(o.seconds for o in outcomes)), 1),
        "build_seconds": round(seconds, 1),
        **training_set.counts(),
    }


# --------------------------------------------------------------------------------------
# files


def save_training_set(
    training_set: TrainingSet, path: str | Path, *, manifest: dict[str, Any] | None = None
) -> Path:
    """Write a training set as ``.npz`` (and its manifest beside it as JSON).

    Parameters
    ----------
    training_set : TrainingSet
        The data.
    path : str or Path
        The ``.npz`` file; the manifest goes to ``<stem>.manifest.json``.
    manifest : dict or None
        Written as is when given; the content hash is always included.

    Returns
    -------
    Path
        The ``.npz`` file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(training_set, name) for name in TrainingSet.column_names()}
    arrays.update({f"fake_{k}": v for k, v in training_set.fakes.items()})
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, target)
    info = dict(manifest or {})
    if "content_sha256" not in info:  # setdefault would hash the stamps even when given
        info["content_sha256"] = training_set.content_hash()
    target.with_name(f"{target.stem}.manifest.json").write_text(
        json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    return target


def load_training_set(path: str | Path, *, mmap: bool = False) -> TrainingSet:
    """Read a training set written by :func:`save_training_set`.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.
    mmap : bool
        Map the stamps (``triplets``, most of the file) read-only from the file instead
        of reading them into memory: the operating system pages them in as they are
        used and can drop them again, so a set larger than half the memory can be
        normalised for training. The other columns are read. Applies to files written by
        :func:`save_training_set` (stored uncompressed); a compressed file is read whole.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    target = Path(path)
    with np.load(target, allow_pickle=False) as data:
        names = [n for n in TrainingSet.column_names() if not (mmap and n == "triplets")]
        values: dict[str, Any] = {name: data[name] for name in names}
        fakes = {k[len("fake_") :]: data[k] for k in data.files if k.startswith("fake_")}
    if mmap:
        values["triplets"] = _mapped_member(target, "triplets")
    return TrainingSet(**values, fakes=fakes)


def _mapped_member(path: Path, name: str) -> NDArray[Any]:
    """Read-only memory map of the array ``name`` of an uncompressed ``.npz``.

    ``np.load`` cannot map a member of a zip archive, but a stored (uncompressed) member
    is a plain ``.npy`` file at a fixed offset in the archive: its header is read there
    and the data mapped after it. A compressed member is read into memory instead.
    """
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.asarray(np.lib.format.read_array(member, allow_pickle=False))
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: bad zip entry for {name!r}")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {name!r} holds Python objects and cannot be mapped")
    return np.memmap(
        path,
        dtype=dtype,
        mode="r",
        offset=offset,
        shape=shape,
        order="F" if fortran_order else "C",
    )
