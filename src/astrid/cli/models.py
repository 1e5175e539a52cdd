"""Real/bogus models on the command line: train, evaluate, manage versions, score alerts.

``astrid train`` builds (or loads) the training set, trains the triplet CNN and the
heat-map U-Net, measures them on held-out fields, logs both runs to MLflow and registers
the CNN as the ``challenger``. ``astrid evaluate`` measures a model on the held-out set
and on real alert packets. ``astrid models list|promote|rollback|export|combine`` manage the
registered versions (``promote`` makes the challenger the ``champion``). ``astrid
score-alerts`` scores alert packets with the model shipped in the package, or another
bundle.

MLflow keeps everything in ``<data-dir>/mlflow`` (a SQLite file and an artifact folder);
training sets live in ``<data-dir>/training``.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, cast

import typer

from astrid.cli.context import DATA_DIR_OPTION
from astrid.cli.errors import friendly_errors

__all__ = [
    "DEFAULT_MODEL_NAME",
    "evaluate",
    "models_app",
    "score_alerts",
    "train",
]

DEFAULT_MODEL_NAME = "real_bogus"
"""Registered (and packaged) name of the production real/bogus model."""

models_app = typer.Typer(
    name="models",
    help="Registered real/bogus models: list versions, promote, roll back, export.",
    no_args_is_help=True,
)

_NAME_OPTION = typer.Option(DEFAULT_MODEL_NAME, "--name", help="Registered model name.")


class _StarHosts(StrEnum):
    """``FakeConfig.star_hosts``: how the hosts of fakes on stars are drawn."""

    uniform = "uniform"
    magnitude = "magnitude"


class _OnArtefact(StrEnum):
    """``FakeConfig.on_artefact``: the label of a fake on a simulated artefact."""

    real = "real"
    ambiguous = "ambiguous"


class _EmaSchedule(StrEnum):
    """``TrainConfig.ema_schedule``: whose validation loss the schedule follows."""

    average = "average"
    raw = "raw"


def _data_dir(data_dir: Path | None) -> Path:
    from astrid.cli.context import load_settings

    return Path(load_settings(data_dir=data_dir).data_dir)


def _registry(data_dir: Path | None) -> Any:
    from astrid.ml.registry import ModelRegistry, RegistryConfig

    return ModelRegistry(RegistryConfig.local(_data_dir(data_dir) / "mlflow"))


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def _model_label(meta: Any) -> str:
    """``name vVERSION (weights sha256 prefix)`` of a bundle's metadata, for run parameters."""
    return f"{meta.name} v{meta.version} ({meta.weights_sha256[:12]})"


def _bundle_label(path: Path) -> str:
    """:func:`_model_label` of a bundle folder."""
    from astrid.ml.serve import METADATA_FILE, ModelMetadata

    return _model_label(ModelMetadata.from_json((path / METADATA_FILE).read_text(encoding="utf-8")))


def _metric_lines(title: str, rows: dict[str, Any]) -> list[str]:
    lines = [title]
    for name, m in rows.items():
        lines.append(
            f"  {name:<28} n={m.n_real}+{m.n_bogus}  AUC {m.auc:.4f}  "
            f"FNR@1%FPR {m.fnr_at_1pct_fpr:.4f}  FPR@1%FNR {m.fpr_at_1pct_fnr:.4f}  "
            f"ECE {m.ece:.3f}"
        )
    return lines


