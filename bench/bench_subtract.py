"""Benchmark: image subtraction + candidate detection on simulated aligned pairs.

Usage::

    python bench/bench_subtract.py prepare --sizes 1024 2048 4096
    python bench/bench_subtract.py run --size 4096 --method zogy --repeat 3
    python bench/bench_subtract.py compare --sizes 1024 2048 --rounds 2 \\
        --methods zogy al stdpipe-zogy sfft properimage

``prepare`` simulates, per size, one field at two epochs on the same pixel grid (no
pointing offset or rotation, so no resampling is involved): a deep reference (120 s,
1.1" seeing) and a shallower science image (60 s, 1.6" seeing), with no transients and
no cosmic rays (``science.fits``), plus the same science image with point sources
injected at known positions and S/N (``science_injected.fits``, truth in
``injected.ecsv``). Files go under ``bench/out/subtract/pair<size>/``.

``run`` times one method on one size in this process and prints a table:

* AstrID (``zogy``, ``al``): ``characterise`` (background, stars, PSF of both images),
  ``subtract`` (:func:`~astrid.science.subtract.subtract_images`: for ZOGY the flux-scale
  fit, the subtraction with source-noise terms, the background-offset refit when it
  triggers and the bad-subtraction gate) and ``detect``
  (:func:`~astrid.science.detect.detect_candidates`: sep extraction in both polarities
  and PSF photometry). **subtract + detect** starts from in-memory, aligned,
  background-subtracted arrays with variances, masks and PSFs already estimated; it is
  the figure compared with the target (``subtract + detect cpu``: the CPU seconds of
  this process over the same span, both FFT threads counted, steadier than the wall
  clock on a shared machine). ``pipeline`` is a separate call of
  :func:`~astrid.pipeline.difference.difference_pair` (``aligned=True``), i.e.
  characterisation of both images + subtraction + detection + cutouts.
* peers (``stdpipe-zogy``, ``sfft``, ``properimage``; see ``bench/peers.py``): the
  peer's own steps (PSF estimation, subtraction) and the same sep detection at 5 sigma
  on its score image.

Each method is then judged on the same pixels (see :func:`evaluate`): robust std of its
score over clean sky and sources, detections at 5 sigma on the transient-free pair
(false positives), and completeness of the injected sources (``--pair injected``).

``compare`` runs ``run --once`` in a fresh process per method and size, alternating the
methods (A B C A B C ...) so that a concurrent load on the machine affects them alike,
times each process as a whole (wall clock, and CPU and peak memory from ``os.wait4``,
the peers' source-extractor and psfex children included), kills one that exceeds
``--timeout`` (that method is not run again at that size), and prints the medians, the
ratios to AstrID ZOGY and the quality numbers. The results and commands are in
``docs/benchmarks_subtraction.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from astropy.table import Table

    from astrid.exposure import Exposure

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "subtract"
ASTRID_METHODS = ("zogy", "al")
PEER_METHODS = ("stdpipe-zogy", "sfft", "properimage")
METHODS = ASTRID_METHODS + PEER_METHODS
#: Detection threshold (sigma) and minimum area, as AstrID's DetectConfig defaults.
N_SIGMA = 5.0
MIN_AREA = 3
#: Pixels within this distance of the image border are not judged.
BORDER = 32
#: Input-mask pixels are grown by this radius before judging.
MASK_GROW = 8
#: Injected sources per million pixels and their ideal science-image S/N range.
INJECT_PER_MPIX = 40
INJECT_SNR = (5.0, 25.0)


# --------------------------------------------------------------------------------------
# prepare


def pair_folder(size: int, out: Path = OUT) -> Path:
    """Folder holding the pair of side ``size``."""
    return out / f"pair{size}"


def prepare(size: int, seed: int, out: Path = OUT) -> Path:
    """Simulate and write one aligned pair (plus its injected copy) of side ``size``.

    Returns
    -------
    Path
        The pair's folder.
    """
    from astropy.table import Table

    from astrid.exposure import UNUSABLE
    from astrid.io.fits import write_exposure
    from astrid.science.simulate import (
        EpochConditions,
        FieldConfig,
        add_point_sources,
        point_source_snr,
        render_point_sources,
        simulate_survey,
    )

    area = (size / 1024.0) ** 2
    config = FieldConfig(
        shape=(size, size),
        n_stars=int(1000 * area),
        n_galaxies=int(300 * area),
        cosmic_ray_rate=0.0,
    )
    conditions = [
        EpochConditions(fwhm=1.1, exposure_time=120.0, mjd=60000.0),
        EpochConditions(fwhm=1.6, exposure_time=60.0, mjd=60010.0),
    ]
    t0 = time.perf_counter()
    survey = simulate_survey(config, seed=seed, conditions=conditions)
    reference, science = survey.exposures
    folder = pair_folder(size, out)
    folder.mkdir(parents=True, exist_ok=True)
    write_exposure(reference, folder / "reference.fits", overwrite=True)
    write_exposure(science, folder / "science.fits", overwrite=True)

    # Injection: uniform positions away from the border and from unusable pixels,
    # S/N drawn uniformly, fluxes from the ideal PSF-fit S/N per unit flux.
    rng = np.random.default_rng(seed + 1000)
    n_inject = round(INJECT_PER_MPIX * size * size / 1e6)
    bad = ((science.mask | reference.mask) & np.uint16(UNUSABLE)) != 0
    psf = survey.epochs[1].true_psf
    xs: list[float] = []
    ys: list[float] = []
    while len(xs) < n_inject:
        x, y = rng.uniform(BORDER + 16, size - BORDER - 16, 2)
        ix, iy = round(x), round(y)
        if bad[iy - 6 : iy + 7, ix - 6 : ix + 7].any():
            continue
        if any((x - a) ** 2 + (y - b) ** 2 < 30.0**2 for a, b in zip(xs, ys, strict=True)):
            continue
        xs.append(float(x))
        ys.append(float(y))
    x_arr, y_arr = np.array(xs), np.array(ys)
    snr = rng.uniform(*INJECT_SNR, n_inject)
    per_unit = point_source_snr(science.variance, x_arr, y_arr, 1.0, psf)
    flux = snr / per_unit
    gain = float(config.gain)
    data = add_point_sources(science.data, x_arr, y_arr, flux, psf, gain=gain, seed=seed + 2000)
    model = render_point_sources(science.shape, x_arr, y_arr, flux, psf)
    injected = science.copy(data=data, variance=science.variance + model / np.float32(gain))
    write_exposure(injected, folder / "science_injected.fits", overwrite=True)
    truth = Table({"x": x_arr, "y": y_arr, "flux": flux, "snr": snr})
    truth.meta["pixel_origin"] = 0
    truth.write(folder / "injected.ecsv", overwrite=True)
    meta = {
        "size": size,
        "seed": seed,
        "fwhm_science_pix": float(survey.epochs[1].true_psf.fwhm),
        "fwhm_reference_pix": float(survey.epochs[0].true_psf.fwhm),
        "gain": gain,
        "n_stars": config.n_stars,
        "n_galaxies": config.n_galaxies,
        "n_injected": n_inject,
    }
    (folder / "pair.json").write_text(json.dumps(meta, indent=1))
    print(
        f"wrote {size}x{size} pair ({n_inject} injected sources) to {folder} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return folder


# --------------------------------------------------------------------------------------
# quality


@dataclass
class Quality:
    """Quality numbers of one method on one pair (see :func:`evaluate`).

    Attributes
    ----------
    score_std : float
        1.4826 MAD of the score over the judged pixels (1 for a calibrated score).
    n_detections : int
        Detections at ``N_SIGMA`` of the score as it comes (both polarities).
    n_detections_rescaled : int
        Detections at ``N_SIGMA`` after dividing the score by ``score_std``.
    n_matched : int
        Positive detections within ``match_radius`` of an injected source (rescaled
        score); 0 without injections.
    completeness : dict of str to float
        Fraction of injected sources found, per S/N bin (rescaled score).
    judged_fraction : float
        Fraction of the image's pixels that were judged.
    """

    score_std: float
    n_detections: int
    n_detections_rescaled: int
    n_matched: int = 0
    completeness: dict[str, float] = field(default_factory=dict)
    judged_fraction: float = 0.0


def judged_region(
    science: Exposure, reference: Exposure, valid: NDArray[np.bool_] | None
) -> NDArray[np.bool_]:
    """Pixels on which every method is judged.

    Away from the border, from unusable input pixels (grown by ``MASK_GROW``), and
    inside the method's own valid area ``valid`` (``None``: everywhere).
    """
    from scipy import ndimage

    from astrid.exposure import UNUSABLE

    bad = ((science.mask | reference.mask) & np.uint16(UNUSABLE)) != 0
    bad = ndimage.binary_dilation(bad, iterations=MASK_GROW) if bad.any() else bad
    region = ~bad
    region[:BORDER] = region[-BORDER:] = False
    region[:, :BORDER] = region[:, -BORDER:] = False
    if valid is not None:
        region &= valid
    return region


def _detect(score: NDArray[np.floating], region: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Detections at ``N_SIGMA`` in both polarities (as AstrID's detect step): (n, 3) of
    x, y, polarity."""
    import sep

    bad = ~region | ~np.isfinite(score)
    clean = np.ascontiguousarray(np.where(bad, 0.0, score), np.float32)
    sep.set_extract_pixstack(max(300000, clean.size // 2))
    rows = []
    for polarity in (+1.0, -1.0):
        objs = sep.extract(
            np.ascontiguousarray(polarity * clean),
            N_SIGMA,
            err=None,
            mask=bad,
            minarea=MIN_AREA,
            deblend_cont=0.005,
            filter_kernel=None,
        )
        rows += [(o["x"], o["y"], polarity) for o in objs]
    return np.array(rows, np.float64).reshape(-1, 3)


def evaluate(
    score: NDArray[np.floating],
    region: NDArray[np.bool_],
    truth: Table | None,
    match_radius: float,
) -> Quality:
    """Judge a score image on ``region``.

    The robust std is over all judged pixels (sky and sources). Detections are counted
    on the score as given (its own sigma) and after dividing it by the robust std (the
    threshold a user would set on an uncalibrated score); injected sources are found
    when a positive detection of the rescaled score lies within ``match_radius``.
    """
    from scipy.spatial import cKDTree

    values = np.asarray(score, np.float64)[region]
    values = values[np.isfinite(values)]
    if values.size > 4_000_000:
        values = values[:: values.size // 2_000_000]
    med = float(np.median(values))
    std = float(1.4826 * np.median(np.abs(values - med)))
    own = _detect(score, region)
    scaled = _detect(np.asarray(score, np.float32) / np.float32(std), region)
    quality = Quality(
        score_std=std,
        n_detections=len(own),
        n_detections_rescaled=len(scaled),
        judged_fraction=float(region.mean()),
    )
    if truth is not None and len(truth):
        tx, ty = np.asarray(truth["x"]), np.asarray(truth["y"])
        snr = np.asarray(truth["snr"])
        pos = scaled[scaled[:, 2] > 0]
        if len(pos):
            dist, _ = cKDTree(pos[:, :2]).query(np.column_stack([tx, ty]))
            found = dist <= match_radius
        else:
            found = np.zeros(len(tx), bool)
        quality.n_matched = int(found.sum())
        for lo, hi in ((5.0, 10.0), (10.0, 25.0)):
            sel = (snr >= lo) & (snr < hi)
            if sel.any():
                quality.completeness[f"{lo:g}-{hi:g}"] = float(found[sel].mean())
    return quality


# --------------------------------------------------------------------------------------
# one method on one pair


def _load(size: int, pair: str, out: Path) -> tuple[Exposure, Exposure, Table | None, dict]:
    from astropy.table import Table

    from astrid.io.fits import read_exposure

    folder = pair_folder(size, out)
    if not (folder / "reference.fits").exists():
        raise SystemExit(f"no pair in {folder}: run `prepare --sizes {size}` first")
    name = "science.fits" if pair == "quiet" else "science_injected.fits"
    science = read_exposure(folder / name)
    reference = read_exposure(folder / "reference.fits")
    truth = Table.read(folder / "injected.ecsv") if pair == "injected" else None
    meta = json.loads((folder / "pair.json").read_text())
    return science, reference, truth, meta


def _astrid_steps(science: Exposure, reference: Exposure, method: str) -> dict[str, Any]:
    """Characterise, subtract and detect with AstrID, timing each step.

    Mirrors :func:`astrid.pipeline.difference.difference_pair` for an aligned pair, so
    the subtraction and detection can be timed on their own.
    """
    from scipy.spatial import cKDTree

    from astrid.exposure import UNUSABLE
    from astrid.pipeline.characterize import characterize
    from astrid.science.detect import detect_candidates
    from astrid.science.subtract import SubtractConfig, subtract_images

    times: dict[str, float] = {}
    t = time.perf_counter()
    sci = characterize(science)
    ref = characterize(reference)
    times["characterise"] = time.perf_counter() - t
    assert sci.exposure.psf is not None and ref.exposure.psf is not None

    sci_data = sci.exposure.data - sci.background.background
    ref_data = ref.exposure.data - ref.background.background
    sci_mask = (sci.exposure.mask & np.uint16(UNUSABLE)) != 0
    ref_mask = (ref.exposure.mask & np.uint16(UNUSABLE)) != 0
    sx, sy = np.asarray(sci.stars["x"]), np.asarray(sci.stars["y"])
    dist, _ = cKDTree(np.column_stack([ref.stars["x"], ref.stars["y"]])).query(
        np.column_stack([sx, sy])
    )
    both = dist <= 1.5

    t, cpu = time.perf_counter(), time.process_time()
    sub = subtract_images(
        sci_data,
        ref_data,
        science_variance=sci.exposure.variance,
        reference_variance=ref.exposure.variance,
        science_psf=sci.exposure.psf,
        reference_psf=ref.exposure.psf,
        science_noise=float(np.median(sci.background.rms)),
        reference_noise=float(np.median(ref.background.rms)),
        star_x=sx[both],
        star_y=sy[both],
        star_snr=np.asarray(sci.stars["snr"])[both],
        science_mask=sci_mask,
        reference_mask=ref_mask,
        config=SubtractConfig(method=method),
    )
    times["subtract"] = time.perf_counter() - t
    t = time.perf_counter()
    candidates = detect_candidates(
        sub.score,
        sub.difference,
        sub.variance,
        sub.psf,
        mask=sub.mask,
        wcs=science.wcs,
        zero_point=science.meta.zero_point,
        flux_conversion=sub.flux_conversion,
    )
    times["detect"] = time.perf_counter() - t
    times["subtract + detect"] = times["subtract"] + times["detect"]
    # CPU seconds of this process (all its threads): less sensitive to other jobs.
    times["subtract + detect cpu"] = time.process_time() - cpu
    return {
        "times": times,
        "score": sub.score,
        "valid": ~sub.mask,
        "n_candidates": len(candidates),
        "gate": {"passed": sub.quality.passed, "score_std": sub.quality.score_std},
        "fwhm": float(sci.exposure.psf.fwhm),
    }


def _astrid_pipeline(science: Exposure, reference: Exposure, method: str) -> dict[str, Any]:
    """The whole pair pipeline (characterise both, subtract, detect, cutouts), timed."""
    from astrid.pipeline.difference import DifferenceConfig, difference_pair
    from astrid.science.subtract import SubtractConfig

    config = DifferenceConfig(
        subtract=SubtractConfig(method=method),
        enforce_gate=False,
    )
    t = time.perf_counter()
    res = difference_pair(science, reference, aligned=True, config=config)
    elapsed = time.perf_counter() - t
    assert res.science.exposure.psf is not None
    return {
        "times": {"pipeline": elapsed},
        "score": res.subtraction.score,
        "valid": ~res.subtraction.mask,
        "n_candidates": len(res.candidates),
        "gate": {
            "passed": res.subtraction.quality.passed,
            "score_std": res.subtraction.quality.score_std,
        },
        "fwhm": float(res.science.exposure.psf.fwhm),
    }


def _peer(
    science: Exposure, reference: Exposure, method: str, meta: dict, threads: int
) -> dict[str, Any]:
    import tempfile

    sys.path.insert(0, str(HERE))
    import peers

    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
        try:
            res = peers.run_peer(
                method,
                science,
                reference,
                workdir=Path(tmp),
                fwhm_science=float(meta["fwhm_science_pix"]),
                threads=threads,
            )
        except peers.PeerUnavailable as exc:
            raise SystemExit(f"{method} not run: {exc}") from None
    t = time.perf_counter()
    region = judged_region(science, reference, res.valid)
    n = len(_detect(res.score, region))
    times = dict(res.times)
    times["detect"] = time.perf_counter() - t
    times["subtract + detect"] = res.times["subtract"] + times["detect"]
    times["total"] = sum(v for k, v in times.items() if k not in ("subtract + detect",))
    return {
        "times": times,
        "score": res.score,
        "valid": res.valid,
        "n_candidates": n,
        "notes": res.notes,
        "fwhm": float(meta["fwhm_science_pix"]),
    }


def run_method(
    size: int,
    method: str,
    *,
    repeat: int,
    pair: str,
    once: bool,
    threads: int,
    out: Path = OUT,
) -> dict[str, Any]:
    """Time ``method`` on the pair of side ``size`` and judge its output.

    With ``once`` the process does what a user's process would: load the pair, run the
    method once (AstrID: characterise both images, subtract, detect; without the
    separate ``pipeline`` call), detect; then the quality is measured and its time
    reported apart, so a caller timing the whole process can subtract it.
    """
    t = time.perf_counter()
    science, reference, truth, meta = _load(size, pair, out)
    load = time.perf_counter() - t
    passes: list[dict[str, Any]] = []
    n = 1 if once else repeat
    for _ in range(n):
        if method in ASTRID_METHODS:
            if once:
                passes.append(_astrid_steps(science, reference, method))
            else:
                step = _astrid_steps(science, reference, method)
                whole = _astrid_pipeline(science, reference, method)
                step["times"].update(whole["times"])
                passes.append(step)
        elif method in PEER_METHODS:
            passes.append(_peer(science, reference, method, meta, threads))
        else:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    t = time.perf_counter()
    last = passes[-1]
    region = judged_region(science, reference, last["valid"])
    quality = evaluate(last["score"], region, truth, match_radius=max(2.0, last["fwhm"]))
    quality_time = time.perf_counter() - t
    counted = passes[1:] if len(passes) > 1 else passes
    steps = list(counted[0]["times"])
    return {
        "size": size,
        "method": method,
        "pair": pair,
        "passes": len(passes),
        "counted": len(counted),
        "load": load,
        "median": {s: statistics.median(p["times"][s] for p in counted) for s in steps},
        "min": {s: min(p["times"][s] for p in counted) for s in steps},
        "quality": quality.__dict__,
        "quality_time": quality_time,
        "n_candidates": last["n_candidates"],
        "gate": last.get("gate"),
        "notes": last.get("notes", ""),
        "load_average": os.getloadavg()[0],
    }


def print_run(result: dict[str, Any]) -> None:
    """Print the step table and quality of one :func:`run_method` result."""
    q = result["quality"]
    print(
        f"{result['method']} on {result['size']}x{result['size']} ({result['pair']} pair): "
        f"{result['passes']} passes, statistics over {result['counted']}; "
        f"load {result['load']:.2f} s; 1-min load average {result['load_average']:.2f}"
    )
    print(f"{'step':<20}{'median s':>10}{'min s':>10}")
    for step, med in result["median"].items():
        print(f"{step:<20}{med:>10.2f}{result['min'][step]:>10.2f}")
    comp = ", ".join(f"S/N {k}: {v:.0%}" for k, v in q["completeness"].items())
    print(
        f"quality: score robust std {q['score_std']:.3g}; detections at {N_SIGMA:g} sigma "
        f"{q['n_detections']} (own scale), {q['n_detections_rescaled']} (rescaled)"
        + (f"; completeness {comp}" if comp else "")
        + f"; judged {q['judged_fraction']:.0%} of pixels"
    )
    if result.get("gate"):
        g = result["gate"]
        print(f"gate: passed={g['passed']} score_std={g['score_std']:.3f}")
    if result.get("notes"):
        print(f"notes: {result['notes']}")


# --------------------------------------------------------------------------------------
# compare: whole processes, alternating


def _whole_process(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd`` in its own process group and time it as a whole.

    Wall clock from the parent; CPU time and peak resident memory from ``os.wait4``
    (the process and the children it waited for). After ``timeout`` seconds the
    process group is killed.
    """
    import signal
    import tempfile

    with tempfile.TemporaryFile() as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"timeout": True, "wall": time.perf_counter() - t}
            time.sleep(0.05)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    return {
        "timeout": False,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "maxrss_gib": usage.ru_maxrss / 2**20,
        "returncode": proc.returncode,
        "output": output,
    }


def compare(
    sizes: list[int],
    methods: list[str],
    *,
    rounds: int,
    timeout: float,
    threads: int,
    skip: list[str],
    out: Path = OUT,
) -> dict[str, Any]:
    """Whole-process timings and quality, methods alternating within each size.

    Each of ``rounds`` rounds runs every method once on the transient-free pair; a last
    round runs each on the injected pair (completeness). A method that times out or
    fails is not run again at that size. ``skip`` holds ``method@size`` entries not to
    run at all.
    """
    import tempfile

    script = str(Path(__file__).resolve())
    results: dict[str, Any] = {}
    for size in sizes:
        dead: dict[str, str] = {m: "skipped (--skip)" for m in methods if f"{m}@{size}" in skip}
        plan = [("quiet", r) for r in range(rounds)] + [("injected", rounds)]
        for pair, r in plan:
            for method in methods:
                if method in dead:
                    continue
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
                    json_path = Path(fh.name)
                cmd = [
                    sys.executable,
                    script,
                    "run",
                    "--size",
                    str(size),
                    "--method",
                    method,
                    "--pair",
                    pair,
                    "--once",
                    "--threads",
                    str(threads),
                    "--json",
                    str(json_path),
                    "--out",
                    str(out),
                ]
                proc = _whole_process(cmd, timeout)
                key = f"{method}@{size}"
                entry = results.setdefault(key, {"runs": [], "size": size, "method": method})
                if proc["timeout"]:
                    dead[method] = f"timed out after {timeout:.0f} s"
                    entry["failure"] = dead[method]
                    print(f"  {key} {pair}: timed out after {timeout:.0f} s", flush=True)
                    continue
                if proc["returncode"] != 0 or not json_path.stat().st_size:
                    tail = "\n".join(proc["output"].strip().splitlines()[-6:])
                    dead[method] = f"failed (exit {proc['returncode']}): {tail}"
                    entry["failure"] = dead[method]
                    print(f"  {key} {pair}: failed\n{tail}", flush=True)
                    continue
                run = json.loads(json_path.read_text())
                json_path.unlink()
                cpu = proc["cpu"]
                run["wall"] = proc["wall"]
                run["cpu"] = cpu
                run["maxrss_gib"] = proc["maxrss_gib"]
                run["process"] = proc["wall"] - run["quality_time"]
                entry["runs"].append(run)
                print(
                    f"  {key} {pair} round {r}: process {run['process']:.1f} s "
                    f"(wall {proc['wall']:.1f}, cpu {cpu:.1f}), load avg "
                    f"{run['load_average']:.2f}",
                    flush=True,
                )
        for method in methods:
            key = f"{method}@{size}"
            if method in dead and key not in results:
                results[key] = {"runs": [], "size": size, "method": method}
            if method in dead:
                results[key]["failure"] = dead[method]
    return results


def print_compare(results: dict[str, Any], baseline: str = "zogy") -> None:
    """Tables of whole-process and in-process medians, ratios and quality."""
    sizes = sorted({v["size"] for v in results.values()})
    print()
    print(
        f"{'size':>6} {'method':<14}{'runs':>5}{'process s':>11}{'ratio':>7}{'cpu s':>8}"
        f"{'ratio':>7}{'sub+det s':>11}{'ratio':>7}   steps (in-process medians, s)"
    )
    for size in sizes:
        base = results.get(f"{baseline}@{size}")
        base_proc = base_sub = base_cpu = float("nan")
        if base and base["runs"]:
            base_proc = statistics.median(r["process"] for r in base["runs"])
            base_cpu = statistics.median(r["cpu"] for r in base["runs"])
            base_sub = statistics.median(r["median"]["subtract + detect"] for r in base["runs"])
        for entry in results.values():
            if entry["size"] != size:
                continue
            runs = entry["runs"]
            if not runs:
                print(f"{size:>6} {entry['method']:<14}  -- {entry.get('failure', 'no run')}")
                continue
            proc = statistics.median(r["process"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            sub = (
                statistics.median(r["median"]["subtract + detect"] for r in runs)
                if "subtract + detect" in runs[0]["median"]
                else float("nan")
            )
            steps = ", ".join(
                f"{k} {statistics.median(r['median'][k] for r in runs):.1f}"
                for k in runs[0]["median"]
                if k not in ("subtract + detect", "total", "subtract + detect cpu")
            )
            print(
                f"{size:>6} {entry['method']:<14}{len(runs):>5}{proc:>11.1f}"
                f"{proc / base_proc:>7.2f}{cpu:>8.1f}{cpu / base_cpu:>7.2f}"
                f"{sub:>11.2f}{sub / base_sub:>7.2f}   {steps}"
            )
    print()
    print(
        f"{'size':>6} {'method':<14}{'score std':>10}{'FP own':>8}{'FP resc':>8}"
        f"{'compl 5-10':>11}{'compl 10-25':>12}{'judged':>8}{'peak GiB':>9}"
    )
    for size in sizes:
        for entry in results.values():
            if entry["size"] != size or not entry["runs"]:
                continue
            quiet = [r for r in entry["runs"] if r["pair"] == "quiet"]
            inj = [r for r in entry["runs"] if r["pair"] == "injected"]
            q = (quiet or entry["runs"])[-1]["quality"]
            comp = inj[-1]["quality"]["completeness"] if inj else {}
            rss = max(r["maxrss_gib"] for r in entry["runs"])
            print(
                f"{size:>6} {entry['method']:<14}{q['score_std']:>10.3g}"
                f"{q['n_detections']:>8}{q['n_detections_rescaled']:>8}"
                f"{comp.get('5-10', float('nan')):>11.0%}{comp.get('10-25', float('nan')):>12.0%}"
                f"{q['judged_fraction']:>8.0%}{rss:>9.1f}"
            )


# --------------------------------------------------------------------------------------
# command line


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="simulate and write the pairs")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=OUT, help="folder of the pairs")
    r = sub.add_parser("run", help="time one method on one size in this process")
    r.add_argument("--size", type=int, required=True)
    r.add_argument("--method", choices=METHODS, default="zogy")
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--pair", choices=("quiet", "injected"), default="quiet")
    r.add_argument("--once", action="store_true", help="one pass as a user's process would")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--json", type=Path, default=None, help="also write the result here")
    r.add_argument("--out", type=Path, default=OUT, help="folder of the pairs")
    c = sub.add_parser("compare", help="whole-process timings, methods alternating")
    c.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    c.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    c.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    c.add_argument("--skip", nargs="*", default=[], help="method@size entries not to run")
    c.add_argument("--json", type=Path, default=None, help="also write all results here")
    c.add_argument("--out", type=Path, default=OUT, help="folder of the pairs")
    args = parser.parse_args()
    out = args.out
    if args.command == "prepare":
        for size in args.sizes:
            prepare(size, args.seed, out)
    elif args.command == "run":
        result = run_method(
            args.size,
            args.method,
            repeat=args.repeat,
            pair=args.pair,
            once=args.once,
            threads=args.threads,
            out=out,
        )
        print_run(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    else:
        results = compare(
            args.sizes,
            args.methods,
            rounds=args.rounds,
            timeout=args.timeout,
            threads=args.threads,
            skip=args.skip,
            out=out,
        )
        print_compare(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
