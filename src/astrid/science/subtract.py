"""The subtraction stage: one entry point over ZOGY and Alard-Lupton, and the bad-subtraction gate.

Inputs are an aligned, background-subtracted science/reference pair with their
variances, masks and PSFs, and positions of stars for the photometric tie (ZOGY) or the
kernel fit (Alard-Lupton). The output is method-independent: a difference image with
its PSF and variance, a score image (unit variance on noise, used for detection), and
the factor that converts PSF-fit fluxes measured on the difference into science-image
data units.

The gate
--------
Two statistics judge a subtraction, both reported for every subtraction:

* the robust standard deviation (1.4826 MAD) of the score image over usable pixels;
  on a good subtraction it is 1, and BlackGEM refuses one above 2.5;
* the residual-to-science power ratio around bright stars: for each star of S/N >=
  ``min_star_snr`` in the science image, within ``stamp_radius_fwhm`` FWHM,
  ``max(sum(r**2) - sum(var_r), 0) / sum(n**2)``, where ``r`` is the difference in
  science flux units, ``var_r`` its expected noise variance and ``n`` the science image;
  the mean and standard deviation over stars are compared with LSST's limits (0.2 and
  0.4). Subtracting the expected noise power makes the ratio zero for a perfect
  subtraction at any depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from astrid.errors import AstridError
from astrid.science.alard_lupton import (
    AlardLuptonConfig,
    AlardLuptonResult,
    subtract_alard_lupton,
)
from astrid.science.psf_model import PsfModel
from astrid.science.zogy import (
    FluxScale,
    FluxScaleConfig,
    ZogyConfig,
    fit_flux_scale,
    zogy_subtract,
)

__all__ = [
    "BadSubtraction",
    "GateConfig",
    "SubtractConfig",
    "Subtraction",
    "SubtractionQuality",
    "assess_subtraction",
    "subtract_images",
]


class BadSubtraction(AstridError):
    """A subtraction failed the quality gate.

    Parameters
    ----------
    quality : SubtractionQuality
        The measured statistics and the reasons.
    """

    def __init__(self, quality: SubtractionQuality) -> None:
        self.quality = quality
        super().__init__("subtraction refused: " + "; ".join(quality.reasons))


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the bad-subtraction gate.

    Attributes
    ----------
    max_score_std : float
        Refuse when the score image's robust std exceeds this (BlackGEM: 2.5).
    max_residual_ratio_mean : float
        Refuse when the mean residual-to-science power ratio exceeds this (LSST: 0.2).
    max_residual_ratio_std : float
        Refuse when its standard deviation over stars exceeds this (LSST: 0.4).
    min_star_snr : float
        Stars used for the ratio have at least this S/N in the science image.
    stamp_radius_fwhm : float
        Radius of the stamp around each star, in science FWHM.
    min_stars : int
        With fewer bright stars the ratio is reported as NaN and not used.
    """

    max_score_std: float = 2.5
    max_residual_ratio_mean: float = 0.2
    max_residual_ratio_std: float = 0.4
    min_star_snr: float = 50.0
    stamp_radius_fwhm: float = 2.0
    min_stars: int = 3


