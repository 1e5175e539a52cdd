"""Evaluation of a real/bogus scorer: held-out metrics and agreement with survey scores.

Two questions, two sets of numbers:

* On a held-out *injected* test set (fields never used in training, labels known):
  :func:`classifier_metrics` gives the ROC AUC, the missed-detection rate at 1 % false
  positives, the false-positive rate at 1 % missed detections, the calibration error and
  the completeness against S/N.
* On *real survey alerts* (never trained on; no ground truth): :func:`score_agreement`
  compares our probability with the survey's own score, taken as a proxy label
  (ZTF ``drb >= 0.5`` or ``rb >= 0.5``, Rubin ``reliability >= 0.5``): the AUC of our
  score against that label and the Spearman rank correlation of the two scores.

Alert cutouts reach a model in AstrID's convention (:func:`alert_input_triplets`): the
difference is science minus reference, so a source that faded is negative. ZTF ships the
difference of a negative detection (``isdiffpos`` ``"f"``) already inverted, so its sign
is turned back; Rubin's difference is science minus template as shipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from astrid.ml.alerts import Alert, alert_triplet
from astrid.ml.metrics import (
    CompletenessCurve,
    completeness_vs_snr,
    expected_calibration_error,
    fnr_at_fpr,
    fpr_at_fnr,
    roc_auc,
)

__all__ = [
    "SNR_BINS",
    "ClassifierMetrics",
    "ScoreAgreement",
    "alert_input_triplets",
    "alert_is_negative",
    "classifier_metrics",
    "plot_score_agreement",
    "score_agreement",
]

SNR_BINS: tuple[float, ...] = (3.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, 200.0)
"""S/N bin edges of the completeness curves."""


def alert_is_negative(alert: Alert) -> bool:
    """Whether an alert is a negative detection (the source is fainter than in the reference).

    ZTF: ``candidate.isdiffpos`` is ``"f"`` or ``"0"``. Rubin: ``diaSource.isNegative``,
    or a negative ``psfFlux`` when the flag is absent.
    """
    detection = alert.detection
    if alert.survey == "ZTF":
        flag = detection.get("isdiffpos")
        return str(flag).strip().lower() in ("f", "0", "false")
    flag = detection.get("isNegative")
    if flag is not None:
        return bool(flag)
    flux = detection.get("psfFlux")
    return flux is not None and math.isfinite(float(flux)) and float(flux) < 0


def alert_input_triplets(alerts: Sequence[Alert], *, size: int = 63) -> NDArray[np.float32]:
    """Raw cutout triplets of alerts in AstrID's convention, ready for a Scorer.

    Each alert's stamps are placed on a ``size`` x ``size`` grid
    (:func:`astrid.ml.alerts.alert_triplet` without normalisation: NaN padding, which the
    scorer's normalisation sets to the background level), and the difference of a ZTF
    negative detection is multiplied by -1 so that every difference is science minus
    reference, as AstrID's own cutouts are.

    Parameters
    ----------
    alerts : sequence of Alert
        The alerts.
    size : int
        Side of the planes.

    Returns
    -------
    ndarray of float32, shape (n, 3, size, size)
        Science, reference and difference per alert.
    """
    out = np.empty((len(alerts), 3, size, size), dtype=np.float32)
    for i, alert in enumerate(alerts):
        out[i] = alert_triplet(alert, size=size, normalise=False)
        if alert.survey == "ZTF" and alert_is_negative(alert):
            out[i, 2] *= -1.0
    return out


@dataclass(frozen=True)
class ClassifierMetrics:
    """Metrics of scores on labelled examples.

    Attributes
    ----------
    n_real, n_bogus : int
        Examples of each class.
    auc : float
        ROC AUC.
    fnr_at_1pct_fpr : float
        Missed-detection rate at the lowest threshold with at most 1 % false positives.
    threshold_at_1pct_fpr : float
        That threshold.
    fpr_at_1pct_fnr : float
        False-positive rate at the highest threshold with at most 1 % missed detections.
    threshold_at_1pct_fnr : float
        That threshold.
    ece : float
        Expected calibration error (10 bins) of the scores as probabilities.
    completeness : CompletenessCurve or None
        Completeness of real examples against S/N at ``threshold_at_1pct_fpr``; None
        without S/N values.
    """

    n_real: int
    n_bogus: int
    auc: float
    fnr_at_1pct_fpr: float
    threshold_at_1pct_fpr: float
    fpr_at_1pct_fnr: float
    threshold_at_1pct_fnr: float
    ece: float
    completeness: CompletenessCurve | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: number}`` (for MLflow metrics and tables), names prefixed."""
        values: dict[str, float] = {
            "n_real": float(self.n_real),
            "n_bogus": float(self.n_bogus),
            "auc": self.auc,
            "fnr_at_1pct_fpr": self.fnr_at_1pct_fpr,
            "threshold_at_1pct_fpr": self.threshold_at_1pct_fpr,
            "fpr_at_1pct_fnr": self.fpr_at_1pct_fnr,
            "threshold_at_1pct_fnr": self.threshold_at_1pct_fnr,
            "ece": self.ece,
        }
        return {f"{prefix}{k}": v for k, v in values.items()}


def classifier_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    snr: ArrayLike | None = None,
    snr_bins: Sequence[float] = SNR_BINS,
) -> ClassifierMetrics:
    """ROC AUC, the two 1 % operating points, calibration and completeness against S/N.

    Parameters
    ----------
    labels : array_like, shape (n,)
        1 real, 0 bogus; both must occur.
    scores : array_like, shape (n,)
        Probabilities (higher is more likely real).
    snr : array_like, shape (n,), or None
        S/N of each example; the completeness uses the real ones.
    snr_bins : sequence of float
        S/N bin edges.

    Returns
    -------
    ClassifierMetrics
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    at_fpr = fnr_at_fpr(y, s, 0.01)
    at_fnr = fpr_at_fnr(y, s, 0.01)
    completeness = None
    if snr is not None:
        x = np.asarray(snr, dtype=np.float64).reshape(-1)
        real = y == 1
        completeness = completeness_vs_snr(
            x[real], s[real], threshold=at_fpr.threshold, bin_edges=snr_bins
        )
    return ClassifierMetrics(
        n_real=int(np.sum(y == 1)),
        n_bogus=int(np.sum(y == 0)),
        auc=roc_auc(y, s),
        fnr_at_1pct_fpr=at_fpr.fnr,
        threshold_at_1pct_fpr=at_fpr.threshold,
        fpr_at_1pct_fnr=at_fnr.fpr,
        threshold_at_1pct_fnr=at_fnr.threshold,
        ece=expected_calibration_error(np.clip(s, 0.0, 1.0), y),
        completeness=completeness,
    )


@dataclass(frozen=True)
class ScoreAgreement:
    """How our score agrees with a survey's own real/bogus score on the same alerts.

    Attributes
    ----------
    name : str
        The survey score (``"drb"``, ``"rb"``, ``"reliability"``).
    n : int
        Alerts with both scores.
    n_positive : int
        Of those, with the survey score at or above ``threshold`` (the proxy "real").
    threshold : float
        Proxy-label threshold on the survey score.
    auc : float
        ROC AUC of our score against the proxy label; NaN if only one class occurs.
    spearman : float
        Spearman rank correlation of the two scores; NaN with fewer than 3 alerts.
    spearman_p : float
        Its two-sided p-value.
    """

    name: str
    n: int
    n_positive: int
    threshold: float
    auc: float
    spearman: float
    spearman_p: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: number}``, names prefixed."""
        values = {
            "n": float(self.n),
            "n_positive": float(self.n_positive),
            "auc": self.auc,
            "spearman": self.spearman,
            "spearman_p": self.spearman_p,
        }
        return {f"{prefix}{k}": v for k, v in values.items()}


