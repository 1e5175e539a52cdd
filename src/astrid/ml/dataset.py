"""Real/bogus training sets built from the pipeline's own candidates: labels, splits, hash.

A training example is one candidate that the pair pipeline
(:func:`astrid.pipeline.difference.difference_pair`) detected and cut out, exactly as in
production: its raw ``(3, 63, 63)`` science, reference and difference stamps (difference
= science - reference, so a source that faded is negative; NaN beyond the image edge),
before any normalisation. Its label says what is under it:

* **real (1)**: a fake point source injected into the science image (a brightening, a new
  source: positive candidate) or into the reference (a fading or vanished source:
  negative candidate) before subtraction, matched to the candidate within one science
  FWHM and with the same polarity (:func:`label_candidates`);
* **bogus (0)**: a candidate that matches nothing injected, on pairs known to hold no
  real transient: residuals of bright and saturated stars, misalignment dipoles, cosmic
  rays, bad columns, image edges, PSF-mismatch rings, noise.

Candidates close to a fake but not matched to it (a second peak in a bright fake's wing,
the wrong polarity) are ambiguous and left out, and so are candidates matched to a fake
that something else at the same spot outweighs (a star's subtraction residual, a
misalignment dipole's lobe, a cosmic ray): the candidate would be there without the
fake, and most of what it shows is not the fake (``dominated_snr`` of
:func:`label_candidates`).

Examples are grouped by *field* (one simulated sky or one real patch of sky): every
epoch of a field shares its stars, galaxies and defects, so splits assign whole fields
(:func:`assign_splits`) and no field is on both sides of a split. A :class:`TrainingSet`
is identified by its content hash (:meth:`TrainingSet.content_hash`), which changes when
any pixel, label, group or split assignment does.

This module is pure: no files are read or written here (see
:mod:`astrid.pipeline.training_set` for building and saving).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from astrid.ml.alerts import normalise_triplet
from astrid.ml.registry import dataset_hash
from astrid.ml.train import SPLIT_NAMES, TripletDataset, split_by_group

__all__ = [
    "AMBIGUOUS",
    "BOGUS",
    "REAL",
    "CandidateLabels",
    "TrainingSet",
    "assign_splits",
    "label_candidates",
]

REAL = 1
"""Label of a candidate on an injected fake."""

BOGUS = 0
"""Label of a candidate that matches nothing injected."""

AMBIGUOUS = -1
"""Label of a candidate near a fake but not matched to it; left out of training sets."""


@dataclass(frozen=True)
class CandidateLabels:
    """Labels of one pair's candidates from the fakes injected into it.

    Attributes
    ----------
    labels : ndarray of int8, shape (n_candidates,)
        :data:`REAL`, :data:`BOGUS` or :data:`AMBIGUOUS` per candidate.
    fake_index : ndarray of intp, shape (n_candidates,)
        Index of the matched fake for real candidates and for those left out as
        dominated by something else; -1 otherwise.
    detected : ndarray of bool, shape (n_fakes,)
        Whether each fake was matched by a candidate (a dominated one included).
    dominated : ndarray of bool, shape (n_fakes,)
        Whether each fake's matched candidate was left out as dominated by something
        other than the fake (always False when ``dominated_snr`` is None).
    """

    labels: NDArray[np.int8]
    fake_index: NDArray[np.intp]
    detected: NDArray[np.bool_]
    dominated: NDArray[np.bool_]


def label_candidates(
    candidate_x: ArrayLike,
    candidate_y: ArrayLike,
    candidate_polarity: ArrayLike,
    fake_x: ArrayLike,
    fake_y: ArrayLike,
    fake_polarity: ArrayLike,
    match_radius: ArrayLike,
    *,
    ambiguous_factor: float = 2.0,
    candidate_snr: ArrayLike | None = None,
    fake_snr: ArrayLike | None = None,
    dominated_snr: float | None = None,
) -> CandidateLabels:
    """Label candidates real, bogus or ambiguous by their distance to injected fakes.

    Pairs of a candidate and a fake of the same polarity closer than the fake's
    ``match_radius`` are matched nearest first, each candidate and each fake at most
    once; the matched candidates are real. An unmatched candidate within
    ``ambiguous_factor * match_radius`` of any fake (either polarity) is ambiguous;
    every other candidate is bogus.

    With ``dominated_snr``, a matched candidate is ambiguous instead of real when the
    part of its measured S/N that the fake does not explain, ``|candidate_snr| -
    fake_snr``, is at least ``dominated_snr`` (it alone would be detected) and at least
    the fake's own S/N (it outweighs the fake): a fake on a star whose residual or
    dipole lobe the pipeline finds anyway. With ``dominated_snr=5``, a fake of S/N 3
    measured at S/N 7 and one of S/N 20 measured at 30 stay real; one of S/N 4 measured
    at 9 does not (a 5-sigma upward fluctuation of the noise alone would be needed).

    Parameters
    ----------
    candidate_x, candidate_y : array_like, shape (n,)
        0-based science-grid positions of the candidates, pixels.
    candidate_polarity : array_like, shape (n,)
        +1 (science brighter) or -1 (reference brighter).
    fake_x, fake_y : array_like, shape (m,)
        0-based science-grid positions of the injected fakes.
    fake_polarity : array_like, shape (m,)
        +1 for a fake injected into the science image, -1 for one injected into the
        reference.
    match_radius : array_like, shape (m,) or scalar
        Matching radius of each fake, pixels (one science FWHM at its position).
    ambiguous_factor : float
        Unmatched candidates closer than this many match radii to a fake are ambiguous.
    candidate_snr : array_like, shape (n,), optional
        Measured S/N of the candidates (sign ignored); needed with ``dominated_snr``.
    fake_snr : array_like, shape (m,), optional
        Ideal S/N of the fakes in the difference; needed with ``dominated_snr``.
    dominated_snr : float or None
        S/N not explained by the fake above which (and above the fake's own) a matched
        candidate is ambiguous; None keeps every matched candidate real.

    Returns
    -------
    CandidateLabels
        Labels, matched fakes and which fakes were detected.
    """
    cx = np.asarray(candidate_x, dtype=np.float64).reshape(-1)
    cy = np.asarray(candidate_y, dtype=np.float64).reshape(-1)
    cp = np.sign(np.asarray(candidate_polarity, dtype=np.float64).reshape(-1))
    fx = np.asarray(fake_x, dtype=np.float64).reshape(-1)
    fy = np.asarray(fake_y, dtype=np.float64).reshape(-1)
    fp = np.sign(np.asarray(fake_polarity, dtype=np.float64).reshape(-1))
    if not (len(cx) == len(cy) == len(cp)):
        raise ValueError("candidate x, y and polarity differ in length")
    if not (len(fx) == len(fy) == len(fp)):
        raise ValueError("fake x, y and polarity differ in length")
    radius = np.broadcast_to(np.asarray(match_radius, dtype=np.float64), fx.shape)
    if ambiguous_factor < 1:
        raise ValueError(f"ambiguous_factor must be at least 1, not {ambiguous_factor}")
    if dominated_snr is not None:
        if candidate_snr is None or fake_snr is None:
            raise ValueError("dominated_snr needs candidate_snr and fake_snr")
        measured = np.abs(np.asarray(candidate_snr, dtype=np.float64).reshape(-1))
        injected = np.asarray(fake_snr, dtype=np.float64).reshape(-1)
        if len(measured) != len(cx) or len(injected) != len(fx):
            raise ValueError("candidate_snr or fake_snr differs in length from positions")
    labels = np.full(len(cx), BOGUS, dtype=np.int8)
    fake_index = np.full(len(cx), -1, dtype=np.intp)
    detected = np.zeros(len(fx), dtype=bool)
    dominated = np.zeros(len(fx), dtype=bool)
    if len(cx) == 0 or len(fx) == 0:
        return CandidateLabels(labels, fake_index, detected, dominated)
    tree = cKDTree(np.column_stack([cx, cy]))
    reach = float(np.max(radius)) * ambiguous_factor
    pairs: list[tuple[float, int, int]] = []
    near = np.zeros(len(cx), dtype=bool)
    for j, found in enumerate(tree.query_ball_point(np.column_stack([fx, fy]), reach)):
        for i in found:
            d = float(np.hypot(cx[i] - fx[j], cy[i] - fy[j]))
            if d <= ambiguous_factor * radius[j]:
                near[i] = True
            if d <= radius[j] and cp[i] == fp[j]:
                pairs.append((d, i, j))
    for _, i, j in sorted(pairs):
        if fake_index[i] >= 0 or detected[j]:
            continue
        fake_index[i] = j
        detected[j] = True
        labels[i] = REAL
    labels[(labels != REAL) & near] = AMBIGUOUS
    if dominated_snr is not None:
        real = np.flatnonzero(labels == REAL)
        own = injected[fake_index[real]]
        excess = measured[real] - own
        # NaN S/N (a failed fit) compares False: the candidate stays real.
        out = (excess >= dominated_snr) & (excess >= own)
        labels[real[out]] = AMBIGUOUS
        dominated[fake_index[real[out]]] = True
    return CandidateLabels(labels, fake_index, detected, dominated)


def assign_splits(
    groups: ArrayLike,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    fixed: Mapping[str, str] | None = None,
) -> NDArray[np.int8]:
    """Split code (0 train, 1 validation, 2 test) of each example, by group.

    Groups named in ``fixed`` go to the split given there (``"train"``, ``"validation"``
    or ``"test"``). Each other group goes where a uniform number drawn from the SHA-256 of
    ``"<seed>:<group>"`` falls among the cumulative ``fractions``, so a field keeps its
    split when fields are added to or removed from the data set: a test field stays a
    test field in every version built with the same seed. If that leaves a split with a
    positive fraction empty (a handful of groups), the free groups are shared out by
    :func:`astrid.ml.train.split_by_group` instead. No group ends up in two splits.

    Parameters
    ----------
    groups : array_like of str, shape (n,)
        Field of each example.
    fractions : sequence of 3 floats
        Shares of the free groups' examples in training, validation and test.
    seed : int
        Seed of the shuffle of the free groups.
    fixed : mapping of str to str or None
        Group to split name, for groups whose split is decided in advance (a real
        image pair kept for testing).

    Returns
    -------
    ndarray of int8, shape (n,)
        Split code of each example (:data:`astrid.ml.train.SPLIT_NAMES` order).
    """
    ids = np.asarray(groups).astype(str).reshape(-1)
    out = np.full(len(ids), -1, dtype=np.int8)
    fixed = dict(fixed or {})
    for name, split in fixed.items():
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r} for group {name!r}; use {SPLIT_NAMES}")
        out[ids == name] = SPLIT_NAMES.index(split)
    free = out < 0
    if not free.any():
        return out
    shares = np.asarray(fractions, dtype=np.float64)
    names = sorted(set(ids[free].tolist()))
    draws = np.array(
        [int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16) for name in names]
    ) / float(16**15)
    codes = np.searchsorted(np.cumsum(shares)[:-1] / shares.sum(), draws, side="right")
    if all(np.any(codes == k) for k in np.flatnonzero(shares > 0)):
        by_name = dict(zip(names, codes.tolist(), strict=True))
        out[free] = [by_name[name] for name in ids[free].tolist()]
    else:
        out[free] = split_by_group(ids[free], fractions, seed=seed).assignment
    return out


def _column(value: ArrayLike, n: int, name: str, dtype: Any) -> NDArray[Any]:
    array = np.asarray(value, dtype=dtype).reshape(-1)
    if len(array) != n:
        raise ValueError(f"{n} triplets but {len(array)} values of {name}")
    return array


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Labelled raw candidate triplets with their field, split and provenance.

    Attributes
    ----------
    triplets : ndarray of float32, shape (n, 3, size, size)
        Raw science, reference and difference stamps as the pipeline cut them (the
        reference scaled to the science photometry, both background-subtracted; NaN
        beyond an image edge). Normalise before training (:meth:`to_triplet_dataset`).
    labels : ndarray of int8, shape (n,)
        :data:`REAL` or :data:`BOGUS`.
    groups : ndarray of str, shape (n,)
        Field of each example (``"sim-0012"``, ``"sfft-decam"``).
    split : ndarray of int8, shape (n,)
        0 training, 1 validation, 2 test; whole groups per split.
    source : ndarray of str, shape (n,)
        Where the pixels come from (``"simulated"``, ``"sfft-decam"``).
    kind : ndarray of str, shape (n,)
        Recipe of the pair (``"aligned"``, ``"misaligned"``, ``"psf-mismatch"``...),
        and for real examples where the fake sits (``"+isolated"``, ``"+galaxy"``,
        ``"+star"``), e.g. ``"resampled+galaxy"``.
    snr : ndarray of float64, shape (n,)
        Real: the fake's ideal S/N in the difference (see
        :func:`astrid.pipeline.injection.ideal_difference_snr`). Bogus: the candidate's
        measured ``|snr|``.
    polarity : ndarray of int8, shape (n,)
        +1 or -1, the candidate's polarity.
    fwhm : ndarray of float32, shape (n,)
        Science PSF FWHM at the candidate, pixels.
    pixel_scale : ndarray of float32, shape (n,)
        Science pixel scale, arcsec per pixel.
    fakes : dict of str to ndarray
        Every fake injected, detected or not, for the completeness of the whole chain:
        ``group``, ``split``, ``snr``, ``polarity``, ``detected``, ``masked`` (its
        pixel is in the subtraction's mask, where detection does not look),
        ``measured_snr`` (the matched candidate's ``|snr|``, NaN when undetected),
        ``dominated`` (its candidate was left out as outweighed by something else) and
        ``where`` (``"isolated"``, ``"galaxy"`` or ``"star"``), one value per fake. Sets
        of older builders lack the columns added after them (``masked``: version 2; the
        last three: version 7).
    """

    triplets: NDArray[np.float32]
    labels: NDArray[np.int8]
    groups: NDArray[np.str_]
    split: NDArray[np.int8]
    source: NDArray[np.str_]
    kind: NDArray[np.str_]
    snr: NDArray[np.float64]
    polarity: NDArray[np.int8]
    fwhm: NDArray[np.float32]
    pixel_scale: NDArray[np.float32]
    fakes: dict[str, NDArray[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        triplets = np.asarray(self.triplets, dtype=np.float32)
        if triplets.ndim != 4 or triplets.shape[1] != 3:
            raise ValueError(f"triplets must have shape (n, 3, ny, nx), not {triplets.shape}")
        n = len(triplets)
        object.__setattr__(self, "triplets", triplets)
        object.__setattr__(self, "labels", _column(self.labels, n, "labels", np.int8))
        if not np.all((self.labels == REAL) | (self.labels == BOGUS)):
            raise ValueError("labels must be REAL (1) or BOGUS (0); drop ambiguous candidates")
        for name, dtype in (
            ("groups", str),
            ("source", str),
            ("kind", str),
            ("split", np.int8),
            ("snr", np.float64),
            ("polarity", np.int8),
            ("fwhm", np.float32),
            ("pixel_scale", np.float32),
        ):
            object.__setattr__(self, name, _column(getattr(self, name), n, name, dtype))
        if np.any((self.split < 0) | (self.split > 2)):
            raise ValueError("split codes must be 0, 1 or 2")
        by_group: dict[str, set[int]] = {}
        for group, code in zip(self.groups.tolist(), self.split.tolist(), strict=True):
            by_group.setdefault(group, set()).add(code)
        mixed = sorted(g for g, codes in by_group.items() if len(codes) > 1)
        if mixed:
            raise ValueError(f"groups in more than one split: {mixed[:5]}")

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def column_names() -> tuple[str, ...]:
        """Names of the per-example arrays, in storage order."""
        return tuple(f.name for f in fields(TrainingSet) if f.name != "fakes")

    def subset(self, indices: ArrayLike) -> TrainingSet:
        """The examples at ``indices`` (integer positions or a boolean mask).

        The fakes table is kept whole (it describes the injections, not the examples).
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        values = {name: getattr(self, name)[idx] for name in self.column_names()}
        return TrainingSet(**values, fakes=dict(self.fakes))

    def part(self, split: str) -> TrainingSet:
        """The examples of one split (``"train"``, ``"validation"`` or ``"test"``)."""
        return self.subset(self.split == SPLIT_NAMES.index(split))

    def content_hash(self) -> str:
        """SHA-256 of the pixels, labels, split assignment and groups.

        Computed with :func:`astrid.ml.registry.dataset_hash` on the raw triplets (NaN
        bytes included), so the same hash identifies the data a model was trained on in
        its metadata and in MLflow.
        """
        return dataset_hash(self.triplets, self.labels, self.split, groups=self.groups)

    def to_triplet_dataset(
        self,
        *,
        clip: float | None = None,
        indices: ArrayLike | None = None,
        out: str | Path | None = None,
    ) -> TripletDataset:
        """Normalised triplets for training (:func:`astrid.ml.alerts.normalise_triplet`).

        Groups and S/N are carried over; the model sees exactly what
        :class:`astrid.ml.serve.Scorer` gives it in production.

        Parameters
        ----------
        clip : float or None
            Passed to the normalisation.
        indices : array_like of int or None
            Only these examples, in this order; None takes all. The raw stamps are
            normalised chunk by chunk, so no raw copy of the subset is made.
        out : str or Path or None
            Write the normalised stamps to this ``.npy`` file (overwritten) and map them
            read-only from it, so that they take page cache, which the operating system
            can reclaim, instead of the process's own memory; None holds them in memory.
        """
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.intp)
        shape = (len(idx), *self.triplets.shape[1:])
        if out is None:
            normalised = np.empty(shape, dtype=np.float32)
        else:
            normalised = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=shape)
        for start in range(0, len(idx), 2048):
            chunk = idx[start : start + 2048]
            normalised[start : start + len(chunk)] = normalise_triplet(
                self.triplets[chunk], clip=clip
            )
        if out is not None:
            del normalised  # unmapped, its pages written to the file; mapped again read-only
            normalised = np.load(out, mmap_mode="r")
        return TripletDataset(
            triplets=normalised,
            labels=self.labels[idx].astype(np.float32),
            groups=self.groups[idx],
            snr=self.snr[idx],
        )

    def counts(self) -> dict[str, Any]:
        """Counts for a manifest: per class, split, source, recipe, polarity and field."""

        def tally(*keys: NDArray[Any]) -> dict[str, int]:
            label = ["real" if v == REAL else "bogus" for v in self.labels.tolist()]
            names = [np.asarray(k).astype(str).tolist() for k in keys]
            return dict(
                sorted(Counter("/".join(t) for t in zip(*names, label, strict=True)).items())
            )

        splits = np.asarray(SPLIT_NAMES)[self.split]
        fields_per_split = {
            name: sorted(set(self.groups[splits == name].tolist())) for name in SPLIT_NAMES
        }
        return {
            "n_examples": len(self),
            "n_real": int(np.sum(self.labels == REAL)),
            "n_bogus": int(np.sum(self.labels == BOGUS)),
            "per_split": tally(splits),
            "per_source": tally(self.source),
            "per_kind": tally(self.kind),
            "per_polarity": tally(np.where(self.polarity > 0, "positive", "negative")),
            "per_field": tally(self.groups),
            "fields_per_split": fields_per_split,
            "fwhm_pixels": _quantiles(self.fwhm),
            "pixel_scale_arcsec": sorted({round(float(v), 3) for v in self.pixel_scale}),
        }

    @classmethod
    def concatenate(cls, parts: Sequence[TrainingSet]) -> TrainingSet:
        """Join training sets (their fakes tables too), in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        values = {
            name: np.concatenate([getattr(p, name) for p in parts]) for name in cls.column_names()
        }
        keys = sorted({k for p in parts for k in p.fakes})
        fakes = {k: np.concatenate([p.fakes[k] for p in parts if k in p.fakes]) for k in keys}
        return cls(**values, fakes=fakes)


def _quantiles(values: NDArray[Any]) -> dict[str, float]:
    if len(values) == 0:
        return {}
    q = np.percentile(np.asarray(values, dtype=np.float64), [0, 5, 50, 95, 100])
    return dict(
        zip(("min", "p5", "median", "p95", "max"), (round(float(v), 3) for v in q), strict=True)
    )
