"""Check and time ZOGY's optional GPU backends against the numpy backend.

Usage::

    python bench/gpu_zogy.py --size 4096 --repeat 3

Builds a synthetic aligned pair (Gaussian stars, different seeing, flux ratio 0.7,
background noise plus source noise), runs :func:`astrid.science.zogy.zogy_subtract` with
each available backend, and prints the largest difference of ``S_corr`` and ``D`` from
the numpy result and the median time per call (after one warm-up call). Backends whose
library or GPU is missing are reported as such.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def make_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_stars = size * size // 4000
    x = rng.uniform(20, size - 20, n_stars)
    y = rng.uniform(20, size - 20, n_stars)
    flux = 10 ** rng.uniform(2.5, 5.0, n_stars)
    half = 12
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]

    def render(sigma: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
        img = np.zeros((size, size), np.float32)
        for xi, yi, fi in zip(x, y, flux, strict=True):
            ix, iy = int(xi), int(yi)
            dx, dy = xi - ix, yi - iy
            g = np.exp(-0.5 * ((xx - dx) ** 2 + (yy - dy) ** 2) / sigma**2)
            img[iy - half : iy + half + 1, ix - half : ix + half + 1] += scale * fi * g / g.sum()
        psf = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
        return img, (psf / psf.sum()).astype(np.float32)

    sci, psf_n = render(1.8, 0.7)
    ref, psf_r = render(1.3, 1.0)
    sci += rng.normal(0, 5.0, sci.shape).astype(np.float32)
    ref += rng.normal(0, 3.0, ref.shape).astype(np.float32)
    return sci, ref, psf_n, psf_r


def main() -> None:
    from astrid.errors import BackendUnavailable
    from astrid.science.zogy import FluxScale, ZogyConfig, zogy_subtract

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sci, ref, psf_n, psf_r = make_pair(args.size)
    var_n = np.full(sci.shape, 25.0, np.float32) + np.clip(sci, 0, None) / 2.0
    var_r = np.full(ref.shape, 9.0, np.float32) + np.clip(ref, 0, None) / 2.0
    results = {}
    print(f"ZOGY {args.size}x{args.size}, float32, constant PSFs, variance maps, sigma_ast 0.05")
    print(f"{'backend':<8}{'median s':>10}{'min s':>9}{'max|dS_corr|':>14}{'max|dD|':>11}")
    for backend in ("numpy", "torch", "cupy"):
        config = ZogyConfig(backend=backend)  # type: ignore[arg-type]

        def call(config: ZogyConfig = config) -> object:
            return zogy_subtract(
                sci,
                ref,
                psf_science=psf_n,
                psf_reference=psf_r,
                noise_science=5.0,
                noise_reference=3.0,
                flux_scale=FluxScale(flux_ratio=0.7),
                variance_science=var_n,
                variance_reference=var_r,
                astrometric_sigma_x=0.05,
                astrometric_sigma_y=0.05,
                config=config,
            )

        try:
            call()
        except BackendUnavailable as exc:
            print(f"{backend:<8}unavailable: {exc}")
            continue
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = call()
            times.append(time.perf_counter() - t0)
        results[backend] = res
        base = results["numpy"]
        ds = float(np.max(np.abs(res.score_corrected - base.score_corrected)))  # type: ignore[attr-defined]
        dd = float(np.max(np.abs(res.difference - base.difference)))  # type: ignore[attr-defined]
        print(
            f"{backend:<8}{statistics.median(times):>10.3f}{min(times):>9.3f}{ds:>14.2e}{dd:>11.2e}"
        )


if __name__ == "__main__":
    main()
