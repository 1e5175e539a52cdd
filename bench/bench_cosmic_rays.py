"""Benchmark: cosmic-ray detection speed and accuracy on simulated epochs.

Usage::

    python bench/bench_cosmic_rays.py --repeat 3
    python bench/bench_cosmic_rays.py --sizes 2048 --seeing 0.8 1.2 2.0 --modes default niter2

For each size and seeing one epoch is simulated like those of ``bench_chain.py``
(0.5 arcsec pixels, 1000 stars and 300 galaxies per 1024x1024 pixels, 120 s, 0.2
cosmic rays per megapixel per second: about 100 hits on 2048x2048, thin tracks and
spots) and :func:`~astrid.science.calibrate.detect_cosmic_rays` runs with each mode,
masking ``BAD`` and ``SATURATED`` pixels as ``calibrate_exposure`` does. The first
size runs every seeing and mode; larger sizes run the middle seeing and
``--large-modes``. Modes in ``--full-modes`` also run over the full image at once
(``tiled=False``), and ``same`` says whether both gave the same mask.

Columns: median wall and CPU seconds over ``--repeat`` runs (the machine's other load
shows in the wall time); ``ran on``: fraction of the image astroscrappy processed;
``flagged`` pixels; ``compl``: fraction of the true cosmic-ray pixels flagged;
``hits``: fraction of hits (8-connected groups of true pixels) with a pixel flagged;
``FP``: flagged pixels that received no cosmic-ray charge, of which ``touch`` border
a true pixel, ``edge`` (of the rest) lie within 7 pixels of the image's edge (where
astroscrappy's 9x9 large-scale median leaves the fine structure unfiltered, so the
wings of bright stars cut by the edge pass) and ``stars`` (of the rest) within 3
pixels of a star's centre; what remains is noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

#: Pixel scale of the simulated detector, arcsec per pixel.
PIXEL_SCALE = 0.5


def modes(seeing_pix: float) -> dict[str, tuple[object, float | None]]:
    """Configurations compared: name -> (CosmicRayConfig, psf_fwhm argument)."""
    from astrid.science.calibrate import CosmicRayConfig

    default = CosmicRayConfig()
    scrappy = replace(default, sigma_clip=4.5, object_limit=5.0, n_iterations=4)
    return {
        "default": (default, None),
        "niter2": (replace(default, n_iterations=2), None),
        "niter4": (replace(default, n_iterations=4), None),
        "objlim20": (replace(default, object_limit=20.0), None),
        "astroscrappy": (scrappy, None),
        "convolve-3px": (replace(scrappy, fine_structure_mode="convolve", psf_fwhm=3.0), None),
        "convolve-psf": (
            replace(default, fine_structure_mode="convolve", object_limit=2.0),
            seeing_pix,
        ),
    }


@dataclass
class Epoch:
    """One simulated epoch and what the scores need."""

    data: NDArray[np.float32]
    unusable: NDArray[np.bool_]
    truth: NDArray[np.bool_]
    near_star: NDArray[np.bool_]
    gain: float
    read_noise: float
    saturation: float


def simulate(size: int, seeing: float, seed: int) -> Epoch:
    from scipy import ndimage

    from astrid.exposure import MaskBit
    from astrid.science.simulate import (
        EpochConditions,
        FieldConfig,
        simulate_exposure,
        simulate_field,
    )

    area = (size / 1024.0) ** 2
    config = FieldConfig(
        shape=(size, size),
        pixel_scale=PIXEL_SCALE,
        n_stars=int(1000 * area),
        n_galaxies=int(300 * area),
    )
    field = simulate_field(config, seed=seed)
    epoch = simulate_exposure(
        field, EpochConditions(fwhm=seeing, exposure_time=120.0), seed=seed + 1
    )
    exposure = epoch.exposure
    centres = np.zeros((size, size), bool)
    x = np.clip(np.rint(np.asarray(epoch.stars["x"])).astype(int), 0, size - 1)
    y = np.clip(np.rint(np.asarray(epoch.stars["y"])).astype(int), 0, size - 1)
    centres[y, x] = True
    near_star = ndimage.binary_dilation(centres, structure=np.ones((7, 7), bool))
    assert exposure.meta.gain and exposure.meta.read_noise and exposure.meta.saturation
    return Epoch(
        data=exposure.data,
        unusable=(exposure.mask & np.uint16(MaskBit.BAD | MaskBit.SATURATED)) != 0,
        truth=epoch.cosmic_rays,
        near_star=near_star,
        gain=exposure.meta.gain,
        read_noise=exposure.meta.read_noise,
        saturation=exposure.meta.saturation,
    )


def score(flagged: NDArray[np.bool_], epoch: Epoch) -> dict[str, float]:
    from scipy import ndimage

    truth = epoch.truth
    labels, n_hits = ndimage.label(truth, structure=np.ones((3, 3), bool))
    found = np.unique(labels[flagged & truth])
    touch = ndimage.binary_dilation(truth, structure=np.ones((3, 3), bool))
    edge = np.ones(truth.shape, bool)
    edge[7:-7, 7:-7] = False
    false = flagged & ~truth
    return {
        "flagged": float(flagged.sum()),
        "compl": float((flagged & truth).sum() / max(truth.sum(), 1)),
        "hits": float(np.count_nonzero(found) / max(n_hits, 1)),
        "FP": float(false.sum()),
        "touch": float((false & touch).sum()),
        "edge": float((false & ~touch & edge).sum()),
        "stars": float((false & ~touch & ~edge & epoch.near_star).sum()),
    }


def run_mode(
    epoch: Epoch, config: object, psf_fwhm: float | None, tiled: bool, repeat: int
) -> tuple[float, float, float, NDArray[np.bool_]]:
    """Median wall and CPU seconds, fraction processed and the mask."""
    from astrid.science.calibrate import CosmicRayConfig, detect_cosmic_rays

    assert isinstance(config, CosmicRayConfig)
    config = replace(config, tiled=tiled)
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = detect_cosmic_rays(
            epoch.data,
            gain=epoch.gain,
            read_noise=epoch.read_noise,
            mask=epoch.unusable,
            saturation=epoch.saturation,
            psf_fwhm=psf_fwhm,
            config=config,
        )
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result.processed_fraction, result.mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--seeing", type=float, nargs="+", default=[0.8, 1.2, 2.0])
    parser.add_argument("--modes", nargs="+", default=list(modes(1.0)))
    parser.add_argument("--large-modes", nargs="+", default=["default", "niter2"])
    parser.add_argument("--full-modes", nargs="+", default=["default", "niter2"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    header = (
        f"{'size':>5} {'seeing':>6} {'mode':<13} {'tiled':<5} {'wall s':>7} {'cpu s':>6} "
        f"{'ran on':>6} {'flagged':>7} {'compl':>6} {'hits':>6} {'FP':>5} {'touch':>5} "
        f"{'edge':>5} {'stars':>5} {'same':>4}"
    )
    print(header)
    print("-" * len(header))
    for index, size in enumerate(args.sizes):
        seeings = args.seeing if index == 0 else [sorted(args.seeing)[len(args.seeing) // 2]]
        names = args.modes if index == 0 else args.large_modes
        for seeing in seeings:
            epoch = simulate(size, seeing, args.seed)
            available = modes(seeing / PIXEL_SCALE)
            for name in names:
                config, psf_fwhm = available[name]
                runs = [True, False] if name in args.full_modes else [True]
                masks = {}
                for tiled in runs:
                    wall, cpu, fraction, mask = run_mode(
                        epoch, config, psf_fwhm, tiled, args.repeat
                    )
                    masks[tiled] = mask
                    s = score(mask, epoch)
                    same = ""
                    if not tiled:
                        same = "yes" if np.array_equal(masks[True], mask) else "NO"
                    print(
                        f'{size:>5} {seeing:>5.1f}" {name:<13} {str(tiled).lower():<5} '
                        f"{wall:>7.2f} {cpu:>6.2f} {fraction:>6.3f} {s['flagged']:>7.0f} "
                        f"{s['compl']:>6.3f} {s['hits']:>6.3f} {s['FP']:>5.0f} "
                        f"{s['touch']:>5.0f} {s['edge']:>5.0f} {s['stars']:>5.0f} {same:>4}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
