"""Train, evaluate and use the real/bogus models: the flows behind ``astrid train`` and co.

:func:`train_real_bogus` trains the triplet CNN (and, for comparison, the heat-map U-Net)
on the training split of a :class:`~astrid.ml.dataset.TrainingSet`, stops early and
calibrates on the validation split, and measures both on the test split (fields never
seen in training) with the energy each training used. :func:`evaluate_scores` measures
any scorer on the test split and on real survey alerts; :func:`score_alert_files` scores
alert packets. Plots are written where asked; MLflow logging is the caller's (the command
line's) business, through :class:`~astrid.ml.registry.ModelRegistry`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from astropy.table import MaskedColumn, Table
from numpy.typing import NDArray

from astrid.ml.alerts import Alert, AlertFailure, read_alerts
from astrid.ml.dataset import TrainingSet
from astrid.ml.evaluate import (
    ClassifierMetrics,
    ScoreAgreement,
    alert_input_triplets,
    classifier_metrics,
    plot_score_agreement,
    score_agreement,
)
from astrid.ml.metrics import (
    OperatingPoint,
    RocCurve,
    plot_completeness,
    plot_reliability,
    plot_roc,
    reliability_curve,
    roc_curve,
)
from astrid.ml.models import (
    TripletCnn,
    TripletCnnConfig,
    TripletCnnEnsemble,
    UNetConfig,
    count_parameters,
    heatmap_scores,
    predict_heatmap,
    predict_logits,
)
from astrid.ml.registry import EnergyReport, measure_energy
from astrid.ml.serve import ModelMetadata, Scorer
from astrid.ml.train import (
    SPLIT_NAMES,
    EpochRecord,
    TrainConfig,
    TrainResult,
    TripletDataset,
    apply_temperature,
    binary_nll,
    fit_temperature,
    heatmap_target,
    train_classifier,
    train_heatmap_model,
)

__all__ = [
    "ALERT_SCORE_NAMES",
    "AlertEvaluation",
    "EnsembleOutcome",
    "ModelOutcome",
    "RealBogusConfig",
    "TrainingOutcome",
    "alert_scores_table",
    "combine_real_bogus",
    "evaluate_alerts",
    "evaluate_scores",
    "score_alert_files",
    "train_real_bogus",
]

ALERT_SCORE_NAMES: tuple[str, ...] = ("rb", "drb", "reliability")
"""Survey real/bogus scores carried over from alert packets, by their packet names."""


@dataclass(frozen=True)
class RealBogusConfig:
    """Options of :func:`train_real_bogus`.

    Attributes
    ----------
    cnn : TripletCnnConfig
        Architecture of the triplet CNN.
    cnn_training : TrainConfig
        Its optimisation: batches of 128, early stopping on the validation loss, flips
        and rotations, and centred crops of 20 % of the triplets (smaller survey stamps).
    unet : UNetConfig or None
        Architecture of the heat-map U-Net; None trains no U-Net.
    unet_training : TrainConfig
        Its optimisation (real pixels weighted up: they are ~1 % of a stamp).
    unet_max_examples : int
        Training examples given to the U-Net at most (a random subset; it takes about
        six times the CNN's training time per example).
    unet_radius : float
        Radius of the target disk at a real candidate, and of the disk a candidate's
        score is read from, in pixels.
    threads : int
        torch threads for training and inference.
    country_iso_code : str
        Electricity mix for the emissions codecarbon reports.
    teacher : str or None
        A model bundle folder whose calibrated scores of the (un-augmented) training
        triplets are mixed into the CNN's training targets (knowledge distillation);
        None trains on the labels alone. Validation and test use the labels.
    teacher_weight : float
        Share of the teacher's score in each target, in (0, 1].
    normalised_dir : str or None
        Folder for the normalised stamps of each split, written as ``.npy`` files and
        mapped from them (:meth:`~astrid.ml.dataset.TrainingSet.to_triplet_dataset`), so
        a set larger than the memory can be trained on; None holds them in memory.
    """

    cnn: TripletCnnConfig = field(default_factory=TripletCnnConfig)
    cnn_training: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=128,
            max_epochs=25,
            patience=6,
            crop_probability=0.2,
            plateau_factor=0.3,
            plateau_patience=2,
            seed=0,
        )
    )
    unet: UNetConfig | None = field(default_factory=UNetConfig)
    unet_training: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=64, max_epochs=8, patience=3, pos_weight=20.0, seed=0
        )
    )
    unet_max_examples: int = 3000
    unet_radius: float = 3.0
    threads: int = 2
    country_iso_code: str = "FRA"
    teacher: str | None = None
    teacher_weight: float = 0.5
    normalised_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight must be in (0, 1], not {self.teacher_weight}")


@dataclass(frozen=True)
class ModelOutcome:
    """One trained model measured on the test split.

    Attributes
    ----------
    name : str
        ``"TripletCnn"`` or ``"HeatmapUNet"``.
    model : torch.nn.Module
        The trained network (best epoch).
    n_parameters : int
        Its trainable parameters.
    temperature : float
        Calibration temperature (1 for the U-Net, whose score is a heat-map maximum).
    best_epoch : int
        Epoch kept.
    epochs_run : int
        Epochs run before early stopping.
    test : ClassifierMetrics
        Metrics on the test split (calibrated scores).
    test_by_source : dict of str to ClassifierMetrics
        The same per source of pixels (``"simulated"``, ``"sfft-decam"``) and on the
        bright part (``"snr>=10"``), where both classes occur.
    test_scores : ndarray of float64
        Calibrated test scores, in test-split order.
    test_scores_uncalibrated : ndarray of float64
        ``sigmoid(logit)`` before temperature scaling (the CNN), for the reliability
        diagram.
    energy : EnergyReport
        Energy its training used.
    seconds : float
        Wall-clock training time.
    """

    name: str
    model: torch.nn.Module
    n_parameters: int
    temperature: float
    best_epoch: int
    epochs_run: int
    test: ClassifierMetrics
    test_by_source: dict[str, ClassifierMetrics]
    test_scores: NDArray[np.float64]
    test_scores_uncalibrated: NDArray[np.float64]
    energy: EnergyReport
    seconds: float


@dataclass(frozen=True)
class TrainingOutcome:
    """What :func:`train_real_bogus` produced.

    Attributes
    ----------
    cnn : ModelOutcome
        The triplet CNN.
    cnn_result : TrainResult
        Its training result (history, validation logits).
    unet : ModelOutcome or None
        The U-Net, if trained.
    dataset_sha256 : str
        Content hash of the training set.
    counts : dict
        Examples per split and class.
    plots : list of Path
        PNG files written.
    """

    cnn: ModelOutcome
    cnn_result: TrainResult
    unet: ModelOutcome | None
    dataset_sha256: str
    counts: dict[str, int]
    plots: list[Path]


def _by_source(
    part: TrainingSet, scores: NDArray[np.float64], rows: NDArray[np.bool_] | None = None
) -> dict[str, ClassifierMetrics]:
    """Metrics per source of pixels, and on the bright part (``"snr>=10"``: real
    candidates of injected S/N >= 10 against bogus ones of measured S/N >= 10).

    ``scores`` belong to the rows of ``part`` that ``rows`` selects (all when None); only
    the per-candidate columns are read, never the stamps.
    """
    source, snr, all_labels = part.source, part.snr, part.labels
    if rows is not None:
        source, snr, all_labels = source[rows], snr[rows], all_labels[rows]
    selections = {name: source == name for name in sorted(set(source.tolist()))}
    selections["snr>=10"] = snr >= 10.0
    out = {}
    for name, sel in selections.items():
        labels = all_labels[sel]
        if 0 < labels.sum() < len(labels):
            out[name] = classifier_metrics(labels, scores[sel], snr=snr[sel])
    return out


def _unet_inputs(
    data: TripletDataset, fwhm: NDArray[np.float32], radius: float
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Difference planes ``(n, 1, s, s)`` and their targets: a disk at real centres."""
    tiles = np.ascontiguousarray(data.triplets[:, 2:3])
    size = tiles.shape[-1]
    centre = (size - 1) / 2.0
    disk = heatmap_target((size, size), [centre], [centre], radius=radius)
    targets = np.zeros_like(tiles)
    targets[data.labels == 1, 0] = disk
    return tiles, targets


def _unet_scores(
    model: torch.nn.Module, tiles: NDArray[np.float32], radius: float
) -> NDArray[np.float64]:
    """Score of each tile's central candidate: the largest heat-map probability near it."""
    size = tiles.shape[-1]
    centre = (size - 1) / 2.0
    out = np.empty(len(tiles), dtype=np.float64)
    for start in range(0, len(tiles), 256):
        heat = predict_heatmap(model, tiles[start : start + 256])
        for k, plane in enumerate(heat[:, 0]):
            out[start + k] = heatmap_scores(plane, centre, centre, radius=radius)[0]
    return out


def _epoch_line(model: str, record: EpochRecord) -> str:
    """One line of training progress: the epoch's losses and learning rate.

    Parameters
    ----------
    model : str
        Name of the network being trained.
    record : EpochRecord
        The epoch just validated.

    Returns
    -------
    str
    """
    raw_weights = (
        ""
        if record.raw_validation_loss is None
        else f" (raw weights {record.raw_validation_loss:.4f})"
    )
    return (
        f"{model} epoch {record.epoch}: train loss {record.train_loss:.4f}, validation loss "
        f"{record.validation_loss:.4f}{raw_weights}, learning rate {record.learning_rate:.2g}"
    )


def train_real_bogus(
    training_set: TrainingSet,
    *,
    config: RealBogusConfig | None = None,
    plots_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    dataset_sha256: str | None = None,
) -> TrainingOutcome:
    """Train the CNN (and the U-Net), calibrate, and measure them on held-out fields.

    Parameters
    ----------
    training_set : TrainingSet
        Raw triplets with labels and splits (whole fields per split).
    config : RealBogusConfig or None
        Options; None uses the defaults.
    plots_dir : str or Path or None
        Where to write the ROC, reliability (before and after temperature scaling) and
        completeness plots; None writes none.
    log : callable or None
        Receives one line per step.
    dataset_sha256 : str or None
        ``training_set.content_hash()`` when the caller already has it (the manifest
        of the set it has just built), which saves reading every stamp again; None
        computes it.

    Returns
    -------
    TrainingOutcome
    """
    cfg = config or RealBogusConfig()
    say = log or (lambda _line: None)
    torch.set_num_threads(cfg.threads)
    masks = [training_set.split == k for k in range(3)]
    # One normalised copy per split, made straight from the raw stamps; the test split's
    # only once the CNN is trained and its training copy dropped, so the normalised
    # training, validation and test copies are never all in memory at once.
    folder = None if cfg.normalised_dir is None else Path(cfg.normalised_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def normalised(split: int) -> TripletDataset:
        out = None if folder is None else folder / f"{SPLIT_NAMES[split]}.npy"
        return training_set.to_triplet_dataset(indices=np.flatnonzero(masks[split]), out=out)

    train, validation = normalised(0), normalised(1)
    counts = {
        f"{name}_{cls}": int(np.sum(m & (training_set.labels == (cls == "real"))))
        for name, m in zip(SPLIT_NAMES, masks, strict=True)
        for cls in ("real", "bogus")
    }
    digest = training_set.content_hash() if dataset_sha256 is None else dataset_sha256
    say(f"training set {digest[:12]}: {counts}")
    if cfg.teacher is not None:
        teacher = Scorer.from_path(cfg.teacher)
        rows = np.flatnonzero(masks[0])
        soft = np.concatenate(
            [
                teacher.score(training_set.triplets[chunk])
                for chunk in np.array_split(rows, max(1, len(rows) // 4096))
            ]
        )
        train = train.with_teacher(soft, cfg.teacher_weight)
        say(
            f"training targets: {1 - cfg.teacher_weight:g} x label + {cfg.teacher_weight:g} x "
            f"score of {teacher.metadata.name} version {teacher.version} "
            f"({teacher.metadata.architecture})"
        )

    started = time.perf_counter()
    with measure_energy(country_iso_code=cfg.country_iso_code) as meter:
        result = train_classifier(
            train,
            validation,
            model_config=cfg.cnn,
            config=cfg.cnn_training,
            on_epoch=lambda record: say(_epoch_line("TripletCnn", record)),
        )
    seconds = time.perf_counter() - started
    del train
    test = normalised(2)
    logits = predict_logits(result.model, test.triplets).astype(np.float64)
    result.model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    calibrated = apply_temperature(logits, result.temperature)
    raw = apply_temperature(logits, 1.0)
    cnn = ModelOutcome(
        name="TripletCnn",
        model=result.model,
        n_parameters=count_parameters(result.model),
        temperature=result.temperature,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        test=classifier_metrics(test.labels, calibrated, snr=test.snr),
        test_by_source=_by_source(training_set, calibrated, masks[2]),
        test_scores=calibrated,
        test_scores_uncalibrated=raw,
        energy=meter.report or EnergyReport(measured=False, reason="no report"),
        seconds=seconds,
    )
    say(
        f"TripletCnn: best epoch {cnn.best_epoch}/{cnn.epochs_run}, T={cnn.temperature:.3f}, "
        f"test AUC {cnn.test.auc:.4f}, FNR@1%FPR {cnn.test.fnr_at_1pct_fpr:.4f}, "
        f"{seconds:.0f} s"
    )

    unet: ModelOutcome | None = None
    if cfg.unet is not None:
        rng = np.random.default_rng(cfg.unet_training.seed)
        chosen = np.flatnonzero(masks[0])
        if len(chosen) > cfg.unet_max_examples:
            chosen = np.sort(rng.choice(chosen, cfg.unet_max_examples, replace=False))
        sub_train = training_set.to_triplet_dataset(indices=chosen)
        x_train, y_train = _unet_inputs(sub_train, training_set.fwhm[chosen], cfg.unet_radius)
        x_val, y_val = _unet_inputs(validation, training_set.fwhm[masks[1]], cfg.unet_radius)
        started = time.perf_counter()
        with measure_energy(country_iso_code=cfg.country_iso_code) as unet_meter:
            unet_result = train_heatmap_model(
                x_train,
                y_train,
                x_val,
                y_val,
                model_config=cfg.unet,
                config=cfg.unet_training,
                on_epoch=lambda record: say(_epoch_line("HeatmapUNet", record)),
            )
        unet_seconds = time.perf_counter() - started
        x_test, _ = _unet_inputs(test, training_set.fwhm[masks[2]], cfg.unet_radius)
        scores = _unet_scores(unet_result.model, x_test, cfg.unet_radius)
        unet = ModelOutcome(
            name="HeatmapUNet",
            model=unet_result.model,
            n_parameters=count_parameters(unet_result.model),
            temperature=1.0,
            best_epoch=unet_result.best_epoch,
            epochs_run=len(unet_result.history),
            test=classifier_metrics(test.labels, scores, snr=test.snr),
            test_by_source=_by_source(training_set, scores, masks[2]),
            test_scores=scores,
            test_scores_uncalibrated=scores,
            energy=unet_meter.report or EnergyReport(measured=False, reason="no report"),
            seconds=unet_seconds,
        )
        say(
            f"HeatmapUNet: best epoch {unet.best_epoch}/{unet.epochs_run}, test AUC "
            f"{unet.test.auc:.4f}, FNR@1%FPR {unet.test.fnr_at_1pct_fpr:.4f}, "
            f"{unet_seconds:.0f} s ({len(chosen)} training examples)"
        )

    plots: list[Path] = []
    if plots_dir is not None:
        plots = _training_plots(Path(plots_dir), test.labels, cnn, unet)
    return TrainingOutcome(
        cnn=cnn,
        cnn_result=result,
        unet=unet,
        dataset_sha256=digest,
        counts=counts,
        plots=plots,
    )


def _training_plots(
    folder: Path,
    labels: NDArray[np.float32],
    cnn: ModelOutcome,
    unet: ModelOutcome | None,
) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for outcome in (cnn, unet):
        if outcome is None:
            continue
        tag = "cnn" if outcome is cnn else "unet"
        curve = roc_curve(labels, outcome.test_scores)
        points = {
            "at 1% FPR": _point(curve, outcome.test.threshold_at_1pct_fpr),
            "at 1% FNR": _point(curve, outcome.test.threshold_at_1pct_fnr),
        }
        paths.append(
            plot_roc(curve, folder / f"roc_{tag}.png", operating_points=points, title=outcome.name)
        )
        if outcome.test.completeness is not None:
            paths.append(
                plot_completeness(
                    outcome.test.completeness,
                    folder / f"completeness_{tag}.png",
                    title=f"{outcome.name}, held-out fields",
                )
            )
    paths.append(
        plot_reliability(
            reliability_curve(cnn.test_scores_uncalibrated, labels),
            folder / "reliability_cnn_uncalibrated.png",
            title="before temperature scaling",
        )
    )
    paths.append(
        plot_reliability(
            reliability_curve(cnn.test_scores, labels),
            folder / "reliability_cnn_calibrated.png",
            title=f"after (T = {cnn.temperature:.2f})",
        )
    )
    # Both ROC curves on one plot, for the comparison.
    fig = Figure(figsize=(4.8, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, outcome in enumerate(o for o in (cnn, unet) if o is not None):
        curve = roc_curve(labels, outcome.test_scores)
        floor = 1e-4
        ax.step(
            np.maximum(curve.fpr, floor),
            curve.tpr,
            where="post",
            color=f"C{k}",
            label=f"{outcome.name} (AUC {outcome.test.auc:.4f})",
        )
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.axvline(0.01, color="0.7", linewidth=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("held-out fields", fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / "roc_comparison.png"
    fig.savefig(path)
    paths.append(path)
    return paths


def _point(curve: RocCurve, threshold: float) -> OperatingPoint:
    """The ROC point of a threshold (the last one accepting scores at or above it)."""
    i = int(np.flatnonzero(curve.thresholds >= threshold)[-1])
    return OperatingPoint(threshold, float(curve.fpr[i]), float(curve.fnr[i]))


# --------------------------------------------------------------------------------------
# ensembles of trained networks


@dataclass(frozen=True)
class EnsembleOutcome:
    """A :class:`~astrid.ml.models.TripletCnnEnsemble` calibrated and measured.

    Attributes
    ----------
    model : TripletCnnEnsemble
        The members and views, not fused.
    temperature : float
        Fitted on the validation split's averaged logits.
    validation_nll : float
        Binary NLL of the validation split at that temperature: the figure to choose
        between ensembles by, since no test field enters it.
    test : ClassifierMetrics
        On the test split (calibrated scores).
    test_by_source : dict of str to ClassifierMetrics
        Per source of pixels and on the bright part, as for :func:`train_real_bogus`.
    normalisation : str
        The input normalisation every member shares.
    normalisation_clip : float or None
        Its ``clip``.
    """

    model: TripletCnnEnsemble
    temperature: float
    validation_nll: float
    test: ClassifierMetrics
    test_by_source: dict[str, ClassifierMetrics]
    normalisation: str
    normalisation_clip: float | None


def combine_real_bogus(
    members: Sequence[tuple[TripletCnn, ModelMetadata]],
    training_set: TrainingSet,
    *,
    views: Sequence[int] = (0,),
) -> EnsembleOutcome:
    """Average trained networks (and views of the stamps), calibrate and measure them.

    The ensemble's logit is the mean over members and views
    (:class:`~astrid.ml.models.TripletCnnEnsemble`). Its temperature is fitted on the
    validation split of ``training_set`` and it is measured on the test split, both
    scored through :class:`~astrid.ml.serve.Scorer` from raw cutouts, as in production.
    The members must have been trained on the training split of this set's fields:
    a member that saw its validation or test fields would bias both.

    Parameters
    ----------
    members : sequence of (TripletCnn, ModelMetadata)
        Trained networks (:func:`astrid.ml.serve.load_bundle`) and their metadata.
    training_set : TrainingSet
        Set whose validation and test splits to use.
    views : sequence of int
        Dihedral transforms to average over (:func:`astrid.ml.models.dihedral_tensor`).

    Returns
    -------
    EnsembleOutcome

    Raises
    ------
    ValueError
        If there are no members, they use different input normalisations or take
        different inputs, the views are not distinct integers 0-7, or the validation or
        test split is empty.
    """
    if not members:
        raise ValueError("no members to combine")
    norms = {(meta.normalisation, meta.normalisation_clip) for _, meta in members}
    if len(norms) != 1:
        raise ValueError(f"members use different input normalisations: {sorted(map(str, norms))}")
    normalisation, clip = norms.pop()
    validation, test = training_set.part("validation"), training_set.part("test")
    if len(validation) == 0 or len(test) == 0:
        raise ValueError(
            f"need examples in the validation and test splits: {len(validation)} and {len(test)}"
        )
    ensemble = TripletCnnEnsemble([model for model, _ in members], views=views)
    unit = Scorer(
        ensemble,
        ModelMetadata(
            name="ensemble",
            version="0",
            temperature=1.0,
            architecture=TripletCnnEnsemble.__name__,
            normalisation=normalisation,
            normalisation_clip=clip,
        ),
    )
    val_logits = unit.logits(validation.triplets).astype(np.float64)
    temperature = fit_temperature(val_logits, validation.labels)
    test_scores = apply_temperature(unit.logits(test.triplets), temperature)
    return EnsembleOutcome(
        model=ensemble,
        temperature=temperature,
        validation_nll=binary_nll(val_logits, validation.labels, temperature),
        test=classifier_metrics(test.labels, test_scores, snr=test.snr),
        test_by_source=_by_source(test, test_scores),
        normalisation=normalisation,
        normalisation_clip=clip,
    )


# evaluation of a scorer


def evaluate_scores(
    scorer: Scorer, training_set: TrainingSet, *, split: str = "test"
) -> tuple[ClassifierMetrics, dict[str, ClassifierMetrics], NDArray[np.float64]]:
    """Metrics of a scorer on one split of a training set (raw triplets, as in production).

    Returns
    -------
    metrics : ClassifierMetrics
        On the whole split.
    by_source : dict of str to ClassifierMetrics
        Per source of pixels.
    scores : ndarray of float64
        The scores, in split order.
    """
    part = training_set.part(split)
    scores = scorer.score(part.triplets)
    return (
        classifier_metrics(part.labels, scores, snr=part.snr),
        _by_source(part, scores),
        scores,
    )


@dataclass(frozen=True)
class AlertEvaluation:
    """Our scores on real alerts against the surveys' own scores.

    Attributes
    ----------
    table : astropy.table.Table
        One row per alert (:func:`alert_scores_table`) plus a ``set`` column (the folder
        the packet came from).
    agreement : dict of str to ScoreAgreement
        Keyed ``"<set>:<score>"`` (``"ztf_alerts_fink_broker/raw_2020-01-01:rb"``), also
        ``"<archive>:<score>"`` for all sets under one folder (``"ztf_alerts_ampel:rb"``),
        and ``"ZTF:drb"``, ``"ZTF:rb"``, ``"Rubin:reliability"`` for all alerts of a
        survey.
    failures : list of AlertFailure
        Files that could not be read.
    """

    table: Table
    agreement: dict[str, ScoreAgreement]
    failures: list[AlertFailure]


def alert_scores_table(alerts: Sequence[Alert], scores: NDArray[np.float64]) -> Table:
    """Per alert: its ids, our ``score`` and the packet's own ``rb``, ``drb``, ``reliability``.

    Columns: ``alert_id`` (ZTF ``candid`` or Rubin ``diaSourceId``), ``id_name`` (which of
    the two), ``candid`` and ``diaSourceId`` (the id again under its own name, masked for
    the other survey), ``survey``, ``object_id``, ``isdiffpos`` (``"t"`` or ``"f"``),
    ``score``, ``rb``, ``drb``, ``reliability`` (masked where the packet has none) and
    ``file``.
    """
    from astrid.ml.evaluate import alert_is_negative

    table = Table()
    ids = np.array([a.alert_id for a in alerts], dtype=np.int64)
    names = np.array([a.id_name for a in alerts], dtype=str)
    table["alert_id"] = ids
    table["id_name"] = names
    table["candid"] = MaskedColumn(ids, mask=names != "candid")
    table["diaSourceId"] = MaskedColumn(ids, mask=names != "diaSourceId")
    table["survey"] = np.array([a.survey for a in alerts], dtype=str)
    table["object_id"] = np.array(
        ["" if a.object_id is None else str(a.object_id) for a in alerts], dtype=str
    )
    table["isdiffpos"] = np.array(["f" if alert_is_negative(a) else "t" for a in alerts], dtype=str)
    table["score"] = np.asarray(scores, dtype=np.float64)
    for name in ALERT_SCORE_NAMES:
        values = np.array([a.scores.get(name, np.nan) for a in alerts], dtype=np.float64)
        table[name] = MaskedColumn(values, mask=np.isnan(values))
    table["file"] = np.array([a.source for a in alerts], dtype=str)
    return table


def score_alert_files(
    paths: Sequence[str | Path], scorer: Scorer, *, skip_bad: bool = False
) -> tuple[Table, list[AlertFailure]]:
    """Read alert packets (files or folders searched recursively) and score every alert.

    Parameters
    ----------
    paths : sequence of path
        Avro or Kowalski JSON files, or folders.
    scorer : Scorer
        The model (its own normalisation and temperature are applied).
    skip_bad : bool
        Skip unreadable files (returned as failures) instead of raising.

    Returns
    -------
    table : astropy.table.Table
        :func:`alert_scores_table`, in file and record order.
    failures : list of AlertFailure
        Files skipped.
    """
    reader = read_alerts(paths, errors="skip" if skip_bad else "raise")
    alerts = list(reader)
    size = scorer.config.cutout_size
    scores = (
        scorer.score(alert_input_triplets(alerts, size=size))
        if alerts
        else np.zeros(0, dtype=np.float64)
    )
    return alert_scores_table(alerts, scores), list(reader.failures)


def evaluate_alerts(
    folders: Sequence[str | Path],
    scorer: Scorer,
    *,
    plots_dir: str | Path | None = None,
) -> AlertEvaluation:
    """Score the alerts of each folder and compare with the packets' own scores.

    Parameters
    ----------
    folders : sequence of path
        Alert sets (each a folder, or a file); a set is named by its path relative to
        the folders' common parent (its own name when there is one set).
    scorer : Scorer
        The model.
    plots_dir : str or Path or None
        Where to write our score against ``drb``, ``rb`` and ``reliability``.

    Returns
    -------
    AlertEvaluation
    """
    tables = []
    failures: list[AlertFailure] = []
    paths = [Path(folder).resolve() for folder in folders]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else None
    for path in paths:
        name = path.name if common is None or path == common else str(path.relative_to(common))
        table, failed = score_alert_files([path], scorer, skip_bad=True)
        table["set"] = np.array([name] * len(table), dtype=str)
        tables.append(table)
        failures += failed
    from astropy.table import vstack

    table = vstack(tables) if tables else Table()
    agreement: dict[str, ScoreAgreement] = {}
    if len(table):
        score = np.asarray(table["score"], dtype=np.float64)
        for name in ALERT_SCORE_NAMES:
            theirs = np.asarray(table[name].filled(np.nan), dtype=np.float64)
            sets = np.asarray(table["set"]).astype(str)
            parents = np.array([s.split("/")[0] for s in sets.tolist()])
            groups = {name: sets == name for name in sorted(set(sets.tolist()))}
            for parent in sorted(set(parents.tolist()) - set(sets.tolist())):
                if len(set(sets[parents == parent].tolist())) > 1:
                    groups[parent] = parents == parent  # all the sets of one archive
            for group, members in groups.items():
                sel = members & np.isfinite(theirs)
                if sel.sum() >= 2:
                    agreement[f"{group}:{name}"] = score_agreement(
                        score[sel], theirs[sel], name=name
                    )
            for survey in ("ZTF", "Rubin"):
                sel = np.asarray(table["survey"] == survey) & np.isfinite(theirs)
                if sel.sum() >= 2:
                    agreement[f"{survey}:{name}"] = score_agreement(
                        score[sel], theirs[sel], name=name
                    )
        if plots_dir is not None:
            folder_out = Path(plots_dir)
            folder_out.mkdir(parents=True, exist_ok=True)
            for name in ALERT_SCORE_NAMES:
                theirs = np.asarray(table[name].filled(np.nan), dtype=np.float64)
                if np.isfinite(theirs).sum() < 2:
                    continue
                key = f"{'Rubin' if name == 'reliability' else 'ZTF'}:{name}"
                found = agreement.get(key)
                auc = "" if found is None or math.isnan(found.auc) else f", AUC {found.auc:.3f}"
                plot_score_agreement(
                    score,
                    theirs,
                    folder_out / f"alerts_{name}.png",
                    xlabel=f"packet {name}",
                    title=f"real alerts: AstrID score vs {name}{auc}",
                    groups=np.asarray(table["set"]),
                )
    return AlertEvaluation(table=table, agreement=agreement, failures=failures)
