"""Candidates left by small WCS errors, with and without the star correction of ``align_to``.

ZOGY assumes the two images are registered; a pair whose WCSs disagree by a few tenths
of a pixel leaves a dipole on every bright star, and each dipole is a bogus candidate.
``align_to`` in ``"auto"`` corrects the WCS with matched stars when their median offset
from the WCS prediction exceeds ``AlignConfig.max_wcs_error_pix``. This script takes
simulated pairs of the training-set recipe ``resampled`` (different pointing and a small
rotation, exact WCSs), moves the reference WCS's reference pixel by a given error, runs
:func:`astrid.pipeline.difference.difference_pair` with two values of that tolerance, and
prints the candidates detected (none of these pairs holds a transient: every candidate is
an artefact or a noise peak) and the alignment methods used::

    OMP_NUM_THREADS=2 python bench/registration.py [--pairs 8] [--seed 9001]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="simulated pairs")
    parser.add_argument("--seed", type=int, default=9001, help="seed of the simulated fields")
    parser.add_argument(
        "--errors", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.45], help="px"
    )
    parser.add_argument(
        "--tolerances", type=float, nargs="+", default=[0.5, 0.15], help="max_wcs_error_pix"
    )
    args = parser.parse_args(argv)

    from astrid.pipeline.difference import DifferenceConfig, difference_pair
    from astrid.pipeline.training_set import (
        TrainingSetConfig,
        simulate_pair,
        simulated_pair_specs,
    )

    config = TrainingSetConfig(seed=args.seed, n_fields=4 * args.pairs, pairs_per_field=3)
    specs = [s for s in simulated_pair_specs(config) if s.recipe == "resampled"][: args.pairs]
    pairs = []
    for spec in specs:  # as the training-set builder draws them
        science, reference = simulate_pair(spec)
        pairs.append((science.exposure, reference.exposure))
    settings = [(e, t) for e in args.errors for t in args.tolerances]
    counts = np.full((len(settings), len(pairs)), np.nan)
    methods: list[list[str]] = [[] for _ in settings]
    for j, (science, reference) in enumerate(pairs):
        for i, (error, tolerance) in enumerate(settings):
            assert reference.wcs is not None
            wcs = reference.wcs.deepcopy()
            wcs.wcs.crpix = wcs.wcs.crpix + error * np.array([0.8, 0.6])
            base = DifferenceConfig()
            cfg = replace(base, align=replace(base.align, max_wcs_error_pix=tolerance))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    result = difference_pair(science, reference.copy(wcs=wcs), config=cfg)
                except Exception as exc:  # refused (quality gate, too few stars): reported
                    methods[i].append(type(exc).__name__)
                    continue
            assert result.alignment is not None
            counts[i, j] = len(result.candidates)
            methods[i].append(result.alignment.method)
    common = np.all(np.isfinite(counts), axis=0)
    print(
        f"{len(pairs)} simulated 'resampled' pairs of seed {args.seed}, WCS error along "
        f"(0.8, 0.6); candidates summed over the {int(common.sum())} pairs that every "
        "setting subtracted"
    )
    print(f"{'WCS error px':>12} {'tolerance px':>12} {'candidates':>10}  alignment methods")
    for i, (error, tolerance) in enumerate(settings):
        tally = ", ".join(f"{m} {methods[i].count(m)}" for m in sorted(set(methods[i])))
        print(f"{error:>12.2f} {tolerance:>12.2f} {int(counts[i, common].sum()):>10d}  {tally}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
