"""Image quality: seeing, depth, photometric tie to a reference, and the pass/fail gate.

All quantities are measured from arrays and catalogues already computed by the
background, star and PSF stages; nothing here reads files.

Limiting magnitude
------------------
The 5-sigma point-source limit is the flux whose optimal (PSF-weighted) measurement has
S/N = 5 on the background noise alone:

    flux_lim = n_sigma * noise * sqrt(N_eff),    N_eff = 1 / sum(P**2)

where ``P`` is the unit-sum PSF stamp (for a Gaussian, N_eff = 4 pi sigma**2), and
``mag_lim = zero_point - 2.5 log10(flux_lim)``. When the zero point is unknown the
limit is reported on the instrumental scale (zero point 0) and flagged as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from astropy.table import Table
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from astrid.errors import StarMatchFailed
from astrid.exposure import MaskBit
from astrid.science.psf_model import PsfModel

__all__ = [
    "QualityConfig",
    "QualityReport",
    "ZeroPointTie",
    "gate_quality",
    "limiting_flux",
    "measure_quality",
    "relative_zero_point",
]


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality gate. ``None`` disables a check.

    Attributes
    ----------
    max_fwhm_arcsec : float or None
        Reject seeing worse than this (needs a pixel scale).
    max_fwhm_pix : float or None
        Reject seeing worse than this in pixels.
    min_stars : int
        Reject when fewer stars were found (PSF, alignment and photometry need them).
    max_masked_fraction : float
        Reject when more of the image than this is flagged unusable.
    max_saturated_fraction : float
        Reject when more than this is saturated (including bleed trails).
    max_cosmic_ray_fraction : float
        Reject when more than this is flagged as cosmic rays.
    min_limiting_mag : float or None
        Reject shallower images (needs a zero point).
    max_zero_point_offset : float or None
        Reject when the photometric offset to the reference (mag) exceeds this, e.g.
        clouds; needs a reference tie.
    """

    max_fwhm_arcsec: float | None = 4.0
    max_fwhm_pix: float | None = 15.0
    min_stars: int = 10
    max_masked_fraction: float = 0.5
    max_saturated_fraction: float = 0.05
    max_cosmic_ray_fraction: float = 0.02
    min_limiting_mag: float | None = None
    max_zero_point_offset: float | None = 1.5


@dataclass(frozen=True)
class ZeroPointTie:
    """Photometric tie of an exposure to a reference through matched stars.

    Attributes
    ----------
    offset : float
        ``zp_exposure - zp_reference`` in magnitudes: positive when the exposure needs
        a larger zero point, i.e. it received less flux (clouds, shorter exposure).
    scatter : float
        Robust (1.4826 MAD) scatter of per-star magnitude differences.
    flux_ratio : float
        Median ``flux_exposure / flux_reference`` (``10**(-0.4 * offset)``).
    n_matched : int
        Stars used.
    """

    offset: float
    scatter: float
    flux_ratio: float
    n_matched: int


@dataclass(frozen=True)
class QualityReport:
    """Quality metrics of one exposure and the gate's verdict.

    Attributes
    ----------
    fwhm_pix : float
        Seeing: PSF FWHM in pixels (NaN when no star or PSF was measured).
    fwhm_arcsec : float or None
        Seeing in arcsec (``None`` without a pixel scale).
    background : float
        Median background level (data units).
    noise : float
        Median background noise per pixel (data units).
    limiting_flux : float
        5-sigma point-source limiting flux (data units).
    limiting_mag : float
        Limiting magnitude with ``zero_point``, or instrumental when it is unknown.
    limiting_mag_is_instrumental : bool
        True when no zero point was available (``limiting_mag`` uses zero point 0).
    zero_point : float or None
        Zero point used (mag of 1 data unit of flux).
    n_stars : int
        Clean stars found.
    masked_fraction : float
        Fraction of pixels flagged unusable (bad, saturated, cosmic ray, no data).
    saturated_fraction : float
        Fraction flagged saturated.
    cosmic_ray_fraction : float
        Fraction flagged cosmic ray.
    zero_point_offset : float or None
        Photometric offset to the reference (see :class:`ZeroPointTie`).
    zero_point_scatter : float or None
        Scatter of that tie.
    passed : bool
        Whether the gate accepted the exposure.
    reasons : tuple of str
        Why it failed (empty when it passed), each with the numbers.
    warnings : tuple of str
        Problems that did not fail it (e.g. metric that could not be computed).
    """

    fwhm_pix: float
    fwhm_arcsec: float | None
    background: float
    noise: float
    limiting_flux: float
    limiting_mag: float
    limiting_mag_is_instrumental: bool
    zero_point: float | None
    n_stars: int
    masked_fraction: float
    saturated_fraction: float
    cosmic_ray_fraction: float
    zero_point_offset: float | None = None
    zero_point_scatter: float | None = None
    passed: bool = True
    reasons: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dictionary (tuples become lists, NaN becomes None)."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, float) and not np.isfinite(v):
                v = None
            out[k] = v
        return out


