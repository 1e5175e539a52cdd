"""Benchmark: real/bogus scoring throughput of the triplet CNN on the CPU.

Usage::

    python bench/bench_scorer.py --threads 2 --batch-sizes 64 256 1024 --repeat 5
    python bench/bench_scorer.py --packaged real_bogus --threads 2 --batch-sizes 256 1024
    python bench/bench_scorer.py --bundle path/to/bundle --threads 2 --batch-sizes 256

``--packaged NAME`` scores with the bundle shipped in the package (the production
scorer, ``Scorer.packaged(NAME)``); ``--bundle PATH`` with a bundle folder (a candidate
exported from the registry). Without either, since weights do not change the cost of a
forward pass, the benchmark saves a freshly initialised
:class:`~astrid.ml.models.TripletCnn` as a bundle in a temporary folder and loads it
through :class:`~astrid.ml.serve.Scorer`; both are the production path (batch
normalisation fused, ``channels_last``, ``torch.inference_mode``). A
``TripletCnnEnsemble`` bundle costs one network pass per member and view, all timed.
Scores are not printed. Two rows per batch size: ``network`` scores triplets already
normalised; ``+ normalise`` also applies the bundle's input normalisation
(``normalise_triplet``) to raw cutouts.

Columns: median wall-clock triplets per second over ``--repeat`` passes (after one
warm-up pass), and CPU seconds per 1000 triplets (process time, all threads), which
varies less than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 256, 1024])
    parser.add_argument("--n", type=int, default=2048, help="triplets per pass")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packaged", default=None, help="name of a shipped model bundle")
    parser.add_argument("--bundle", default=None, help="a model bundle folder")
    args = parser.parse_args()

    import numpy as np
    import torch

    from astrid.ml.models import TripletCnn, TripletCnnEnsemble, count_parameters
    from astrid.ml.serve import Scorer, load_bundle, packaged_model_path, save_model_bundle

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    raw = rng.normal(0.0, 1.0, (args.n, 3, 63, 63)).astype(np.float32)
    raw[:, :, :, :5] = np.nan  # masked edge columns, as cutouts at an image border
    if args.packaged or args.bundle:
        path = packaged_model_path(args.packaged) if args.packaged else Path(args.bundle)
        model, meta = load_bundle(path)
        loaded = Scorer(model, meta)
        where = "packaged" if args.packaged else "bundle"
        passes = model.n_passes if isinstance(model, TripletCnnEnsemble) else 1
        label = (
            f"{loaded.model_name} version {loaded.version} ({where}, "
            f"{loaded.metadata.architecture}, network passes per triplet: {passes})"
        )
    else:
        torch.manual_seed(args.seed)
        model = TripletCnn()
        with tempfile.TemporaryDirectory() as tmp:
            save_model_bundle(Path(tmp), model, name="bench", version="0", temperature=1.0)
            loaded = Scorer.from_path(tmp)
        label = "TripletCnn (random weights)"
    normalised = loaded.normalise(raw)

    print(
        f"{label}, {count_parameters(model)} parameters; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.n} triplets per pass, "
        f"median of {args.repeat}"
    )
    print(f"{'batch':>6} {'path':>12} {'triplets/s':>11} {'CPU s/1000':>11}")
    for batch in args.batch_sizes:
        loaded.batch_size = batch
        for label, data, is_normalised in (
            ("network", normalised, True),
            ("+ normalise", raw, False),
        ):
            loaded.score(data[:batch], normalised=is_normalised)  # warm-up
            walls, cpus = [], []
            for _ in range(args.repeat):
                wall, cpu = time.perf_counter(), time.process_time()
                loaded.score(data, normalised=is_normalised)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            rate = args.n / statistics.median(walls)
            cpu_per_k = 1000 * statistics.median(cpus) / args.n
            print(f"{batch:>6} {label:>12} {rate:>11.0f} {cpu_per_k:>11.3f}")


if __name__ == "__main__":
    main()
