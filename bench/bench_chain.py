"""Benchmark: load + calibrate + background + PSF + align for a simulated image pair.

Usage::

    python bench/bench_chain.py prepare bench/out/pair4k --size 4096
    python bench/bench_chain.py run bench/out/pair4k --repeat 3

    python bench/bench_chain.py pair bench/out/pair4k --repeat 3

``prepare`` simulates two epochs of one field (different seeing and pointing) and writes
them as FITS; ``run`` times each step of the chain in one process and prints a table of
the median and minimum over ``--repeat`` passes (the first pass also pays the imports'
first-call costs, so it is included in neither statistic when ``--repeat`` > 1).

``pair`` times the chain as the library runs it, :func:`astrid.pipeline.pair.prepare_pair`
(load, calibrate and characterise each image, then align), with the reference branch in
a second process and, alternating in the same command, with both branches in this
process; it prints the median wall and CPU seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path


def prepare(folder: Path, size: int, seed: int) -> None:
    from astrid.io.fits import write_exposure
    from astrid.science.simulate import EpochConditions, FieldConfig, simulate_survey

    area = (size / 1024.0) ** 2
    config = FieldConfig(shape=(size, size), n_stars=int(1000 * area), n_galaxies=int(300 * area))
    conditions = [
        EpochConditions(fwhm=1.1, exposure_time=120.0, dx=0.0, dy=0.0, mjd=60000.0),
        EpochConditions(fwhm=1.6, exposure_time=60.0, dx=2.7, dy=-1.4, rotation=0.03, mjd=60010.0),
    ]
    survey = simulate_survey(config, seed=seed, conditions=conditions)
    folder.mkdir(parents=True, exist_ok=True)
    write_exposure(survey.exposures[0], folder / "reference.fits", overwrite=True)
    write_exposure(survey.exposures[1], folder / "science.fits", overwrite=True)
    print(f"wrote {size}x{size} reference.fits and science.fits to {folder}")


def run_chain(folder: Path) -> dict[str, float]:
    """One pass of the chain; returns seconds per step."""
    import numpy as np

    from astrid.exposure import UNUSABLE, MaskBit
    from astrid.io.fits import read_exposure
    from astrid.science.align import align_to
    from astrid.science.background import estimate_background
    from astrid.science.calibrate import CalibrationConfig, calibrate_exposure
    from astrid.science.psf import estimate_psf
    from astrid.science.stars import find_sources

    times: dict[str, float] = {}

    cpu: dict[str, float] = {}
    c0 = [time.process_time()]

    def tick(name: str, t0: float) -> float:
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - t0
        c = time.process_time()
        cpu[name] = cpu.get(name, 0.0) + c - c0[0]
        c0[0] = c
        return now

    t = time.perf_counter()
    c0[0] = time.process_time()
    science = read_exposure(folder / "science.fits")
    reference = read_exposure(folder / "reference.fits")
    t = tick("load", t)
    base = CalibrationConfig()
    cal = replace(base, overscan=replace(base.overscan, enabled=False))
    science = calibrate_exposure(science, config=cal)
    reference = calibrate_exposure(reference, config=cal)
    t = tick("calibrate", t)
    stars = {}
    for name, exp in (("science", science), ("reference", reference)):
        unusable = (exp.mask & np.uint16(UNUSABLE)) != 0
        saturated = (exp.mask & np.uint16(MaskBit.SATURATED)) != 0
        t = time.perf_counter()
        c0[0] = time.process_time()
        bkg = estimate_background(exp.data, mask=unusable)
        t = tick("background", t)
        sources = find_sources(
            exp.data,
            background=bkg.background,
            noise=bkg.rms,
            mask=unusable & ~saturated,
            saturated=saturated,
        )
        t = tick("detect stars", t)
        psf = estimate_psf(
            exp.data,
            background=bkg.background,
            noise=bkg.rms,
            mask=unusable & ~saturated,
            saturated=saturated,
            sources=sources,
        )
        t = tick("psf", t)
        stars[name] = np.column_stack([psf.stars["x"], psf.stars["y"]])
    t = time.perf_counter()
    c0[0] = time.process_time()
    result = align_to(
        science, reference, science_stars=stars["science"], reference_stars=stars["reference"]
    )
    tick("align", t)
    times["total"] = sum(times.values())
    for k, v in cpu.items():
        times[f"_cpu_{k}"] = v
    times["_cpu_total"] = sum(cpu.values())
    times["_rms_pix"] = result.rms_pix
    times["_n_matched"] = result.n_matched
    return times


def run(folder: Path, repeat: int) -> None:
    passes = [run_chain(folder) for _ in range(repeat)]
    counted = passes[1:] if repeat > 1 else passes
    steps = [k for k in passes[0] if not k.startswith("_")]
    print(f"chain on {folder.name}: {repeat} passes, statistics over {len(counted)}")
    print(f"{'step':<14}{'median s':>10}{'min s':>10}{'share':>8}{'cpu s':>8}")
    total = statistics.median(p["total"] for p in counted)
    for step in steps:
        vals = [p[step] for p in counted]
        med = statistics.median(vals)
        share = f"{med / total:7.0%}" if step != "total" else ""
        cpu_med = statistics.median(p[f"_cpu_{step}"] for p in counted)
        print(f"{step:<14}{med:>10.2f}{min(vals):>10.2f}{share:>8}{cpu_med:>8.2f}")
    last = passes[-1]
    print(f"alignment residual: {last['_rms_pix']:.3f} px from {int(last['_n_matched'])} stars")


def run_pair(folder: Path, repeat: int) -> None:
    import resource

    from astrid.pipeline.pair import PairConfig, prepare_pair

    def cpu_seconds() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    science, reference = folder / "science.fits", folder / "reference.fits"
    prepare_pair(science, reference, config=PairConfig(parallel=False))  # warm-up
    rows: dict[bool, list[tuple[float, float, dict[str, float]]]] = {True: [], False: []}
    for _ in range(repeat):
        for parallel in (True, False):
            wall, cpu = time.perf_counter(), cpu_seconds()
            result = prepare_pair(science, reference, config=PairConfig(parallel=parallel))
            rows[parallel].append((time.perf_counter() - wall, cpu_seconds() - cpu, result.seconds))
    print(
        f"prepare_pair on {folder.name}: {repeat} passes each, alternating, after one warm-up; "
        f"alignment residual {result.alignment.rms_pix:.3f} px from "
        f"{result.alignment.n_matched} stars"
    )
    print(
        f"{'branches':<22}{'wall s':>8}{'CPU s':>8}{'science s':>11}{'reference s':>13}"
        f"{'align s':>9}"
    )
    medians = {}
    for parallel in (True, False):
        r = rows[parallel]
        wall = statistics.median(x[0] for x in r)
        medians[parallel] = wall
        print(
            f"{'two processes' if parallel else 'one process':<22}{wall:>8.2f}"
            f"{statistics.median(x[1] for x in r):>8.2f}"
            f"{statistics.median(x[2]['science'] for x in r):>11.2f}"
            f"{statistics.median(x[2]['reference'] for x in r):>13.2f}"
            f"{statistics.median(x[2]['align'] for x in r):>9.2f}"
        )
    ratios = [a[0] / b[0] for a, b in zip(rows[True], rows[False], strict=True)]
    print(f"wall ratio two/one processes: median {statistics.median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="simulate and write the pair")
    p.add_argument("folder", type=Path)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("run", help="time the chain")
    r.add_argument("folder", type=Path)
    r.add_argument("--repeat", type=int, default=1)
    q = sub.add_parser("pair", help="time prepare_pair, two processes against one")
    q.add_argument("folder", type=Path)
    q.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.folder, args.size, args.seed)
    elif args.command == "pair":
        run_pair(args.folder, args.repeat)
    else:
        run(args.folder, args.repeat)


if __name__ == "__main__":
    main()