def score_agreement(
    ours: ArrayLike, theirs: ArrayLike, *, name: str, threshold: float = 0.5
) -> ScoreAgreement:
    """AUC of our score against ``theirs >= threshold``, and the rank correlation.

    Alerts where either score is NaN are left out.

    Parameters
    ----------
    ours : array_like, shape (n,)
        Our probabilities.
    theirs : array_like, shape (n,)
        The survey's score (NaN where the packet has none).
    name : str
        Name of the survey score.
    threshold : float
        Proxy-label threshold.

    Returns
    -------
    ScoreAgreement
    """
    a = np.asarray(ours, dtype=np.float64).reshape(-1)
    b = np.asarray(theirs, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"score arrays differ in length: {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    label = (b >= threshold).astype(np.int8)
    n_positive = int(label.sum())
    auc = roc_auc(label, a) if 0 < n_positive < len(label) else math.nan
    rho, p = math.nan, math.nan
    if len(a) >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
        result = stats.spearmanr(a, b)
        rho, p = float(result.statistic), float(result.pvalue)
    return ScoreAgreement(name, len(a), n_positive, float(threshold), auc, rho, p)


def plot_score_agreement(
    ours: ArrayLike,
    theirs: ArrayLike,
    path: str | Path,
    *,
    xlabel: str,
    title: str = "",
    groups: ArrayLike | None = None,
) -> Path:
    """Scatter our score against a survey's score, one colour per group of alerts.

    Parameters
    ----------
    ours, theirs : array_like, shape (n,)
        The two scores (NaN entries are left out).
    path : str or Path
        Output PNG.
    xlabel : str
        Name of the survey score (x axis).
    title : str
        Plot title.
    groups : array_like of str, shape (n,), or None
        Alert set of each point, for the legend.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = np.asarray(ours, dtype=np.float64).reshape(-1)
    b = np.asarray(theirs, dtype=np.float64).reshape(-1)
    g = np.asarray(groups if groups is not None else np.full(len(a), ""), dtype=str)
    keep = np.isfinite(a) & np.isfinite(b)
    fig = Figure(figsize=(4.8, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, name in enumerate(sorted(set(g[keep].tolist()))):
        sel = keep & (g == name)
        ax.scatter(b[sel], a[sel], s=10, alpha=0.7, color=f"C{k}", label=name or None)
    ax.axhline(0.5, color="0.7", linewidth=0.8)
    ax.axvline(0.5, color="0.7", linewidth=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("AstrID score")
    if title:
        ax.set_title(title, fontsize="medium")
    if groups is not None:
        ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out
