"""From a science/reference pair of exposures to measured candidates with cutouts.

Chain: characterise both (background, stars, PSF) -> align the reference onto the
science grid (unless already aligned) -> characterise the aligned reference -> subtract
(ZOGY or Alard-Lupton, with the bad-subtraction gate) -> detect and measure candidates
on the score image -> cutout triplets. Everything stays in memory; writing files is the
caller's business (see :func:`write_difference`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import QTable
from scipy.spatial import cKDTree

from astrid import __version__
from astrid.errors import AstridError, ShapeMismatch, StarMatchFailed, TooFewStarsForPsf
from astrid.exposure import UNUSABLE, Exposure
from astrid.pipeline.characterize import Characterization, CharacterizeConfig, characterize
from astrid.science.align import AlignConfig, AlignmentResult, AlignmentWarning, align_to
from astrid.science.detect import Cutouts, DetectConfig, detect_candidates, make_cutouts
from astrid.science.psf import PsfConfig
from astrid.science.psf_model import PsfModel
from astrid.science.subtract import BadSubtraction, SubtractConfig, Subtraction, subtract_images

__all__ = [
    "BandMismatch",
    "DifferenceConfig",
    "DifferenceResult",
    "difference_pair",
    "write_difference",
]


class BandMismatch(AstridError):
    """Science and reference were taken in different bands.

    Parameters
    ----------
    science_band, reference_band : str
        The two bands.
    """

    def __init__(self, science_band: str, reference_band: str) -> None:
        self.science_band = science_band
        self.reference_band = reference_band
        super().__init__(
            f"science band {science_band!r} differs from reference band {reference_band!r}"
        )


@dataclass(frozen=True)
class DifferenceConfig:
    """Options of :func:`difference_pair`, one per stage.

    Attributes
    ----------
    characterize : CharacterizeConfig
        Background, stars and PSF of each image. The default models the PSF's spatial
        variation on a 3x3 grid whenever the stars support it (degree 1 from 15 stars,
        2 from 30) rather than only when an F-test finds the variation significant: a
        subtraction is first-order sensitive to a PSF mismatch (a transient's PSF flux
        by ~1% per 1% of FWHM, a bright star's residual by as much), and with 20-25
        stars the test misses a 15% FWHM range across the field.
    align : AlignConfig
        Resampling of the reference.
    subtract : SubtractConfig
        Method and gate.
    detect : DetectConfig
        Candidate detection on the score image.
    cutout_size : int
        Side of the cutout triplets (63, as ZTF).
    enforce_gate : bool
        Raise :class:`~astrid.science.subtract.BadSubtraction` when the gate refuses
        the subtraction (otherwise the result carries the verdict).
    match_radius : float
        Pixels within which a science star and a reference star are the same star.
    """

    characterize: CharacterizeConfig = field(
        default_factory=lambda: CharacterizeConfig(psf=PsfConfig(grid=(3, 3)))
    )
    align: AlignConfig = field(default_factory=AlignConfig)
    subtract: SubtractConfig = field(default_factory=SubtractConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    cutout_size: int = 63
    enforce_gate: bool = True
    match_radius: float = 1.5


@dataclass(frozen=True)
class DifferenceResult:
    """Products of :func:`difference_pair`.

    Attributes
    ----------
    science : Characterization
        The science exposure characterised (with its PSF).
    reference : Characterization
        The reference on the science grid, characterised.
    alignment : AlignmentResult or None
        How the reference was aligned (``None`` when given aligned).
    subtraction : Subtraction
        Difference, score, PSF and the gate's statistics.
    candidates : QTable
        Measured candidates (see :func:`astrid.science.detect.detect_candidates`).
    cutouts : Cutouts
        Science, reference and difference stamps per candidate (science and reference
        background-subtracted, the reference scaled to the science's photometry).
    """

    science: Characterization
    reference: Characterization
    alignment: AlignmentResult | None
    subtraction: Subtraction
    candidates: QTable
    cutouts: Cutouts


def _with_psf(char: Characterization, psf: PsfModel | None) -> Characterization:
    """The characterisation with its exposure's PSF replaced (unchanged for None)."""
    if psf is None:
        return char
    return replace(char, exposure=replace(char.exposure, psf=psf))


def _require_psf(char: Characterization, which: str, min_stars: int) -> None:
    if char.exposure.psf is None:
        raise TooFewStarsForPsf(len(char.stars), min_stars)


def _warn_if_offset(dx: np.ndarray, dy: np.ndarray, align: AlignConfig) -> None:
    """Warn when stars of a pair given as aligned are offset by more than the WCS tolerance."""
    if len(dx) < align.min_matched_stars:
        return
    mx, my = float(np.median(dx)), float(np.median(dy))
    if np.hypot(mx, my) > align.max_wcs_error_pix:
        warnings.warn(
            f"the pair was given as aligned, but its {len(dx)} matched stars are offset by "
            f"({mx:+.2f}, {my:+.2f}) px (science - reference): every star will leave a "
            "dipole; pass aligned=False to register the pair with its stars",
            AlignmentWarning,
            stacklevel=3,
        )


def difference_pair(
    science: Exposure,
    reference: Exposure,
    *,
    aligned: bool = False,
    config: DifferenceConfig | None = None,
    science_psf: PsfModel | None = None,
    reference_psf: PsfModel | None = None,
) -> DifferenceResult:
    """Subtract a reference from a science exposure and measure the candidates.

    Parameters
    ----------
    science : Exposure
        Calibrated science exposure; its grid and WCS are the output's.
    reference : Exposure
        Calibrated reference exposure of the same field and band.
    aligned : bool
        True when ``reference`` is already on the science grid (same shape) and
        registered to it: it is used as given. Images resampled onto one grid can still
        be offset by a fraction of a pixel, which ZOGY turns into a dipole on every
        star; when the matched stars show a median offset above
        ``config.align.max_wcs_error_pix`` an :class:`~astrid.science.align.AlignmentWarning`
        says so (``aligned=False`` registers the pair with its stars).
    config : DifferenceConfig or None
        Options.
    science_psf, reference_psf : PsfModel or None
        PSF models to use instead of the ones estimated from the images (the
        reference's on the science grid), e.g. those measured before fake sources were
        injected; ``None`` estimates them.

    Raises
    ------
    BandMismatch
        Different bands (when both are known).
    InsufficientOverlap
        The exposures do not overlap enough.
    TooFewStarsForPsf, StarMatchFailed
        Not enough stars to model a PSF or tie the photometry.
    BadSubtraction
        The gate refused the subtraction (with ``enforce_gate``).
    """
    cfg = config or DifferenceConfig()
    sb, rb = science.meta.band, reference.meta.band
    if sb is not None and rb is not None and sb != rb:
        raise BandMismatch(sb, rb)
    min_stars = cfg.characterize.psf.min_stars
    sci = _with_psf(characterize(science, config=cfg.characterize), science_psf)
    _require_psf(sci, "science", min_stars)
    alignment = None
    if aligned:
        if reference.shape != science.shape:
            raise ShapeMismatch({"science": science.shape, "reference": reference.shape})
        on_grid = reference
    else:
        ref_native = characterize(reference, config=cfg.characterize)
        alignment = align_to(
            science,
            reference,
            config=cfg.align,
            science_stars=np.column_stack([sci.stars["x"], sci.stars["y"]]),
            reference_stars=np.column_stack([ref_native.stars["x"], ref_native.stars["y"]]),
        )
        on_grid = alignment.aligned
    ref = _with_psf(characterize(on_grid, config=cfg.characterize), reference_psf)
    _require_psf(ref, "reference", min_stars)
    assert sci.exposure.psf is not None and ref.exposure.psf is not None

    sci_data = sci.exposure.data - sci.background.background
    ref_data = ref.exposure.data - ref.background.background
    sci_mask = (sci.exposure.mask & np.uint16(UNUSABLE)) != 0
    ref_mask = (ref.exposure.mask & np.uint16(UNUSABLE)) != 0

    # Stars in both images tie the photometry (ZOGY) or fit the kernel (A&L).
    sx, sy = np.asarray(sci.stars["x"]), np.asarray(sci.stars["y"])
    rx, ry = np.asarray(ref.stars["x"]), np.asarray(ref.stars["y"])
    if len(sx) == 0 or len(rx) == 0:
        raise StarMatchFailed(0, cfg.subtract.flux_scale.min_stars, "stars in both images")
    dist, nearest = cKDTree(np.column_stack([rx, ry])).query(np.column_stack([sx, sy]))
    both = dist <= cfg.match_radius
    if aligned:
        _warn_if_offset(sx[both] - rx[nearest[both]], sy[both] - ry[nearest[both]], cfg.align)
    # Registration noise per axis: the residual rms of the matched stars includes both
    # images' centroid noise; the registration itself is fitted to all of them, so its
    # error is that of the mean, rms / sqrt(2 n).
    astrometric_sigma = 0.0
    if alignment is not None and np.isfinite(alignment.rms_pix) and alignment.n_matched > 0:
        astrometric_sigma = float(alignment.rms_pix) / np.sqrt(2.0 * alignment.n_matched)

    sub = subtract_images(
        sci_data,
        ref_data,
        science_variance=sci.exposure.variance,
        reference_variance=ref.exposure.variance,
        science_psf=sci.exposure.psf,
        reference_psf=ref.exposure.psf,
        science_noise=float(np.median(sci.background.rms)),
        reference_noise=float(np.median(ref.background.rms)),
        star_x=sx[both],
        star_y=sy[both],
        star_snr=np.asarray(sci.stars["snr"])[both],
        science_mask=sci_mask,
        reference_mask=ref_mask,
        science_saturation=_level(science.meta.saturation, sci),
        reference_saturation=_level(reference.meta.saturation, ref),
        astrometric_sigma=astrometric_sigma,
        config=cfg.subtract,
    )
    if cfg.enforce_gate and not sub.quality.passed:
        raise BadSubtraction(sub.quality)

    ref_sources = ref.sources.copy()
    ref_sources["flux"] = np.asarray(ref_sources["flux"]) * sub.flux_scale.flux_ratio
    candidates = detect_candidates(
        sub.score,
        sub.difference,
        sub.variance,
        sub.psf,
        mask=sub.mask,
        wcs=science.wcs,
        zero_point=science.meta.zero_point,
        reference_sources=ref_sources,
        flux_conversion=sub.flux_conversion,
        config=cfg.detect,
    )
    cutouts = make_cutouts(
        sci_data,
        ref_data * np.float32(sub.flux_scale.flux_ratio),
        sub.difference,
        np.asarray(candidates["x"].value),
        np.asarray(candidates["y"].value),
        size=cfg.cutout_size,
    )
    return DifferenceResult(
        science=sci,
        reference=ref,
        alignment=alignment,
        subtraction=sub,
        candidates=candidates,
        cutouts=cutouts,
    )


def _level(saturation: float | None, char: Characterization) -> float | None:
    """Saturation level relative to the subtracted background."""
    if saturation is None:
        return None
    return float(saturation - char.background.global_background)


def write_difference(
    result: DifferenceResult, folder: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write ``difference.fits``, ``score.fits``, ``candidates.ecsv`` and ``cutouts.fits``.

    The FITS headers carry the science WCS, the method, the photometric tie, the gate's
    statistics and the AstrID version; ``cutouts.fits`` holds ``SCIENCE``,
    ``REFERENCE`` and ``DIFFERENCE`` cubes (n, size, size) in candidate order.

    Returns
    -------
    dict of str to Path
        The written files by kind.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sub = result.subtraction
    header = (
        result.science.exposure.wcs.to_header(relax=True)
        if result.science.exposure.wcs is not None
        else fits.Header()
    )
    header["AST_VER"] = (__version__, "AstrID version")
    header["SUBMETH"] = (sub.method, "subtraction method")
    header["FLXRATIO"] = (sub.flux_scale.flux_ratio, "science counts per reference count")
    header["BKGOFFST"] = (sub.flux_scale.background_offset, "science - ratio*reference sky")
    header["FLXCONV"] = (sub.flux_conversion, "PSF flux on D x this = science ADU")
    header["SCORESTD"] = (sub.quality.score_std, "robust std of the score image")
    header["RESRATIO"] = (
        sub.quality.residual_ratio_mean if np.isfinite(sub.quality.residual_ratio_mean) else "NaN",
        "mean residual/science power around stars",
    )
    header["GATEPASS"] = (sub.quality.passed, "bad-subtraction gate verdict")
    zp = result.science.exposure.meta.zero_point
    if zp is not None:
        header["MAGZERO"] = (zp, "science zero point: mag of 1 ADU")
    paths = {
        "difference": out / "difference.fits",
        "score": out / "score.fits",
        "candidates": out / "candidates.ecsv",
        "cutouts": out / "cutouts.fits",
    }
    psf_hdu = fits.ImageHDU(
        sub.psf.stamps[sub.psf.stamps.shape[0] // 2, sub.psf.stamps.shape[1] // 2], name="PSF"
    )
    fits.HDUList(
        [
            fits.PrimaryHDU(sub.difference, header=header),
            fits.ImageHDU(sub.variance, name="VARIANCE"),
            fits.ImageHDU(sub.mask.astype(np.uint8), name="MASK"),
            psf_hdu,
        ]
    ).writeto(paths["difference"], overwrite=overwrite)
    fits.PrimaryHDU(sub.score, header=header).writeto(paths["score"], overwrite=overwrite)
    result.candidates.write(paths["candidates"], format="ascii.ecsv", overwrite=overwrite)
    c = result.cutouts
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(c.science, name="SCIENCE"),
            fits.ImageHDU(c.reference, name="REFERENCE"),
            fits.ImageHDU(c.difference, name="DIFFERENCE"),
        ]
    ).writeto(paths["cutouts"], overwrite=overwrite)
    return paths