@friendly_errors
def train(
    data_dir: Path | None = DATA_DIR_OPTION,
    dataset: Path | None = typer.Option(
        None,
        "--dataset",
        help="Train on this training-set .npz instead of building one in <data-dir>/training.",
    ),
    shared_data: Path | None = typer.Option(
        None,
        "--shared-data",
        envvar="ASTRID_SHARED_DATA",
        help="Shared real-data folder: its DECam pair gets fakes too (env ASTRID_SHARED_DATA; "
        "default: simulations only).",
    ),
    fields: int = typer.Option(50, "--fields", min=3, help="Simulated fields to build."),
    pairs_per_field: int = typer.Option(3, "--pairs-per-field", min=1, help="Pairs per field."),
    workers: int = typer.Option(2, "--workers", min=1, help="Processes building pairs."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads for training."),
    epochs: int = typer.Option(25, "--epochs", min=1, help="Most epochs of the CNN."),
    stem_channels: int = typer.Option(16, "--stem-channels", min=1, help="CNN stem channels."),
    block_channels: str = typer.Option(
        "16,32,128,128", "--block-channels", help="CNN block channels, comma-separated."
    ),
    hidden: int = typer.Option(32, "--hidden", min=1, help="Units of the CNN head's dense layer."),
    centre_window: int = typer.Option(
        1,
        "--centre-window",
        min=0,
        help="Side of the central window of the CNN's last feature map pooled for the "
        "head beside the whole map (0: whole map only).",
    ),
    crop: int = typer.Option(
        47,
        "--crop",
        min=0,
        help="Side in pixels of the centred square of each stamp the CNN looks at "
        "(0: the whole stamp); smaller is faster. The defaults, 47 px and a centre "
        "window of 1, are those of versions 10-12 (version 12 is wider: "
        "--block-channels 32,32,128,128 --hidden 64 --epochs 40).",
    ),
    input_stretch: float = typer.Option(
        0.0,
        "--input-stretch",
        min=0.0,
        help="Softening s, in noise units, of s * asinh(x / s) applied to the CNN's inputs "
        "(linear near the background, logarithmic for bright pixels); 0: none.",
    ),
    unet: bool = typer.Option(True, "--unet/--no-unet", help="Also train the U-Net to compare."),
    name: str = _NAME_OPTION,
    plots: Path | None = typer.Option(
        None, "--plots", help="Folder for the PNG plots (default <data-dir>/training/plots)."
    ),
    country: str = typer.Option(
        "FRA", "--country", help="ISO 3166 alpha-3 country of the electricity mix (emissions)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the training runs."),
    patience: int | None = typer.Option(
        None,
        "--patience",
        min=1,
        help="Epochs without a lower validation loss before the CNN stops (default: "
        "RealBogusConfig's).",
    ),
    plateau_patience: int | None = typer.Option(
        None,
        "--plateau-patience",
        min=1,
        help="Epochs without a lower validation loss before the CNN's learning rate is "
        "cut (default: RealBogusConfig's).",
    ),
    ema_decay: float | None = typer.Option(
        None,
        "--ema-decay",
        min=0.0,
        max=1.0,
        help="Validate and keep an exponential moving average of the CNN's weights, "
        "updated after every step with this decay (e.g. 0.999; default: "
        "RealBogusConfig's, none).",
    ),
    ema_schedule: _EmaSchedule | None = typer.Option(
        None,
        "--ema-schedule",
        help="With --ema-decay, whose validation loss early stopping and learning-rate "
        "cuts follow: 'average' (the averaged weights') or 'raw' (the raw weights', the "
        "schedule of a run without the average; the best averaged weights are kept). "
        "Default: RealBogusConfig's, 'average'.",
    ),
    time_reverse: float | None = typer.Option(
        None,
        "--time-reverse",
        min=0.0,
        max=1.0,
        help="Share of the CNN's training triplets replaced by their time reverse "
        "(science and reference swapped, difference negated, label kept; default: "
        "RealBogusConfig's, none).",
    ),
    star_hosts: _StarHosts = typer.Option(
        _StarHosts.uniform,
        "--star-hosts",
        help="Hosts of the fakes on stars: uniform (each visible star equally likely) or "
        "magnitude (drawn uniformly in magnitude: more bright hosts).",
    ),
    keep_dominated: bool = typer.Option(
        False,
        "--keep-dominated",
        help="Label real the candidates on a fake that something else at its spot (a "
        "star's residual, a dipole lobe) outweighs; by default they are left out "
        "(FakeConfig.dominated_snr).",
    ),
    fakes_on_artefacts: _OnArtefact = typer.Option(
        _OnArtefact.real,
        "--fakes-on-artefacts",
        help="Label of the candidates on a simulated fake with a cosmic ray, bad column "
        "or satellite trail of either epoch within 1 FWHM: real (as any fake) or "
        "ambiguous (left out of the set; FakeConfig.on_artefact).",
    ),
    fields_seed: int | None = typer.Option(
        None,
        "--fields-seed",
        help="Seed the simulated fields of the training set are drawn from; another seed "
        "gives other fields (default: the builder's, 2024).",
    ),
    teacher: Path | None = typer.Option(
        None,
        "--teacher",
        exists=True,
        file_okay=False,
        help="Model bundle folder whose scores of the training triplets are mixed into "
        "the CNN's targets (knowledge distillation); validation uses the labels.",
    ),
    teacher_weight: float = typer.Option(
        0.5,
        "--teacher-weight",
        min=0.0,
        max=1.0,
        help="Share of the teacher's score in each training target, above 0.",
    ),
    normalised_dir: Path | None = typer.Option(
        None,
        "--normalised-dir",
        file_okay=False,
        help="Write the normalised stamps of each split to .npy files in this folder and "
        "map them from there instead of holding them in memory (for sets larger than "
        "the memory; the files are about the size of the set).",
    ),
    build_only: bool = typer.Option(
        False,
        "--build-only",
        help="Build (or complete from the cache) the training set, write it and stop; "
        "train later with --dataset, which maps its stamps from the file instead of "
        "holding them in memory.",
    ),
) -> None:
    """Build the training set, train the CNN (and U-Net), register the CNN as challenger.

    The training set (fakes injected into simulated and real pairs, imperfect pairs for
    bogus candidates, split by field) is cached pair by pair, so a second run only trains.
    Both models are measured on the test fields, which no model saw; the CNN's bundle,
    model card, metrics, plots, dataset hash and training energy go to MLflow.
    """
    from dataclasses import replace

    from astrid.ml.registry import ModelCardInfo
    from astrid.pipeline.real_bogus import RealBogusConfig, train_real_bogus
    from astrid.pipeline.training_set import (
        FakeConfig,
        TrainingSetConfig,
        build_training_set,
        load_training_set,
    )

    if teacher is not None and teacher_weight <= 0:
        raise typer.BadParameter("--teacher-weight must be above 0 when a teacher is given")
    root = _data_dir(data_dir)
    out = root / "training"
    known_hash: str | None = None  # the content hash of a set built here, from its manifest
    if ema_schedule is not None and ema_decay is None:
        raise typer.BadParameter(
            "needs --ema-decay: there is no average to schedule", param_hint="--ema-schedule"
        )
    if dataset is not None:
        if (
            star_hosts is not _StarHosts.uniform
            or keep_dominated
            or fakes_on_artefacts is not _OnArtefact.real
        ):
            typer.echo(
                "--star-hosts, --keep-dominated and --fakes-on-artefacts apply to a set "
                "being built; --dataset is used as is",
                err=True,
            )
        if build_only:
            raise typer.BadParameter("--build-only builds a set; it takes no --dataset")
        training_set = load_training_set(dataset, mmap=True)
        typer.echo(f"loaded {dataset}: {len(training_set)} examples", err=True)
    else:
        config = TrainingSetConfig(
            name=f"real-bogus-{fields}x{pairs_per_field}"
            + ("" if fields_seed is None else f"-seed{fields_seed}")
            + ("" if star_hosts is _StarHosts.uniform else f"-{star_hosts.value}-hosts")
            + ("-keep-dominated" if keep_dominated else "")
            + ("" if fakes_on_artefacts is _OnArtefact.real else "-artefacts-ambiguous"),
            n_fields=fields,
            pairs_per_field=pairs_per_field,
            fakes=FakeConfig(
                star_hosts=cast(Literal["uniform", "magnitude"], star_hosts.value),
                dominated_snr=None if keep_dominated else FakeConfig().dominated_snr,
                on_artefact=cast(Literal["real", "ambiguous"], fakes_on_artefacts.value),
            ),
        )
        if fields_seed is not None:
            config = replace(config, seed=fields_seed)

        def progress(done: int, total: int, outcome: Any) -> None:
            typer.echo(f"[{done}/{total}] {outcome.group}: {outcome.status[:100]}", err=True)

        training_set, manifest = build_training_set(
            config, out, shared_data=shared_data, workers=workers, progress=progress
        )
        typer.echo(
            f"training set {config.name}: {manifest['n_examples']} examples "
            f"({manifest['n_real']} real, {manifest['n_bogus']} bogus), "
            f"sha256 {manifest['content_sha256']}",
            err=True,
        )
        written = out / f"{config.name}.npz"
        if build_only:
            typer.echo(f"wrote {written}")
            return
        # Train from the written file with its stamps mapped, not from the set in memory:
        # normalising for training makes a second copy of the stamps.
        del training_set
        training_set = load_training_set(written, mmap=True)
        known_hash = str(manifest["content_sha256"])
    plots_dir = plots if plots is not None else out / "plots"
    base = RealBogusConfig()
    blocks = tuple(int(c) for c in block_channels.split(",") if c.strip())
    # Schedule options left out keep RealBogusConfig's values.
    schedule: dict[str, Any] = {
        "patience": patience,
        "plateau_patience": plateau_patience,
        "time_reverse_probability": time_reverse,
        "ema_decay": ema_decay,
        "ema_schedule": None if ema_schedule is None else ema_schedule.value,
    }
    cfg = replace(
        base,
        cnn=replace(
            base.cnn,
            stem_channels=stem_channels,
            block_channels=blocks,
            hidden=hidden,
            centre_window=centre_window,
            crop=crop,
            input_stretch=input_stretch,
        ),
        cnn_training=replace(
            base.cnn_training,
            max_epochs=epochs,
            seed=seed,
            **{key: value for key, value in schedule.items() if value is not None},
        ),
        unet_training=replace(base.unet_training, seed=seed),
        unet=base.unet if unet else None,
        threads=threads,
        country_iso_code=country,
        teacher=None if teacher is None else str(teacher),
        teacher_weight=teacher_weight,
        normalised_dir=None if normalised_dir is None else str(normalised_dir),
    )
    outcome = train_real_bogus(
        training_set,
        config=cfg,
        plots_dir=plots_dir,
        log=lambda s: typer.echo(s, err=True),
        dataset_sha256=known_hash,
    )
    cnn = outcome.cnn
    metrics = cnn.test.as_dict("test_")
    for source, m in cnn.test_by_source.items():
        metrics.update(m.as_dict(f"test_{source.replace('>=', '_ge_')}_"))
    params: dict[str, Any] = {
        "architecture": "TripletCnn",
        "teacher": "none" if teacher is None else _bundle_label(teacher),
        "teacher_weight": teacher_weight if teacher is not None else 0.0,
        "n_parameters": cnn.n_parameters,
        "best_epoch": cnn.best_epoch,
        "epochs_run": cnn.epochs_run,
        "temperature": round(cnn.temperature, 6),
        **{f"train_{k}": v for k, v in vars(cfg.cnn_training).items()},
        **{f"model_{k}": v for k, v in vars(cfg.cnn).items()},
        **{f"examples_{k}": v for k, v in outcome.counts.items()},
    }
    card = ModelCardInfo(
        data=(
            "Candidates detected and cut out by AstrID's pair pipeline (ZOGY) on simulated "
            "pairs (ZTF-, DECam-, Rubin-like and generic detectors, PSF FWHM ~1.2-6 px) and "
            "on the real DECam pair of the sfft test data. Real: fakes injected before "
            "subtraction into the science (positive) or the reference (negative), isolated, "
            "on galaxies or on stars, matched within 1 FWHM (from builder version 7, unless "
            "built with --keep-dominated, a match that a star's residual or another artefact "
            "at the spot outweighs is left out). Bogus: everything else detected "
            "on simulated pairs without transients, with cosmic rays, saturated stars, "
            "unmasked bad columns, satellite trails, 0.3-1 px misalignment and PSF mismatch, "
            "and on the real pair (from builder version 8 without its source that changed "
            "between the visits). The builder version is in the set's manifest. Split by "
            "field; the test split "
            f"holds fields never trained on. Counts: {outcome.counts}."
        )
    )
    registry = _registry(data_dir)
    version = registry.register(
        cnn.model,
        name=name,
        temperature=cnn.temperature,
        params=params,
        metrics=_finite(metrics),
        plots=[p for p in outcome.plots if "unet" not in p.name],
        dataset_sha256=outcome.dataset_sha256,
        energy=cnn.energy,
        card=card,
        run_name="TripletCnn",
    )
    lines = [
        f"registered {name} version {version.version} as challenger (run {version.run_id})",
        f"dataset sha256 {outcome.dataset_sha256}",
    ]
    rows = {"TripletCnn (all test)": cnn.test}
    rows.update({f"TripletCnn ({k})": v for k, v in cnn.test_by_source.items()})
    if outcome.unet is not None:
        u = outcome.unet
        unet_metrics = u.test.as_dict("test_")
        for source, m in u.test_by_source.items():
            unet_metrics.update(m.as_dict(f"test_{source.replace('>=', '_ge_')}_"))
        run_id = registry.log_run(
            params={
                "architecture": "HeatmapUNet",
                "n_parameters": u.n_parameters,
                "best_epoch": u.best_epoch,
                "epochs_run": u.epochs_run,
                **{f"train_{k}": v for k, v in vars(cfg.unet_training).items()},
                **{f"model_{k}": v for k, v in vars(cfg.unet).items()},
                "max_examples": cfg.unet_max_examples,
                "radius": cfg.unet_radius,
            },
            metrics=_finite(unet_metrics),
            plots=[p for p in outcome.plots if "unet" in p.name or "comparison" in p.name],
            dataset_sha256=outcome.dataset_sha256,
            energy=u.energy,
            run_name="HeatmapUNet",
            tags={"astrid.model_name": f"{name}-unet"},
        )
        lines.append(f"logged HeatmapUNet run {run_id} (not registered: the scorer serves CNNs)")
        rows["HeatmapUNet (all test)"] = u.test
        rows.update({f"HeatmapUNet ({k})": v for k, v in u.test_by_source.items()})
    lines += _metric_lines("held-out test fields:", rows)
    lines.append(f"CNN training energy: {cnn.energy.summary()}")
    if outcome.unet is not None:
        lines.append(f"U-Net training energy: {outcome.unet.energy.summary()}")
    for line in lines:
        typer.echo(line)
    summary = {
        "model": name,
        "version": version.version,
        "run_id": version.run_id,
        "dataset_sha256": outcome.dataset_sha256,
        "counts": outcome.counts,
        "cnn": {**params, **metrics, "energy": cnn.energy.summary(), "seconds": cnn.seconds},
    }
    if outcome.unet is not None:
        summary["unet"] = {
            **outcome.unet.test.as_dict("test_"),
            "energy": outcome.unet.energy.summary(),
            "seconds": outcome.unet.seconds,
            "n_parameters": outcome.unet.n_parameters,
        }
    plots_dir.mkdir(parents=True, exist_ok=True)
    (plots_dir / "train_summary.json").write_text(
        json.dumps(_json_safe(summary), indent=2, default=str) + "\n", encoding="utf-8"
    )


def _scorer(model: Path | None, alias: str | None, name: str, data_dir: Path | None) -> Any:
    from astrid.ml.registry import load_scorer

    mlflow_dir = _data_dir(data_dir) / "mlflow" if alias is not None else None
    return load_scorer(name, path=model, alias=alias, registry_dir=mlflow_dir)


@friendly_errors
def evaluate(
    alerts: list[Path] = typer.Argument(
        None, help="Alert sets (folders or packet files) to compare with the surveys' scores."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="A model bundle folder (default: the packaged model)."
    ),
    alias: str | None = typer.Option(
        None, "--alias", help="Use the registered version with this alias (champion, challenger)."
    ),
    name: str = _NAME_OPTION,
    dataset: Path | None = typer.Option(
        None, "--dataset", help="Training-set .npz whose test split (held-out fields) to score."
    ),
    plots: Path | None = typer.Option(None, "--plots", help="Folder for the PNG plots."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the metrics as JSON."),
    scores_csv: Path | None = typer.Option(
        None, "--scores-csv", help="Write the per-alert scores as CSV."
    ),
    log: bool = typer.Option(True, "--log/--no-log", help="Log an evaluation run to MLflow."),
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Measure a model on the held-out fields of a training set and on real alerts.

    Held-out: ROC AUC, missed detections at 1% false positives, false positives at 1%
    missed detections, calibration and completeness against S/N. Alerts: the AUC of our
    score against the packet's own score as a proxy label (drb, rb or reliability >= 0.5)
    and the Spearman correlation of the two.
    """
    from astrid.ml.metrics import plot_completeness
    from astrid.pipeline.real_bogus import evaluate_alerts, evaluate_scores
    from astrid.pipeline.training_set import load_training_set

    scorer = _scorer(model, alias, name, data_dir)
    typer.echo(f"model {scorer.metadata.name} version {scorer.version}", err=True)
    results: dict[str, Any] = {
        "model": scorer.metadata.name,
        "version": scorer.version,
        "weights_sha256": scorer.metadata.weights_sha256,
        "dataset_sha256_trained": scorer.metadata.dataset_hash,
    }
    metrics: dict[str, float] = {}
    written: list[Path] = []
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
    if dataset is not None:
        training_set = load_training_set(dataset, mmap=True)
        overall, by_source, _ = evaluate_scores(scorer, training_set)
        rows = {"all test": overall, **by_source}
        for line in _metric_lines("held-out test fields:", rows):
            typer.echo(line)
        metrics.update(overall.as_dict("test_"))
        for source, m in by_source.items():
            metrics.update(m.as_dict(f"test_{source.replace('>=', '_ge_')}_"))
        results["dataset_sha256"] = training_set.content_hash()
        if plots is not None and overall.completeness is not None:
            written.append(
                plot_completeness(
                    overall.completeness, plots / "completeness_test.png", title="held-out"
                )
            )
    if alerts:
        evaluation = evaluate_alerts(alerts, scorer, plots_dir=plots)
        typer.echo("real alerts (survey score >= 0.5 as the proxy label):")
        for key, agreement in evaluation.agreement.items():
            typer.echo(
                f"  {key:<48} n={agreement.n:<4} positive={agreement.n_positive:<4} "
                f"AUC {agreement.auc:.4f}  Spearman {agreement.spearman:+.3f}"
            )
            metrics.update(agreement.as_dict(f"alerts_{key.replace(':', '_').replace('/', '_')}_"))
        for failure in evaluation.failures:
            typer.echo(f"skipped {failure.path}: {failure.reason}", err=True)
        results["alerts"] = {k: vars(v) for k, v in evaluation.agreement.items()}
        if scores_csv is not None:
            evaluation.table.write(scores_csv, format="ascii.csv", overwrite=True)
        if plots is not None:
            written += sorted(plots.glob("alerts_*.png"))
    results["metrics"] = metrics
    if log:
        run_id = _registry(data_dir).log_run(
            params={"model": scorer.metadata.name, "version": scorer.version},
            metrics=_finite(metrics),
            plots=written,
            dataset_sha256=results.get("dataset_sha256"),
            run_name=f"evaluate {scorer.metadata.name} v{scorer.version}",
            tags={"astrid.kind": "evaluation"},
        )
        typer.echo(f"logged evaluation run {run_id}", err=True)
    if output is not None:
        output.write_text(
            json.dumps(_json_safe(results), indent=2, default=str) + "\n", encoding="utf-8"
        )


@friendly_errors
def score_alerts(
    paths: list[Path] = typer.Argument(
        ..., help="Alert packet files (.avro, Kowalski .json) or folders searched recursively."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="CSV file to write."),
    model: Path | None = typer.Option(
        None, "--model", help="A model bundle folder (default: the packaged champion)."
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip unreadable files (listed on stderr) instead of stopping."
    ),
) -> None:
    """Score every alert with our real/bogus model and write one CSV row per alert.

    Columns: alert_id (ZTF candid or Rubin diaSourceId), id_name, candid, diaSourceId,
    survey, object_id, isdiffpos, score (our calibrated probability that the detection is
    real), the packet's own rb, drb (ZTF) and reliability (Rubin) where present, and the
    file. Scoring needs no network: the model is the one shipped in the package.
    """
    from astrid.ml.serve import Scorer
    from astrid.pipeline.real_bogus import score_alert_files

    scorer = Scorer.from_path(model) if model is not None else Scorer.packaged(DEFAULT_MODEL_NAME)
    table, failures = score_alert_files(paths, scorer, skip_bad=skip_bad)
    for failure in failures:
        typer.echo(f"skipped {failure.path}: {failure.reason}", err=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.write(output, format="ascii.csv", overwrite=True)
    typer.echo(
        f"scored {len(table)} alerts with {scorer.metadata.name} version {scorer.version}; "
        f"wrote {output}",
        err=True,
    )


@models_app.command("list")
@friendly_errors
def list_models(data_dir: Path | None = DATA_DIR_OPTION) -> None:
    """List registered models: versions, aliases, champion history and test metrics."""
    registry = _registry(data_dir)
    summaries = registry.list_models()
    if not summaries:
        typer.echo("no registered models")
        return
    for summary in summaries:
        aliases = {v: k for k, v in summary.aliases.items()}
        history = " -> ".join(str(v) for v in summary.champion_history) or "none"
        typer.echo(f"{summary.name}: champion history {history}")
        for version in summary.versions:
            found = registry.client.get_model_version(summary.name, str(version))
            run = registry.client.get_run(found.run_id) if found.run_id else None
            m = run.data.metrics if run is not None else {}
            digest = (run.data.tags.get("dataset_sha256", "") if run is not None else "")[:12]
            auc = m.get("test_auc", float("nan"))
            fnr = m.get("test_fnr_at_1pct_fpr", float("nan"))
            typer.echo(
                f"  v{version:<4} {aliases.get(version, ''):<11} test AUC {auc:.4f}  "
                f"FNR@1%FPR {fnr:.4f}  dataset {digest}  run {found.run_id}"
            )


@models_app.command("promote")
@friendly_errors
def promote(
    name: str = typer.Argument(DEFAULT_MODEL_NAME, help="Registered model name."),
    version: int | None = typer.Option(
        None, "--version", help="Version to promote (default: the challenger)."
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Make a version (by default the challenger) the champion; the old one is remembered."""
    new = _registry(data_dir).promote(name, version)
    typer.echo(f"{name}: version {new} is now champion")


@models_app.command("rollback")
@friendly_errors
def rollback(
    name: str = typer.Argument(DEFAULT_MODEL_NAME, help="Registered model name."),
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Give the champion alias back to the previous champion."""
    restored = _registry(data_dir).rollback(name)
    typer.echo(f"{name}: version {restored} is champion again")


@models_app.command("export")
@friendly_errors
def export(
    output: Path = typer.Argument(..., help="Folder to write the bundle into."),
    name: str = _NAME_OPTION,
    alias: str = typer.Option("champion", "--alias", help="Alias of the version to export."),
    version: int | None = typer.Option(None, "--version", help="Export this version instead."),
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Copy a registered version's bundle (weights.pt, metadata.json, model card) to a folder.

    Exporting the champion into src/astrid/ml/weights/<name>/ ships it with the package.
    """
    target = _registry(data_dir).export_bundle(name, output, alias=alias, version=version)
    typer.echo(f"wrote {name} ({'version ' + str(version) if version else alias}) to {target}")


@models_app.command("combine")
@friendly_errors
def combine(
    bundles: list[Path] = typer.Argument(..., help="Bundle folders of the member networks."),
    dataset: Path = typer.Option(
        ...,
        "--dataset",
        exists=True,
        dir_okay=False,
        help="Training-set .npz the members were trained on: its validation split fits the "
        "temperature, its test split measures the result.",
    ),
    views: str = typer.Option(
        "0",
        "--views",
        help="Dihedral views to average over, comma-separated (0-3: rotation by k x 90 "
        "degrees; 4-7: transpose, then rotate by k - 4); each costs one pass per member.",
    ),
    other_builds: bool = typer.Option(
        False,
        "--other-builds",
        help="Accept members trained on another build of the same fields (same seed and "
        "split, e.g. by an earlier builder version), whose content hash differs.",
    ),
    register: bool = typer.Option(
        True, "--register/--no-register", help="Register the result as the challenger."
    ),
    name: str = _NAME_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Average trained networks (and rotations of the stamps) into one calibrated model.

    The logit is the mean over members and views; the temperature is fitted on the
    validation split and the metrics measured on the test split, from raw cutouts as in
    production. Prints the validation loss to choose between ensembles by, and registers
    the result as the challenger unless --no-register.
    """
    from astrid.ml.models import TripletCnn
    from astrid.ml.registry import EnergyReport, ModelCardInfo
    from astrid.ml.serve import load_bundle
    from astrid.pipeline.real_bogus import combine_real_bogus
    from astrid.pipeline.training_set import load_training_set

    try:
        view_list = [int(v) for v in views.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"--views takes integers 0-7: {exc}") from exc
    if not view_list or len(set(view_list)) != len(view_list):
        raise typer.BadParameter(f"--views needs distinct integers 0-7, not {views!r}")
    if not all(0 <= k < 8 for k in view_list):
        raise typer.BadParameter(f"--views takes integers 0-7, not {views!r}")
    members = []
    seen: dict[str, Path] = {}
    for path in bundles:
        network, meta = load_bundle(path)
        if not isinstance(network, TripletCnn):
            raise typer.BadParameter(
                f"{path} holds a {meta.architecture}; combine the single networks it was made of"
            )
        if meta.weights_sha256 in seen:
            raise typer.BadParameter(
                f"{path} holds the same weights as {seen[meta.weights_sha256]}: a member given "
                "twice would count double"
            )
        seen[meta.weights_sha256] = path
        members.append((network, meta))
    training_set = load_training_set(dataset, mmap=True)
    digest = training_set.content_hash()
    foreign = [
        f"{meta.name} version {meta.version} ({(meta.dataset_hash or 'unknown')[:12]})"
        for _, meta in members
        if meta.dataset_hash != digest
    ]
    if foreign and not other_builds:
        raise typer.BadParameter(
            f"{', '.join(foreign)} trained on other data than {dataset.name} "
            f"({digest[:12]}); a member that saw its validation or test fields would bias "
            "the calibration and the metrics. If the members were trained on another build "
            "of the same fields and split, pass --other-builds."
        )
    for line in foreign:
        typer.echo(f"note: {line} was trained on another build of these fields", err=True)
    try:
        outcome = combine_real_bogus(members, training_set, views=view_list)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    metrics = outcome.test.as_dict("test_")
    for source, m in outcome.test_by_source.items():
        metrics.update(m.as_dict(f"test_{source.replace('>=', '_ge_')}_"))
    metrics["validation_nll"] = outcome.validation_nll
    lines = [
        f"{len(members)} member(s) x {len(view_list)} view(s) = {outcome.model.n_passes} "
        f"passes per triplet; T = {outcome.temperature:.4f}; validation NLL "
        f"{outcome.validation_nll:.5f}"
    ]
    rows = {"all test": outcome.test, **outcome.test_by_source}
    lines += _metric_lines("held-out test fields:", rows)
    if register:
        member_names = [_model_label(meta) for _, meta in members]
        params: dict[str, Any] = {
            "architecture": "TripletCnnEnsemble",
            "members": "; ".join(member_names),
            "member_dataset_sha256": "; ".join(
                (meta.dataset_hash or "unknown")[:16] for _, meta in members
            ),
            "views": ",".join(map(str, view_list)),
            "passes_per_triplet": outcome.model.n_passes,
            "temperature": round(outcome.temperature, 6),
        }
        card = ModelCardInfo(
            data=(
                f"Not trained: the mean logit of {len(members)} trained network(s) "
                f"({', '.join(member_names)}) over the dihedral view(s) {view_list} of the "
                "stamps. Temperature fitted on the validation split, metrics on the test "
                f"split of the training set {digest[:16]}."
            )
        )
        version = _registry(data_dir).register(
            outcome.model,
            name=name,
            temperature=outcome.temperature,
            normalisation=outcome.normalisation,
            normalisation_clip=outcome.normalisation_clip,
            params=params,
            metrics=_finite(metrics),
            dataset_sha256=digest,
            energy=EnergyReport(
                measured=False,
                reason="no training: the members' energy is in their own training runs",
            ),
            card=card,
            run_name="TripletCnnEnsemble",
        )
        lines.insert(
            0, f"registered {name} version {version.version} as challenger (run {version.run_id})"
        )
    for line in lines:
        typer.echo(line)
