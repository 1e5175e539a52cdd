"""Tests of the data split, augmentation, training loops and calibration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.special import expit

from astrid.ml.metrics import expected_calibration_error, roc_auc
from astrid.ml.models import (
    TripletCnn,
    TripletCnnConfig,
    UNetConfig,
    heatmap_scores,
    predict_heatmap,
    predict_logits,
)
from astrid.ml.tests.toy_triplets import blob, make_toy_triplets
from astrid.ml.train import (
    EpochRecord,
    TrainConfig,
    TripletDataset,
    _fit,
    apply_temperature,
    augment_dihedral,
    binary_nll,
    dihedral,
    fit_temperature,
    heatmap_target,
    split_by_group,
    time_reverse,
    train_classifier,
    train_heatmap_model,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy() -> TripletDataset:
    triplets, labels, groups, snr = make_toy_triplets(400, seed=1, n_groups=16)
    return TripletDataset(triplets, labels, groups, snr)


def test_split_by_group_never_puts_a_group_in_two_splits() -> None:
    rng = np.random.default_rng(5)
    groups = rng.choice([f"field-{i}" for i in range(40)], size=2000)
    split = split_by_group(groups, (0.7, 0.15, 0.15), seed=3)
    parts = [set(groups[idx]) for idx in (split.train, split.validation, split.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(groups)
    assert sorted(np.r_[split.train, split.validation, split.test]) == list(range(2000))
    for k, (idx, share) in enumerate(
        zip((split.train, split.validation, split.test), (0.7, 0.15, 0.15), strict=True)
    ):
        assert np.all(split.assignment[idx] == k)
        assert set(split.groups[k]) == parts[k]
        assert abs(len(idx) / 2000 - share) < 0.08
    again = split_by_group(groups, (0.7, 0.15, 0.15), seed=3)
    np.testing.assert_array_equal(again.assignment, split.assignment)
    other = split_by_group(groups, (0.7, 0.15, 0.15), seed=4)
    assert not np.array_equal(other.assignment, split.assignment)


def test_split_by_group_fills_every_requested_split() -> None:
    groups = np.r_[np.zeros(100, int), np.ones(3, int), np.full(3, 2)]  # one dominant field
    split = split_by_group(groups, (0.8, 0.1, 0.1), seed=0)
    assert all(len(idx) > 0 for idx in (split.train, split.validation, split.test))
    no_test = split_by_group(groups, (0.5, 0.5, 0.0), seed=0)
    assert len(no_test.test) == 0
    with pytest.raises(ValueError, match="2 groups cannot fill 3 splits"):
        split_by_group([1, 1, 2], (0.6, 0.2, 0.2))
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_group([1, 2, 3], (0.6, 0.2, 0.3))


def test_dataset_checks_and_split(toy: TripletDataset) -> None:
    split = split_by_group(toy.groups, (0.6, 0.2, 0.2), seed=0)
    train, validation, test = toy.split(split)
    assert len(train) + len(validation) + len(test) == len(toy)
    assert not set(train.groups) & set(validation.groups)
    bad = toy.triplets[:2].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        TripletDataset(bad, toy.labels[:2], toy.groups[:2])
    many = np.zeros((4100, 3, 4, 4), dtype=np.float32)  # checked in chunks of 4096
    many[4099, 2, 3, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        TripletDataset(many, np.zeros(4100, dtype=np.float32), np.zeros(4100))
    with pytest.raises(ValueError, match=r"0 \(bogus\) or 1"):
        TripletDataset(toy.triplets[:2], np.array([0, 3]), np.array([1, 1]))
    with pytest.raises(ValueError, match="in both splits"):
        train_classifier(train, train)


def test_dihedral_gives_the_eight_symmetries_of_the_square() -> None:
    image = np.arange(9.0).reshape(1, 3, 3)
    images = [dihedral(image, k) for k in range(8)]
    assert len({im.tobytes() for im in (np.ascontiguousarray(i) for i in images)}) == 8
    np.testing.assert_array_equal(images[0], image)
    np.testing.assert_array_equal(images[4][0], image[0].T)
    # transforms of examples and of their targets stay paired
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 5, 5)).astype(np.float32)
    out, (target,) = augment_dihedral(x, rng, others=(x[:, :1].copy(),))
    np.testing.assert_array_equal(out[:, :1], target)
    assert not np.array_equal(out, x)
    np.testing.assert_allclose(np.sort(out.ravel()), np.sort(x.ravel()))


def test_time_reverse_swaps_epochs_and_negates_the_difference() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3, 5, 5)).astype(np.float32)
    out = time_reverse(x, np.random.default_rng(1), 0.5)
    swapped = np.array([np.array_equal(o[0], i[1]) for o, i in zip(out, x, strict=True)])
    assert 150 < swapped.sum() < 250
    np.testing.assert_array_equal(out[swapped, 1], x[swapped, 0])
    np.testing.assert_array_equal(out[swapped, 2], -x[swapped, 2])
    np.testing.assert_array_equal(out[~swapped], x[~swapped])
    # the input is left alone; reversing twice gives it back
    assert not np.array_equal(out, x)
    np.testing.assert_array_equal(time_reverse(time_reverse(x, rng, 1.0), rng, 1.0), x)
    np.testing.assert_array_equal(time_reverse(x, rng, 0.0), x)
    with pytest.raises(ValueError, match="triplets"):
        time_reverse(x[:, :2], rng, 0.5)
    with pytest.raises(ValueError, match="time_reverse_probability"):
        TrainConfig(time_reverse_probability=1.5)


def test_temperature_scaling_calibrates_an_overconfident_model() -> None:
    rng = np.random.default_rng(2)
    true_logits = rng.normal(0.0, 2.0, 5000)
    labels = (rng.uniform(size=5000) < expit(true_logits)).astype(float)
    overconfident = 3.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert binary_nll(overconfident, labels, temperature) < binary_nll(overconfident, labels)
    before = expected_calibration_error(expit(overconfident), labels)
    after = expected_calibration_error(apply_temperature(overconfident, temperature), labels)
    assert after < 0.03 < before
    # the order of the scores, hence the AUC, does not change
    assert roc_auc(labels, apply_temperature(overconfident, temperature)) == pytest.approx(
        roc_auc(labels, overconfident)
    )


def test_cnn_learns_the_toy_problem(toy: TripletDataset) -> None:
    train, validation, test = toy.split(split_by_group(toy.groups, (0.6, 0.2, 0.2), seed=0))
    config = TrainConfig(max_epochs=6, patience=2, batch_size=32, learning_rate=3e-3, seed=0)
    result = train_classifier(train, validation, config=config)
    assert 1 <= result.best_epoch <= len(result.history) <= 6
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert roc_auc(validation.labels, result.validation_logits) > 0.95
    assert roc_auc(test.labels, predict_logits(result.model, test.triplets)) > 0.95
    assert 0.05 < result.temperature < 20


def test_training_is_reproducible_for_a_seed(toy: TripletDataset) -> None:
    small = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))
    config = TrainConfig(max_epochs=1, batch_size=16, seed=7)
    field = np.asarray(toy.groups, dtype=int)
    train = toy.subset(np.flatnonzero(field < 4))
    validation = toy.subset(np.flatnonzero(field == 4))
    state_before = torch.random.get_rng_state()
    first = train_classifier(train, validation, model_config=small, config=config)
    reported: list[EpochRecord] = []
    second = train_classifier(
        train, validation, model_config=small, config=config, on_epoch=reported.append
    )
    assert tuple(reported) == second.history  # each epoch handed over as it ends
    assert torch.equal(torch.random.get_rng_state(), state_before)  # caller's state untouched
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
        assert value.is_contiguous(), key  # handed back in the default layout
    assert first.temperature == second.temperature


def test_channels_last_training_computes_what_the_default_layout_does(
    toy: TripletDataset,
) -> None:
    small = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))
    config = TrainConfig(max_epochs=2, batch_size=16, seed=3)
    n = 160
    triplets, labels = toy.triplets[:n], toy.fit_targets[:n]
    states = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = TripletCnn(small)
        seen: set[bool] = set()

        def record(m: torch.nn.Module, args: tuple[torch.Tensor], seen: set[bool] = seen) -> None:
            if m.training:
                seen.add(args[0].is_contiguous(memory_format=torch.channels_last))

        model.register_forward_pre_hook(record)
        history, _ = _fit(
            model,
            n_train=n,
            train_batch=lambda idx, rng: (augment_dihedral(triplets[idx], rng)[0], labels[idx]),
            validation_loss=lambda m: binary_nll(predict_logits(m, triplets), toy.labels[:n]),
            config=config,
            rng=np.random.default_rng(3),
            memory_format=layout,
        )
        assert seen == {layout is torch.channels_last}  # every training batch in the layout
        states.append((history, model.state_dict()))
    (default_history, default_state), (last_history, last_state) = states
    for a, b in zip(default_history, last_history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.validation_loss == pytest.approx(b.validation_loss, rel=1e-4)
    for key, value in default_state.items():
        torch.testing.assert_close(value, last_state[key], rtol=1e-4, atol=1e-5, msg=key)


def _tiles(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, int, int]]]:
    """Noise tiles with one real blob each and one cosmic-ray pixel elsewhere."""
    rng = np.random.default_rng(seed)
    size = 32
    tiles = rng.normal(0, 1, (n, size, size))
    targets = np.empty_like(tiles)
    fakes = []
    for i in range(n):
        x, y = rng.uniform(6, 26, 2)
        tiles[i] += blob(size, x, y, 1.5, rng.uniform(6, 15))
        targets[i] = heatmap_target((size, size), [x], [y], radius=2.0)
        fx, fy = (round(x) + 10) % 28 + 2, (round(y) + 12) % 28 + 2
        tiles[i, fy, fx] += 20.0
        fakes.append((x, y, fx, fy))
    return tiles.astype(np.float32), targets.astype(np.float32), fakes


def test_unet_learns_to_mark_real_blobs_and_not_cosmic_rays() -> None:
    train_x, train_y, _ = _tiles(48, seed=0)
    val_x, val_y, positions = _tiles(8, seed=1)
    config = TrainConfig(
        max_epochs=8, patience=3, batch_size=8, learning_rate=1e-2, pos_weight=5.0, seed=0
    )
    result = train_heatmap_model(
        train_x, train_y, val_x, val_y, model_config=UNetConfig(base_channels=4), config=config
    )
    assert result.history[result.best_epoch - 1].validation_loss < result.history[0].train_loss
    heat = predict_heatmap(result.model, val_x)
    real, fake = [], []
    for tile, (x, y, fx, fy) in zip(heat, positions, strict=True):
        real.append(heatmap_scores(tile, [x], [y], radius=2)[0])
        fake.append(heatmap_scores(tile, [fx], [fy], radius=2)[0])
    assert np.median(real) > 0.5 > np.median(fake)


def test_temperature_at_a_bound_warns() -> None:
    logits, labels = np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1])  # separable
    with pytest.warns(UserWarning, match="edge of the search range"):
        assert fit_temperature(logits, labels) == pytest.approx(0.05, rel=1e-2)


def test_learning_rate_drops_after_each_epoch_without_improvement(toy: TripletDataset) -> None:
    small = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))
    field = np.asarray(toy.groups, dtype=int)
    train = toy.subset(np.flatnonzero(field < 4))
    # Labels unrelated to the stamps: the validation loss soon stops improving.
    held = toy.subset(np.flatnonzero(field >= 4))
    shuffled = np.random.default_rng(0).permutation(held.labels)
    validation = TripletDataset(held.triplets, shuffled, held.groups)
    config = TrainConfig(
        max_epochs=6, patience=6, batch_size=16, learning_rate=1e-2, plateau_factor=0.5, seed=3
    )
    result = train_classifier(train, validation, model_config=small, config=config)
    history = result.history
    assert history[0].learning_rate == pytest.approx(1e-2)
    best = history[0].validation_loss
    drops = 0
    for before, after in itertools.pairwise(history):
        improved = before.validation_loss < best or before is history[0]
        best = min(best, before.validation_loss)
        expected = before.learning_rate * (1.0 if improved else 0.5)
        assert after.learning_rate == pytest.approx(expected)
        drops += not improved
    assert drops >= 1
    with pytest.raises(ValueError, match="plateau_factor"):
        TrainConfig(plateau_factor=0.0)
    with pytest.raises(ValueError, match="plateau_patience"):
        TrainConfig(plateau_patience=0)


def test_soft_targets_are_what_training_fits(toy: TripletDataset) -> None:
    train, validation, test = toy.split(split_by_group(toy.groups, (0.6, 0.2, 0.2), seed=0))
    # A "teacher" that says the opposite of every label, given all the weight: a model fitted
    # to the targets ranks the test split backwards, which fitting the labels never does.
    inverted = train.with_teacher(1.0 - train.labels, weight=1.0)
    np.testing.assert_array_equal(inverted.fit_targets, 1.0 - train.labels)
    np.testing.assert_array_equal(inverted.labels, train.labels)  # labels kept for metrics
    assert inverted.subset([0, 1]).targets is not None
    config = TrainConfig(max_epochs=4, patience=4, batch_size=32, learning_rate=3e-3, seed=0)
    result = train_classifier(inverted, validation, config=config)
    assert roc_auc(test.labels, predict_logits(result.model, test.triplets)) < 0.4
    # A mix: half label, half teacher.
    mixed = train.with_teacher(np.full(len(train), 0.5), weight=0.5)
    np.testing.assert_allclose(mixed.fit_targets, 0.5 * train.labels + 0.25)


@pytest.mark.parametrize(
    ("probabilities", "weight", "message"),
    [(None, 0.0, "teacher weight"), (None, 1.5, "teacher weight"), ([2.0], 0.5, "probabilities")],
)
def test_with_teacher_refuses_bad_input(
    toy: TripletDataset, probabilities: list[float] | None, weight: float, message: str
) -> None:
    p = np.full(len(toy), 0.5) if probabilities is None else np.array(probabilities)
    with pytest.raises(ValueError, match=message):
        toy.with_teacher(p, weight)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        TripletDataset(
            toy.triplets[:2],
            toy.labels[:2],
            toy.groups[:2],
            targets=np.array([0.5, 1.5], dtype=np.float32),
        )


@pytest.mark.filterwarnings("ignore:temperature")
def test_moving_average_of_the_weights_is_what_is_validated_and_kept(
    toy: TripletDataset,
) -> None:
    small = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))
    field = np.asarray(toy.groups, dtype=int)
    train = toy.subset(np.flatnonzero(field < 4))
    validation = toy.subset(np.flatnonzero(field == 4))

    def run(epochs: int, ema_decay: float | None) -> tuple[dict[str, torch.Tensor], int]:
        # One optimisation step per epoch (the whole split in one batch), no dropout
        # randomness that the average would change: the raw trajectory is the same with
        # and without the average.
        config = TrainConfig(
            max_epochs=epochs,
            patience=5,
            batch_size=len(train),
            learning_rate=3e-2,
            augment=False,
            ema_decay=ema_decay,
            seed=2,
        )
        result = train_classifier(train, validation, model_config=small, config=config)
        return result.model.state_dict(), result.best_epoch

    first, _ = run(1, None)  # raw weights after step 1
    second, best = run(2, None)
    assert best == 2, "the toy's validation loss should improve on the second step"
    averaged, best_averaged = run(2, 0.5)
    assert best_averaged == 2
    floats = [k for k, v in first.items() if v.is_floating_point()]
    assert floats
    moved = False
    for key in floats:
        expected = 0.5 * first[key] + 0.5 * second[key]
        torch.testing.assert_close(averaged[key], expected, rtol=1e-5, atol=1e-6)
        moved |= not torch.allclose(averaged[key], second[key])
    assert moved  # the average is not the last step's weights
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="needs ema_decay"):
        TrainConfig(ema_schedule="raw")
    with pytest.raises(ValueError, match="ema_schedule"):
        TrainConfig(ema_decay=0.9, ema_schedule="best")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:temperature")
def test_raw_schedule_cuts_and_stops_on_the_raw_loss_and_keeps_the_best_average(
    toy: TripletDataset,
) -> None:
    small = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))
    field = np.asarray(toy.groups, dtype=int)
    train = toy.subset(np.flatnonzero(field < 4))
    validation = toy.subset(np.flatnonzero(field >= 4))
    # A slow average (decay 0.97, a few steps an epoch) still improves when the raw weights
    # have stopped improving: the two schedules differ.
    config = TrainConfig(
        max_epochs=10,
        patience=3,
        batch_size=16,
        learning_rate=1e-2,
        plateau_factor=0.5,
        ema_decay=0.97,
        ema_schedule="raw",
        seed=3,
    )
    result = train_classifier(train, validation, model_config=small, config=config)
    history = result.history
    raw = [r.raw_validation_loss for r in history]
    assert all(loss is not None for loss in raw)
    raw_losses = [float(loss) for loss in raw if loss is not None]
    averaged = [r.validation_loss for r in history]
    assert raw_losses != averaged  # two sets of weights were validated
    # Cuts follow the raw weights' loss, as in a run without the average.
    best, drops = raw_losses[0], 0
    for i in range(1, len(history)):
        improved = i == 1 or raw_losses[i - 1] < best
        best = min(best, raw_losses[i - 1])
        expected = history[i - 1].learning_rate * (1.0 if improved else 0.5)
        assert history[i].learning_rate == pytest.approx(expected)
        drops += not improved
    assert drops >= 1
    # ... and not the average's: some cut came after an epoch in which the average improved.
    assert any(
        history[i].learning_rate < history[i - 1].learning_rate
        and averaged[i - 1] < min(averaged[: i - 1])
        for i in range(2, len(history))
    )
    # Stopping follows the raw loss too: the run ends `patience` epochs after its best,
    # though the average was still improving.
    raw_best = int(np.argmin(raw_losses)) + 1
    assert len(history) == raw_best + config.patience < config.max_epochs
    assert averaged[-1] < min(averaged[:-1])
    # What is kept is the average of the epoch with the lowest averaged loss.
    assert result.best_epoch == int(np.argmin(averaged)) + 1
    kept = binary_nll(predict_logits(result.model, validation.triplets), validation.labels)
    assert kept == pytest.approx(averaged[result.best_epoch - 1], rel=1e-5)
