"""Injection and recovery of fake point sources: completeness, false positives, flux bias.

Fake point sources drawn with the science PSF are added to the science exposure only
(the reference is left as it is), the whole pair pipeline
(:func:`astrid.pipeline.difference.difference_pair`) runs on the injected pair, and the
candidates are matched to the fakes within ``match_radius_fwhm`` science FWHM. Several
runs with fresh positions accumulate statistics; one extra run without fakes gives the
PSFs, variances, flux ratio and masks the fakes are placed and scored with.

Which PSF draws the fakes
-------------------------
The science exposure's own ``psf`` when it carries one (for a simulated exposure, pass
the true PSF: ``exposure.copy(psf=true_psf)``); otherwise the model the pipeline
estimates from the science image without fakes. ``InjectionResult.injection_psf`` says
which was used. The pipeline's own PSF models are those it measured on the pair without
fakes (``InjectionConfig.reuse_psf``), as a survey injects after characterisation.
With a known gain, each fake's Poisson noise is drawn and its expected variance
(model / gain) is added to the variance plane, so the pipeline sees the fake's noise as
it would a real source's.

The ideal S/N of a fake in the difference
-----------------------------------------
Each fake's S/N is the best any subtraction can do for a new point source of science
flux ``f`` at that position, given both images' noise. Let the science image be
``N = r T ⊗ P_n + f P_n(x - x0) + ε_n`` and the reference ``R = T ⊗ P_r + ε_r``, with
``T`` the unknown static sky, ``r`` the flux ratio (science counts per reference count)
and white noise of variances ``σ_n²`` and ``σ_r²`` (each in its own units). At each
spatial frequency ``k`` the static sky is known only through ``R̂ / P̂_r``, so the
best prediction of ``N̂`` without the transient, ``r (P̂_n / P̂_r) R̂``, carries noise
``r² σ_r² |P̂_n|² / |P̂_r|²``; the frequencies are independent, and the optimal
(matched-filter, i.e. PSF-fit) S/N adds in quadrature over them::

    (S/N)² = f² Σ_k 1 / (σ_n² / |P̂_n(k)|² + r² σ_r² / |P̂_r(k)|²) / n_pix

(Parseval normalisation: ``Σ_x P² = Σ_k |P̂|² / n_pix``). This is also the expected value
of ZOGY's score ``S_corr`` at the source (Zackay, Ofek & Gal-Yam 2016, eqs. 12-15, 41)
and of a decorrelated Alard-Lupton difference's PSF fit, so a pipeline thresholding at
``n_sigma`` finds half of the fakes of S/N ``n_sigma``, up to pixel sampling. With no
reference noise it is the science image's own PSF-fit S/N; with equal PSFs it is
``f / sqrt(var_n + r² var_r)`` with ``var_x = σ_x² / Σ P_x²`` the PSF-fit flux variance
in each image. When the PSFs differ that per-image formula is an upper bound (the
integrand is a concave, degree-1 homogeneous function of ``|P̂_n|²`` and ``|P̂_r|²``):
for Gaussian PSFs of 4.0 (science) and 2.6 pixels FWHM, ``σ_n = 3``, ``σ_r = 2`` and
``r = 0.7`` it reads 5.30 where the S/N is 5.195 (the mean ZOGY ``S_corr`` at such
sources agrees with the latter).

Source noise makes the variance vary across the PSF; ``σ_n²`` and ``σ_r²`` are then the
effective variances ``Σ P² / Σ (P² / V)`` over the PSF footprint at the fake (for a
noiseless reference this gives exactly the science image's PSF-fit S/N).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from astropy.table import Table, vstack
from numpy.typing import NDArray
from scipy import ndimage, optimize, special
from scipy.spatial import cKDTree

from astrid.exposure import Exposure
from astrid.pipeline.difference import DifferenceConfig, DifferenceResult, difference_pair
from astrid.science.psf_model import PsfModel
from astrid.science.simulate import add_point_sources, render_point_sources

__all__ = [
    "InjectionConfig",
    "InjectionResult",
    "combine_injection_results",
    "expected_noise_peaks",
    "ideal_difference_snr",
    "inject_and_recover",
    "plot_injection",
    "score_gradient_variance",
]

#: Default S/N bin edges of the binned completeness.
DEFAULT_SNR_BINS: tuple[float, ...] = (
    1.0,
    2.0,
    3.0,
    4.0,
    4.5,
    5.0,
    5.5,
    6.0,
    7.0,
    8.0,
    10.0,
    15.0,
    20.0,
    30.0,
    50.0,
    100.0,
)


@dataclass(frozen=True)
class InjectionConfig:
    """Options of :func:`inject_and_recover`.

    Attributes
    ----------
    n_fakes : int
        Fakes placed per run (fewer when the free area runs out; see ``min_separation_fwhm``).
    n_runs : int
        Runs, each with fresh positions and fluxes and a full pipeline pass.
    snr_range : tuple of float
        ``(low, high)`` range of the ideal difference S/N drawn for the fakes (see the
        module docstring); ignored when ``mag_range`` is given.
    snr_distribution : {"log-uniform", "uniform"}
        How S/N values are drawn within ``snr_range``.
    mag_range : tuple of float or None
        Draw magnitudes uniformly in ``(bright, faint)`` instead of S/N; needs the
        science exposure's zero point.
    min_separation_fwhm : float
        Least distance between two fakes, in science FWHM.
    source_separation_fwhm : float
        Least distance of a fake from any source detected in the science or the
        reference image, and from given known sources, in science FWHM; from the stars
        that tie the photometry (or fit the Alard-Lupton kernel), at least the side of
        the science PSF stamp, so that no fake falls in their fits.
    mask_distance : float or None
        Least distance, in pixels, from a pixel masked in the subtraction (which includes
        the image border). ``None``: half the science PSF stamp.
    match_radius_fwhm : float
        A positive candidate within this many science FWHM (at the fake's position)
        recovers the fake; each candidate recovers at most one fake (nearest pairs first).
    n_sigma : float
        Detection threshold on the score image (replaces ``difference_config.detect.n_sigma``).
    bright_snr : float
        Flux bias and astrometric offsets are measured on recovered fakes of at least
        this ideal S/N.
    snr_bins : tuple of float
        Edges of the S/N bins of the binned completeness.
    poisson : bool
        Add each fake's Poisson noise (and its variance) when the science gain is known.
    reuse_psf : bool
        The runs with fakes use the PSF models the pipeline measured on the pair
        without fakes, as LSST injects after characterisation: a real image's few
        transients do not change its PSF, while ~100 bright, isolated fakes would
        dominate the PSF stars. ``False`` re-estimates them from the injected images.
    n_bootstrap : int
        Bootstrap resamples for the uncertainty of the 50%-completeness S/N.
    seed : int
        Seed of positions, fluxes, Poisson noise and the bootstrap.
    """

    n_fakes: int = 200
    n_runs: int = 5
    snr_range: tuple[float, float] = (2.0, 50.0)
    snr_distribution: Literal["log-uniform", "uniform"] = "log-uniform"
    mag_range: tuple[float, float] | None = None
    min_separation_fwhm: float = 6.0
    source_separation_fwhm: float = 3.0
    mask_distance: float | None = None
    match_radius_fwhm: float = 1.0
    n_sigma: float = 5.0
    bright_snr: float = 20.0
    snr_bins: tuple[float, ...] = DEFAULT_SNR_BINS
    poisson: bool = True
    reuse_psf: bool = True
    n_bootstrap: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_fakes < 1 or self.n_runs < 1:
            raise ValueError(f"n_fakes and n_runs must be >= 1, got {self.n_fakes}, {self.n_runs}")
        lo, hi = self.snr_range
        if not 0 < lo < hi:
            raise ValueError(f"snr_range must be (low, high) with 0 < low < high, got {lo, hi}")
        if self.snr_distribution not in ("log-uniform", "uniform"):
            raise ValueError(f"unknown snr_distribution {self.snr_distribution!r}")
        if self.mag_range is not None and not self.mag_range[0] < self.mag_range[1]:
            raise ValueError(f"mag_range must be (bright, faint), got {self.mag_range}")
        if not self.match_radius_fwhm > 0:
            raise ValueError(f"match_radius_fwhm must be > 0, got {self.match_radius_fwhm}")
        if len(self.snr_bins) < 2 or np.any(np.diff(self.snr_bins) <= 0):
            raise ValueError("snr_bins must be at least two increasing edges")


@dataclass(frozen=True)
class InjectionResult:
    """What :func:`inject_and_recover` measured.

    Attributes
    ----------
    fakes : astropy.table.Table
        One row per fake: ``run``, ``x``, ``y`` (0-based science pixels), ``flux``
        (injected, science data units), ``snr`` (ideal difference S/N), ``recovered``,
        ``measured_x``, ``measured_y``, ``measured_flux``, ``measured_flux_err`` (PSF fit
        on the difference, science units), ``measured_snr``, ``score_peak``, ``dx``,
        ``dy`` (measured minus injected, pixels), ``fwhm`` (science PSF FWHM there).
        Measured columns are NaN for fakes not recovered.
    false_positives : astropy.table.Table
        Candidates matched neither to a fake nor to a known source: ``run``, ``x``,
        ``y``, ``polarity``, ``score_peak``, ``flux``, ``snr``, ``ref_distance``,
        ``ref_mag``, ``is_dipole``.
    completeness : astropy.table.Table
        Binned completeness: ``snr_low``, ``snr_high``, ``snr_median``, ``n``,
        ``n_recovered``, ``completeness``, ``lower``, ``upper`` (68% Wilson interval).
    snr50 : float
        Ideal S/N at which the fitted completeness curve is 0.5.
    snr50_error : float
        Its bootstrap standard deviation.
    curve : dict of str to float
        The fitted curve ``plateau * Phi((snr - centre) / width)``: ``plateau``,
        ``centre``, ``width``.
    n_false_positives : int
        False positives over all runs.
    false_positives_per_image : float
        Mean over runs.
    false_positives_per_deg2 : float
        Per square degree of usable difference area (NaN without a WCS).
    area_deg2 : float
        Usable (unmasked) difference area of one image, square degrees (NaN without a WCS).
    baseline_false_positives : int
        Candidates on the pair without fakes (not matched to known sources).
    flux_bias : float
        ``median(measured_flux / flux) - 1`` over recovered fakes of S/N >= ``bright_snr``.
    flux_bias_error : float
        Its standard error (``1.2533 * robust std / sqrt(n)``).
    n_flux : int
        Fakes in the flux-bias and offset statistics.
    offset_median : tuple of float
        Median ``(dx, dy)`` of those fakes, pixels.
    offset_rms : tuple of float
        Root-mean-square ``(dx, dy)`` of those fakes, pixels.
    n_runs : int
        Runs done.
    method : str
        Subtraction method.
    injection_psf : str
        ``"exposure"`` (the science exposure's own PSF) or ``"estimated"`` (the model
        estimated by the pipeline).
    flux_ratio : float
        Science counts per reference count used for the ideal S/N (fitted by the
        subtraction of the pair without fakes).
    config : InjectionConfig
        The configuration.
    """

    fakes: Table
    false_positives: Table
    completeness: Table
    snr50: float
    snr50_error: float
    curve: dict[str, float]
    n_false_positives: int
    false_positives_per_image: float
    false_positives_per_deg2: float
    area_deg2: float
    baseline_false_positives: int
    flux_bias: float
    flux_bias_error: float
    n_flux: int
    offset_median: tuple[float, float]
    offset_rms: tuple[float, float]
    n_runs: int
    method: str
    injection_psf: str
    flux_ratio: float
    config: InjectionConfig

    def summary(self) -> dict[str, Any]:
        """The scalar results as a JSON-serialisable dict."""
        return {
            "method": self.method,
            "n_runs": self.n_runs,
            "n_fakes": len(self.fakes),
            "n_recovered": int(np.count_nonzero(self.fakes["recovered"])),
            "snr50": _finite_or_none(self.snr50),
            "snr50_error": _finite_or_none(self.snr50_error),
            "curve": {k: _finite_or_none(v) for k, v in self.curve.items()},
            "n_sigma": self.config.n_sigma,
            "n_false_positives": self.n_false_positives,
            "false_positives_per_image": self.false_positives_per_image,
            "false_positives_per_deg2": _finite_or_none(self.false_positives_per_deg2),
            "area_deg2": _finite_or_none(self.area_deg2),
            "baseline_false_positives": self.baseline_false_positives,
            "flux_bias": _finite_or_none(self.flux_bias),
            "flux_bias_error": _finite_or_none(self.flux_bias_error),
            "bright_snr": self.config.bright_snr,
            "n_flux": self.n_flux,
            "offset_median_px": [_finite_or_none(v) for v in self.offset_median],
            "offset_rms_px": [_finite_or_none(v) for v in self.offset_rms],
            "injection_psf": self.injection_psf,
            "flux_ratio": self.flux_ratio,
            "seed": self.config.seed,
        }


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


# --------------------------------------------------------------------------------------
# Ideal S/N
# --------------------------------------------------------------------------------------


def _effective_variance(
    variance: NDArray[np.floating], stamp: NDArray[np.float64], ix: int, iy: int
) -> float:
    """``Σ P² / Σ (P² / V)`` over the stamp's footprint on the image (finite V > 0)."""
    ny, nx = variance.shape
    h = stamp.shape[0] // 2
    y0, y1 = max(iy - h, 0), min(iy + h + 1, ny)
    x0, x1 = max(ix - h, 0), min(ix + h + 1, nx)
    if y0 >= y1 or x0 >= x1:
        return math.nan
    p = stamp[y0 - (iy - h) : y1 - (iy - h), x0 - (ix - h) : x1 - (ix - h)]
    v = np.asarray(variance[y0:y1, x0:x1], np.float64)
    good = np.isfinite(v) & (v > 0)
    p2 = p[good] ** 2
    denom = float(np.sum(p2 / v[good]))
    return float(np.sum(p2)) / denom if denom > 0 else math.nan


def _power_spectrum(stamp: NDArray[np.float64], size: int) -> NDArray[np.float64]:
    """``|P̂|²`` of a unit-sum stamp zero-padded to ``size`` x ``size``."""
    s = np.asarray(stamp, np.float64)
    s = s / s.sum()
    return np.abs(np.fft.rfft2(s, s=(size, size))) ** 2


def ideal_difference_snr(
    flux: NDArray[np.floating] | float,
    x: NDArray[np.floating] | float,
    y: NDArray[np.floating] | float,
    *,
    science_psf: PsfModel,
    science_variance: NDArray[np.floating],
    reference_psf: PsfModel,
    reference_variance: NDArray[np.floating],
    flux_ratio: float,
    reference_x: NDArray[np.floating] | float | None = None,
    reference_y: NDArray[np.floating] | float | None = None,
) -> NDArray[np.float64]:
    """Ideal PSF-fit S/N of new point sources in the difference of two images.

    ``S/N = f sqrt(Σ_k 1 / (σ_n² / |P̂_n|² + r² σ_r² / |P̂_r|²) / n_pix)`` (derived in the
    module docstring), with ``σ²`` each image's effective variance ``Σ P² / Σ (P² / V)``
    over the PSF footprint at the source.

    Parameters
    ----------
    flux : float or ndarray, shape (n,)
        Science-image flux of each source (data units of the science image).
    x, y : float or ndarray, shape (n,)
        0-based positions on the (common) pixel grid.
    science_psf, reference_psf : PsfModel
        PSFs of the two images on that grid.
    science_variance : ndarray, shape (ny, nx)
        Per-pixel variance of the science image (its units squared).
    reference_variance : ndarray, shape (ny, nx)
        Per-pixel variance of the reference on the grid (reference units squared).
    flux_ratio : float
        Science counts per reference count, ``r``.
    reference_x, reference_y : float or ndarray, shape (n,), optional
        Positions of the sources on ``reference_variance``'s grid, when the reference
        has not been resampled onto the science's (default: ``x``, ``y``). The
        reference PSF is evaluated there too.

    Returns
    -------
    ndarray, shape (n,)
        The S/N (NaN where a variance is unusable over the footprint).
    """
    xa, ya, fa = (np.atleast_1d(np.asarray(v, np.float64)) for v in np.broadcast_arrays(x, y, flux))
    rxa = (
        xa
        if reference_x is None
        else np.broadcast_to(np.asarray(reference_x, np.float64), xa.shape)
    )
    rya = (
        ya
        if reference_y is None
        else np.broadcast_to(np.asarray(reference_y, np.float64), ya.shape)
    )
    size = max(64, 4 * max(science_psf.size, reference_psf.size))
    out = np.full(xa.shape, np.nan)
    constant = science_psf.is_constant and reference_psf.is_constant
    spectra: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
    tiny = np.finfo(np.float64).tiny
    for i, (xi, yi, fi) in enumerate(zip(xa, ya, fa, strict=True)):
        ix, iy = round(float(xi)), round(float(yi))
        rx, ry = float(rxa[i]), float(rya[i])
        pn = np.asarray(science_psf.at(xi, yi), np.float64)
        pr = np.asarray(reference_psf.at(rx, ry), np.float64)
        var_n = _effective_variance(science_variance, pn / pn.sum(), ix, iy)
        var_r = _effective_variance(reference_variance, pr / pr.sum(), round(rx), round(ry))
        if not (np.isfinite(var_n) and np.isfinite(var_r)):
            continue
        if spectra is None or not constant:  # constant PSFs share one pair of spectra
            spectra = (_power_spectrum(pn, size), _power_spectrum(pr, size))
        a2n, a2r = spectra
        inv = 1.0 / (var_n / np.maximum(a2n, tiny) + flux_ratio**2 * var_r / np.maximum(a2r, tiny))
        # Sum over the full plane from the rfft half-plane (columns 1..n/2-1 count twice).
        total = 2.0 * inv.sum() - inv[:, 0].sum() - inv[:, -1].sum()
        out[i] = fi * math.sqrt(total / size**2)
    return out


# --------------------------------------------------------------------------------------
# Placement, matching, statistics
# --------------------------------------------------------------------------------------


def _place(
    rng: np.random.Generator,
    n: int,
    allowed: NDArray[np.bool_],
    avoid: list[tuple[NDArray[np.float64], float]],
    separation: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Up to ``n`` random positions on allowed pixels, at least each ``(points, radius)``
    radius from those points and ``separation`` from each other."""
    iy, ix = np.nonzero(allowed)
    if iy.size == 0:
        return np.zeros(0), np.zeros(0)
    trees = [(cKDTree(points), radius) for points, radius in avoid if len(points)]
    xs = np.zeros(n)
    ys = np.zeros(n)
    k = 0
    batch = max(4 * n, 256)
    for _ in range(50):
        pick = rng.integers(0, iy.size, batch)
        x = ix[pick] + rng.uniform(-0.5, 0.5, batch)
        y = iy[pick] + rng.uniform(-0.5, 0.5, batch)
        ok = np.ones(batch, bool)
        for tree, radius in trees:
            d, _ = tree.query(np.column_stack([x, y]))
            ok &= d >= radius
        for xi, yi in zip(x[ok], y[ok], strict=True):
            if k and np.min((xs[:k] - xi) ** 2 + (ys[:k] - yi) ** 2) < separation**2:
                continue
            xs[k], ys[k] = xi, yi
            k += 1
            if k == n:
                return xs, ys
    return xs[:k], ys[:k]


def _match(
    fx: NDArray[np.float64],
    fy: NDArray[np.float64],
    radius: NDArray[np.float64],
    cx: NDArray[np.float64],
    cy: NDArray[np.float64],
) -> NDArray[np.int64]:
    """For each fake, the index of its candidate (-1: none); nearest pairs first, 1 to 1."""
    out = np.full(len(fx), -1, np.int64)
    if len(fx) == 0 or len(cx) == 0:
        return out
    tree = cKDTree(np.column_stack([cx, cy]))
    pairs: list[tuple[float, int, int]] = []
    for i, js in enumerate(tree.query_ball_point(np.column_stack([fx, fy]), float(np.max(radius)))):
        for j in js:
            d = math.hypot(cx[j] - fx[i], cy[j] - fy[i])
            if d <= radius[i]:
                pairs.append((d, i, j))
    taken: set[int] = set()
    for _, i, j in sorted(pairs):
        if out[i] < 0 and j not in taken:
            out[i] = j
            taken.add(j)
    return out


def _erf_curve(snr: NDArray[np.float64], plateau: float, centre: float, width: float) -> Any:
    return plateau * special.ndtr((snr - centre) / width)


def _fit_completeness(
    snr: NDArray[np.float64], hit: NDArray[np.bool_], n_sigma: float
) -> tuple[float, float, float]:
    """Maximum-likelihood ``plateau * Phi((snr - centre) / width)`` on individual fakes."""
    s = np.asarray(snr, np.float64)
    k = np.asarray(hit, np.float64)

    def nll(p: NDArray[np.float64]) -> float:
        plateau = special.expit(p[0])
        c = np.clip(_erf_curve(s, plateau, p[1], math.exp(p[2])), 1e-12, 1 - 1e-12)
        return -float(np.sum(k * np.log(c) + (1 - k) * np.log1p(-c)))

    start = np.array([4.0, n_sigma, 0.0])
    best = optimize.minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-4})
    p = best.x
    return float(special.expit(p[0])), float(p[1]), float(math.exp(p[2]))


def _snr_at_half(plateau: float, centre: float, width: float) -> float:
    if plateau <= 0.5:
        return math.nan
    return float(centre + width * special.ndtri(0.5 / plateau))


def _wilson(k: int, n: int, z: float = 1.0) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _binned(snr: NDArray[np.float64], hit: NDArray[np.bool_], edges: tuple[float, ...]) -> Table:
    rows = []
    for lo, hi in itertools.pairwise(edges):
        sel = (snr >= lo) & (snr < hi)
        n = int(np.count_nonzero(sel))
        k = int(np.count_nonzero(hit[sel]))
        low, up = _wilson(k, n)
        rows.append(
            (
                lo,
                hi,
                float(np.median(snr[sel])) if n else math.nan,
                n,
                k,
                k / n if n else math.nan,
                low,
                up,
            )
        )
    names = ("snr_low", "snr_high", "snr_median", "n", "n_recovered", "completeness")
    return Table(rows=rows, names=(*names, "lower", "upper"))


# --------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------


def _positions(table: Table | None) -> NDArray[np.float64]:
    if table is None or len(table) == 0:
        return np.zeros((0, 2))
    return np.column_stack([np.asarray(table["x"], np.float64), np.asarray(table["y"], np.float64)])


def _column(table: Any, name: str) -> NDArray[np.float64]:
    col = table[name]
    return np.asarray(getattr(col, "value", col), np.float64)


def _take(cands: Any, name: str, idx: NDArray[np.int64], hit: NDArray[np.bool_]) -> Any:
    """Column ``name`` of the candidates matched to each fake (NaN where none)."""
    if len(cands) == 0:
        return np.full(len(hit), np.nan)
    return np.where(hit, _column(cands, name)[idx], np.nan)


def _area_deg2(result: DifferenceResult, science: Exposure) -> float:
    scale = science.pixel_scale
    if scale is None:
        return math.nan
    n_good = int(np.count_nonzero(~result.subtraction.mask))
    return n_good * (scale / 3600.0) ** 2


def inject_and_recover(
    science: Exposure,
    reference: Exposure,
    *,
    aligned: bool = False,
    config: InjectionConfig | None = None,
    difference_config: DifferenceConfig | None = None,
    known_sources: Table | None = None,
    pipeline_psfs: tuple[PsfModel, PsfModel] | None = None,
) -> InjectionResult:
    """Inject fake point sources into the science exposure, subtract, detect and score.

    Parameters
    ----------
    science : Exposure
        Calibrated science exposure (not modified). Its ``psf``, when set, draws the fakes
        (see the module docstring); its ``variance`` must include source noise for a
        faithful ideal S/N.
    reference : Exposure
        Calibrated reference exposure of the same field and band.
    aligned : bool
        True when ``reference`` is already on the science grid; its own ``psf``, when
        set, is then used for the ideal S/N (otherwise the pipeline's estimate).
    config : InjectionConfig or None
        Options of the harness.
    difference_config : DifferenceConfig or None
        Options of the pair pipeline (method, PSF, detection); its detection threshold
        is replaced by ``config.n_sigma``.
    known_sources : Table or None
        ``x``, ``y`` (0-based science pixels) of real variable or transient sources:
        fakes avoid them and candidates on them are not false positives.
    pipeline_psfs : tuple of PsfModel or None
        ``(science, reference)`` PSF models for the pipeline to use instead of
        estimating them (e.g. a simulation's true PSFs, to separate PSF-modelling errors
        from the rest); ``None`` lets it estimate them.

    Returns
    -------
    InjectionResult

    Raises
    ------
    ValueError
        ``mag_range`` without a science zero point.
    AstridError
        Whatever :func:`~astrid.pipeline.difference.difference_pair` raises on the pair.
    """
    cfg = config or InjectionConfig()
    base_cfg = difference_config or DifferenceConfig()
    dcfg = replace(base_cfg, detect=replace(base_cfg.detect, n_sigma=cfg.n_sigma))
    if cfg.mag_range is not None and science.meta.zero_point is None:
        raise ValueError("mag_range needs the science zero point")

    given_n, given_r = pipeline_psfs if pipeline_psfs is not None else (None, None)
    baseline = difference_pair(
        science,
        reference,
        aligned=aligned,
        config=dcfg,
        science_psf=given_n,
        reference_psf=given_r,
    )
    injection_psf = "exposure" if science.psf is not None else "estimated"
    psf_n = science.psf if science.psf is not None else baseline.science.exposure.psf
    psf_r = (
        reference.psf if aligned and reference.psf is not None else baseline.reference.exposure.psf
    )
    assert psf_n is not None and psf_r is not None  # difference_pair raised otherwise
    ref_variance = baseline.reference.exposure.variance
    ratio = float(baseline.subtraction.flux_scale.flux_ratio)
    fwhm = float(baseline.science.exposure.psf.fwhm)  # type: ignore[union-attr]
    known = _positions(known_sources)

    # Where fakes may go: away from the subtraction mask (and border), sources and knowns.
    mask_distance = cfg.mask_distance if cfg.mask_distance is not None else psf_n.size // 2
    distance = ndimage.distance_transform_edt(~baseline.subtraction.mask)
    allowed = distance >= max(mask_distance, 1.0)
    source_radius = cfg.source_separation_fwhm * fwhm
    sources = np.vstack(
        [_positions(baseline.science.sources), _positions(baseline.reference.sources), known]
    )
    # The stars that tie the photometry or fit the kernel are measured over a PSF stamp:
    # a fake inside it would bias the tie.
    stars = np.vstack([_positions(baseline.science.stars), _positions(baseline.reference.stars)])
    avoid = [(sources, source_radius), (stars, max(source_radius, float(psf_n.size)))]
    gain = science.meta.gain if cfg.poisson else None

    def match_radius(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
        return cfg.match_radius_fwhm * np.array(
            [baseline.science.exposure.psf.fwhm_at(a, b) for a, b in zip(x, y, strict=True)]  # type: ignore[union-attr]
        )

    def unknown(cands: Any) -> NDArray[np.bool_]:
        cx, cy = _column(cands, "x"), _column(cands, "y")
        out = np.ones(len(cx), bool)
        if len(known) and len(cx):
            d, _ = cKDTree(known).query(np.column_stack([cx, cy]))
            out = d > cfg.match_radius_fwhm * fwhm
        return out

    baseline_fp = int(np.count_nonzero(unknown(baseline.candidates)))
    fake_rows: list[Table] = []
    fp_rows: list[Table] = []
    areas: list[float] = []
    for run in range(cfg.n_runs):
        rng = np.random.default_rng([cfg.seed, run])
        x, y = _place(rng, cfg.n_fakes, allowed, avoid, cfg.min_separation_fwhm * fwhm)
        if cfg.mag_range is not None:
            zp = float(science.meta.zero_point)  # type: ignore[arg-type]
            mags = rng.uniform(cfg.mag_range[0], cfg.mag_range[1], len(x))
            flux = 10.0 ** (-0.4 * (mags - zp))
        else:
            lo, hi = cfg.snr_range
            if cfg.snr_distribution == "log-uniform":
                target = np.exp(rng.uniform(math.log(lo), math.log(hi), len(x)))
            else:
                target = rng.uniform(lo, hi, len(x))
            per_flux = ideal_difference_snr(
                1.0,
                x,
                y,
                science_psf=psf_n,
                science_variance=science.variance,
                reference_psf=psf_r,
                reference_variance=ref_variance,
                flux_ratio=ratio,
            )
            flux = target / per_flux
        good = np.isfinite(flux) & (flux > 0)
        x, y, flux = x[good], y[good], flux[good]
        data = add_point_sources(
            science.data,
            x,
            y,
            flux,
            psf_n,
            gain=gain,
            seed=None if gain is None else int(rng.integers(2**31)),
        )
        variance = science.variance
        if gain is not None:
            variance = variance + render_point_sources(
                science.shape, x, y, flux, psf_n
            ) / np.float32(gain)
        injected = science.copy(data=data, variance=np.asarray(variance, np.float32))
        snr = ideal_difference_snr(
            flux,
            x,
            y,
            science_psf=psf_n,
            science_variance=injected.variance,
            reference_psf=psf_r,
            reference_variance=ref_variance,
            flux_ratio=ratio,
        )
        res = difference_pair(
            injected,
            reference,
            aligned=aligned,
            config=dcfg,
            science_psf=baseline.science.exposure.psf if cfg.reuse_psf else given_n,
            reference_psf=baseline.reference.exposure.psf if cfg.reuse_psf else given_r,
        )
        areas.append(_area_deg2(res, science))
        cands = res.candidates
        pol = np.asarray(cands["polarity"])
        positive = np.nonzero(pol > 0)[0]
        cx, cy = _column(cands, "x"), _column(cands, "y")
        radius = match_radius(x, y)
        j = _match(x, y, radius, cx[positive], cy[positive])
        hit = j >= 0
        idx = np.where(hit, positive[np.maximum(j, 0)], 0)

        mx, my = _take(cands, "x", idx, hit), _take(cands, "y", idx, hit)
        fake_rows.append(
            Table(
                {
                    "run": np.full(len(x), run, np.int32),
                    "x": x,
                    "y": y,
                    "flux": flux,
                    "snr": snr,
                    "recovered": hit,
                    "measured_x": mx,
                    "measured_y": my,
                    "measured_flux": _take(cands, "flux", idx, hit),
                    "measured_flux_err": _take(cands, "flux_err", idx, hit),
                    "measured_snr": _take(cands, "snr", idx, hit),
                    "score_peak": _take(cands, "score_peak", idx, hit),
                    "dx": mx - x,
                    "dy": my - y,
                    "fwhm": radius / cfg.match_radius_fwhm,
                }
            )
        )
        used = np.zeros(len(cands), bool)
        used[idx[hit]] = True
        false = ~used & unknown(cands)
        fp = Table(
            {
                "run": np.full(int(false.sum()), run, np.int32),
                "x": cx[false],
                "y": cy[false],
                "polarity": pol[false],
                "score_peak": _column(cands, "score_peak")[false],
                "flux": _column(cands, "flux")[false],
                "snr": _column(cands, "snr")[false],
                "ref_distance": _column(cands, "ref_distance")[false],
                "ref_mag": _column(cands, "ref_mag")[false],
                "is_dipole": np.asarray(cands["is_dipole"], bool)[false],
            }
        )
        fp_rows.append(fp)

    fakes = vstack(fake_rows)
    fakes.meta["pixel_origin"] = 0
    fakes.meta["flux_units"] = "science data units"
    return _summarise(
        fakes,
        vstack(fp_rows),
        float(np.sum(areas)),
        baseline_fp,
        cfg,
        n_runs=cfg.n_runs,
        method=dcfg.subtract.method,
        injection_psf=injection_psf,
        flux_ratio=ratio,
    )


def _summarise(
    fakes: Table,
    false_positives: Table,
    total_area: float,
    baseline_fp: int,
    cfg: InjectionConfig,
    *,
    n_runs: int,
    method: str,
    injection_psf: str,
    flux_ratio: float,
) -> InjectionResult:
    """The statistics of an :class:`InjectionResult` from its tables."""
    snr_all = np.asarray(fakes["snr"], np.float64)
    rec = np.asarray(fakes["recovered"], bool)
    plateau, centre, width = _fit_completeness(snr_all, rec, cfg.n_sigma)
    snr50 = _snr_at_half(plateau, centre, width)
    boot_rng = np.random.default_rng([cfg.seed, 1_000_003])
    boots = []
    for _ in range(cfg.n_bootstrap):
        pick = boot_rng.integers(0, len(snr_all), len(snr_all))
        boots.append(_snr_at_half(*_fit_completeness(snr_all[pick], rec[pick], cfg.n_sigma)))
    boot_arr = np.asarray(boots)
    boot_arr = boot_arr[np.isfinite(boot_arr)]
    snr50_error = float(np.std(boot_arr)) if boot_arr.size > 1 else math.nan

    bright = rec & (snr_all >= cfg.bright_snr)
    ratio_f = np.asarray(fakes["measured_flux"])[bright] / np.asarray(fakes["flux"])[bright]
    n_flux = int(bright.sum())
    if n_flux:
        med = float(np.median(ratio_f))
        robust = 1.4826 * float(np.median(np.abs(ratio_f - med)))
        flux_bias, flux_bias_error = med - 1.0, 1.2533 * robust / math.sqrt(n_flux)
        dxb, dyb = np.asarray(fakes["dx"])[bright], np.asarray(fakes["dy"])[bright]
        offset_median = (float(np.median(dxb)), float(np.median(dyb)))
        offset_rms = (float(np.sqrt(np.mean(dxb**2))), float(np.sqrt(np.mean(dyb**2))))
    else:
        flux_bias = flux_bias_error = math.nan
        offset_median = offset_rms = (math.nan, math.nan)

    n_fp = len(false_positives)
    return InjectionResult(
        fakes=fakes,
        false_positives=false_positives,
        completeness=_binned(snr_all, rec, cfg.snr_bins),
        snr50=snr50,
        snr50_error=snr50_error,
        curve={"plateau": plateau, "centre": centre, "width": width},
        n_false_positives=n_fp,
        false_positives_per_image=n_fp / n_runs,
        false_positives_per_deg2=n_fp / total_area if total_area > 0 else math.nan,
        area_deg2=total_area / n_runs,
        baseline_false_positives=baseline_fp,
        flux_bias=flux_bias,
        flux_bias_error=flux_bias_error,
        n_flux=n_flux,
        offset_median=offset_median,
        offset_rms=offset_rms,
        n_runs=n_runs,
        method=method,
        injection_psf=injection_psf,
        flux_ratio=flux_ratio,
        config=cfg,
    )


def combine_injection_results(results: Sequence[InjectionResult]) -> InjectionResult:
    """Pool several harness results (e.g. different pairs) into one set of statistics.

    The fakes and false positives are stacked with a ``pair`` column (index in
    ``results``); rates are per image over all runs and the area summed; the flux ratio
    and baseline false positives are the mean and the sum. The first result's config
    supplies the thresholds and the bootstrap seed.

    Parameters
    ----------
    results : sequence of InjectionResult
        At least one, all with the same method.

    Returns
    -------
    InjectionResult
    """
    if not results:
        raise ValueError("nothing to combine")
    methods = {r.method for r in results}
    if len(methods) != 1:
        raise ValueError(f"cannot combine methods {sorted(methods)}")
    fakes, fps = [], []
    for k, r in enumerate(results):
        f = r.fakes.copy()
        f["pair"] = np.full(len(f), k, np.int32)
        fakes.append(f)
        p = r.false_positives.copy()
        p["pair"] = np.full(len(p), k, np.int32)
        fps.append(p)
    n_runs = sum(r.n_runs for r in results)
    psfs = {r.injection_psf for r in results}
    return _summarise(
        vstack(fakes),
        vstack(fps),
        float(sum(r.area_deg2 * r.n_runs for r in results)),
        sum(r.baseline_false_positives for r in results),
        results[0].config,
        n_runs=n_runs,
        method=results[0].method,
        injection_psf=psfs.pop() if len(psfs) == 1 else "mixed",
        flux_ratio=float(np.mean([r.flux_ratio for r in results])),
    )


# --------------------------------------------------------------------------------------
# The Gaussian expectation of false positives
# --------------------------------------------------------------------------------------


def score_gradient_variance(psf: PsfModel | NDArray[np.floating]) -> float:
    """``λ``: variance of the x-derivative of a unit-variance matched-filter score image.

    A score ``S = D ⊗ P̄`` of white noise ``D`` has the power spectrum ``|P̂|²``, so
    ``λ = Σ (2π k_x)² |P̂|² / Σ |P̂|²`` (per pixel², the mean of the x and y values);
    ``1 / (2 σ²)`` for a Gaussian PSF of width ``σ``.

    Parameters
    ----------
    psf : PsfModel or ndarray
        PSF of the difference (its stamp at the image centre for a model).
    """
    if isinstance(psf, PsfModel):
        ny, nx = psf.stamps.shape[:2]
        stamp = np.asarray(psf.stamps[ny // 2, nx // 2], np.float64)
    else:
        stamp = np.asarray(psf, np.float64)
    size = max(64, 4 * stamp.shape[0])
    power = np.abs(np.fft.fft2(stamp / stamp.sum(), s=(size, size))) ** 2
    k = 2.0 * np.pi * np.fft.fftfreq(size)
    lam_x = float(np.sum(power * k[None, :] ** 2) / np.sum(power))
    lam_y = float(np.sum(power * k[:, None] ** 2) / np.sum(power))
    return 0.5 * (lam_x + lam_y)


def expected_noise_peaks(
    n_sigma: float, *, area: float, gradient_variance: float, perimeter: float = 0.0
) -> float:
    """Expected number of excursions above ``n_sigma`` of a smooth unit Gaussian field.

    The expected Euler characteristic of the excursion set of a stationary, isotropic
    2-D Gaussian field of unit variance (Adler 1981; Worsley 1996), which at high
    thresholds is the expected number of separate regions (and of local maxima) above
    it::

        E = A λ / (2π)^(3/2) t exp(-t²/2) + (L / 2) sqrt(λ) / (2π) exp(-t²/2) + Q(t)

    with ``A`` the area, ``L`` the perimeter, ``λ`` the variance of the field's
    derivative along an axis (:func:`score_gradient_variance`) and ``Q`` the Gaussian
    upper tail. One polarity: double it for positive and negative candidates.

    Parameters
    ----------
    n_sigma : float
        Threshold ``t`` in units of the field's standard deviation.
    area : float
        Area searched, pixels.
    gradient_variance : float
        ``λ``, per pixel².
    perimeter : float
        Length of the boundary of the searched region, pixels.
    """
    t = float(n_sigma)
    lam = float(gradient_variance)
    tail = math.exp(-0.5 * t * t)
    return (
        area * lam / (2.0 * math.pi) ** 1.5 * t * tail
        + 0.5 * perimeter * math.sqrt(lam) / (2.0 * math.pi) * tail
        + float(special.ndtr(-t))
    )


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _snr_axis(ax: Any) -> None:
    """Log S/N axis with plain-number ticks."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200) if lo <= t <= hi]
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_injection(
    result: InjectionResult, folder: str | Path, *, prefix: str = "", title: str | None = None
) -> dict[str, Path]:
    """Write ``completeness.png``, ``flux_ratio.png`` and ``offsets.png`` (matplotlib Agg).

    Parameters
    ----------
    result : InjectionResult
        What to plot.
    folder : str or Path
        Output folder (created).
    prefix : str
        Prepended to each file name.
    title : str or None
        Figure title (default: the method and the number of fakes).

    Returns
    -------
    dict of str to Path
        The written files by kind.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    fakes = result.fakes
    snr = np.asarray(fakes["snr"], np.float64)
    rec = np.asarray(fakes["recovered"], bool)
    label = title or f"{result.method}: {len(fakes)} fakes in {result.n_runs} runs"
    paths: dict[str, Path] = {}

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=100)
    comp = result.completeness
    ok = np.asarray(comp["n"]) > 0
    mid = np.asarray(comp["snr_median"])[ok]
    c = np.asarray(comp["completeness"])[ok]
    ax.errorbar(
        mid,
        c,
        yerr=[
            np.maximum(c - np.asarray(comp["lower"])[ok], 0.0),
            np.maximum(np.asarray(comp["upper"])[ok] - c, 0.0),
        ],
        fmt="o",
        ms=4,
        label="measured",
    )
    grid = np.geomspace(max(0.5, float(snr.min()) * 0.9), float(snr.max()) * 1.1, 300)
    cv = result.curve
    ax.plot(grid, _erf_curve(grid, cv["plateau"], cv["centre"], cv["width"]), label="fit")
    n_sigma = result.config.n_sigma
    ax.plot(grid, special.ndtr(grid - n_sigma), ":", color="grey", label="ideal")
    if np.isfinite(result.snr50):
        ax.axvline(result.snr50, color="C3", lw=0.8)
        ax.text(
            result.snr50 * 1.05,
            0.1,
            f"S/N50 = {result.snr50:.2f} ± {result.snr50_error:.2f}",
            color="C3",
            fontsize=8,
        )
    _snr_axis(ax)
    ax.set_xlabel("ideal difference S/N")
    ax.set_ylabel("completeness")
    ax.set_ylim(-0.03, 1.05)
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths["completeness"] = out / f"{prefix}completeness.png"
    fig.savefig(paths["completeness"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=100)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.asarray(fakes["measured_flux"]) / np.asarray(fakes["flux"])
    ax.scatter(snr[rec], ratio[rec], s=4, alpha=0.5)
    grid = np.geomspace(max(3.0, float(snr[rec].min()) if rec.any() else 3.0), snr.max(), 200)
    ax.plot(grid, 1 + 1 / grid, ":", color="grey")
    ax.plot(grid, 1 - 1 / grid, ":", color="grey")
    ax.axhline(1.0, color="k", lw=0.6)
    if np.isfinite(result.flux_bias):
        ax.axhline(1 + result.flux_bias, color="C3", lw=0.8)
        ax.axvline(result.config.bright_snr, color="C3", lw=0.5, ls="--")
        ax.text(
            result.config.bright_snr * 1.05,
            0.55,
            f"bias {100 * result.flux_bias:+.2f} ± {100 * result.flux_bias_error:.2f} %",
            color="C3",
            fontsize=8,
        )
    _snr_axis(ax)
    ax.set_ylim(0.4, 1.6)
    ax.set_xlabel("ideal difference S/N")
    ax.set_ylabel("measured / injected flux")
    ax.set_title(label, fontsize=9)
    fig.tight_layout()
    paths["flux_ratio"] = out / f"{prefix}flux_ratio.png"
    fig.savefig(paths["flux_ratio"])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.4), dpi=100)
    dx, dy = np.asarray(fakes["dx"]), np.asarray(fakes["dy"])
    sc = axes[0].scatter(dx[rec], dy[rec], c=np.log10(snr[rec]), s=4, cmap="viridis")
    axes[0].set_xlabel("dx (pix)")
    axes[0].set_ylabel("dy (pix)")
    axes[0].set_aspect("equal")
    lim = float(np.nanmax(np.abs(np.concatenate([dx[rec], dy[rec], [0.5]]))))
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    fig.colorbar(sc, ax=axes[0], label="log10 S/N")
    axes[1].scatter(snr[rec], np.hypot(dx[rec], dy[rec]), s=4, alpha=0.5)
    axes[1].set_yscale("log")
    _snr_axis(axes[1])
    axes[1].set_xlabel("ideal difference S/N")
    axes[1].set_ylabel("|offset| (pix)")
    fig.suptitle(
        f"{label}; S/N>={result.config.bright_snr:g}: median "
        f"({result.offset_median[0]:+.3f}, {result.offset_median[1]:+.3f}), rms "
        f"({result.offset_rms[0]:.3f}, {result.offset_rms[1]:.3f}) px",
        fontsize=8,
    )
    fig.tight_layout()
    paths["offsets"] = out / f"{prefix}offsets.png"
    fig.savefig(paths["offsets"])
    plt.close(fig)
    return paths