def limiting_flux(
    noise: float, psf: PsfModel | NDArray[np.floating], *, n_sigma: float = 5.0
) -> float:
    """Point-source flux detected at ``n_sigma`` by PSF-weighted photometry.

    Parameters
    ----------
    noise : float
        Background noise per pixel (data units).
    psf : PsfModel or ndarray
        PSF (a model's median stamp is used) or a unit-sum stamp.
    n_sigma : float
        Significance.

    Returns
    -------
    float
        ``n_sigma * noise * sqrt(1 / sum(P**2))``.
    """
    if isinstance(psf, PsfModel):
        ny, nx = psf.stamps.shape[:2]
        stamp = np.asarray(psf.stamps[ny // 2, nx // 2], np.float64)
    else:
        stamp = np.asarray(psf, np.float64)
    stamp = stamp / stamp.sum()
    n_eff = 1.0 / float(np.sum(stamp**2))
    return float(n_sigma * noise * np.sqrt(n_eff))


def measure_quality(
    *,
    mask: NDArray[np.integer],
    background: NDArray[np.floating],
    noise: NDArray[np.floating],
    n_stars: int,
    psf: PsfModel | None,
    zero_point: float | None = None,
    pixel_scale: float | None = None,
    tie: ZeroPointTie | None = None,
) -> QualityReport:
    """Compute the quality metrics of an exposure (ungated; see :func:`gate_quality`).

    Parameters
    ----------
    mask : ndarray of uint16, shape (ny, nx)
        :class:`astrid.exposure.MaskBit` flags.
    background, noise : ndarray, shape (ny, nx)
        Background level and background noise maps (data units).
    n_stars : int
        Clean stars found.
    psf : PsfModel or None
        PSF model; ``None`` leaves seeing and depth undefined (NaN) with a warning.
    zero_point : float or None
        Zero point (mag of 1 data unit); ``None`` reports depth on the instrumental scale.
    pixel_scale : float or None
        Arcsec per pixel; ``None`` leaves ``fwhm_arcsec`` undefined.
    tie : ZeroPointTie or None
        Photometric tie to the reference, when measured.
    """
    m = np.asarray(mask)
    n = float(m.size)
    unusable = (
        m & int(MaskBit.BAD | MaskBit.SATURATED | MaskBit.COSMIC_RAY | MaskBit.NO_DATA)
    ) != 0
    good = ~unusable
    bkg = float(np.median(np.asarray(background)[good])) if good.any() else float("nan")
    rms = float(np.median(np.asarray(noise)[good])) if good.any() else float("nan")
    warnings: list[str] = []
    if psf is None:
        fwhm = float("nan")
        flux_lim = float("nan")
        warnings.append("no PSF model: seeing and depth not measured")
    else:
        fwhm = float(psf.fwhm)
        flux_lim = limiting_flux(rms, psf)
    zp_used = 0.0 if zero_point is None else float(zero_point)
    mag_lim = zp_used - 2.5 * np.log10(flux_lim) if flux_lim > 0 else float("nan")
    if zero_point is None:
        warnings.append("no zero point: limiting magnitude is instrumental")
    return QualityReport(
        fwhm_pix=fwhm,
        fwhm_arcsec=fwhm * pixel_scale if pixel_scale is not None else None,
        background=bkg,
        noise=rms,
        limiting_flux=flux_lim,
        limiting_mag=float(mag_lim),
        limiting_mag_is_instrumental=zero_point is None,
        zero_point=zero_point,
        n_stars=int(n_stars),
        masked_fraction=float(np.count_nonzero(unusable) / n),
        saturated_fraction=float(np.count_nonzero(m & int(MaskBit.SATURATED)) / n),
        cosmic_ray_fraction=float(np.count_nonzero(m & int(MaskBit.COSMIC_RAY)) / n),
        zero_point_offset=tie.offset if tie is not None else None,
        zero_point_scatter=tie.scatter if tie is not None else None,
        warnings=tuple(warnings),
    )


def gate_quality(report: QualityReport, config: QualityConfig | None = None) -> QualityReport:
    """Apply the gate: return the report with ``passed`` and ``reasons`` set.

    Every failed check contributes one reason stating the measured value and the limit.
    """
    cfg = config or QualityConfig()
    reasons: list[str] = []
    r = report
    if r.n_stars < cfg.min_stars:
        reasons.append(f"{r.n_stars} stars found, need at least {cfg.min_stars}")
    if cfg.max_fwhm_pix is not None and np.isfinite(r.fwhm_pix) and r.fwhm_pix > cfg.max_fwhm_pix:
        reasons.append(f"seeing {r.fwhm_pix:.2f} px exceeds {cfg.max_fwhm_pix:.2f} px")
    if (
        cfg.max_fwhm_arcsec is not None
        and r.fwhm_arcsec is not None
        and np.isfinite(r.fwhm_arcsec)
        and r.fwhm_arcsec > cfg.max_fwhm_arcsec
    ):
        reasons.append(f'seeing {r.fwhm_arcsec:.2f}" exceeds {cfg.max_fwhm_arcsec:.2f}"')
    if not np.isfinite(r.fwhm_pix):
        reasons.append("seeing could not be measured (no PSF)")
    if r.masked_fraction > cfg.max_masked_fraction:
        reasons.append(
            f"{r.masked_fraction:.1%} of pixels unusable, limit {cfg.max_masked_fraction:.1%}"
        )
    if r.saturated_fraction > cfg.max_saturated_fraction:
        reasons.append(
            f"{r.saturated_fraction:.2%} saturated, limit {cfg.max_saturated_fraction:.2%}"
        )
    if r.cosmic_ray_fraction > cfg.max_cosmic_ray_fraction:
        reasons.append(
            f"{r.cosmic_ray_fraction:.2%} cosmic-ray pixels, "
            f"limit {cfg.max_cosmic_ray_fraction:.2%}"
        )
    if cfg.min_limiting_mag is not None and not r.limiting_mag_is_instrumental:
        if not r.limiting_mag >= cfg.min_limiting_mag:
            reasons.append(
                f"limiting magnitude {r.limiting_mag:.2f} shallower than {cfg.min_limiting_mag:.2f}"
            )
    if (
        cfg.max_zero_point_offset is not None
        and r.zero_point_offset is not None
        and abs(r.zero_point_offset) > cfg.max_zero_point_offset
    ):
        reasons.append(
            f"zero point offset {r.zero_point_offset:+.2f} mag to the reference exceeds "
            f"{cfg.max_zero_point_offset:.2f} mag"
        )
    return replace(report, passed=not reasons, reasons=tuple(reasons))


def relative_zero_point(
    stars: Table,
    reference_stars: Table,
    *,
    max_separation: float = 1.5,
    min_matched: int = 5,
    clip_sigma: float = 3.0,
) -> ZeroPointTie:
    """Tie an exposure's photometry to a reference through stars matched by position.

    Both catalogues must be on the same pixel grid (align first) and carry ``x``, ``y``
    (0-based) and ``flux`` measured the same way (e.g. the same aperture after PSF
    matching, or PSF fluxes).

    Parameters
    ----------
    stars, reference_stars : Table
        Star catalogues (``x``, ``y``, ``flux``).
    max_separation : float
        Match radius in pixels.
    min_matched : int
        Fewer matches raise :class:`StarMatchFailed`.
    clip_sigma : float
        Iterative sigma clipping of per-star magnitude differences.

    Returns
    -------
    ZeroPointTie
    """
    if len(stars) == 0 or len(reference_stars) == 0:
        raise StarMatchFailed(0, min_matched, "an empty star list")
    a = np.column_stack([np.asarray(stars["x"]), np.asarray(stars["y"])])
    b = np.column_stack([np.asarray(reference_stars["x"]), np.asarray(reference_stars["y"])])
    d, j = cKDTree(b).query(a, distance_upper_bound=max_separation)
    hit = np.isfinite(d)
    fa = np.asarray(stars["flux"], np.float64)[hit]
    fb = np.asarray(reference_stars["flux"], np.float64)[j[hit]]
    ok = (fa > 0) & (fb > 0)
    if np.count_nonzero(ok) < min_matched:
        raise StarMatchFailed(int(np.count_nonzero(ok)), min_matched, "photometric tie")
    dm = -2.5 * np.log10(fa[ok] / fb[ok])  # mag_exposure - mag_reference (instrumental)
    keep = np.ones(dm.size, bool)
    for _ in range(5):
        med = np.median(dm[keep])
        sig = 1.4826 * np.median(np.abs(dm[keep] - med))
        new = np.abs(dm - med) <= clip_sigma * max(sig, 1e-3)
        if np.array_equal(new, keep) or new.sum() < min_matched:
            break
        keep = new
    offset = float(np.median(dm[keep]))
    scatter = float(1.4826 * np.median(np.abs(dm[keep] - offset)))
    return ZeroPointTie(
        offset=offset,
        scatter=scatter,
        flux_ratio=float(10 ** (-0.4 * offset)),
        n_matched=int(keep.sum()),
    )
