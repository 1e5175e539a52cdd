"""Tests of dataset hashing, energy reports and the MLflow registry round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from astrid.errors import ModelNotAvailable
from astrid.ml.models import TripletCnn, TripletCnnConfig
from astrid.ml.registry import (
    CHALLENGER,
    CHAMPION,
    ModelCardInfo,
    ModelRegistry,
    RegistryConfig,
    dataset_hash,
    load_scorer,
    measure_energy,
)
from astrid.ml.serve import Scorer, save_model_bundle
from astrid.ml.tests.toy_triplets import make_toy_triplets

torch.set_num_threads(1)

SMALL = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))


def test_dataset_hash_depends_on_pixels_labels_and_split() -> None:
    rng = np.random.default_rng(0)
    triplets = rng.normal(size=(6, 3, 8, 8)).astype(np.float32)
    labels, split = np.array([0, 1, 0, 1, 1, 0]), np.array([0, 0, 0, 1, 1, 2])
    reference = dataset_hash(triplets, labels, split)
    assert len(reference) == 64
    assert dataset_hash(triplets.copy(), labels.astype(float), split) == reference
    changed = triplets.copy()
    changed[3, 2, 4, 4] += 1e-3
    assert dataset_hash(changed, labels, split) != reference
    assert dataset_hash(triplets, labels[::-1], split) != reference
    assert dataset_hash(triplets, labels, np.array([0, 0, 1, 1, 1, 2])) != reference
    assert dataset_hash(triplets, labels, split, groups=list("aabbcc")) != reference


def test_energy_failure_is_reported_without_a_number(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # import fails
    with measure_energy(country_iso_code="FRA") as meter:
        pass
    report = meter.report
    assert report is not None and not report.measured
    assert report.energy_kwh is None and report.emissions_kg is None
    assert "codecarbon could not start" in report.reason
    assert report.summary().startswith("not measured")


def test_mlflow_round_trip(tmp_path: Path) -> None:
    triplets, _, _, _ = make_toy_triplets(8, seed=4, normalise=False)
    registry = ModelRegistry(RegistryConfig.local(tmp_path / "mlruns"))
    assert (tmp_path / "mlruns").is_dir()
    plot = tmp_path / "roc.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    models = []
    with measure_energy(country_iso_code="FRA") as meter:
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(TripletCnn(SMALL).eval())
    energy = meter.report
    assert energy is not None
    if energy.measured:
        assert energy.energy_kwh is not None and energy.energy_kwh >= 0
    else:
        assert energy.reason and energy.energy_kwh is None
    versions = [
        registry.register(
            model,
            name="real_bogus",
            temperature=1.0 + i,
            params={"seed": i, "epochs": 3},
            metrics={"auc": 0.9 + i / 100, "fnr_at_1pct_fpr": float("nan"), "n_real": 16188.0},
            plots=[plot],
            dataset_sha256="d" * 64,
            energy=energy,
            card=ModelCardInfo(data="toy triplets"),
            alias=None,
        )
        for i, model in enumerate(models)
    ]
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].metadata.version == "2"

    run = registry.client.get_run(versions[0].run_id)
    assert run.data.params["seed"] == "0"
    assert run.data.metrics["auc"] == pytest.approx(0.9)
    assert run.data.tags["dataset_sha256"] == "d" * 64
    assert run.data.tags["energy_status"].startswith("measured" if energy.measured else "not")
    artifacts = {a.path for a in registry.client.list_artifacts(versions[0].run_id, "model")}
    assert {"model/weights.pt", "model/metadata.json", "model/MODEL_CARD.md"} <= artifacts
    card = registry.model_card("real_bogus", 1)
    assert "toy triplets" in card and "## Energy" in card and "| auc | 0.9 |" in card
    assert "| n_real | 16188 |" in card and "| fnr_at_1pct_fpr | nan |" in card

    registry.promote("real_bogus", 1)
    registry.set_challenger("real_bogus", 2)
    assert registry.alias_version("real_bogus", CHAMPION) == 1
    assert registry.alias_version("real_bogus", CHALLENGER) == 2
    assert registry.promote("real_bogus") == 2  # the challenger becomes champion
    assert registry.alias_version("real_bogus", CHAMPION) == 2
    assert registry.alias_version("real_bogus", CHALLENGER) is None
    (summary,) = registry.list_models()
    assert summary.name == "real_bogus" and summary.versions == (1, 2)
    assert summary.aliases == {CHAMPION: 2} and summary.champion_history == (1, 2)

    assert registry.rollback("real_bogus") == 1
    assert registry.alias_version("real_bogus", CHAMPION) == 1
    with pytest.raises(ModelNotAvailable, match="no earlier champion"):
        registry.rollback("real_bogus")

    champion = registry.load_scorer("real_bogus", CHAMPION)
    assert champion.version == "1" and champion.metadata.temperature == 1.0
    save_model_bundle(
        tmp_path / "local", models[0], name="real_bogus", version="1", temperature=1.0
    )
    np.testing.assert_array_equal(
        champion.score(triplets), Scorer.from_path(tmp_path / "local").score(triplets)
    )
    with pytest.raises(ModelNotAvailable, match="no version with alias 'challenger'"):
        registry.load_scorer("real_bogus", CHALLENGER)

    # load_scorer: a bundle path first, then a registry alias, else the packaged model.
    by_alias = load_scorer("real_bogus", alias=CHAMPION, registry_dir=tmp_path / "mlruns")
    by_path = load_scorer("real_bogus", path=tmp_path / "local", alias=CHAMPION)
    np.testing.assert_array_equal(by_alias.score(triplets), by_path.score(triplets))
    assert load_scorer("real_bogus").version == Scorer.packaged("real_bogus").version
    with pytest.raises(ValueError, match="registry_dir"):
        load_scorer("real_bogus", alias=CHAMPION)
