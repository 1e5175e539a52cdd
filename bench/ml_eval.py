"""Evaluate a real/bogus model on a fresh injected set whose fields no model was trained on.

Two steps::

    # 1. build the set: every simulated field drawn from --seed, every example in "test"
    OMP_NUM_THREADS=2 python bench/ml_eval.py build bench/out/ml_eval \
        --seed 9001 --fields 40 --pairs-per-field 3 --shared-data ../shared/data --workers 2

    # 2. score it with the packaged model (or a bundle) and write metrics and plots
    OMP_NUM_THREADS=2 python bench/ml_eval.py evaluate \
        bench/out/ml_eval/real-bogus-eval-9001.npz --plots docs/img \
        -o bench/out/ml_eval/metrics.json

``build`` uses :func:`astrid.pipeline.training_set.build_training_set` with the same
recipes as ``astrid train`` but another seed and ``fractions=(0, 0, 1)``, so the whole
set is the test split (``astrid evaluate --dataset`` reads it as is). ``--star-hosts
magnitude`` draws the hosts of fakes on stars uniformly in magnitude
(``FakeConfig.star_hosts``; the set is named ``real-bogus-eval-<seed>-magnitude-hosts``);
``--keep-dominated`` labels real the candidates that a star's residual or another
artefact at a fake's spot outweighs (``FakeConfig.dominated_snr=None``, builder versions
up to 6; the name ends in ``-keep-dominated``); ``--rescale-score`` detects on the
score image divided by its measured robust noise (``DetectConfig.rescale_score``; the
name ends in ``-rescaled-score``).
The simulated fields are drawn from ``default_rng([seed, field_index])``; ``build``
first checks that none of the field seeds of ``--seed`` occurs among the first
``--check-fields`` fields of the default seed 2024, which ``astrid train`` always builds
from.

``evaluate`` scores every example with the model's own normalisation and temperature
(:class:`astrid.ml.serve.Scorer`) and reports, through :mod:`astrid.ml.evaluate` and
:mod:`astrid.ml.metrics`: ROC AUC, missed detections at 1 % false positives, false
positives at 1 % missed detections, expected calibration error, completeness against
S/N; overall, per source of pixels (simulated, real DECam) and for S/N >= 10. The set's
``snr`` column is the injected S/N of a real example and the measured one of a bogus
example, so ``snr>=10`` cuts the two classes on different quantities; the rows
``measured snr>=6`` and ``measured snr>=10`` cut both on the S/N the pipeline measured
(a real example's, from the fakes table), as a survey's threshold would. Plots,
all prefixed ``ml_``: ``ml_roc.png`` (simulated and DECam curves and the operating
points), ``ml_completeness.png`` (completeness against injected S/N at the 1 %-FPR
threshold), ``ml_reliability.png`` (before and after temperature scaling) and
``ml_scores.png`` (score histograms of real and bogus).

``point-sources`` scores hand-made stamps of a lone Gaussian point source on unit noise
(science and difference; the reference is noise only) for a grid of FWHM and S/N, and
prints the median score of each cell: how sharp a source can be before the model takes
it for a cosmic ray::

    python bench/ml_eval.py point-sources [--model BUNDLE]

``variable-stars`` does the same for a star that brightened or faded: a Gaussian star
of given S/N in the reference, changed by a given difference S/N (with the star's Poisson
noise), median score per cell; how small a change on how bright a star the model still
takes for real::

    python bench/ml_eval.py variable-stars [--model BUNDLE] [--fwhm 2.0]

``stack`` bounds what numbers production knows besides the stamps would add: it fits
scikit-learn's ``HistGradientBoostingClassifier`` on one set to the model's logit, the
measured ``|S/N|``, the PSF FWHM at the candidate and the polarity (and, as a control, to
the logit alone), and measures both beside the model on other sets; ``--method
logistic`` fits a logistic regression to those numbers and their products with the logit
instead, a smooth model that does not bin the logit::

    python bench/ml_eval.py stack <fit set> <set> [<set> ...] [--model BUNDLE] [--method logistic]

``ztf-context`` scores ZTF alerts and prints the AUC against ``drb >= 0.5`` by polarity
and by whether the reference has a source under the candidate (``candidate.distnr``
below 1.5 arcsec: variable stars, nuclear transients), and on the alerts where ZTF's two
classifiers agree (``drb`` and ``rb`` on the same side of 0.5) or disagree; beside each
AUC, the AUC of ZTF's own ``rb`` against the same label, for reference::

    python bench/ml_eval.py ztf-context ../shared/data/ztf_alerts_fink_broker \
        ../shared/data/ztf_alerts_kowalski ../shared/data/ztf_alerts_ampel [--model BUNDLE]

``real-pair-sources`` runs the real DECam pairs of the training set without fakes and
groups their candidates by sky position: a source found with several exposures of both
visits changed in the sky, and the builder leaves its candidates out instead of calling
them bogus (``SFFT_DECAM_KNOWN_SOURCES``)::

    python bench/ml_eval.py real-pair-sources --shared-data ../shared/data [--model BUNDLE]

``agreement`` pools sets of the per-alert CSV that ``astrid evaluate --scores-csv``
writes and compares our score with the packets' ``drb``, ``rb`` and ``reliability``
(:func:`astrid.ml.evaluate.score_agreement`), e.g. only the unfiltered ZTF sets::

    python bench/ml_eval.py agreement bench/out/ml_alerts_sets/scores.csv \
        --sets ztf_alerts_fink_broker/raw_2020-01-01 ztf_alerts_ampel
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

FIELD_SEED_DEFAULT = 2024


def _field_seeds(seed: int, n_fields: int) -> set[int]:
    """Seeds of the simulated fields a training set with this seed draws (one pair each)."""
    from astrid.pipeline.training_set import TrainingSetConfig, simulated_pair_specs

    specs = simulated_pair_specs(TrainingSetConfig(seed=seed, n_fields=n_fields, pairs_per_field=1))
    return {s.field_seed for s in specs}


def cmd_build(args: argparse.Namespace) -> int:
    from astrid.pipeline.difference import DifferenceConfig
    from astrid.pipeline.training_set import FakeConfig, TrainingSetConfig, build_training_set

    ours = _field_seeds(args.seed, args.fields)
    default = _field_seeds(FIELD_SEED_DEFAULT, args.check_fields)
    shared = ours & default
    print(
        f"field seeds: {len(ours)} fields of seed {args.seed}, {len(default)} of seed "
        f"{FIELD_SEED_DEFAULT}; in common: {len(shared)}"
    )
    if shared and args.seed != FIELD_SEED_DEFAULT:
        print("refusing: some fields coincide with the default seed's", file=sys.stderr)
        return 1
    suffix = "" if args.star_hosts == "uniform" else f"-{args.star_hosts}-hosts"
    suffix += "-keep-dominated" if args.keep_dominated else ""
    suffix += "-rescaled-score" if args.rescale_score else ""
    difference = DifferenceConfig()
    if args.rescale_score:
        difference = replace(difference, detect=replace(difference.detect, rescale_score=True))
    config = TrainingSetConfig(
        name=f"real-bogus-eval-{args.seed}{suffix}",
        fakes=FakeConfig(
            star_hosts=args.star_hosts,
            dominated_snr=None if args.keep_dominated else FakeConfig().dominated_snr,
        ),
        n_fields=args.fields,
        pairs_per_field=args.pairs_per_field,
        seed=args.seed,
        real_pairs=args.shared_data is not None,
        fractions=(0.0, 0.0, 1.0),
        difference=difference,
    )

    printed: set[int] = set()

    def progress(done: int, total: int, outcome: Any) -> None:
        if (done % 10 == 0 or done == total) and done not in printed:
            printed.add(done)  # cached pairs all report the same count
            print(f"[{done}/{total}] {outcome.group}: {outcome.status[:80]}", flush=True)

    started = time.perf_counter()
    _, manifest = build_training_set(
        config, args.output, shared_data=args.shared_data, workers=args.workers, progress=progress
    )
    keys = (
        "n_examples",
        "n_real",
        "n_bogus",
        "n_pairs",
        "n_pairs_used",
        "n_fakes_injected",
        "n_fakes_detected",
        "n_fakes_dominated",
        "n_ambiguous_dropped",
        "content_sha256",
    )
    for key in keys:
        print(f"{key}: {manifest[key]}")
    print("per_source:", manifest["per_source"])
    reasons: dict[str, int] = {}
    for reason, count in manifest["skipped_pairs"].items():
        short = reason.split(": ", 1)[1].split(":")[0:2]
        reasons[":".join(short)] = reasons.get(":".join(short), 0) + count
    print("skipped pairs by reason:", reasons)
    target = Path(args.output) / f"{config.name}.npz"
    print(f"wrote {target} in {time.perf_counter() - started:.0f} s")
    return 0


def _fmt(m: Any) -> str:
    return (
        f"n={m.n_real}+{m.n_bogus}  AUC {m.auc:.4f}  FNR@1%FPR {m.fnr_at_1pct_fpr:.4f} "
        f"(thr {m.threshold_at_1pct_fpr:.3f})  FPR@1%FNR {m.fpr_at_1pct_fnr:.4f} "
        f"(thr {m.threshold_at_1pct_fnr:.4f})  ECE {m.ece:.4f}"
    )


def _fake_column(part: Any, column: str) -> np.ndarray:
    """A column of the fakes table for every real example, NaN for bogus ones.

    A real example is matched to its fake by field and injected S/N (the set's ``snr``
    column holds the injected S/N for real examples). NaN where no fake matches or the
    set's fakes table lacks the column (older builder versions).
    """
    out = np.full(len(part), np.nan)
    fakes = part.fakes
    if column not in fakes:
        return out
    lookup = {
        (str(g), float(v)): float(m)
        for g, v, m in zip(fakes["group"], fakes["snr"], fakes[column], strict=True)
    }
    for i in np.flatnonzero(part.labels == 1):
        out[i] = lookup.get((str(part.groups[i]), float(part.snr[i])), np.nan)
    return out


def _measured_snr(part: Any) -> np.ndarray:
    """The measured ``|S/N|`` of every example, real ones included.

    A set's ``snr`` column holds the injected S/N for real examples and the measured one
    for bogus ones; a real example's comes from its fake's row in the fakes table
    (builder version 7 on). NaN where no fake matches.
    """
    measured = np.asarray(part.snr, dtype=np.float64).copy()
    real = part.labels == 1
    measured[real] = _fake_column(part, "measured_snr")[real]
    return measured


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch
    from scipy.special import expit

    from astrid.ml.evaluate import classifier_metrics
    from astrid.ml.metrics import (
        expected_calibration_error,
        fnr_at_fpr,
        fpr_at_fnr,
        reliability_curve,
        roc_curve,
    )
    from astrid.ml.serve import Scorer
    from astrid.pipeline.training_set import load_training_set

    torch.set_num_threads(args.threads)
    scorer = Scorer.from_path(args.model) if args.model else Scorer.packaged("real_bogus")
    data = load_training_set(args.dataset, mmap=True)
    part = data.part("test")
    if len(part) != len(data):
        print(f"note: scoring the test split only ({len(part)} of {len(data)} examples)")
    print(
        f"model {scorer.metadata.name} version {scorer.version} "
        f"(T = {scorer.metadata.temperature:.4f}); data set {data.content_hash()[:16]}, "
        f"{len(part)} examples"
    )
    started = time.perf_counter()
    if args.zero_outside is None:
        logits = scorer.logits(part.triplets).astype(np.float64)
    else:
        side = part.triplets.shape[-1]
        if not 0 < args.zero_outside <= side or (side - args.zero_outside) % 2:
            raise SystemExit(f"--zero-outside must be a centred square within {side} px")
        margin = (side - args.zero_outside) // 2
        inputs = scorer.normalise(part.triplets)
        keep = np.zeros(inputs.shape[-2:], dtype=bool)
        keep[margin : side - margin, margin : side - margin] = True
        inputs[..., ~keep] = 0.0
        print(f"pixels outside the centred {args.zero_outside} px square set to 0")
        logits = scorer.logits(inputs, normalised=True).astype(np.float64)
    seconds = time.perf_counter() - started
    raw = expit(logits)
    scores = expit(logits / scorer.metadata.temperature)
    labels = part.labels.astype(int)
    measured = _measured_snr(part)
    selections = {
        "all": np.ones(len(part), bool),
        "simulated": part.source == "simulated",
        "sfft-decam": part.source == "sfft-decam",
        "snr>=10": part.snr >= 10.0,
        "measured snr>=6": measured >= 6.0,
        "measured snr>=10": measured >= 10.0,
        "simulated, snr>=10": (part.source == "simulated") & (part.snr >= 10.0),
        "sfft-decam, snr>=10": (part.source == "sfft-decam") & (part.snr >= 10.0),
        "positive": part.polarity > 0,
        "negative (faded)": part.polarity < 0,
    }
    # Simulated fakes on a cosmic ray, bad column or trail of either epoch (builder version 9
    # on): the stamps show both, and noise-free truth says which.
    on_artefact = _fake_column(part, "on_artefact")
    if not np.all(np.isnan(on_artefact[part.labels == 1])):
        selections["clear of artefacts"] = (part.source == "simulated") & (
            (part.labels == 0) | (on_artefact == 0)
        )
    unmatched = int(np.sum(np.isnan(measured)))
    if unmatched:
        print(f"note: {unmatched} real examples without a measured S/N (left out of 'measured')")
    results: dict[str, Any] = {
        "model": scorer.metadata.name,
        "version": scorer.version,
        "temperature": scorer.metadata.temperature,
        "dataset_sha256": data.content_hash(),
        "scoring_seconds": seconds,
        "metrics": {},
    }
    per: dict[str, Any] = {}
    for name, sel in selections.items():
        y = labels[sel]
        if not 0 < y.sum() < len(y):
            print(f"{name:<22} skipped: one class only")
            continue
        m = classifier_metrics(y, scores[sel], snr=part.snr[sel])
        per[name] = m
        print(f"{name:<22} {_fmt(m)}")
        results["metrics"][name] = m.as_dict()
    ece_raw = expected_calibration_error(raw, labels)
    results["ece_uncalibrated"] = ece_raw
    print(f"ECE before temperature scaling {ece_raw:.4f}, after {per['all'].ece:.4f}")
    # The same threshold for every source: the one at 1 % FPR on the whole set.
    thr = per["all"].threshold_at_1pct_fpr
    for name in ("simulated", "sfft-decam"):
        sel = selections[name]
        real, bogus = sel & (labels == 1), sel & (labels == 0)
        fnr = float(np.mean(scores[real] < thr)) if real.any() else math.nan
        fpr = float(np.mean(scores[bogus] >= thr)) if bogus.any() else math.nan
        results.setdefault("at_global_1pct_fpr_threshold", {})[name] = {"fnr": fnr, "fpr": fpr}
        print(f"at the overall 1%-FPR threshold {thr:.3f}: {name}: FNR {fnr:.4f}, FPR {fpr:.4f}")
    # Where the misses and false positives at that threshold are: by recipe and placement.
    missed = (labels == 1) & (scores < thr)
    passed = (labels == 0) & (scores >= thr)
    n_missed, n_passed = int(missed.sum()), int(passed.sum())
    print(f"at the overall 1%-FPR threshold: {n_missed} missed, {n_passed} bogus pass")
    kinds = np.asarray(data.kind).tolist()
    by_kind: dict[str, dict[str, dict[str, int]]] = {}
    # Misses among bright candidates (measured |S/N| >= 10), where noise is no excuse.
    bright = measured >= 10.0
    for what, chosen, pool in (
        ("missed", missed, labels == 1),
        ("missed, S/N>=10", missed & bright, (labels == 1) & bright),
        ("bogus passing", passed, labels == 0),
    ):
        totals = Counter(k for k, p in zip(kinds, pool, strict=True) if p)
        hits = Counter(k for k, c in zip(kinds, chosen, strict=True) if c)
        for kind, of in sorted(totals.items(), key=lambda item: -hits[item[0]]):
            print(f"  {what:<15} {kind:<24} {hits[kind]:>4} of {of:<5} {hits[kind] / of:.3f}")
        by_kind[what] = {kind: {"n": hits[kind], "of": of} for kind, of in totals.items()}
    results["at_global_1pct_fpr_threshold"]["by_kind"] = by_kind
    on = (labels == 1) & (on_artefact == 1)
    if on.any():
        n_on, n_on_missed = int(on.sum()), int((on & missed).sum())
        print(
            f"  real on a cosmic ray, bad column or trail: {n_on} of {int((labels == 1).sum())}, "
            f"{n_on_missed} of them missed ({n_on_missed / max(n_missed, 1):.0%} of the misses)"
        )
        results["at_global_1pct_fpr_threshold"]["on_artefact"] = {
            "real": n_on,
            "missed": n_on_missed,
        }
    # Completeness table (overall, at the overall 1 %-FPR threshold).
    curve = per["all"].completeness
    assert curve is not None
    rows = []
    print("completeness at the 1%-FPR threshold (real examples, injected S/N):")
    for lo, hi, n, k, c in zip(
        curve.bin_edges[:-1],
        curve.bin_edges[1:],
        curve.n_total,
        curve.n_accepted,
        curve.completeness,
        strict=True,
    ):
        rows.append({"snr_lo": lo, "snr_hi": hi, "n": int(n), "accepted": int(k), "c": c})
        print(f"  S/N {lo:>5.0f}-{hi:<5.0f} n={n:<5} accepted={k:<5} completeness {c:.3f}")
    results["completeness"] = rows
    # Fakes injected vs detected (the detection step's completeness, before any scoring).
    fakes = data.fakes
    if len(fakes.get("snr", ())):
        edges = np.asarray(curve.bin_edges)
        masked = np.asarray(fakes.get("masked", np.zeros(len(fakes["snr"]), bool)), bool)
        detected = np.asarray(fakes["detected"], bool)
        inj = np.histogram(fakes["snr"], edges)[0]
        det = np.histogram(fakes["snr"][detected], edges)[0]
        usable = np.histogram(fakes["snr"][~masked], edges)[0]
        det_usable = np.histogram(fakes["snr"][detected & ~masked], edges)[0]
        results["detection"] = {
            "edges": edges.tolist(),
            "injected": inj.tolist(),
            "detected": det.tolist(),
            "injected_unmasked": usable.tolist(),
            "detected_unmasked": det_usable.tolist(),
        }
        print(
            "detection of injected fakes (before scoring); 'unmasked': fakes whose pixel "
            "is outside the subtraction's mask"
        )
        for lo, hi, a, b, c, d in zip(
            edges[:-1], edges[1:], inj, det, usable, det_usable, strict=True
        ):
            print(
                f"  S/N {lo:>5.0f}-{hi:<5.0f} injected {a:<5} detected {b:<5} {b / max(a, 1):.3f}"
                f"  unmasked {c:<5} detected {d:<5} {d / max(c, 1):.3f}"
            )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.plots:
        _plots(
            Path(args.plots),
            labels,
            scores,
            raw,
            part,
            per,
            selections,
            scorer,
            roc_curve,
            reliability_curve,
            fnr_at_fpr,
            fpr_at_fnr,
        )
    return 0


def _plots(
    folder: Path,
    labels: np.ndarray,
    scores: np.ndarray,
    raw: np.ndarray,
    part: Any,
    per: dict[str, Any],
    selections: dict[str, np.ndarray],
    scorer: Any,
    roc_curve: Any,
    reliability_curve: Any,
    fnr_at_fpr: Any,
    fpr_at_fnr: Any,
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from astrid.ml.metrics import completeness_vs_snr

    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{scorer.metadata.name} v{scorer.version}"

    def figure(size: tuple[float, float]) -> Figure:
        fig = Figure(figsize=size, dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    # ROC: overall, simulated, DECam; log FPR.
    fig = figure((5.2, 4.2))
    ax = fig.add_subplot()
    floor = 1e-4
    for k, name in enumerate(("all", "simulated", "sfft-decam", "snr>=10")):
        if name not in per:
            continue
        sel = selections[name]
        curve = roc_curve(labels[sel], scores[sel])
        label = {"all": "all", "sfft-decam": "real DECam pair", "snr>=10": "S/N >= 10"}.get(
            name, name
        )
        ax.step(
            np.maximum(curve.fpr, floor),
            curve.tpr,
            where="post",
            color=f"C{k}",
            label=f"{label} (AUC {per[name].auc:.3f}, n={per[name].n_real}+{per[name].n_bogus})",
        )
    m = per["all"]
    ax.plot(0.01, 1 - m.fnr_at_1pct_fpr, "o", color="k", label="1% FPR (all)")
    ax.plot(max(m.fpr_at_1pct_fnr, floor), 0.99, "s", color="k", label="1% FNR (all)")
    ax.axvline(0.01, color="0.7", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate (completeness)")
    ax.set_title(f"{tag}, fresh held-out fields", fontsize="medium")
    ax.legend(loc="lower right", fontsize="x-small")
    ax.grid(alpha=0.3)
    fig.savefig(folder / "ml_roc.png")

    # Completeness vs S/N at the overall 1 %-FPR threshold, and the detection step's.
    fig = figure((5.6, 3.8))
    ax = fig.add_subplot()
    thr = m.threshold_at_1pct_fpr
    for k, name in enumerate(("all", "simulated", "sfft-decam")):
        sel = selections[name] & (labels == 1)
        if not sel.any():
            continue
        c = completeness_vs_snr(
            part.snr[sel], scores[sel], threshold=thr, bin_edges=m.completeness.bin_edges
        )
        filled = c.n_total > 0
        centres = np.sqrt(c.bin_edges[:-1] * c.bin_edges[1:])
        label = {"all": "all", "sfft-decam": "real DECam pair"}.get(name, name)
        ax.errorbar(
            centres[filled] * (1 + 0.03 * k),
            c.completeness[filled],
            yerr=c.error[filled],
            fmt="o-",
            capsize=2,
            color=f"C{k}",
            label=label,
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("injected S/N (ideal, in the difference)")
    ax.set_ylabel("fraction of detected fakes accepted")
    ax.set_title(f"{tag}: score >= {thr:.3f} (1% FPR overall)", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(folder / "ml_completeness.png")

    # Reliability before and after temperature scaling.
    fig = figure((8.4, 3.9))
    for k, (probs, title) in enumerate(
        (
            (raw, "before temperature scaling"),
            (scores, f"after (T = {scorer.metadata.temperature:.3f})"),
        )
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        rc = reliability_curve(probs, labels)
        filled = rc.counts > 0
        ece = float(
            np.sum(
                rc.counts[filled] * np.abs(rc.fraction_positive[filled] - rc.mean_predicted[filled])
            )
            / rc.counts.sum()
        )
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="calibrated")
        ax.plot(
            rc.mean_predicted[filled],
            rc.fraction_positive[filled],
            "o-",
            color="C1",
            label="observed",
        )
        for x, y, n in zip(
            rc.mean_predicted[filled], rc.fraction_positive[filled], rc.counts[filled], strict=True
        ):
            ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability of real")
        ax.set_ylabel("observed fraction real")
        ax.set_title(f"{title} (ECE {ece:.3f})", fontsize="medium")
        ax.legend(loc="upper left", fontsize="small")
    fig.savefig(folder / "ml_reliability.png")

    # Score histograms.
    fig = figure((5.6, 3.6))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 41).tolist()
    ax.hist(
        scores[labels == 0],
        bins=bins,
        histtype="step",
        color="C3",
        label=f"bogus ({int((labels == 0).sum())})",
    )
    ax.hist(
        scores[labels == 1],
        bins=bins,
        histtype="step",
        color="C0",
        label=f"real ({int((labels == 1).sum())})",
    )
    ax.axvline(thr, color="0.4", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("calibrated score")
    ax.set_ylabel("candidates")
    ax.set_title(f"{tag}, fresh held-out fields", fontsize="medium")
    ax.legend(fontsize="small", loc="upper center")
    fig.savefig(folder / "ml_scores.png")
    print(f"wrote ml_roc.png, ml_completeness.png, ml_reliability.png, ml_scores.png to {folder}")


def cmd_real_pair_sources(args: argparse.Namespace) -> int:
    """Candidates of the real DECam pairs without fakes, grouped by sky position."""
    import warnings

    from astropy.coordinates import SkyCoord

    from astrid.errors import AstridError
    from astrid.pipeline.training_set import (
        SFFT_DECAM_KNOWN_SOURCES,
        TrainingSetConfig,
        real_pair_baseline,
        real_pair_specs,
    )

    scorer = _scorer(args)
    specs = [s for s in real_pair_specs(TrainingSetConfig(real_runs=1)) if s.group == "sfft-decam"]
    found: list[tuple[str, str, float, float, int, float, float]] = []
    for spec in specs:
        sci, ref = Path(spec.science).stem, Path(spec.reference).stem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _, _, result = real_pair_baseline(spec, args.shared_data)
            except AstridError as exc:  # a refused pair is reported, not fatal
                print(f"{sci} - {ref}: {type(exc).__name__}: {exc}")
                continue
        c, cut = result.candidates, result.cutouts
        scores = scorer.score(np.stack([cut.science, cut.reference, cut.difference], axis=1))
        print(f"{sci} - {ref}: {len(c)} candidates")
        for k in range(len(c)):
            found.append(
                (
                    sci,
                    ref,
                    float(c["ra"][k].value),
                    float(c["dec"][k].value),
                    int(c["polarity"][k]),
                    float(c["snr"][k]),
                    float(scores[k]),
                )
            )
    if not found:
        return 1
    sky = SkyCoord([f[2] for f in found], [f[3] for f in found], unit="deg")
    known = SkyCoord(*np.asarray(SFFT_DECAM_KNOWN_SOURCES).T, unit="deg")
    left = set(range(len(found)))
    print("sky positions with candidates in more than one pair (1 arcsec), most pairs first:")
    groups = []
    while left:
        i = min(left)
        close = sky.separation(sky[i]).arcsec < 1.0
        near = [j for j in sorted(left) if close[j]]
        left -= set(near)
        groups.append(near)
    for near in sorted(groups, key=len, reverse=True):
        pairs = {(found[j][0], found[j][1]) for j in near}
        if len(pairs) < 2:
            continue
        science = {found[j][0] for j in near}
        reference = {found[j][1] for j in near}
        centre = SkyCoord(
            np.mean([found[j][2] for j in near]), np.mean([found[j][3] for j in near]), unit="deg"
        )
        flag = "  KNOWN SOURCE" if np.min(centre.separation(known).arcsec) < 1.0 else ""
        snr = [abs(found[j][5]) for j in near]
        print(
            f"  RA {centre.ra.deg:.6f} Dec {centre.dec.deg:.6f}: {len(pairs)} pairs, "
            f"{len(science)} science and {len(reference)} reference exposures, polarity "
            f"{sorted({found[j][4] for j in near})}, |S/N| {min(snr):.1f}-{max(snr):.1f}, "
            f"score {min(found[j][6] for j in near):.3f}-{max(found[j][6] for j in near):.3f}"
            f"{flag}"
        )
    print(
        "A source found with several science AND several reference exposures is in the sky: "
        "no artefact of one exposure repeats across independent exposures of both visits."
    )
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from astropy.table import Table

    from astrid.ml.evaluate import score_agreement

    table = Table.read(args.scores_csv, format="ascii.csv")
    sets = np.asarray(table["set"]).astype(str)
    chosen = np.zeros(len(table), bool)
    for prefix in args.sets:
        chosen |= np.char.startswith(sets, prefix)
    ours = np.asarray(table["score"], dtype=np.float64)
    print(f"{int(chosen.sum())} alerts from {sorted(set(sets[chosen].tolist()))}")
    for name in ("drb", "rb", "reliability"):
        column = table[name]
        theirs = np.asarray(
            column.filled(np.nan) if hasattr(column, "filled") else column, dtype=np.float64
        )
        sel = chosen & np.isfinite(theirs)
        if sel.sum() < 2:
            continue
        a = score_agreement(ours[sel], theirs[sel], name=name)
        print(
            f"  {name:<12} n={a.n:<4} positive={a.n_positive:<4} AUC {a.auc:.4f}  "
            f"Spearman {a.spearman:+.3f} (p {a.spearman_p:.2g})"
        )
        pos, neg = sel & (theirs >= 0.5), sel & (theirs < 0.5)
        print(
            f"  {'':<12} ours >= 0.5 on {name} >= 0.5: {int(np.sum(ours[pos] >= 0.5))}/"
            f"{int(pos.sum())}; ours < 0.5 on {name} < 0.5: {int(np.sum(ours[neg] < 0.5))}/"
            f"{int(neg.sum())}"
        )
    for name in sorted(set(sets[chosen].tolist())):
        sel = sets == name
        print(
            f"  {name:<42} n={int(sel.sum()):<4} median score {np.median(ours[sel]):.3f}  "
            f"score >= 0.5: {np.mean(ours[sel] >= 0.5):.2f}"
        )
    return 0


def cmd_ztf_context(args: argparse.Namespace) -> int:
    from astrid.ml.alerts import read_alerts
    from astrid.ml.evaluate import alert_input_triplets, alert_is_negative
    from astrid.ml.metrics import roc_auc

    scorer = _scorer(args)
    alerts, seen = [], set()
    for a in read_alerts(args.paths):
        if a.survey == "ZTF" and "drb" in a.scores and a.alert_id not in seen:
            seen.add(a.alert_id)  # one alert shipped by two brokers counts once
            alerts.append(a)
    ours = scorer.score(alert_input_triplets(alerts))
    real = np.array([a.scores["drb"] >= 0.5 for a in alerts])
    negative = np.array([alert_is_negative(a) for a in alerts])
    # candidate.distnr: distance to the nearest source in the reference image, arcsec
    distnr = np.array(
        [
            np.inf if a.detection.get("distnr") is None else float(a.detection["distnr"])
            for a in alerts
        ]
    )
    distnr[distnr < 0] = np.inf  # -999: no reference source
    on_source = distnr < args.on_source
    rb = np.array([a.scores.get("rb", np.nan) for a in alerts], dtype=np.float64)
    agree = np.isfinite(rb) & ((rb >= 0.5) == real)
    print(
        f"{scorer.model_name} version {scorer.model_version}: {len(alerts)} ZTF alerts with "
        f"drb; on a source: the reference has a source within {args.on_source:g} arcsec "
        "(candidate.distnr); 'rb AUC': ZTF's own random-forest score against the same "
        "label, what a classifier trained on ZTF's own data reaches on this proxy"
    )
    print(
        f"{'subset':<26} {'alerts':>6} {'drb real':>8} {'AUC':>6} {'rb AUC':>6} "
        f"{'ours>=0.5 | real':>17} {'ours<0.5 | bogus':>17}"
    )
    subsets = {
        "all": np.ones(len(alerts), bool),
        "positive": ~negative,
        "negative": negative,
        "on a source": on_source,
        "not on a source": ~on_source,
        "on a source, positive": on_source & ~negative,
        "on a source, negative": on_source & negative,
        "drb and rb agree": agree,
        "drb and rb disagree": np.isfinite(rb) & ~agree,
    }
    for name, sel in subsets.items():
        r, b = sel & real, sel & ~real
        auc = roc_auc(real[sel], ours[sel]) if r.any() and b.any() else float("nan")
        has_rb = sel & np.isfinite(rb)
        rb_auc = (
            roc_auc(real[has_rb], rb[has_rb])
            if (has_rb & real).any() and (has_rb & ~real).any()
            else float("nan")
        )
        print(
            f"{name:<26} {int(sel.sum()):>6} {int(r.sum()):>8} {auc:>6.3f} {rb_auc:>6.3f} "
            f"{np.mean(ours[r] >= 0.5) if r.any() else np.nan:>17.2f} "
            f"{np.mean(ours[b] < 0.5) if b.any() else np.nan:>17.2f}"
        )
    return 0


def _gaussian_psf(rng: np.random.Generator, fwhm: float) -> np.ndarray:
    """A unit-sum Gaussian PSF on a 63 x 63 stamp, centred within half a pixel of (31, 31)."""
    yy, xx = np.mgrid[:63, :63]
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    cx, cy = 31.0 + rng.uniform(-0.5, 0.5, 2)
    psf = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * sigma**2))
    return psf / psf.sum()


def _scorer(args: argparse.Namespace) -> Any:
    import torch

    from astrid.ml.serve import Scorer

    torch.set_num_threads(args.threads)
    return Scorer.from_path(args.model) if args.model else Scorer.packaged("real_bogus")


def cmd_point_sources(args: argparse.Namespace) -> int:
    scorer = _scorer(args)
    rng = np.random.default_rng(args.seed)
    snrs = (8.0, 15.0, 30.0, 100.0)
    print(
        f"{scorer.model_name} version {scorer.model_version}: median score of {args.n} stamps "
        "per cell, lone Gaussian point source, unit noise"
    )
    print(f"{'FWHM px':>8} " + " ".join(f"{'S/N ' + format(v, 'g'):>8}" for v in snrs))
    for fwhm in (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0):
        row = []
        for snr in snrs:
            stamps = np.empty((args.n, 3, 63, 63), np.float32)
            for k in range(args.n):
                psf = _gaussian_psf(rng, fwhm)
                source = snr / np.sqrt(np.sum(psf**2)) * psf  # PSF-fit S/N in unit noise
                science = source + rng.normal(size=psf.shape)
                reference = 0.5 * rng.normal(size=psf.shape)
                stamps[k] = (science, reference, science - reference)
            row.append(float(np.median(scorer.score(stamps))))
        print(f"{fwhm:>8.1f} " + " ".join(f"{v:>8.3f}" for v in row))
    return 0


def cmd_variable_stars(args: argparse.Namespace) -> int:
    scorer = _scorer(args)
    rng = np.random.default_rng(args.seed)
    snrs = (8.0, 15.0, 30.0, 100.0)
    stars = (0.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
    gain = 10.0  # source counts per unit of sky variance: Poisson noise of the star
    print(
        f"{scorer.model_name} version {scorer.model_version}: median score of {args.n} stamps "
        f"per cell; a star (PSF-fit S/N in the reference, before any change) that "
        "brightened (+) or faded (-, the reference holds the star plus the change) "
        f"by a change of the given difference S/N; Gaussian PSF FWHM {args.fwhm:g} px; sky "
        "noise 1 in the science, 0.5 in the reference, plus the star's Poisson noise"
    )
    header = " ".join(f"{sign}S/N {v:g}".rjust(8) for sign in "+-" for v in snrs)
    print(f"{'star S/N':>9} {header}")
    for star_snr in stars:
        row = []
        for sign in (1.0, -1.0):
            for snr in snrs:
                stamps = np.empty((args.n, 3, 63, 63), np.float32)
                for k in range(args.n):
                    psf = _gaussian_psf(rng, args.fwhm)
                    star = star_snr / np.sqrt(np.sum(psf**2 / 0.25)) * psf
                    var_sci = 1.0 + star / gain
                    var_ref = 0.25 * (1.0 + star / gain)
                    change = snr / np.sqrt(np.sum(psf**2 / (var_sci + var_ref))) * psf
                    science = star + (change if sign > 0 else 0.0)
                    reference = star + (change if sign < 0 else 0.0)
                    science = science + rng.normal(size=psf.shape) * np.sqrt(var_sci)
                    reference = reference + rng.normal(size=psf.shape) * np.sqrt(var_ref)
                    stamps[k] = (science, reference, science - reference)
                row.append(float(np.median(scorer.score(stamps))))
        print(f"{star_snr:>9g} " + " ".join(f"{v:>8.3f}" for v in row))
    return 0


def _stack_features(
    part: Any, logits: np.ndarray, logit_only: bool, *, smooth: bool = False
) -> np.ndarray:
    """Columns of the stacked classifier: the model's logit, then what production knows.

    The measured ``|S/N|`` (log10; NaN where a real example has none, which the boosted
    trees route on their own), the PSF FWHM at the candidate in pixels and the polarity.
    ``smooth`` (for a logistic regression) fills a missing S/N with 5, adds a column that
    flags it, and adds the products of the logit with each number and the squares of the
    logit and of the log S/N, so that a linear model can bend the threshold.
    """
    if logit_only:
        return logits[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_snr = np.log10(_measured_snr(part))
    fwhm = np.asarray(part.fwhm, np.float64)
    polarity = np.asarray(part.polarity, np.float64)
    if not smooth:
        return np.column_stack([logits, log_snr, fwhm, polarity])
    missing = np.isnan(log_snr)
    log_snr = np.where(missing, np.log10(5.0), log_snr)
    return np.column_stack(
        [
            logits,
            log_snr,
            fwhm,
            polarity,
            missing,
            logits * log_snr,
            logits * fwhm,
            logits * polarity,
            log_snr * polarity,
            logits**2,
            log_snr**2,
        ]
    )


def cmd_stack(args: argparse.Namespace) -> int:
    """Fit a classifier on a model's logit plus candidate numbers; measure it on other sets."""
    import torch
    from scipy.special import expit
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from astrid.ml.evaluate import classifier_metrics
    from astrid.ml.serve import Scorer
    from astrid.pipeline.training_set import load_training_set

    torch.set_num_threads(args.threads)
    scorer = Scorer.from_path(args.model) if args.model else Scorer.packaged("real_bogus")
    print(f"model {scorer.metadata.name} version {scorer.version}")

    def scored(path: str) -> tuple[Any, np.ndarray, str]:
        data = load_training_set(path, mmap=True)
        part = data.part("test")
        logits = scorer.logits(part.triplets).astype(np.float64)
        return part, logits, data.content_hash()

    fit_part, fit_logits, fit_hash = scored(args.fit)
    print(f"fit set {fit_hash[:12]}: {len(fit_part)} examples, {int(fit_part.labels.sum())} real")
    smooth = args.method == "logistic"
    fitted = {}
    for name, logit_only in (("logit only", True), ("stacked", False)):
        clf: Any
        if smooth:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        else:
            clf = HistGradientBoostingClassifier(
                max_iter=args.iterations, learning_rate=0.05, random_state=args.seed
            )
        features = _stack_features(fit_part, fit_logits, logit_only, smooth=smooth)
        clf.fit(features, fit_part.labels.astype(int))
        fitted[name] = (clf, logit_only)
    results: dict[str, Any] = {"fit_sha256": fit_hash, "method": args.method, "sets": {}}
    header = f"{'set':<14} {'scores':<11} {'AUC':>7} {'missed@1%FPR':>13} {'FPR@1%missed':>13}"
    print(header + f" {'missed@1%FPR, S/N>=10':>22}")
    for path in args.sets:
        part, logits, content = scored(path)
        labels = part.labels.astype(int)
        bright = _measured_snr(part) >= 10.0
        rows = {"model": expit(logits)}
        for name, (clf, logit_only) in fitted.items():
            features = _stack_features(part, logits, logit_only, smooth=smooth)
            rows[name] = clf.predict_proba(features)[:, 1]
        results["sets"][content] = {}
        for name, scores in rows.items():
            m = classifier_metrics(labels, scores)
            mb = classifier_metrics(labels[bright], scores[bright])
            results["sets"][content][name] = {
                "auc": m.auc,
                "fnr_at_1pct_fpr": m.fnr_at_1pct_fpr,
                "fpr_at_1pct_fnr": m.fpr_at_1pct_fnr,
                "fnr_at_1pct_fpr_snr10": mb.fnr_at_1pct_fpr,
            }
            print(
                f"{content[:12]:<14} {name:<11} {m.auc:>7.4f} {m.fnr_at_1pct_fpr:>13.2%} "
                f"{m.fpr_at_1pct_fnr:>13.2%} {mb.fnr_at_1pct_fpr:>22.2%}"
            )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the fresh evaluation set")
    b.add_argument("output", help="folder of the set (and its per-pair cache)")
    b.add_argument("--seed", type=int, default=9001)
    b.add_argument("--fields", type=int, default=40)
    b.add_argument("--pairs-per-field", type=int, default=3)
    b.add_argument("--shared-data", default=None, help="shared data folder (real DECam pair)")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--check-fields", type=int, default=1000, help="default-seed fields to compare")
    b.add_argument(
        "--star-hosts",
        choices=("uniform", "magnitude"),
        default="uniform",
        help="hosts of fakes on stars (FakeConfig.star_hosts)",
    )
    b.add_argument(
        "--keep-dominated",
        action="store_true",
        help="label real the candidates that something else at a fake's spot outweighs "
        "(FakeConfig.dominated_snr=None, the rule of builder versions up to 6)",
    )
    b.add_argument(
        "--rescale-score",
        action="store_true",
        help="detect on the score divided by its measured robust noise "
        "(DetectConfig.rescale_score), so that 5 sigma counts the noise the pair has",
    )
    b.set_defaults(func=cmd_build)
    r = sub.add_parser(
        "real-pair-sources",
        help="candidates of the real DECam pairs without fakes, grouped by sky position",
    )
    r.add_argument("--shared-data", default="../shared/data", help="shared data folder")
    r.add_argument("--model", default=None, help="a bundle folder [default: the packaged model]")
    r.add_argument("--threads", type=int, default=2)
    r.set_defaults(func=cmd_real_pair_sources)
    e = sub.add_parser("evaluate", help="score the set and write metrics and plots")
    e.add_argument("dataset", help="the .npz written by build")
    e.add_argument("--model", default=None, help="a bundle folder [default: the packaged model]")
    e.add_argument("--plots", default=None, help="folder of the ml_*.png plots")
    e.add_argument("-o", "--output", default=None, help="metrics as JSON")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument(
        "--zero-outside",
        type=int,
        default=None,
        metavar="C",
        help="set the normalised pixels outside the centred C x C square to 0 (the "
        "background) before scoring: how much the stamp's outer ring tells the model",
    )
    e.set_defaults(func=cmd_evaluate)
    a = sub.add_parser("agreement", help="agreement with survey scores on chosen alert sets")
    a.add_argument("scores_csv", help="CSV written by astrid evaluate --scores-csv")
    a.add_argument("--sets", nargs="+", required=True, help="set names (prefixes) to pool")
    a.set_defaults(func=cmd_agreement)
    ps = sub.add_parser("point-sources", help="scores of lone point sources by FWHM and S/N")
    ps.add_argument("--model", default=None, help="a bundle folder [default: the packaged model]")
    ps.add_argument("--n", type=int, default=64, help="stamps per cell")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--threads", type=int, default=2)
    ps.set_defaults(func=cmd_point_sources)
    vs = sub.add_parser("variable-stars", help="scores of a star that brightened or faded")
    vs.add_argument("--model", default=None, help="a bundle folder [default: the packaged model]")
    vs.add_argument("--n", type=int, default=64, help="stamps per cell")
    vs.add_argument("--fwhm", type=float, default=2.0, help="PSF FWHM, pixels")
    vs.add_argument("--seed", type=int, default=0)
    vs.add_argument("--threads", type=int, default=2)
    vs.set_defaults(func=cmd_variable_stars)
    st = sub.add_parser(
        "stack", help="bound what the measured S/N, PSF FWHM and polarity add to a model"
    )
    st.add_argument("fit", help="set the stacked classifier is fitted on (.npz of build)")
    st.add_argument("sets", nargs="+", help="sets it is measured on")
    st.add_argument("--model", default=None, help="a bundle folder [default: the packaged model]")
    st.add_argument(
        "--method",
        choices=("boosted", "logistic"),
        default="boosted",
        help="gradient-boosted trees, or a logistic regression with the logit's products",
    )
    st.add_argument("--iterations", type=int, default=200, help="boosting iterations")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("-o", "--output", default=None, help="metrics as JSON")
    st.add_argument("--threads", type=int, default=2)
    st.set_defaults(func=cmd_stack)
    zc = sub.add_parser("ztf-context", help="AUC against drb by polarity and host")
    zc.add_argument("paths", nargs="+", help="ZTF alert files or folders")
    zc.add_argument("--model", default=None, help="a bundle folder [default: the packaged model]")
    zc.add_argument("--on-source", type=float, default=1.5, help="distnr limit, arcsec")
    zc.add_argument("--threads", type=int, default=2)
    zc.set_defaults(func=cmd_ztf_context)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
