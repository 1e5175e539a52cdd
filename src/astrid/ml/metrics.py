"""Metrics of a real/bogus classifier, in NumPy, and their plots.

Conventions: ``labels`` are 1 for real and 0 for bogus; ``scores`` are higher for more
likely real; a candidate is *accepted* (called real) when ``score >= threshold``. Then

* false-positive rate ``FPR = FP / (FP + TN)``: bogus candidates accepted;
* true-positive rate ``TPR = TP / (TP + FN)``: real candidates accepted (completeness);
* missed-detection rate ``FNR = 1 - TPR``: real candidates rejected.

The ROC curve is traced through every distinct score (ties move together, as in
scikit-learn), and the AUC is its trapezoidal area, which equals the probability that a
random real candidate outscores a random bogus one, ties counting one half.

Plots are written as PNG with Matplotlib's object-oriented API on an Agg canvas; no global
backend or pyplot state is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CompletenessCurve",
    "OperatingPoint",
    "ReliabilityCurve",
    "RocCurve",
    "completeness_vs_snr",
    "expected_calibration_error",
    "fnr_at_fpr",
    "fpr_at_fnr",
    "plot_completeness",
    "plot_reliability",
    "plot_roc",
    "reliability_curve",
    "roc_auc",
    "roc_curve",
]


@dataclass(frozen=True)
class RocCurve:
    """Receiver operating characteristic.

    Attributes
    ----------
    fpr, tpr : ndarray of float64, shape (m,)
        False- and true-positive rates, non-decreasing, from (0, 0) to (1, 1).
    thresholds : ndarray of float64, shape (m,)
        Threshold of each point, decreasing; the first is ``+inf`` (nothing accepted).
    """

    fpr: NDArray[np.float64]
    tpr: NDArray[np.float64]
    thresholds: NDArray[np.float64]

    @property
    def fnr(self) -> NDArray[np.float64]:
        """Missed-detection rate ``1 - tpr`` at each point."""
        return 1.0 - self.tpr


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold on the ROC curve.

    Attributes
    ----------
    threshold : float
        Scores at or above it are accepted as real.
    fpr : float
        False-positive rate there.
    fnr : float
        Missed-detection rate there.
    """

    threshold: float
    fpr: float
    fnr: float


@dataclass(frozen=True)
class ReliabilityCurve:
    """Data of a reliability diagram: predicted probability against observed frequency.

    Attributes
    ----------
    bin_edges : ndarray, shape (n_bins + 1,)
        Edges of equal-width probability bins on [0, 1]; the last bin includes 1.
    mean_predicted : ndarray, shape (n_bins,)
        Mean predicted probability in each bin; NaN for an empty bin.
    fraction_positive : ndarray, shape (n_bins,)
        Fraction of real examples in each bin; NaN for an empty bin.
    counts : ndarray of int64, shape (n_bins,)
        Examples per bin.
    """

    bin_edges: NDArray[np.float64]
    mean_predicted: NDArray[np.float64]
    fraction_positive: NDArray[np.float64]
    counts: NDArray[np.int64]


@dataclass(frozen=True)
class CompletenessCurve:
    """Fraction of real candidates accepted, per S/N bin.

    Attributes
    ----------
    bin_edges : ndarray, shape (n_bins + 1,)
        S/N bin edges.
    completeness : ndarray, shape (n_bins,)
        Accepted / total real candidates in each bin; NaN for an empty bin.
    n_total : ndarray of int64, shape (n_bins,)
        Real candidates per bin.
    n_accepted : ndarray of int64, shape (n_bins,)
        Of those, accepted (score at or above the threshold).
    error : ndarray, shape (n_bins,)
        Binomial standard error ``sqrt(c (1 - c) / n)``; NaN for an empty bin.
    threshold : float
        The score threshold used.
    """

    bin_edges: NDArray[np.float64]
    completeness: NDArray[np.float64]
    n_total: NDArray[np.int64]
    n_accepted: NDArray[np.int64]
    error: NDArray[np.float64]
    threshold: float


