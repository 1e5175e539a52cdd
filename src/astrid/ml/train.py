"""Training of the real/bogus models: data sets, splits by field, loops and calibration.

The pieces, in the order a training run uses them:

1. :class:`TripletDataset` holds normalised cutout triplets, their labels (1 real,
   0 bogus) and the *group* of each example: the field (or field and night) it came from.
2. :func:`split_by_group` assigns whole groups to the training, validation and test
   splits. Candidates of one field share its reference image, PSF and artefacts, so a
   split by example would leak them across splits and overstate every metric.
3. :func:`train_classifier` trains a :class:`~astrid.ml.models.TripletCnn` with Adam on
   binary cross-entropy, augmenting only the training split by the eight flips and
   90-degree rotations of the square (the sky has no preferred orientation), stops early
   on the validation loss and keeps the best epoch's weights. :func:`train_heatmap_model`
   does the same for a :class:`~astrid.ml.models.HeatmapUNet` on difference tiles.
4. :func:`fit_temperature` fits a temperature on the validation logits (Guo et al. 2017,
   "On calibration of modern neural networks") so that ``sigmoid(logit / T)`` is a
   calibrated probability; :func:`astrid.ml.metrics.reliability_curve` and
   :func:`astrid.ml.metrics.expected_calibration_error` check it.

Runs are reproducible: a seed drives NumPy's ``Generator`` (splits, shuffling,
augmentation) and torch's generator (weight initialisation, dropout) inside a forked torch
random state, so the caller's random state is left untouched. On a CPU with the same number
of threads two runs with one seed give identical weights.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar
from scipy.special import expit
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from astrid.ml.models import (
    HeatmapUNet,
    TripletCnn,
    TripletCnnConfig,
    UNetConfig,
    predict_logits,
)

__all__ = [
    "SPLIT_NAMES",
    "EpochRecord",
    "GroupSplit",
    "HeatmapTrainResult",
    "TrainConfig",
    "TrainResult",
    "TripletDataset",
    "apply_temperature",
    "augment_dihedral",
    "binary_nll",
    "crop_centre",
    "dihedral",
    "fit_temperature",
    "heatmap_target",
    "split_by_group",
    "time_reverse",
    "train_classifier",
    "train_heatmap_model",
]

SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")
"""Names of the splits, in the order of :attr:`GroupSplit.assignment` codes 0, 1, 2."""


# --------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class TripletDataset:
    """Labelled cutout triplets with the group (field) of each.

    Attributes
    ----------
    triplets : ndarray of float32, shape (n, 3, ny, nx)
        Normalised science, reference and difference stamps, all finite.
    labels : ndarray of float32, shape (n,)
        1 for a real transient, 0 for a bogus detection.
    groups : ndarray, shape (n,)
        Group id of each example (field id, integer or string); splits never cut a group.
    snr : ndarray of float64, shape (n,), or None
        Optional S/N of each candidate (for completeness against S/N); None if unknown.
    targets : ndarray of float32, shape (n,), or None
        Soft training targets in [0, 1] that the classifier is fitted to instead of the
        labels (knowledge distillation: a mix of the label and a teacher's probability,
        :meth:`with_teacher`); None fits the labels. Validation and metrics always use
        the labels.
    """

    triplets: NDArray[np.float32]
    labels: NDArray[np.float32]
    groups: NDArray[np.generic]
    snr: NDArray[np.float64] | None = None
    targets: NDArray[np.float32] | None = None

    def __post_init__(self) -> None:
        triplets = np.ascontiguousarray(self.triplets, dtype=np.float32)
        labels = np.asarray(self.labels, dtype=np.float32).reshape(-1)
        groups = np.asarray(self.groups).reshape(-1)
        if triplets.ndim != 4:
            raise ValueError(f"triplets must have shape (n, 3, ny, nx), not {triplets.shape}")
        n = len(triplets)
        if len(labels) != n or len(groups) != n:
            raise ValueError(f"{n} triplets but {len(labels)} labels and {len(groups)} group ids")
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("labels must be 0 (bogus) or 1 (real)")
        # Checked in chunks: a boolean copy of a large set would cost a quarter of its size.
        if not all(np.isfinite(triplets[i : i + 4096]).all() for i in range(0, n, 4096)):
            raise ValueError(
                "triplets contain non-finite pixels; normalise them first "
                "(astrid.ml.alerts.normalise_triplet sets masked pixels to 0)"
            )
        object.__setattr__(self, "triplets", triplets)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "groups", groups)
        if self.snr is not None:
            snr = np.asarray(self.snr, dtype=np.float64).reshape(-1)
            if len(snr) != n:
                raise ValueError(f"{n} triplets but {len(snr)} S/N values")
            object.__setattr__(self, "snr", snr)
        if self.targets is not None:
            targets = np.asarray(self.targets, dtype=np.float32).reshape(-1)
            if len(targets) != n:
                raise ValueError(f"{n} triplets but {len(targets)} targets")
            if not np.all((targets >= 0) & (targets <= 1)):
                raise ValueError("targets must lie in [0, 1]")
            object.__setattr__(self, "targets", targets)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def fit_targets(self) -> NDArray[np.float32]:
        """What training fits: the soft ``targets`` if set, else the labels."""
        return self.labels if self.targets is None else self.targets

    def with_teacher(self, probabilities: ArrayLike, weight: float) -> TripletDataset:
        """The same examples with soft targets ``(1 - weight) * label + weight * p``.

        Parameters
        ----------
        probabilities : array_like, shape (n,)
            A teacher model's calibrated probability that each example is real.
        weight : float
            Share of the teacher in the target, in (0, 1].

        Returns
        -------
        TripletDataset
            A copy sharing the arrays, with ``targets`` set.
        """
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"teacher weight must be in (0, 1], not {weight}")
        if len(p) != len(self) or not np.all((p >= 0) & (p <= 1)):
            raise ValueError(f"need {len(self)} teacher probabilities in [0, 1]")
        targets = (1.0 - weight) * self.labels + weight * p
        return replace(self, targets=np.clip(targets, 0.0, 1.0).astype(np.float32))

    def subset(self, indices: ArrayLike) -> TripletDataset:
        """The examples at ``indices`` (integer positions), as a new data set."""
        idx = np.asarray(indices, dtype=np.intp)
        return TripletDataset(
            triplets=self.triplets[idx],
            labels=self.labels[idx],
            groups=self.groups[idx],
            snr=None if self.snr is None else self.snr[idx],
            targets=None if self.targets is None else self.targets[idx],
        )

    def split(self, split: GroupSplit) -> tuple[TripletDataset, TripletDataset, TripletDataset]:
        """The training, validation and test parts of this data set under ``split``."""
        if len(split.assignment) != len(self):
            raise ValueError(
                f"split covers {len(split.assignment)} examples, data set has {len(self)}"
            )
        return self.subset(split.train), self.subset(split.validation), self.subset(split.test)


@dataclass(frozen=True)
class GroupSplit:
    """Assignment of examples to splits such that no group spans two splits.

    Attributes
    ----------
    assignment : ndarray of int8, shape (n,)
        Split of each example: 0 training, 1 validation, 2 test (:data:`SPLIT_NAMES`).
    train, validation, test : ndarray of intp
        Sorted example indices of each split.
    groups : tuple of three tuples
        The group ids in each split, sorted.
    """

    assignment: NDArray[np.int8]
    train: NDArray[np.intp]
    validation: NDArray[np.intp]
    test: NDArray[np.intp]
    groups: tuple[tuple[Hashable, ...], tuple[Hashable, ...], tuple[Hashable, ...]]


def split_by_group(
    groups: ArrayLike,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> GroupSplit:
    """Split examples into training, validation and test sets by group, never by example.

    Groups are shuffled with ``numpy.random.default_rng(seed)`` and laid end to end; each
    group goes to the split whose share of the examples (``fractions``) contains the
    group's middle example, so the splits hold close to the requested fractions of the
    *examples* even when groups differ in size. A split with a positive fraction that
    ends up empty takes the last group of the split with the most groups.

    Parameters
    ----------
    groups : array_like, shape (n,)
        Group id of each example (the field it came from).
    fractions : sequence of 3 floats
        Shares of training, validation and test; non-negative, summing to 1.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    GroupSplit
        Indices per split and the assignment of each example.

    Raises
    ------
    ValueError
        If the fractions are invalid or there are fewer groups than splits with a
        positive fraction.
    """
    ids = np.asarray(groups).reshape(-1)
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.shape != (3,) or np.any(shares < 0) or not math.isclose(shares.sum(), 1.0):
        raise ValueError(
            f"fractions must be 3 non-negative numbers summing to 1, not {tuple(fractions)}"
        )
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    wanted = int(np.count_nonzero(shares > 0))
    if len(unique) < wanted:
        raise ValueError(
            f"{len(unique)} groups cannot fill {wanted} splits with no group in two of them"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    ends = np.cumsum(counts[order])
    middles = (ends - counts[order] / 2.0) / ends[-1]
    boundaries = np.cumsum(shares)[:-1]
    split_of_group = np.empty(len(unique), dtype=np.int8)
    split_of_group[order] = np.searchsorted(boundaries, middles, side="right")
    for target in np.flatnonzero(shares > 0):
        if np.any(split_of_group == target):
            continue
        sizes = np.bincount(split_of_group, minlength=3)
        donor = int(np.argmax(sizes))
        donor_groups = [g for g in order if split_of_group[g] == donor]
        split_of_group[donor_groups[-1]] = target
    assignment = split_of_group[inverse].astype(np.int8)
    indices = [np.flatnonzero(assignment == k).astype(np.intp) for k in range(3)]
    names = tuple(tuple(unique[split_of_group == k].tolist()) for k in range(3))
    return GroupSplit(
        assignment=assignment,
        train=indices[0],
        validation=indices[1],
        test=indices[2],
        groups=(names[0], names[1], names[2]),
    )


def dihedral(images: NDArray[np.float32], k: int) -> NDArray[np.float32]:
    """Apply one of the 8 symmetries of the square to the last two axes.

    Parameters
    ----------
    images : ndarray, shape (..., ny, nx)
        Square (for rotations by odd multiples of 90 degrees) planes.
    k : int
        0-3 rotate by ``k`` times 90 degrees; 4-7 transpose first, then rotate by
        ``k - 4`` times 90 degrees.

    Returns
    -------
    ndarray
        The transformed planes (a view where possible).
    """
    if not 0 <= k < 8:
        raise ValueError(f"k must be in 0..7, not {k}")
    out = np.swapaxes(images, -1, -2) if k >= 4 else images
    return np.rot90(out, k % 4, axes=(-2, -1))


def augment_dihedral(
    images: NDArray[np.float32], rng: np.random.Generator, *, others: Sequence[NDArray] = ()
) -> tuple[NDArray[np.float32], list[NDArray]]:
    """Apply an independent random flip/rotation to each example.

    Parameters
    ----------
    images : ndarray, shape (n, c, s, s)
        Square examples.
    rng : numpy.random.Generator
        Source of the random choices.
    others : sequence of ndarray, shape (n, ..., s, s)
        Arrays transformed exactly like ``images`` (targets of a heat map).

    Returns
    -------
    images : ndarray
        Augmented copy of ``images``.
    others : list of ndarray
        Augmented copies of ``others``.
    """
    choice = rng.integers(0, 8, size=len(images))
    out = np.empty_like(images)
    other_out = [np.empty_like(o) for o in others]
    for k in range(8):
        sel = np.flatnonzero(choice == k)
        if len(sel) == 0:
            continue
        out[sel] = dihedral(images[sel], k)
        for src, dst in zip(others, other_out, strict=True):
            dst[sel] = dihedral(src[sel], k)
    return out, other_out


def time_reverse(
    images: NDArray[np.float32], rng: np.random.Generator, probability: float
) -> NDArray[np.float32]:
    """Replace some triplets by their time reverse: (reference, science, -difference).

    A source that brightened becomes one that faded and the reverse; an artefact of the
    science image (a cosmic ray, a trail) becomes the same artefact in the reference, with
    the sign of its difference turned. The label is unchanged: a transient stays real and
    an artefact bogus whichever epoch came first. Normalised planes (per-plane median and
    MAD) transform the same way as raw ones, so this applies after normalisation.

    Parameters
    ----------
    images : ndarray, shape (n, 3, s, s)
        Triplets in AstrID's order: science, reference, difference.
    rng : numpy.random.Generator
        Source of the random choices.
    probability : float
        Chance that a triplet is reversed.

    Returns
    -------
    ndarray
        A copy with the chosen triplets reversed.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected triplets of shape (n, 3, s, s), got {images.shape}")
    out = np.array(images, copy=True)
    chosen = np.flatnonzero(rng.random(len(out)) < probability)
    out[chosen, 0] = images[chosen, 1]
    out[chosen, 1] = images[chosen, 0]
    out[chosen, 2] = -images[chosen, 2]
    return out


