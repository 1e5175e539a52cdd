"""Reference selection: choose the best epoch of a field, or build a coadd.

The rule
--------
For point sources in background-limited images, the S/N of a PSF-fit measurement of a
source of magnitude ``m`` scales as ``10**(-0.4 m) / (noise * sqrt(N_eff))`` with
``N_eff`` the PSF's effective area (``4 pi sigma**2`` for a Gaussian, so proportional to
FWHM**2). The depth of an epoch is therefore its 5-sigma limiting magnitude, and what a
reference should maximise. Seeing matters twice: a sharp reference resolves crowded
fields and it is cheaper to degrade (convolve) a sharp image than a blurred one. So:

1. epochs that failed the quality gate are not eligible;
2. among the rest, those whose seeing is no worse than ``max_fwhm_ratio`` times the best
   seeing are preferred (when none is, all remain);
3. the deepest of those (largest limiting magnitude) is the reference.

With ``n_coadd > 1`` the best ``n_coadd`` epochs by the same ordering are coadded with
inverse-variance weights after scaling each to the first one's photometric zero point;
the coadd's PSF is approximately the weighted mean of the inputs' PSFs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from astrid.errors import AstridError, ShapeMismatch

__all__ = [
    "Coadd",
    "EpochSummary",
    "NoEligibleReference",
    "ReferenceChoice",
    "ReferenceConfig",
    "choose_reference",
    "coadd",
]


class NoEligibleReference(AstridError):
    """No epoch passed the quality gate, so none can serve as the reference.

    Parameters
    ----------
    n_epochs : int
        Epochs considered.
    """

    def __init__(self, n_epochs: int) -> None:
        self.n_epochs = int(n_epochs)
        super().__init__(f"none of {self.n_epochs} epochs passed the quality gate")


@dataclass(frozen=True)
class ReferenceConfig:
    """Options of :func:`choose_reference`.

    Attributes
    ----------
    max_fwhm_ratio : float
        Epochs with seeing worse than this multiple of the best seeing are used only
        when no sharper epoch exists.
    n_coadd : int
        Number of epochs to coadd; 1 picks a single epoch.
    """

    max_fwhm_ratio: float = 1.3
    n_coadd: int = 1


@dataclass(frozen=True)
class EpochSummary:
    """What reference selection needs to know of an epoch.

    Attributes
    ----------
    key : str
        Identifier (file name, observation id).
    fwhm_pix : float
        Seeing in pixels.
    limiting_mag : float
        5-sigma limiting magnitude (on a common zero point scale).
    passed : bool
        Whether the quality gate passed it.
    """

    key: str
    fwhm_pix: float
    limiting_mag: float
    passed: bool = True


@dataclass(frozen=True)
class ReferenceChoice:
    """The chosen reference epoch(s).

    Attributes
    ----------
    keys : tuple of str
        Chosen epochs, best first (one unless coadding).
    ranking : tuple of str
        Every eligible epoch in order of preference.
    reason : str
        The rule's outcome in words, with the numbers.
    """

    keys: tuple[str, ...]
    ranking: tuple[str, ...]
    reason: str


def choose_reference(
    epochs: Sequence[EpochSummary], *, config: ReferenceConfig | None = None
) -> ReferenceChoice:
    """Apply the reference rule (see the module docstring) to a field's epochs.

    Raises
    ------
    NoEligibleReference
        When no epoch passed the gate.
    """
    cfg = config or ReferenceConfig()
    eligible = [e for e in epochs if e.passed and np.isfinite(e.fwhm_pix)]
    if not eligible:
        raise NoEligibleReference(len(epochs))
    best_fwhm = min(e.fwhm_pix for e in eligible)
    sharp = [e for e in eligible if e.fwhm_pix <= cfg.max_fwhm_ratio * best_fwhm]
    rest = [e for e in eligible if e not in sharp]
    order = sorted(sharp, key=lambda e: -e.limiting_mag) + sorted(
        rest, key=lambda e: -e.limiting_mag
    )
    chosen = tuple(e.key for e in order[: max(1, cfg.n_coadd)])
    top = order[0]
    reason = (
        f"{top.key}: deepest (limiting mag {top.limiting_mag:.2f}) of {len(sharp)} epochs "
        f"with seeing <= {cfg.max_fwhm_ratio:.2f} x best ({best_fwhm:.2f} px); "
        f"its seeing {top.fwhm_pix:.2f} px"
    )
    return ReferenceChoice(keys=chosen, ranking=tuple(e.key for e in order), reason=reason)


@dataclass(frozen=True)
class Coadd:
    """An inverse-variance weighted coadd.

    Attributes
    ----------
    data : ndarray, shape (ny, nx), float32
        Weighted mean of the scaled inputs (NaN where no input had data).
    variance : ndarray, shape (ny, nx), float32
        Its variance (inf where no input had data).
    n_inputs : ndarray, shape (ny, nx), int16
        Inputs contributing to each pixel.
    """

    data: NDArray[np.float32]
    variance: NDArray[np.float32]
    n_inputs: NDArray[np.int16]


def coadd(
    data: Sequence[NDArray[np.floating]],
    variance: Sequence[NDArray[np.floating]],
    *,
    scales: Sequence[float] | None = None,
    masks: Sequence[NDArray[np.bool_]] | None = None,
) -> Coadd:
    """Coadd aligned, background-subtracted images with inverse-variance weights.

    Parameters
    ----------
    data, variance : sequence of ndarray, each shape (ny, nx)
        Images on one grid and their variances.
    scales : sequence of float or None
        Multiplicative flux scale bringing each image to the common zero point
        (``10**(0.4 * (zp_common - zp_i))``); ``None`` means all 1.
    masks : sequence of bool ndarray or None
        True for pixels to leave out of each input.
    """
    if not data or len(data) != len(variance):
        raise ValueError("need as many variance images as data images, and at least one")
    shape = np.shape(data[0])
    shapes = {f"data[{i}]": np.shape(d) for i, d in enumerate(data)}
    shapes.update({f"variance[{i}]": np.shape(v) for i, v in enumerate(variance)})
    if len(set(shapes.values())) != 1:
        raise ShapeMismatch(shapes)
    s = list(scales) if scales is not None else [1.0] * len(data)
    num = np.zeros(shape, np.float64)
    wsum = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int16)
    for i, (d, v) in enumerate(zip(data, variance, strict=True)):
        d64 = np.asarray(d, np.float64) * s[i]
        v64 = np.asarray(v, np.float64) * s[i] ** 2
        ok = np.isfinite(d64) & np.isfinite(v64) & (v64 > 0)
        if masks is not None:
            ok &= ~np.asarray(masks[i], bool)
        w = np.where(ok, 1.0 / np.where(ok, v64, 1.0), 0.0)
        num += w * np.where(ok, d64, 0.0)
        wsum += w
        count += ok.astype(np.int16)
    has = wsum > 0
    mean = np.where(has, num / np.where(has, wsum, 1.0), np.nan)
    var = np.where(has, 1.0 / np.where(has, wsum, 1.0), np.inf)
    return Coadd(data=mean.astype(np.float32), variance=var.astype(np.float32), n_inputs=count)