def _labels_scores(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} and {s.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (bogus) or 1 (real)")
    if np.any(np.isnan(s)):
        raise ValueError("scores contain NaN")
    positive = y == 1
    if positive.all() or not positive.any():
        raise ValueError("need both real and bogus examples for a ROC curve")
    return positive, s


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> RocCurve:
    """ROC curve through every distinct score.

    Parameters
    ----------
    labels : array_like, shape (n,)
        1 real, 0 bogus; both must occur.
    scores : array_like, shape (n,)
        Higher for more likely real.

    Returns
    -------
    RocCurve
        Rates at each threshold, starting with nothing accepted at ``+inf``.
    """
    positive, s = _labels_scores(labels, scores)
    order = np.argsort(-s, kind="stable")
    s_sorted, pos_sorted = s[order], positive[order]
    # the last index of each run of equal scores: all tied examples cross together
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(pos_sorted)[last]
    fp = (last + 1) - tp
    n_pos, n_neg = tp[-1], fp[-1]
    return RocCurve(
        fpr=np.r_[0.0, fp / n_neg],
        tpr=np.r_[0.0, tp / n_pos],
        thresholds=np.r_[np.inf, s_sorted[last]],
    )


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (trapezoidal; ties count one half)."""
    curve = roc_curve(labels, scores)
    return float(np.trapezoid(curve.tpr, curve.fpr))


def fnr_at_fpr(labels: ArrayLike, scores: ArrayLike, fpr: float = 0.01) -> OperatingPoint:
    """Missed-detection rate at the lowest threshold whose FPR does not exceed ``fpr``.

    Parameters
    ----------
    labels, scores : array_like, shape (n,)
        As for :func:`roc_curve`.
    fpr : float
        Largest acceptable false-positive rate (0.01 for 1 %).

    Returns
    -------
    OperatingPoint
        The threshold, its actual FPR (at most ``fpr``) and its FNR.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], not {fpr}")
    curve = roc_curve(labels, scores)
    i = int(np.flatnonzero(curve.fpr <= fpr)[-1])
    return OperatingPoint(float(curve.thresholds[i]), float(curve.fpr[i]), float(curve.fnr[i]))


def fpr_at_fnr(labels: ArrayLike, scores: ArrayLike, fnr: float = 0.01) -> OperatingPoint:
    """False-positive rate at the highest threshold whose FNR does not exceed ``fnr``.

    Parameters
    ----------
    labels, scores : array_like, shape (n,)
        As for :func:`roc_curve`.
    fnr : float
        Largest acceptable missed-detection rate.

    Returns
    -------
    OperatingPoint
        The threshold, its FPR and its actual FNR (at most ``fnr``).
    """
    if not 0.0 <= fnr <= 1.0:
        raise ValueError(f"fnr must be in [0, 1], not {fnr}")
    curve = roc_curve(labels, scores)
    i = int(np.flatnonzero(curve.fnr <= fnr + 1e-12)[0])
    return OperatingPoint(float(curve.thresholds[i]), float(curve.fpr[i]), float(curve.fnr[i]))


def reliability_curve(probs: ArrayLike, labels: ArrayLike, n_bins: int = 10) -> ReliabilityCurve:
    """Reliability-diagram data in equal-width probability bins.

    Parameters
    ----------
    probs : array_like, shape (n,)
        Predicted probabilities of being real, in [0, 1].
    labels : array_like, shape (n,)
        1 real, 0 bogus.
    n_bins : int
        Bins over [0, 1].

    Returns
    -------
    ReliabilityCurve
        Mean prediction, observed fraction of real and count per bin. A calibrated
        model has ``fraction_positive`` close to ``mean_predicted`` in every bin.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probs and labels differ in length: {p.shape} and {y.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("probs must be finite and in [0, 1]")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, not {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins).astype(np.int64)
    sum_p = np.bincount(which, weights=p, minlength=n_bins)
    sum_y = np.bincount(which, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(counts > 0, sum_p / counts, np.nan)
        frac = np.where(counts > 0, sum_y / counts, np.nan)
    return ReliabilityCurve(edges, mean_p, frac, counts)


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error: count-weighted mean of ``|fraction - mean prediction|``.

    Uses the bins of :func:`reliability_curve`; 0 for a perfectly calibrated model.
    """
    curve = reliability_curve(probs, labels, n_bins)
    filled = curve.counts > 0
    gaps = np.abs(curve.fraction_positive[filled] - curve.mean_predicted[filled])
    return float(np.sum(curve.counts[filled] * gaps) / np.sum(curve.counts))