@dataclass(frozen=True)
class SubtractConfig:
    """Options of :func:`subtract_images`.

    Attributes
    ----------
    method : {"zogy", "al"}
        ZOGY (Zackay, Ofek & Gal-Yam 2016) or Alard-Lupton kernel matching.
    zogy : ZogyConfig
        ZOGY options. The default allows for a 2% PSF-model error in ``S_corr``
        (``ZogyConfig.psf_error``): PSF models from 20-40 stars read a point source's
        flux to 1.5-2% (rms over the field, against the true PSF of simulated images),
        and without the term each bright star's residual is a 5-sigma candidate.
    flux_scale : FluxScaleConfig
        Photometric tie (ZOGY).
    alard_lupton : AlardLuptonConfig
        Alard-Lupton options. The default allows for a 2% kernel-model error in the
        score's variance (``AlardLuptonConfig.model_error``), as for ZOGY.
    gate : GateConfig
        Bad-subtraction thresholds.
    """

    method: Literal["zogy", "al"] = "zogy"
    zogy: ZogyConfig = field(default_factory=lambda: ZogyConfig(psf_error=0.02, refit_offset=True))
    flux_scale: FluxScaleConfig = field(default_factory=FluxScaleConfig)
    alard_lupton: AlardLuptonConfig = field(
        default_factory=lambda: AlardLuptonConfig(model_error=0.02)
    )
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass(frozen=True)
class SubtractionQuality:
    """Statistics of the bad-subtraction gate.

    Attributes
    ----------
    score_std : float
        Robust std of the score image over usable pixels (1 is ideal).
    residual_ratio_mean : float
        Mean residual-to-science power ratio around bright stars (NaN when too few).
    residual_ratio_std : float
        Its standard deviation over those stars (NaN when too few).
    n_stars : int
        Stars used for the ratio.
    passed : bool
        Whether the gate accepts the subtraction.
    reasons : tuple of str
        Why not, with the numbers.
    """

    score_std: float
    residual_ratio_mean: float
    residual_ratio_std: float
    n_stars: int
    passed: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Subtraction:
    """A difference image and what detection and measurement need from it.

    Attributes
    ----------
    method : str
        ``"zogy"`` or ``"al"``.
    difference : ndarray, shape (ny, nx)
        The difference image: ZOGY's proper image ``D`` (white, unit-variance noise) or
        Alard-Lupton's decorrelated difference in science units.
    variance : ndarray, shape (ny, nx)
        Per-pixel variance of ``difference``.
    psf : PsfModel
        PSF of ``difference``.
    score : ndarray, shape (ny, nx)
        Detection statistic in sigmas: ZOGY ``S_corr``, or the Alard-Lupton
        matched-filtered ``D / sigma``.
    mask : ndarray of bool, shape (ny, nx)
        True where the products are unreliable.
    flux_conversion : float
        Multiply a PSF-fit flux measured on ``difference`` by this to get science-image
        data units (ZOGY: ``flux_ratio / F_D``; Alard-Lupton: 1).
    flux_scale : FluxScale
        Photometric tie (science counts per reference count and background offset).
    quality : SubtractionQuality
        The gate's statistics and verdict.
    details : dict
        Method-specific numbers (zero point ``F_D``, kernel fit statistics, ...).
    """

    method: str
    difference: NDArray[np.float32]
    variance: NDArray[np.float32]
    psf: PsfModel
    score: NDArray[np.float32]
    mask: NDArray[np.bool_]
    flux_conversion: float
    flux_scale: FluxScale
    quality: SubtractionQuality
    details: dict[str, float | int | str]


