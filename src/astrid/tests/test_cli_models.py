"""The real/bogus commands: score-alerts with the shipped model, models list/promote/rollback."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from astrid.cli import app
from astrid.ml.alerts import read_alerts
from astrid.ml.dataset import TrainingSet
from astrid.ml.evaluate import alert_input_triplets
from astrid.ml.models import TripletCnn, TripletCnnConfig
from astrid.ml.registry import CHAMPION, ModelRegistry, RegistryConfig
from astrid.ml.serve import Scorer, packaged_model_path

torch.set_num_threads(1)

runner = CliRunner()

KOWALSKI = "ztf_alerts_kowalski"


def test_packaged_champion_loads_and_scores(shared_data: Path) -> None:
    scorer = Scorer.packaged("real_bogus")
    meta = scorer.metadata
    assert packaged_model_path("real_bogus").is_dir()
    assert meta.normalisation == "normalise_triplet"
    # Versions 8-12: a network on the stamps as given and rotated by 180 degrees.
    assert meta.architecture == "TripletCnnEnsemble" and meta.model_config["views"] == [0, 2]
    assert meta.dataset_hash is not None and len(meta.dataset_hash) == 64
    assert 0.0 < meta.metrics["test_auc"] <= 1.0
    alerts = list(read_alerts(shared_data / KOWALSKI))
    scores = scorer.score(alert_input_triplets(alerts))
    assert scores.shape == (len(alerts),)
    assert np.all((scores >= 0) & (scores <= 1))


def test_score_alerts_writes_the_required_columns(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score-alerts", str(shared_data / KOWALSKI), "-o", str(out)])
    assert result.exit_code == 0, result.output
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    for column in ("alert_id", "candid", "diaSourceId", "score", "rb", "drb", "reliability"):
        assert column in rows[0]
    for row in rows:
        assert row["candid"] == row["alert_id"] and row["diaSourceId"] == ""
        assert 0.0 <= float(row["score"]) <= 1.0
        assert 0.0 <= float(row["drb"]) <= 1.0 and row["reliability"] == ""
    # The same alerts scored in the library agree with the file.
    scorer = Scorer.packaged("real_bogus")
    alerts = list(read_alerts(shared_data / KOWALSKI))
    expected = scorer.score(alert_input_triplets(alerts))
    written = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(written, expected, rtol=1e-6, atol=1e-9)


def test_score_alerts_reports_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.avro"
    bad.write_bytes(b"not an alert")
    result = runner.invoke(app, ["score-alerts", str(bad), "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 3
    result = runner.invoke(
        app, ["score-alerts", str(bad), "-o", str(tmp_path / "s.csv"), "--skip-bad"]
    )
    assert result.exit_code == 0 and "skipped" in result.output


def test_models_list_promote_rollback_export(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    registry = ModelRegistry(RegistryConfig.local(data_dir / "mlflow"))
    small = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))
    for seed in (0, 1):
        torch.manual_seed(seed)
        registry.register(
            TripletCnn(small).eval(),
            name="real_bogus",
            temperature=1.0 + seed,
            metrics={"test_auc": 0.9 + 0.01 * seed},
            dataset_sha256="ab" * 32,
        )
    base = ["--data-dir", str(data_dir)]
    listed = runner.invoke(app, ["models", "list", *base])
    assert listed.exit_code == 0, listed.output
    assert "v1" in listed.output and "v2" in listed.output and "challenger" in listed.output

    assert (
        runner.invoke(app, ["models", "promote", "real_bogus", "--version", "1", *base]).exit_code
        == 0
    )
    promoted = runner.invoke(app, ["models", "promote", *base])  # the challenger, version 2
    assert promoted.exit_code == 0 and "version 2 is now champion" in promoted.output
    assert registry.alias_version("real_bogus", CHAMPION) == 2

    exported = tmp_path / "bundle"
    result = runner.invoke(app, ["models", "export", str(exported), *base])
    assert result.exit_code == 0, result.output
    assert math.isclose(Scorer.from_path(exported).metadata.temperature, 2.0)

    rolled = runner.invoke(app, ["models", "rollback", *base])
    assert rolled.exit_code == 0 and "version 1 is champion again" in rolled.output
    assert registry.alias_version("real_bogus", CHAMPION) == 1
    again = runner.invoke(app, ["models", "rollback", *base])
    assert again.exit_code == 3 and "no earlier champion" in again.output


@pytest.mark.parametrize("flag", ["t", "f"])
def test_negative_ztf_difference_is_turned_back(shared_data: Path, flag: str) -> None:
    (alert, *_) = [
        a
        for a in read_alerts(shared_data / "ztf_alerts_fink_broker" / "raw_2020-01-01")
        if a.detection.get("isdiffpos") == flag
    ]
    triplet = alert_input_triplets([alert])[0]
    centre = np.nansum(triplet[2, 29:34, 29:34])
    # ZTF inverts a negative detection's difference; AstrID's convention is science minus
    # reference, so a negative detection is negative again.
    assert (centre < 0) == (flag == "f")


@pytest.mark.parametrize(
    ("option", "value"), [("--star-hosts", "brightest"), ("--fakes-on-artefacts", "bogus")]
)
def test_train_refuses_an_unknown_set_rule(tmp_path: Path, option: str, value: str) -> None:
    result = runner.invoke(
        app, ["train", "--data-dir", str(tmp_path), "--fields", "3", option, value]
    )
    assert result.exit_code == 2
    assert option in result.output and value in result.output
    assert not (tmp_path / "training").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--time-reverse", "1.5"),
        ("--plateau-patience", "0"),
        ("--patience", "0"),
        ("--ema-decay", "1.5"),
        ("--ema-schedule", "best"),
        ("--ema-schedule", "raw"),  # without --ema-decay
        ("--input-stretch", "-1"),
    ],
)
def test_train_refuses_out_of_range_training_options(
    tmp_path: Path, option: str, value: str
) -> None:
    result = runner.invoke(
        app, ["train", "--data-dir", str(tmp_path), "--fields", "3", option, value]
    )
    assert result.exit_code == 2
    assert option in result.output
    assert not (tmp_path / "training").exists()


def test_train_build_only_refuses_a_given_dataset(tmp_path: Path) -> None:
    dataset = _small_training_set(tmp_path / "small.npz")
    result = runner.invoke(
        app, ["train", "--data-dir", str(tmp_path), "--dataset", str(dataset), "--build-only"]
    )
    assert result.exit_code == 2
    assert "--build-only" in result.output
    assert not (tmp_path / "training").exists()


def _run_params(registry: ModelRegistry, name: str, version: int) -> Any:
    """The MLflow run data (params, metrics, tags) of a registered version."""
    found = registry.client.get_model_version(name, str(version))
    assert found.run_id is not None
    return registry.client.get_run(found.run_id).data


def _small_training_set(path: Path) -> Path:
    """A small saved training set: a PSF-like blob on noise (real) or noise (bogus)."""
    from astrid.pipeline.training_set import save_training_set

    rng = np.random.default_rng(5)
    n = 96
    triplets = rng.normal(0.0, 1.0, (n, 3, 63, 63)).astype(np.float32)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:63, :63]
    blob = 8.0 * np.exp(-((xx - 31) ** 2 + (yy - 31) ** 2) / 4.5)
    triplets[labels == 1, 0] += blob
    triplets[labels == 1, 2] += blob
    groups = np.array([f"sim-{i % 12:04d}" for i in range(n)])
    split = np.array([0 if i % 12 < 8 else 1 if i % 12 < 10 else 2 for i in range(n)])
    data = TrainingSet(
        triplets=triplets,
        labels=labels,
        groups=groups,
        split=split,
        source=np.full(n, "simulated"),
        kind=np.full(n, "resampled"),
        snr=np.full(n, 20.0),
        polarity=np.ones(n, np.int8),
        fwhm=np.full(n, 2.5),
        pixel_scale=np.full(n, 1.0),
    )
    return save_training_set(data, path)


def test_train_options_reach_the_registered_run(tmp_path: Path) -> None:
    dataset = _small_training_set(tmp_path / "small.npz")
    data_dir = tmp_path / "data"
    common = ["train", "--dataset", str(dataset), "--data-dir", str(data_dir)]
    common += (
        "--no-unet --threads 1 --epochs 2 --seed 3 --stem-channels 4 --block-channels 4,8 "
        "--hidden 8 --centre-window 0 --crop 31 --input-stretch 2.5"
    ).split()
    schedule = (
        "--patience 5 --plateau-patience 3 --time-reverse 0.25 --ema-decay 0.9 --ema-schedule raw"
    ).split()
    result = runner.invoke(app, common + schedule)
    assert result.exit_code == 0, result.output
    assert "registered real_bogus version 1 as challenger" in result.output
    registry = ModelRegistry(RegistryConfig.local(data_dir / "mlflow"))
    params = _run_params(registry, "real_bogus", 1).params
    expected = {
        "train_max_epochs": "2",
        "train_seed": "3",
        "train_patience": "5",
        "train_plateau_patience": "3",
        "train_time_reverse_probability": "0.25",
        "train_ema_decay": "0.9",
        "train_ema_schedule": "raw",
        "model_stem_channels": "4",
        "model_block_channels": "(4, 8)",
        "model_hidden": "8",
        "model_centre_window": "0",
        "model_crop": "31",
        "model_input_stretch": "2.5",
    }
    assert {k: params.get(k) for k in expected} == expected
    # Options left out keep RealBogusConfig's values.
    from astrid.pipeline.real_bogus import RealBogusConfig

    base = RealBogusConfig().cnn_training
    # --keep-dominated and --fakes-on-artefacts apply to a set being built: with --dataset
    # they are refused aloud.
    default = runner.invoke(
        app,
        [*common, "--name", "plain", "--keep-dominated", "--fakes-on-artefacts", "ambiguous"],
    )
    assert default.exit_code == 0, default.output
    assert "--fakes-on-artefacts apply to a set being built" in _plain(default.output)
    params = _run_params(registry, "plain", 1).params
    assert params["train_patience"] == str(base.patience)
    assert params["train_plateau_patience"] == str(base.plateau_patience)
    assert params["train_time_reverse_probability"] == str(base.time_reverse_probability)
    assert params["train_ema_decay"] == str(base.ema_decay)
    assert params["train_ema_schedule"] == base.ema_schedule


def _plain(output: str) -> str:
    """Command output with the error box's borders and line wrapping removed."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", output).split())


