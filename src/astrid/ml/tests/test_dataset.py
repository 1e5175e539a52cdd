"""Tests of candidate labelling, splits by field and the training set's content hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from astrid.ml.dataset import (
    AMBIGUOUS,
    BOGUS,
    REAL,
    TrainingSet,
    assign_splits,
    label_candidates,
)


def test_labels_by_hand() -> None:
    # Fakes at (10, 10) positive and (50, 50) negative, match radius 2 px.
    labelled = label_candidates(
        candidate_x=[10.5, 11.0, 50.0, 80.0, 13.0, 30.0],
        candidate_y=[10.0, 10.0, 51.0, 80.0, 10.0, 30.0],
        candidate_polarity=[1, 1, 1, -1, 1, -1],
        fake_x=[10.0, 50.0, 30.0],
        fake_y=[10.0, 50.0, 30.0],
        fake_polarity=[1, -1, -1],
        match_radius=[2.0, 2.0, 2.0],
    )
    # 0: nearest to the first fake, real. 1: second candidate on the same fake, within
    # 2 radii but unmatched: ambiguous. 2: on the negative fake with the wrong polarity:
    # ambiguous. 3: far from everything: bogus. 4: 3 px away (1.5 radii): ambiguous.
    # 5: on the third fake with its polarity: real.
    assert labelled.labels.tolist() == [REAL, AMBIGUOUS, AMBIGUOUS, BOGUS, AMBIGUOUS, REAL]
    assert labelled.fake_index.tolist() == [0, -1, -1, -1, -1, 2]
    assert labelled.detected.tolist() == [True, False, True]


def test_candidates_outweighed_by_something_else_are_ambiguous() -> None:
    # Four fakes, each matched by one candidate; S/N injected / measured:
    # 3 / 7 (noise lifted it: real), 4 / 9 (5 unexplained, more than the fake: left out),
    # 20 / 30 (10 unexplained but less than the fake: real), 8 / 40 (a star's residual).
    fx = [10.0, 30.0, 50.0, 70.0]
    kwargs: dict[str, Any] = {
        "candidate_x": fx,
        "candidate_y": [10.0] * 4,
        "candidate_polarity": [1, -1, 1, 1],
        "fake_x": fx,
        "fake_y": [10.0] * 4,
        "fake_polarity": [1, -1, 1, 1],
        "match_radius": 2.0,
        "candidate_snr": [7.0, -9.0, 30.0, 40.0],
        "fake_snr": [3.0, 4.0, 20.0, 8.0],
    }
    labelled = label_candidates(**kwargs, dominated_snr=5.0)
    assert labelled.labels.tolist() == [REAL, AMBIGUOUS, REAL, AMBIGUOUS]
    assert labelled.fake_index.tolist() == [0, 1, 2, 3]
    assert labelled.detected.tolist() == [True] * 4
    assert labelled.dominated.tolist() == [False, True, False, True]
    # Without the rule every matched candidate is real.
    plain = label_candidates(**kwargs)
    assert plain.labels.tolist() == [REAL] * 4 and not plain.dominated.any()
    # A NaN measurement (a failed fit) keeps the candidate real.
    kwargs["candidate_snr"] = [np.nan, -9.0, 30.0, 40.0]
    assert label_candidates(**kwargs, dominated_snr=5.0).labels[0] == REAL
    with pytest.raises(ValueError, match="needs candidate_snr"):
        label_candidates(fx, [10.0] * 4, [1] * 4, fx, [10.0] * 4, [1] * 4, 2.0, dominated_snr=5.0)


def test_labels_without_fakes_or_candidates() -> None:
    none = label_candidates([1.0, 2.0], [1.0, 2.0], [1, -1], [], [], [], 2.0)
    assert none.labels.tolist() == [BOGUS, BOGUS] and len(none.detected) == 0
    empty = label_candidates([], [], [], [5.0], [5.0], [1], 2.0)
    assert len(empty.labels) == 0 and empty.detected.tolist() == [False]


def test_splits_never_share_a_field() -> None:
    groups = np.repeat([f"sim-{k:02d}" for k in range(20)], 7).tolist() + ["sfft"] * 5
    split = assign_splits(groups, seed=3, fixed={"sfft": "test"})
    groups_arr = np.asarray(groups)
    for name in set(groups):
        assert len(set(split[groups_arr == name].tolist())) == 1
    assert set(split[groups_arr == "sfft"].tolist()) == {2}
    assert set(split.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="unknown split"):
        assign_splits(groups, fixed={"sfft": "holdout"})


def _toy_set(n: int = 8) -> TrainingSet:
    rng = np.random.default_rng(1)
    triplets = rng.normal(size=(n, 3, 9, 9)).astype(np.float32)
    triplets[0, :, 0, :] = np.nan  # an edge stamp
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d"][:n])
    return TrainingSet(
        triplets=triplets,
        labels=np.arange(n) % 2,
        groups=groups,
        split=np.array([0, 0, 0, 0, 1, 1, 2, 2][:n]),
        source=np.full(n, "simulated"),
        kind=np.full(n, "resampled"),
        snr=np.linspace(5, 50, n),
        polarity=np.where(np.arange(n) % 3 == 0, -1, 1),
        fwhm=np.full(n, 2.5),
        pixel_scale=np.full(n, 1.0),
    )


def test_content_hash_changes_with_the_data() -> None:
    data = _toy_set()
    digest = data.content_hash()
    assert len(digest) == 64 and digest == _toy_set().content_hash()
    pixels = _toy_set()
    pixels.triplets[3, 2, 4, 4] += 1e-3
    assert pixels.content_hash() != digest
    relabelled = _toy_set()
    relabelled.labels[2] = 1 - relabelled.labels[2]
    assert relabelled.content_hash() != digest
    assert data.subset(np.arange(7)).content_hash() != digest


def test_training_set_checks_and_parts() -> None:
    data = _toy_set()
    assert len(data.part("train")) == 4 and set(data.part("test").groups) == {"d"}
    normalised = data.to_triplet_dataset()
    assert np.isfinite(normalised.triplets).all() and np.all(normalised.triplets[0, :, 0] == 0)
    picked = np.array([6, 1, 3])
    part = data.to_triplet_dataset(indices=picked)
    np.testing.assert_array_equal(part.triplets, normalised.triplets[picked])
    np.testing.assert_array_equal(part.labels, normalised.labels[picked])
    np.testing.assert_array_equal(part.groups, normalised.groups[picked])
    counts = data.counts()
    assert counts["n_real"] + counts["n_bogus"] == 8
    assert counts["fields_per_split"]["test"] == ["d"]
    bad_split = _toy_set()
    with pytest.raises(ValueError, match="more than one split"):
        TrainingSet(
            **{
                name: getattr(bad_split, name)
                for name in TrainingSet.column_names()
                if name != "split"
            },
            split=np.array([0, 1, 0, 0, 1, 1, 2, 2]),
        )
    with pytest.raises(ValueError, match="REAL"):
        TrainingSet(
            **{
                name: getattr(data, name) for name in TrainingSet.column_names() if name != "labels"
            },
            labels=np.full(8, AMBIGUOUS),
        )
    joined = TrainingSet.concatenate([data, data.subset([6, 7])])
    assert len(joined) == 10


def test_normalised_stamps_can_live_in_a_mapped_file(tmp_path: Path) -> None:
    data = _toy_set()
    picked = np.array([6, 1, 3])
    held = data.to_triplet_dataset(indices=picked)
    path = tmp_path / "train.npy"
    mapped = data.to_triplet_dataset(indices=picked, out=path)
    assert isinstance(mapped.triplets.base, np.memmap)  # mapped from the file, not copied
    assert not mapped.triplets.flags.writeable
    np.testing.assert_array_equal(mapped.triplets, held.triplets)
    np.testing.assert_array_equal(np.load(path), held.triplets)
    np.testing.assert_array_equal(mapped.labels, held.labels)