def _robust_std(values: NDArray[np.floating]) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    if v.size > 2_000_000:
        v = v[:: v.size // 1_000_000]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def assess_subtraction(
    *,
    score: NDArray[np.floating],
    residual: NDArray[np.floating],
    residual_variance: NDArray[np.floating],
    science: NDArray[np.floating],
    mask: NDArray[np.bool_],
    star_x: NDArray[np.floating],
    star_y: NDArray[np.floating],
    star_snr: NDArray[np.floating],
    fwhm: float,
    config: GateConfig | None = None,
) -> SubtractionQuality:
    """Measure the gate statistics (see the module docstring) and decide.

    Parameters
    ----------
    score : ndarray, shape (ny, nx)
        Detection statistic (unit variance on noise).
    residual : ndarray, shape (ny, nx)
        Difference in science flux units per pixel.
    residual_variance : ndarray, shape (ny, nx)
        Expected noise variance of ``residual``.
    science : ndarray, shape (ny, nx)
        Background-subtracted science image.
    mask : ndarray of bool
        Unusable pixels.
    star_x, star_y, star_snr : ndarray, shape (n,)
        Science stars (0-based) and their S/N.
    fwhm : float
        Science PSF FWHM in pixels.
    config : GateConfig or None
        Thresholds.
    """
    cfg = config or GateConfig()
    good = ~np.asarray(mask, bool)
    score_std = _robust_std(np.asarray(score)[good])
    ny, nx = np.shape(science)
    radius = cfg.stamp_radius_fwhm * fwhm
    half = int(np.ceil(radius))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    disc = xx**2 + yy**2 <= radius**2
    ratios = []
    for x, y, snr in zip(star_x, star_y, star_snr, strict=True):
        if not snr >= cfg.min_star_snr:
            continue
        ix, iy = round(float(x)), round(float(y))
        if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
            continue
        sl = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        if not good[sl][disc].all():
            continue
        r = np.asarray(residual[sl], np.float64)[disc]
        v = np.asarray(residual_variance[sl], np.float64)[disc]
        s = np.asarray(science[sl], np.float64)[disc]
        power = float(np.sum(s**2))
        if power <= 0:
            continue
        ratios.append(max(float(np.sum(r**2) - np.sum(v)), 0.0) / power)
    if len(ratios) >= cfg.min_stars:
        mean, std = float(np.mean(ratios)), float(np.std(ratios))
    else:
        mean = std = float("nan")
    reasons = []
    if not score_std <= cfg.max_score_std:
        reasons.append(f"score robust std {score_std:.2f} > {cfg.max_score_std:.2f}")
    if np.isfinite(mean) and mean > cfg.max_residual_ratio_mean:
        reasons.append(
            f"residual/science power ratio mean {mean:.3f} > {cfg.max_residual_ratio_mean:.3f}"
        )
    if np.isfinite(std) and std > cfg.max_residual_ratio_std:
        reasons.append(
            f"residual/science power ratio std {std:.3f} > {cfg.max_residual_ratio_std:.3f}"
        )
    return SubtractionQuality(
        score_std=score_std,
        residual_ratio_mean=mean,
        residual_ratio_std=std,
        n_stars=len(ratios),
        passed=not reasons,
        reasons=tuple(reasons),
    )