def crop_centre(
    images: NDArray[np.float32],
    rng: np.random.Generator,
    probability: float,
    sizes: tuple[int, int],
) -> NDArray[np.float32]:
    """Keep only a centred square of some examples, setting the rest to 0.

    Parameters
    ----------
    images : ndarray, shape (n, c, s, s)
        Normalised examples (background 0).
    rng : numpy.random.Generator
        Source of the random choices.
    probability : float
        Chance that an example is cropped.
    sizes : tuple of int
        Range of the kept square's side, pixels (inclusive); the square is centred like
        :func:`astrid.ml.alerts.alert_triplet` centres a smaller stamp.

    Returns
    -------
    ndarray
        A copy with the chosen examples cropped.
    """
    out = np.array(images, copy=True)
    n, size = len(out), out.shape[-1]
    chosen = np.flatnonzero(rng.random(n) < probability)
    sides = rng.integers(sizes[0], sizes[1] + 1, size=len(chosen))
    for i, side in zip(chosen, sides, strict=True):
        side = int(min(side, size))
        start = size // 2 - side // 2
        kept = out[i, :, start : start + side, start : start + side].copy()
        out[i] = 0.0
        out[i, :, start : start + side, start : start + side] = kept
    return out


def heatmap_target(
    shape: tuple[int, int], x: ArrayLike, y: ArrayLike, *, radius: float = 2.0
) -> NDArray[np.float32]:
    """Target heat map for :class:`~astrid.ml.models.HeatmapUNet`: disks at real sources.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the tile.
    x, y : array_like, shape (n,)
        0-based positions of the real transients in the tile.
    radius : float
        Disk radius in pixels (about the PSF's FWHM).

    Returns
    -------
    ndarray of float32, shape (ny, nx)
        1 within ``radius`` of a real transient, 0 elsewhere.
    """
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    target = np.zeros(shape, dtype=bool)
    for xi, yi in zip(np.atleast_1d(x), np.atleast_1d(y), strict=True):
        target |= (xx - float(xi)) ** 2 + (yy - float(yi)) ** 2 <= radius**2
    return target.astype(np.float32)


