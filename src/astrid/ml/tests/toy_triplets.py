"""Tiny synthetic cutout triplets for the ML tests (not a test module).

*Real*: a PSF blob near the centre of the science and difference stamps and absent from
the reference. *Bogus*, in equal shares: a subtraction dipole (a misaligned star), pure
noise, a cosmic ray (one hot pixel in science and difference), and an edge-masked stamp
(a third of each plane is NaN, with a star's residual at the mask's border). Static stars
appear in science and reference alike. Planes are in noise units before normalisation.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from astrid.ml.alerts import normalise_triplet

__all__ = ["blob", "make_toy_triplets"]


def blob(size: int, x: float, y: float, sigma: float, amplitude: float) -> NDArray[np.float64]:
    """A circular Gaussian of peak ``amplitude`` at 0-based ``(x, y)``."""
    yy, xx = np.mgrid[0:size, 0:size]
    return amplitude * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2)


def make_toy_triplets(
    n: int, *, seed: int, size: int = 63, n_groups: int = 10, normalise: bool = True
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64], NDArray[np.float64]]:
    """``n`` triplets, half real: ``(triplets, labels, groups, snr)``.

    ``snr`` is the blob's peak in noise units for real examples (0 for bogus ones).
    """
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2
    triplets = np.empty((n, 3, size, size), dtype=np.float64)
    labels = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(labels)
    groups = rng.integers(0, n_groups, size=n)
    snr = np.zeros(n)
    for i in range(n):
        science = rng.normal(0.0, 1.0, (size, size))
        reference = rng.normal(0.0, 0.7, (size, size))
        for _ in range(rng.integers(0, 4)):  # static stars, subtracted away
            sx, sy = rng.uniform(5, size - 5, 2)
            star = blob(size, sx, sy, 1.6, rng.uniform(5, 40))
            science += star
            reference += star
        difference = science - reference
        sigma = rng.uniform(1.2, 2.0)
        if labels[i] == 1:
            amplitude = rng.uniform(1.0, 30.0)
            source = blob(size, c + rng.uniform(-1, 1), c + rng.uniform(-1, 1), sigma, amplitude)
            science += source
            difference += source
            snr[i] = amplitude
        else:
            kind = rng.integers(0, 4)
            if kind == 0:  # dipole: a star shifted by ~2 pixels between epochs
                amplitude = rng.uniform(10, 40)
                dx, dy = rng.uniform(-2.5, 2.5, 2)
                new = blob(size, c + dx / 2, c + dy / 2, sigma, amplitude)
                old = blob(size, c - dx / 2, c - dy / 2, sigma, amplitude)
                science += new
                reference += old
                difference += new - old
            elif kind == 2:  # cosmic ray
                value = rng.uniform(15, 60)
                px, py = np.round(c + rng.uniform(-1, 1, 2)).astype(int)
                science[py, px] += value
                difference[py, px] += value
            elif kind == 3:  # masked edge with a residual at its border
                cut = size // 3
                difference += blob(size, cut, c, 1.0, rng.uniform(5, 20))
                for plane in (science, reference, difference):
                    plane[:, :cut] = np.nan
        triplets[i] = (science, reference, difference)
    out = normalise_triplet(triplets) if normalise else triplets.astype(np.float32)
    return out, labels, groups, snr
