"""Benchmark: training speed of the real/bogus triplet CNN on the CPU.

Usage::

    python bench/bench_train.py <set.npz> --threads 2 --epochs 3
    python bench/bench_train.py <set.npz> --block-channels 32,32,128,128 --hidden 64

Trains :class:`~astrid.ml.models.TripletCnn` with
:func:`~astrid.ml.train.train_classifier` on the training split of a set written by
``astrid train --build-only``, with the optimisation of ``astrid train`` (batches of 128,
flips and rotations, centred crops of 20 % of the triplets) and a fixed number of epochs
(no early stop), and prints one row per epoch and a median: wall seconds (the training
pass and the validation pass that follows it) and training triplets per second. The
first epoch includes the one-off costs (allocator warm-up), so the median is the figure
to quote; ``farm-bench`` around two checkouts gives the whole-process ratio.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="a training set .npz (astrid train --build-only)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--block-channels", default="32,32,128,128")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    from astrid.ml.models import TripletCnnConfig
    from astrid.ml.train import EpochRecord, TrainConfig, train_classifier
    from astrid.pipeline.real_bogus import RealBogusConfig
    from astrid.pipeline.training_set import load_training_set

    torch.set_num_threads(args.threads)
    # As astrid train reads a set: the stamps mapped, each split normalised from them.
    data = load_training_set(args.dataset, mmap=True)
    train, validation = (
        data.to_triplet_dataset(indices=np.flatnonzero(data.split == k)) for k in (0, 1)
    )
    model_config = TripletCnnConfig(
        block_channels=tuple(int(c) for c in args.block_channels.split(",")),
        hidden=args.hidden,
    )
    recipe = RealBogusConfig().cnn_training
    config = TrainConfig(
        batch_size=recipe.batch_size,
        max_epochs=args.epochs,
        patience=args.epochs + 1,
        crop_probability=recipe.crop_probability,
        crop_sizes=recipe.crop_sizes,
        seed=args.seed,
    )
    marks = [time.perf_counter()]

    def on_epoch(record: EpochRecord) -> None:
        marks.append(time.perf_counter())

    train_classifier(train, validation, model_config=model_config, config=config, on_epoch=on_epoch)
    seconds = [b - a for a, b in itertools.pairwise(marks)]
    print(
        f"# {len(train)} training and {len(validation)} validation triplets, "
        f"blocks {args.block_channels}, hidden {args.hidden}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(f"{'epoch':>6} {'seconds':>9} {'triplets/s':>11}")
    for i, s in enumerate(seconds, 1):
        print(f"{i:>6} {s:>9.2f} {len(train) / s:>11.0f}")
    median = statistics.median(seconds[1:] if len(seconds) > 1 else seconds)
    print(f"{'median':>6} {median:>9.2f} {len(train) / median:>11.0f}")


if __name__ == "__main__":
    main()