@pytest.mark.filterwarnings("ignore:temperature .* is at the edge")
def test_models_combine_registers_a_calibrated_ensemble(tmp_path: Path) -> None:
    from astrid.ml.models import TripletCnnEnsemble
    from astrid.ml.serve import load_bundle, save_model_bundle
    from astrid.pipeline.training_set import load_training_set

    dataset = _small_training_set(tmp_path / "small.npz")
    digest = load_training_set(dataset).content_hash()
    small = TripletCnnConfig(stem_channels=4, block_channels=(4, 8), hidden=8, centre_window=0)
    bundles = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"member{seed}"
        save_model_bundle(
            path, TripletCnn(small), name="real_bogus", version=str(seed + 1),
            temperature=1.0, dataset_hash=digest if seed == 0 else "f" * 64,
        )  # fmt: skip
        bundles.append(str(path))
    data_dir = tmp_path / "data"
    args = ["models", "combine", *bundles, "--dataset", str(dataset), "--views", "0,2"]
    args += ["--data-dir", str(data_dir)]
    # The second member was trained on other data: refused unless said to be another build.
    refused = runner.invoke(app, args)
    assert refused.exit_code != 0
    assert "real_bogus version 2 (ffffffffffff) trained on other data" in _plain(refused.output)
    result = runner.invoke(app, [*args, "--other-builds"])
    assert result.exit_code == 0, result.output
    assert "2 member(s) x 2 view(s) = 4 passes per triplet" in result.output
    assert "registered real_bogus version 1 as challenger" in result.output
    registry = ModelRegistry(RegistryConfig.local(data_dir / "mlflow"))
    scorer = registry.load_scorer("real_bogus", "challenger")
    meta = scorer.metadata
    assert meta.architecture == "TripletCnnEnsemble" and meta.dataset_hash == digest
    assert meta.model_config["views"] == [0, 2]
    run = _run_params(registry, "real_bogus", 1)
    assert run.params["passes_per_triplet"] == "4" and run.params["views"] == "0,2"
    assert "validation_nll" in run.metrics and "test_auc" in run.metrics
    assert run.tags["energy_status"].startswith("not measured: no training")
    # The registered scores are the calibrated mean logit of the members over the views.
    members = [load_bundle(b)[0] for b in bundles]
    ensemble = TripletCnnEnsemble([m for m in members if isinstance(m, TripletCnn)], (0, 2))
    test = load_training_set(dataset).part("test")
    expected = Scorer(ensemble, meta).score(test.triplets)
    np.testing.assert_allclose(scorer.score(test.triplets), expected, rtol=1e-5, atol=1e-8)
    # An ensemble is not a member.
    registry.export_bundle("real_bogus", tmp_path / "ens", alias="challenger")
    nested = runner.invoke(app, ["models", "combine", str(tmp_path / "ens"), "--dataset",
                                 str(dataset), "--no-register"])  # fmt: skip
    assert nested.exit_code != 0 and "holds a TripletCnnEnsemble" in _plain(nested.output)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--views", "9"], "--views takes integers 0-7"),
        (["--views", "0,0"], "--views needs distinct integers"),
        (["--views", ","], "--views needs distinct integers"),
        (["--views", "a"], "--views takes integers 0-7"),
        (["--dataset", "missing.npz"], "does not exist"),
        (["twice"], "holds the same weights as"),
        (["--dataset", "alltest.npz"], "need examples in the validation and test splits: 0"),
    ],
)
def test_models_combine_refuses_bad_input_cleanly(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    from astrid.ml.dataset import TrainingSet
    from astrid.ml.serve import save_model_bundle
    from astrid.pipeline.training_set import load_training_set, save_training_set

    dataset = _small_training_set(tmp_path / "small.npz")
    data = load_training_set(dataset)
    columns = {name: getattr(data, name) for name in TrainingSet.column_names()}
    columns["split"] = np.full(len(data), 2)
    save_training_set(TrainingSet(**columns), tmp_path / "alltest.npz")
    torch.manual_seed(0)
    small = TripletCnnConfig(stem_channels=4, block_channels=(4, 8), hidden=8, centre_window=0)
    member = tmp_path / "member"
    save_model_bundle(
        member, TripletCnn(small), name="real_bogus", version="1", temperature=1.0,
        dataset_hash=data.content_hash(),
    )  # fmt: skip
    args = ["models", "combine", str(member), "--dataset", str(dataset), "--no-register"]
    if extra == ["twice"]:
        args.insert(3, str(member))
    elif extra[0] == "--dataset":
        args[args.index("--dataset") + 1] = str(tmp_path / extra[1])
        args += ["--other-builds"]
    else:
        args += extra
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in _plain(result.output)
    assert "Traceback" not in result.output


def test_train_with_a_teacher_records_it(tmp_path: Path) -> None:
    from astrid.ml.serve import save_model_bundle

    dataset = _small_training_set(tmp_path / "small.npz")
    torch.manual_seed(0)
    small = TripletCnnConfig(stem_channels=4, block_channels=(4, 8), hidden=8, centre_window=0)
    meta = save_model_bundle(
        tmp_path / "teacher", TripletCnn(small), name="real_bogus", version="3", temperature=1.0
    )
    data_dir = tmp_path / "data"
    args = ["train", "--dataset", str(dataset), "--data-dir", str(data_dir), "--no-unet"]
    args += "--threads 1 --epochs 1 --stem-channels 4 --block-channels 4,8 --hidden 8".split()
    args += ["--centre-window", "0", "--teacher", str(tmp_path / "teacher")]
    refused = runner.invoke(app, [*args, "--teacher-weight", "0"])
    assert refused.exit_code == 2 and "--teacher-weight must be above 0" in _plain(refused.output)
    result = runner.invoke(app, [*args, "--teacher-weight", "0.3"])
    assert result.exit_code == 0, result.output
    assert "training targets: 0.7 x label + 0.3 x score of real_bogus version 3" in result.output
    registry = ModelRegistry(RegistryConfig.local(data_dir / "mlflow"))
    params = _run_params(registry, "real_bogus", 1).params
    assert params["teacher"] == f"real_bogus v3 ({meta.weights_sha256[:12]})"
    assert params["teacher_weight"] == "0.3"