# --------------------------------------------------------------------------------------
# calibration


def binary_nll(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``sigmoid(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    t = np.asarray(labels, dtype=np.float64)
    # -log p(t | z) = softplus(z) - t z, written to stay finite for large |z|
    return float(np.mean(np.logaddexp(0.0, z) - t * z))


def fit_temperature(
    logits: ArrayLike, labels: ArrayLike, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature that minimises the negative log-likelihood of the labels.

    Temperature scaling divides every logit by one positive number ``T``: it changes how
    confident the probabilities are without changing their order (ROC, AUC and every
    threshold's completeness are kept). The NLL is minimised over ``log T`` with a bounded
    1-D search (Brent), which is deterministic.

    Parameters
    ----------
    logits : array_like, shape (n,)
        Uncalibrated logits of the validation split.
    labels : array_like, shape (n,)
        Their labels, 0 or 1.
    bounds : tuple of float
        Range searched for ``T``.

    Returns
    -------
    float
        The fitted temperature; calibrated probabilities are ``sigmoid(logits / T)``.

    Warns
    -----
    UserWarning
        If the optimum lies at a bound: with perfectly separated classes the NLL keeps
        falling as ``T`` goes to 0, and the bound says nothing about calibration.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    t = np.asarray(labels, dtype=np.float64).reshape(-1)
    if z.shape != t.shape or len(z) == 0:
        raise ValueError(f"need matching, non-empty logits and labels: {z.shape}, {t.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(
        lambda log_t: binary_nll(z, t, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(math.exp(result.x))
    if min(abs(result.x - lo), abs(result.x - hi)) < 1e-3:
        # Perfectly separated validation logits make the NLL fall without limit as T -> 0:
        # the validation split is then too small or too easy to calibrate on.
        warnings.warn(
            f"temperature {temperature:.3g} is at the edge of the search range {bounds}; "
            f"the {len(z)} validation examples do not constrain it",
            stacklevel=2,
        )
    return temperature


def apply_temperature(logits: ArrayLike, temperature: float) -> NDArray[np.float64]:
    """Calibrated probabilities ``sigmoid(logits / temperature)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    return np.asarray(expit(np.asarray(logits, dtype=np.float64) / temperature))


# --------------------------------------------------------------------------------------
# training loops


@dataclass(frozen=True)
class TrainConfig:
    """Options of the training loops.

    Attributes
    ----------
    learning_rate : float
        Adam's step size.
    weight_decay : float
        L2 penalty added by Adam.
    batch_size : int
        Examples per optimisation step.
    max_epochs : int
        Upper limit on passes over the training split.
    patience : int
        Epochs without a lower validation loss before training stops; the weights of the
        best epoch are kept.
    min_delta : float
        A validation loss must improve on the best by more than this to count.
    augment : bool
        Apply random flips and 90-degree rotations to training examples.
    pos_weight : float or None
        Weight of positive (real) pixels or examples in the loss; None weighs all alike.
        Useful for heat maps, where real pixels are rare.
    crop_probability : float
        Share of training triplets whose planes are cut to a random centred square
        (side in ``crop_sizes``), the rest set to 0, the background level of normalised
        planes: what a smaller stamp (Rubin's 30 x 30, a ZTF stamp clipped at a CCD
        edge) becomes once padded to the model's size. 0 never crops.
    crop_sizes : tuple of int
        Range of the side of the kept square, pixels (inclusive).
    time_reverse_probability : float
        Share of training triplets replaced by their time reverse (:func:`time_reverse`:
        science and reference swapped, difference negated, label kept). 0 never reverses.
    plateau_factor : float
        Factor the learning rate is multiplied by when the validation loss has not
        improved for ``plateau_patience`` epochs (``torch.optim.lr_scheduler.
        ReduceLROnPlateau``); 1 keeps it constant. Set ``patience`` above
        ``plateau_patience`` so that a smaller step is tried before training stops.
    plateau_patience : int
        Epochs without improvement before the learning rate is reduced.
    ema_decay : float or None
        Keep an exponential moving average of the weights (batch-normalisation
        statistics included), updated after every optimisation step with this decay
        (``torch.optim.swa_utils.get_ema_multi_avg_fn``; about ``1 / (1 - decay)`` steps
        are averaged). The averaged weights are what is validated and what is kept;
        ``ema_schedule`` says whose validation loss early stopping and the
        learning-rate schedule follow. None trains and keeps the raw weights.
    ema_schedule : {"average", "raw"}
        With ``ema_decay``: "average" stops and cuts the learning rate on the averaged
        weights' validation loss; "raw" validates the raw weights as well and stops and
        cuts on theirs, the schedule a run without the average would follow, while the
        averaged weights of the epoch where their own validation loss is lowest are kept.
    seed : int
        Seed of initialisation, shuffling, augmentation and dropout.
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_epochs: int = 30
    patience: int = 5
    min_delta: float = 0.0
    augment: bool = True
    pos_weight: float | None = None
    crop_probability: float = 0.0
    crop_sizes: tuple[int, int] = (25, 45)
    time_reverse_probability: float = 0.0
    plateau_factor: float = 1.0
    plateau_patience: int = 1
    ema_decay: float | None = None
    ema_schedule: Literal["average", "raw"] = "average"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, not {self.ema_decay}")
        if self.ema_schedule not in ("average", "raw"):
            raise ValueError(f"ema_schedule must be 'average' or 'raw', not {self.ema_schedule!r}")
        if self.ema_schedule == "raw" and self.ema_decay is None:
            raise ValueError("ema_schedule 'raw' needs ema_decay: there is no average to keep")
        if not 0.0 < self.plateau_factor <= 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1], not {self.plateau_factor}")
        if not 0.0 <= self.time_reverse_probability <= 1.0:
            raise ValueError(
                f"time_reverse_probability must be in [0, 1], not {self.time_reverse_probability}"
            )
        if self.plateau_patience < 1:
            raise ValueError(f"plateau_patience must be >= 1, not {self.plateau_patience}")


@dataclass(frozen=True)
class EpochRecord:
    """Losses after one epoch.

    Attributes
    ----------
    epoch : int
        1-based epoch number.
    train_loss : float
        Mean training loss over the epoch's batches (on augmented examples, with dropout).
    validation_loss : float
        Loss of the weights that are kept (the moving average, with
        ``TrainConfig.ema_decay``) on the whole validation split, in evaluation mode.
    learning_rate : float
        Learning rate of the epoch's steps.
    raw_validation_loss : float or None
        With ``TrainConfig.ema_schedule == "raw"``: the raw weights' validation loss,
        which the schedule follows; None otherwise.
    """

    epoch: int
    train_loss: float
    validation_loss: float
    learning_rate: float
    raw_validation_loss: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_classifier`.

    Attributes
    ----------
    model : TripletCnn
        The network with the weights of the best epoch, in evaluation mode.
    history : tuple of EpochRecord
        Losses of every epoch run.
    best_epoch : int
        Epoch whose weights were kept.
    temperature : float
        Temperature fitted on the validation logits of the best epoch.
    validation_logits : ndarray of float32, shape (n_validation,)
        Those logits, before temperature scaling.
    """

    model: TripletCnn
    history: tuple[EpochRecord, ...]
    best_epoch: int
    temperature: float
    validation_logits: NDArray[np.float32] = field(repr=False)


@dataclass(frozen=True)
class HeatmapTrainResult:
    """Outcome of :func:`train_heatmap_model`.

    Attributes
    ----------
    model : HeatmapUNet
        The network with the weights of the best epoch, in evaluation mode.
    history : tuple of EpochRecord
        Losses of every epoch run.
    best_epoch : int
        Epoch whose weights were kept.
    """

    model: HeatmapUNet
    history: tuple[EpochRecord, ...]
    best_epoch: int


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[NDArray[np.intp]]:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _fit(
    model: nn.Module,
    *,
    n_train: int,
    train_batch: Callable[[NDArray[np.intp], np.random.Generator], tuple[np.ndarray, ...]],
    validation_loss: Callable[[nn.Module], float],
    config: TrainConfig,
    rng: np.random.Generator,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[tuple[EpochRecord, ...], int]:
    """Shared loop: Adam on BCE with logits, early stopping, best weights restored.

    With ``config.ema_decay`` the weights validated and kept are the moving average.
    ``on_epoch`` receives each epoch's record as soon as the epoch is validated. The
    model's parameters and each batch of inputs are put in ``memory_format`` (the
    layout changes the order of floating-point sums, not what is computed).
    """
    model.to(memory_format=memory_format)  # type: ignore[call-overload]
    optimiser = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimiser,
            factor=config.plateau_factor,
            patience=config.plateau_patience - 1,
            threshold=config.min_delta,
            threshold_mode="abs",
        )
        if config.plateau_factor < 1.0
        else None
    )
    pos_weight = None if config.pos_weight is None else torch.tensor(config.pos_weight)
    averaged = (
        None
        if config.ema_decay is None
        else AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    )
    # The weights that are validated and kept: the moving average, or the model itself.
    kept: nn.Module = model if averaged is None else averaged.module
    raw_schedule = averaged is not None and config.ema_schedule == "raw"
    history: list[EpochRecord] = []
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(kept.state_dict())
    # What stopping follows: the kept weights' loss, or the raw weights' with a raw schedule.
    followed_best, followed_epoch = math.inf, 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        total, seen = 0.0, 0
        learning_rate = float(optimiser.param_groups[0]["lr"])
        for idx in _batches(n_train, config.batch_size, rng):
            inputs, targets = train_batch(idx, rng)
            x = torch.from_numpy(np.ascontiguousarray(inputs))
            x = x.contiguous(memory_format=memory_format)
            y = torch.from_numpy(np.ascontiguousarray(targets))
            optimiser.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=pos_weight)
            loss.backward()
            optimiser.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total += loss.item() * len(idx)
            seen += len(idx)
        val = validation_loss(kept)
        raw_val = validation_loss(model) if raw_schedule else None
        followed = val if raw_val is None else raw_val
        history.append(EpochRecord(epoch, total / max(seen, 1), val, learning_rate, raw_val))
        if on_epoch is not None:
            on_epoch(history[-1])
        if scheduler is not None:
            scheduler.step(followed)
        if val < best_loss - config.min_delta:
            best_loss, best_epoch = val, epoch
            best_state = copy.deepcopy(kept.state_dict())
        if followed < followed_best - config.min_delta:
            followed_best, followed_epoch = followed, epoch
        elif epoch - followed_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return tuple(history), best_epoch


def train_classifier(
    train: TripletDataset,
    validation: TripletDataset,
    *,
    model_config: TripletCnnConfig | None = None,
    config: TrainConfig | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train a :class:`~astrid.ml.models.TripletCnn` and calibrate it on validation.

    Parameters
    ----------
    train : TripletDataset
        Training split (augmented by flips and rotations if ``config.augment``).
    validation : TripletDataset
        Validation split, never augmented: early stopping and the temperature use it.
    model_config : TripletCnnConfig or None
        Architecture; None uses the default.
    config : TrainConfig or None
        Optimisation options; None uses the default.
    on_epoch : callable or None
        Called with each epoch's :class:`EpochRecord` as soon as it is validated (to
        report progress during a long run); None reports nothing.

    Returns
    -------
    TrainResult
        Best model, loss history and fitted temperature.
    """
    config = config if config is not None else TrainConfig()
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(
            f"need examples in both splits: {len(train)} training, {len(validation)} validation"
        )
    overlap = set(np.unique(train.groups).tolist()) & set(np.unique(validation.groups).tolist())
    if overlap:
        raise ValueError(f"groups {sorted(map(str, overlap))[:5]} are in both splits")
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TripletCnn(model_config)

        def batch(idx: NDArray[np.intp], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
            x = train.triplets[idx]
            if config.augment:
                x, _ = augment_dihedral(x, rng)
            if config.crop_probability > 0:
                x = crop_centre(x, rng, config.crop_probability, config.crop_sizes)
            if config.time_reverse_probability > 0:
                x = time_reverse(x, rng, config.time_reverse_probability)
            return x, train.fit_targets[idx]

        def validation_loss(m: nn.Module) -> float:
            return binary_nll(predict_logits(m, validation.triplets), validation.labels)

        history, best_epoch = _fit(
            model,
            n_train=len(train),
            train_batch=batch,
            validation_loss=validation_loss,
            config=config,
            rng=rng,
            on_epoch=on_epoch,
            # Channels-last convolutions train the CNN about 1.16 times faster on CPUs
            # (docs/benchmarks.md, "Training the triplet CNN (CPU)").
            memory_format=torch.channels_last,
        )
    logits = predict_logits(model, validation.triplets)
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    temperature = fit_temperature(logits, validation.labels)
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        temperature=temperature,
        validation_logits=logits,
    )


def train_heatmap_model(
    train_tiles: ArrayLike,
    train_targets: ArrayLike,
    validation_tiles: ArrayLike,
    validation_targets: ArrayLike,
    *,
    model_config: UNetConfig | None = None,
    config: TrainConfig | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> HeatmapTrainResult:
    """Train a :class:`~astrid.ml.models.HeatmapUNet` on difference tiles.

    Parameters
    ----------
    train_tiles, validation_tiles : array_like, shape (n, ny, nx) or (n, 1, ny, nx)
        Normalised difference tiles; the two splits must come from different fields.
    train_targets, validation_targets : array_like, same shapes
        Target heat maps (:func:`heatmap_target`): 1 on real transients, 0 elsewhere.
    model_config : UNetConfig or None
        Architecture; None uses the default.
    config : TrainConfig or None
        Optimisation options (``pos_weight`` around the ratio of background to source
        pixels helps); None uses the default.
    on_epoch : callable or None
        As in :func:`train_classifier`.

    Returns
    -------
    HeatmapTrainResult
        Best model and loss history.
    """
    config = config if config is not None else TrainConfig()

    def as4d(a: ArrayLike, what: str) -> NDArray[np.float32]:
        arr = np.asarray(a, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4 or arr.shape[1] != 1:
            raise ValueError(
                f"{what} must have shape (n, ny, nx) or (n, 1, ny, nx), not {np.shape(a)}"
            )
        return np.ascontiguousarray(arr)

    x_train, y_train = as4d(train_tiles, "train_tiles"), as4d(train_targets, "train_targets")
    x_val = as4d(validation_tiles, "validation_tiles")
    y_val = as4d(validation_targets, "validation_targets")
    if x_train.shape != y_train.shape or x_val.shape != y_val.shape:
        raise ValueError("tiles and targets must have the same shapes")
    square = x_train.shape[-1] == x_train.shape[-2]
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = HeatmapUNet(model_config)
        pos_weight = None if config.pos_weight is None else torch.tensor(config.pos_weight)

        def batch(idx: NDArray[np.intp], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
            x, y = x_train[idx], y_train[idx]
            if config.augment and square:
                x, (y,) = augment_dihedral(x, rng, others=(y,))
            return x, y

        def validation_loss(m: nn.Module) -> float:
            m.eval()
            total = 0.0
            with torch.inference_mode():
                for start in range(0, len(x_val), config.batch_size):
                    x = torch.from_numpy(x_val[start : start + config.batch_size])
                    y = torch.from_numpy(y_val[start : start + config.batch_size])
                    loss = F.binary_cross_entropy_with_logits(
                        m(x), y, pos_weight=pos_weight, reduction="sum"
                    )
                    total += loss.item()
            return total / y_val.size

        history, best_epoch = _fit(
            model,
            n_train=len(x_train),
            train_batch=batch,
            validation_loss=validation_loss,
            config=config,
            rng=rng,
            on_epoch=on_epoch,
        )
    return HeatmapTrainResult(model=model, history=history, best_epoch=best_epoch)