def subtract_images(
    science: NDArray[np.floating],
    reference: NDArray[np.floating],
    *,
    science_variance: NDArray[np.floating],
    reference_variance: NDArray[np.floating],
    science_psf: PsfModel,
    reference_psf: PsfModel,
    science_noise: float,
    reference_noise: float,
    star_x: NDArray[np.floating],
    star_y: NDArray[np.floating],
    star_snr: NDArray[np.floating] | None = None,
    science_mask: NDArray[np.bool_] | None = None,
    reference_mask: NDArray[np.bool_] | None = None,
    science_saturation: float | None = None,
    reference_saturation: float | None = None,
    astrometric_sigma: float = 0.0,
    config: SubtractConfig | None = None,
) -> Subtraction:
    """Subtract an aligned reference from a science image and assess the result.

    Parameters
    ----------
    science, reference : ndarray, shape (ny, nx)
        Background-subtracted images on one pixel grid (data units).
    science_variance, reference_variance : ndarray, shape (ny, nx)
        Their per-pixel variances, source noise included.
    science_psf, reference_psf : PsfModel
        Their PSFs.
    science_noise, reference_noise : float
        Background noise sigma of each (data units).
    star_x, star_y : ndarray, shape (n,)
        0-based positions of isolated, unsaturated stars present in both images.
    star_snr : ndarray or None
        Their S/N in the science image, for the gate; ``None`` skips the
        residual-ratio statistic.
    science_mask, reference_mask : ndarray of bool or None
        Unusable pixels.
    science_saturation, reference_saturation : float or None
        Saturation levels (stars near them are not used for the photometric tie).
    astrometric_sigma : float
        Registration noise in pixels (e.g. the alignment's residual rms / sqrt(2) per
        axis) for ZOGY's astrometric variance terms.
    config : SubtractConfig or None
        Options.

    Returns
    -------
    Subtraction
        Never raises for a poor subtraction: ``quality.passed`` says whether to use it.
    """
    cfg = config or SubtractConfig()
    x = np.asarray(star_x, np.float64)
    y = np.asarray(star_y, np.float64)
    if cfg.method == "zogy":
        scale = fit_flux_scale(
            science,
            reference,
            x=x,
            y=y,
            psf_science=science_psf,
            psf_reference=reference_psf,
            mask_science=science_mask,
            mask_reference=reference_mask,
            saturation_science=science_saturation,
            saturation_reference=reference_saturation,
            config=cfg.flux_scale,
        )

        z = zogy_subtract(
            science,
            reference,
            psf_science=science_psf,
            psf_reference=reference_psf,
            noise_science=science_noise,
            noise_reference=reference_noise,
            flux_scale=scale,
            variance_science=science_variance,
            variance_reference=reference_variance,
            mask_science=science_mask,
            mask_reference=reference_mask,
            astrometric_sigma_x=astrometric_sigma,
            astrometric_sigma_y=astrometric_sigma,
            config=cfg.zogy,
        )
        scale = z.flux_scale
        conversion = scale.flux_ratio / z.difference_zero_point
        difference = np.asarray(z.difference, np.float32)
        variance = np.ones_like(difference)
        # The PSF a transient has in D at its position (it follows the science PSF's
        # variation inside each tile), for the PSF photometry of candidates.
        result_psf = z.transient_psf
        score = np.asarray(z.score_corrected, np.float32)
        mask = np.asarray(z.mask, bool)
        details: dict[str, float | int | str] = {
            "difference_zero_point": float(z.difference_zero_point),
            "backend": z.backend,
        }
    else:
        al = subtract_alard_lupton(
            science,
            reference,
            science_psf=science_psf,
            reference_psf=reference_psf,
            star_x=x,
            star_y=y,
            science_variance=science_variance,
            reference_variance=reference_variance,
            mask=_combine_masks(science_mask, reference_mask),
            config=cfg.alard_lupton,
            workers=2,
        )
        ratio = float(al.science_over_reference)
        scale = FluxScale(flux_ratio=ratio, n_stars=int(al.n_stamps_used))
        conversion = 1.0
        difference = np.asarray(al.decorrelated, np.float32)
        variance = np.asarray(al.variance, np.float32)
        result_psf = _al_transient_psf(al, science_psf)
        score = np.asarray(al.score, np.float32)
        mask = np.asarray(al.mask, bool)
        details = {
            "convolved": al.convolved,
            "n_stamps_used": int(al.n_stamps_used),
            "n_stamps_rejected": int(al.n_stamps_rejected),
            "kernel_residual_rms": float(al.residual_rms),
        }
    factor = _residual_factor(result_psf, science_psf, conversion)
    quality = assess_subtraction(
        score=score,
        residual=difference * np.float32(factor),
        residual_variance=variance * np.float32(factor**2),
        science=science,
        mask=mask,
        star_x=x,
        star_y=y,
        star_snr=np.full(len(x), np.nan) if star_snr is None else np.asarray(star_snr),
        fwhm=science_psf.fwhm,
        config=cfg.gate,
    )
    return Subtraction(
        method=cfg.method,
        difference=difference,
        variance=variance,
        psf=result_psf,
        score=score,
        mask=mask,
        flux_conversion=float(conversion),
        flux_scale=scale,
        quality=quality,
        details=details,
    )


def _combine_masks(
    a: NDArray[np.bool_] | None, b: NDArray[np.bool_] | None
) -> NDArray[np.bool_] | None:
    if a is None:
        return b
    if b is None:
        return a
    return np.asarray(a, bool) | np.asarray(b, bool)