def completeness_vs_snr(
    snr: ArrayLike,
    scores: ArrayLike,
    *,
    threshold: float = 0.5,
    bin_edges: ArrayLike = (0.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0),
) -> CompletenessCurve:
    """Completeness of real candidates against their S/N.

    Parameters
    ----------
    snr : array_like, shape (n,)
        S/N of each *real* candidate (injected or confirmed).
    scores : array_like, shape (n,)
        Their scores.
    threshold : float
        Scores at or above it count as accepted.
    bin_edges : array_like
        Increasing S/N edges; candidates outside them are left out.

    Returns
    -------
    CompletenessCurve
        Completeness with binomial errors per bin.
    """
    x = np.asarray(snr, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    edges = np.asarray(bin_edges, dtype=np.float64)
    if x.shape != s.shape:
        raise ValueError(f"snr and scores differ in length: {x.shape} and {s.shape}")
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("bin_edges must be at least two increasing numbers")
    accepted = s >= threshold
    n_total = np.histogram(x, bins=edges)[0].astype(np.int64)
    n_accepted = np.histogram(x[accepted], bins=edges)[0].astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        completeness = np.where(n_total > 0, n_accepted / n_total, np.nan)
        error = np.where(n_total > 0, np.sqrt(completeness * (1 - completeness) / n_total), np.nan)
    return CompletenessCurve(edges, completeness, n_total, n_accepted, error, float(threshold))


# --------------------------------------------------------------------------------------
# plots


def _figure(size: tuple[float, float] = (4.5, 4.0)) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_roc(
    curve: RocCurve,
    path: str | Path,
    *,
    operating_points: dict[str, OperatingPoint] | None = None,
    title: str = "ROC",
) -> Path:
    """Write the ROC curve as a PNG, FPR on a log axis (the interesting end is small).

    Parameters
    ----------
    curve : RocCurve
        Curve to draw.
    path : str or Path
        Output PNG file.
    operating_points : dict of str to OperatingPoint or None
        Points to mark, by label (``"FNR at 1% FPR"``).
    title : str
        Plot title; the AUC is appended.

    Returns
    -------
    Path
        ``path``.
    """
    auc = float(np.trapezoid(curve.tpr, curve.fpr))
    fig = _figure()
    ax = fig.add_subplot()
    positive_fpr = curve.fpr[curve.fpr > 0]
    floor = float(positive_fpr.min()) / 2 if positive_fpr.size else 1e-4
    ax.step(np.maximum(curve.fpr, floor), curve.tpr, where="post", color="C0")
    for label, point in (operating_points or {}).items():
        ax.plot(max(point.fpr, floor), 1 - point.fnr, "o", label=label)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate (completeness)")
    ax.set_title(f"{title} (AUC = {auc:.4f})")
    ax.grid(alpha=0.3)
    if operating_points:
        ax.legend(loc="lower right", fontsize="small")
    out = Path(path)
    fig.savefig(out)
    return out


def plot_reliability(curve: ReliabilityCurve, path: str | Path, *, title: str = "") -> Path:
    """Write a reliability diagram as a PNG: observed fraction real against prediction.

    Parameters
    ----------
    curve : ReliabilityCurve
        Data from :func:`reliability_curve`.
    path : str or Path
        Output PNG file.
    title : str
        Plot title; the expected calibration error is appended.

    Returns
    -------
    Path
        ``path``.
    """
    filled = curve.counts > 0
    ece = float(
        np.sum(
            curve.counts[filled]
            * np.abs(curve.fraction_positive[filled] - curve.mean_predicted[filled])
        )
        / max(int(curve.counts.sum()), 1)
    )
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="calibrated")
    centres = 0.5 * (curve.bin_edges[:-1] + curve.bin_edges[1:])
    widths = np.diff(curve.bin_edges)
    ax.bar(
        centres[filled],
        curve.fraction_positive[filled],
        width=widths[filled],
        edgecolor="C0",
        alpha=0.4,
        label="fraction real",
    )
    ax.plot(
        curve.mean_predicted[filled],
        curve.fraction_positive[filled],
        "o-",
        color="C1",
        label="mean prediction",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability of real")
    ax.set_ylabel("observed fraction real")
    ax.set_title(f"{title + ' ' if title else ''}(ECE = {ece:.3f})")
    ax.legend(loc="upper left", fontsize="small")
    out = Path(path)
    fig.savefig(out)
    return out


def plot_completeness(curve: CompletenessCurve, path: str | Path, *, title: str = "") -> Path:
    """Write completeness against S/N as a PNG, with binomial error bars.

    Parameters
    ----------
    curve : CompletenessCurve
        Data from :func:`completeness_vs_snr`.
    path : str or Path
        Output PNG file.
    title : str
        Plot title; the threshold is appended.

    Returns
    -------
    Path
        ``path``.
    """
    filled = curve.n_total > 0
    centres = 0.5 * (curve.bin_edges[:-1] + curve.bin_edges[1:])
    fig = _figure((5.0, 3.5))
    ax = fig.add_subplot()
    ax.errorbar(
        centres[filled],
        curve.completeness[filled],
        yerr=curve.error[filled],
        fmt="o-",
        capsize=2,
    )
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("S/N")
    ax.set_ylabel("completeness")
    ax.set_title(f"{title + ' ' if title else ''}(score >= {curve.threshold:.2f})")
    ax.grid(alpha=0.3)
    out = Path(path)
    fig.savefig(out)
    return out
