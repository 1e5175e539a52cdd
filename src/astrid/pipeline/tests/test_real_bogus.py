"""End-to-end test of :func:`astrid.pipeline.real_bogus.train_real_bogus` on toy triplets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from astrid.ml.dataset import TrainingSet
from astrid.ml.evaluate import classifier_metrics
from astrid.ml.models import TripletCnnConfig, UNetConfig
from astrid.ml.tests.toy_triplets import make_toy_triplets
from astrid.pipeline.real_bogus import RealBogusConfig, train_real_bogus

torch.set_num_threads(1)


def _toy_training_set(n: int = 320) -> TrainingSet:
    triplets, labels, groups, snr = make_toy_triplets(n, seed=5, n_groups=10, normalise=False)
    split = np.select([groups < 6, groups < 8], [0, 1], 2)
    return TrainingSet(
        triplets=triplets,
        labels=labels.astype(np.int8),
        groups=np.array([f"sim-{g:04d}" for g in groups]),
        split=split,
        source=np.where(groups == 9, "sfft-decam", "simulated"),
        kind=np.full(n, "resampled"),
        snr=np.where(labels > 0, snr, 6.0),
        polarity=np.ones(n, dtype=np.int8),
        fwhm=np.full(n, 2.5, dtype=np.float32),
        pixel_scale=np.full(n, 1.0, dtype=np.float32),
    )


@pytest.mark.parametrize("centre_window", [0, 2])
def test_train_real_bogus_trains_calibrates_and_measures_on_test_fields(
    tmp_path: Path, centre_window: int
) -> None:
    data = _toy_training_set()
    base = RealBogusConfig()
    config = replace(
        base,
        cnn=TripletCnnConfig(
            stem_channels=8, block_channels=(8, 16, 16, 16), hidden=16, centre_window=centre_window
        ),
        cnn_training=replace(base.cnn_training, max_epochs=6, batch_size=32, learning_rate=3e-3),
        unet=UNetConfig(base_channels=4) if centre_window else None,
        unet_training=replace(base.unet_training, max_epochs=1),
        unet_max_examples=40,
        threads=1,
    )
    lines: list[str] = []
    outcome = train_real_bogus(data, config=config, plots_dir=tmp_path, log=lines.append)
    n_test = int(np.sum(data.split == 2))
    assert outcome.counts["test_real"] + outcome.counts["test_bogus"] == n_test
    assert outcome.dataset_sha256 == data.content_hash()
    cnn = outcome.cnn
    assert cnn.test_scores.shape == (n_test,)
    assert np.all((cnn.test_scores >= 0) & (cnn.test_scores <= 1))
    # The toy classes are easy: the held-out fields are ranked well.
    assert cnn.test.auc > 0.9
    assert {"simulated", "sfft-decam"} <= set(cnn.test_by_source)
    # Per-source metrics are those of the test rows of that source, in split order.
    test_rows = data.split == 2
    decam = data.source[test_rows] == "sfft-decam"
    expected = classifier_metrics(
        data.labels[test_rows][decam], cnn.test_scores[decam], snr=data.snr[test_rows][decam]
    )
    got = cnn.test_by_source["sfft-decam"]
    assert (got.n_real, got.n_bogus, got.auc, got.ece) == (
        expected.n_real,
        expected.n_bogus,
        expected.auc,
        expected.ece,
    )
    assert 1 <= cnn.best_epoch <= cnn.epochs_run <= 6
    epoch_lines = [line for line in lines if line.startswith("TripletCnn epoch ")]
    assert len(epoch_lines) == cnn.epochs_run and "learning rate" in epoch_lines[0]
    assert outcome.plots and all(p.exists() for p in outcome.plots)
    unet_lines = [line for line in lines if line.startswith("HeatmapUNet epoch ")]
    if centre_window:
        assert outcome.unet is not None and outcome.unet.test_scores.shape == (n_test,)
        assert len(unet_lines) == outcome.unet.epochs_run
    else:
        assert outcome.unet is None and not unet_lines


def _tiny_config(max_epochs: int) -> RealBogusConfig:
    """A CNN of a few hundred weights, no U-Net, one thread: the training path, fast."""
    base = RealBogusConfig()
    return replace(
        base,
        cnn=TripletCnnConfig(stem_channels=4, block_channels=(4, 8), hidden=8, centre_window=0),
        cnn_training=replace(base.cnn_training, max_epochs=max_epochs, batch_size=32),
        unet=None,
        threads=1,
    )


@pytest.mark.filterwarnings("ignore:temperature")
def test_a_known_content_hash_is_not_computed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _toy_training_set(120)
    digest = data.content_hash()
    config = _tiny_config(max_epochs=1)

    def refuse(self: TrainingSet) -> str:
        raise AssertionError("the stamps were hashed again")

    monkeypatch.setattr(TrainingSet, "content_hash", refuse)
    outcome = train_real_bogus(data, config=config, dataset_sha256=digest)
    assert outcome.dataset_sha256 == digest
    with pytest.raises(AssertionError, match="hashed again"):
        train_real_bogus(data, config=config)


@pytest.mark.filterwarnings("ignore:temperature")
def test_normalised_splits_mapped_from_files_train_the_same_model(tmp_path: Path) -> None:
    data = _toy_training_set(120)
    config = _tiny_config(max_epochs=2)
    held = train_real_bogus(data, config=config)
    folder = tmp_path / "normalised"
    mapped = train_real_bogus(data, config=replace(config, normalised_dir=str(folder)))
    assert sorted(p.name for p in folder.iterdir()) == ["test.npy", "train.npy", "validation.npy"]
    np.testing.assert_array_equal(mapped.cnn.test_scores, held.cnn.test_scores)