def _al_transient_psf(al: AlardLuptonResult, science_psf: PsfModel) -> PsfModel:
    """PSF in the decorrelated Alard-Lupton difference of a source new in the science.

    Such a source is drawn with the science PSF ``P_N(x)``: it reaches the difference
    unconvolved (``φ ⊗ P_N(x)``) when the reference was convolved, and through the
    kernel (``φ ⊗ κ(x) ⊗ P_N(x) / Σκ``) when the science was. The kernel-matched model
    ``φ ⊗ κ ⊗ P_R`` equals it only where the kernel matches exactly; at the edges of a
    field whose PSF varies it differs by a few per cent, which biases PSF fluxes as
    much. Evaluated on the science PSF's grid (3x3 for a constant science PSF when the
    kernel varies), with the stamp size of ``al.psf``.
    """
    from scipy.signal import fftconvolve

    phi = np.asarray(al.decorrelation_kernel, np.float64)
    kernel = al.kernel_fit.kernel
    through_kernel = al.convolved == "science"
    if science_psf.is_constant and not (through_kernel and kernel.spatial_degree > 0):
        grid_x, grid_y = np.array([0.0]), np.array([0.0])
    elif science_psf.is_constant:
        ny, nx = kernel.shape
        grid_x = (np.arange(3) + 0.5) * nx / 3 - 0.5
        grid_y = (np.arange(3) + 0.5) * ny / 3 - 0.5
    else:
        grid_x, grid_y = science_psf.grid_x, science_psf.grid_y
    size = al.psf.size
    half = size // 2
    stamps = np.zeros((len(grid_y), len(grid_x), size, size), np.float32)
    fwhm = np.zeros((len(grid_y), len(grid_x)))
    for j, yy in enumerate(grid_y):
        for i, xx in enumerate(grid_x):
            p = np.asarray(science_psf.at(float(xx), float(yy)), np.float64)
            if through_kernel:
                p = fftconvolve(p, kernel.at(float(xx), float(yy)))
            p = fftconvolve(p, phi)
            c = p.shape[0] // 2
            h = min(half, c)
            out = np.zeros((size, size))
            inner = slice(half - h, half + h + 1)
            out[inner, inner] = p[c - h : c + h + 1, c - h : c + h + 1]
            out /= out.sum()
            stamps[j, i] = out
            fwhm[j, i] = _moment_fwhm(out)
    return PsfModel(
        stamps=stamps,
        grid_x=np.asarray(grid_x, np.float64),
        grid_y=np.asarray(grid_y, np.float64),
        fwhm=float(np.median(fwhm)),
        fwhm_grid=fwhm,
        n_stars=0,
    )


def _moment_fwhm(stamp: NDArray[np.float64]) -> float:
    """FWHM (pixels) of the Gaussian with the second moments of the stamp's positive part."""
    half = stamp.shape[0] // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    w = np.clip(stamp, 0.0, None)
    w = w / w.sum()
    var = float((w * (x**2 + y**2)).sum() - (w * x).sum() ** 2 - (w * y).sum() ** 2) / 2.0
    return float(2.0 * np.sqrt(2.0 * np.log(2.0) * max(var, 0.0)))


def _central_stamp(psf: PsfModel) -> NDArray[np.float64]:
    ny, nx = psf.stamps.shape[:2]
    return np.asarray(psf.stamps[ny // 2, nx // 2], np.float64)


def _residual_factor(difference_psf: PsfModel, science_psf: PsfModel, conversion: float) -> float:
    """Scale taking the difference to science flux units per pixel, PSF shape matched.

    A point-source residual of science flux ``f`` appears in the difference as
    ``f / conversion * P_D``. Multiplying by ``conversion`` gives ``f * P_D``; a further
    ``sqrt(sum(P_N**2) / sum(P_D**2))`` makes its power over a stamp comparable with that
    of the same flux in the science image, ``f**2 * sum(P_N**2)``.
    """
    pd = _central_stamp(difference_psf)
    pn = _central_stamp(science_psf)
    return float(conversion * np.sqrt(np.sum(pn**2) / np.sum(pd**2)))
