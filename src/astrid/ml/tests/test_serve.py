"""Tests of model bundles, the scorer and shadow scoring."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit

from astrid.errors import BadImageShape, ModelNotAvailable
from astrid.ml.alerts import normalise_triplet
from astrid.ml.models import (
    TripletCnn,
    TripletCnnConfig,
    TripletCnnEnsemble,
    fuse_batch_norm,
    predict_logits,
)
from astrid.ml.serve import (
    METADATA_FILE,
    WEIGHTS_FILE,
    Scorer,
    load_bundle,
    packaged_model_path,
    save_model_bundle,
    shadow_score,
)
from astrid.ml.tests.toy_triplets import make_toy_triplets
from astrid.ml.train import dihedral

torch.set_num_threads(1)

SMALL = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))


def _model(seed: int) -> TripletCnn:
    torch.manual_seed(seed)
    return TripletCnn(SMALL).eval()


@pytest.fixture(scope="module")
def raw_triplets() -> np.ndarray:
    triplets, _, _, _ = make_toy_triplets(12, seed=3, normalise=False)
    return triplets


def test_bundle_round_trip_scores_like_the_model(tmp_path: Path, raw_triplets) -> None:
    model = _model(0)
    meta = save_model_bundle(
        tmp_path / "rb",
        model,
        name="real_bogus",
        version="7",
        temperature=1.7,
        metrics={"auc": 0.99},
        dataset_hash="abc",
    )
    assert meta.weights_sha256 and meta.model_config["block_channels"] == [8, 8]
    scorer = Scorer.from_path(tmp_path / "rb", batch_size=5)
    assert scorer.version == "7" and scorer.metadata == meta
    scores = scorer.score(raw_triplets)  # raw cutouts with NaN: the scorer normalises
    expected_logits = predict_logits(fuse_batch_norm(model), normalise_triplet(raw_triplets))
    np.testing.assert_allclose(scores, expit(expected_logits / 1.7), rtol=1e-6)
    np.testing.assert_allclose(
        scorer.score(normalise_triplet(raw_triplets), normalised=True), scores, rtol=1e-6
    )
    assert scorer.score(raw_triplets[0]).shape == (1,)


def test_cropped_ensemble_bundle_keeps_its_crop_and_stretch(tmp_path: Path, raw_triplets) -> None:
    torch.manual_seed(4)
    member = TripletCnn(replace(SMALL, crop=41, centre_window=0, input_stretch=3.0)).eval()
    model = TripletCnnEnsemble([member], views=(0, 1, 2, 3))
    meta = save_model_bundle(
        tmp_path / "rb",
        model,
        name="real_bogus",
        version="3",
        temperature=1.0,
        metrics={},
        dataset_hash="abc",
    )
    assert [m["crop"] for m in meta.model_config["members"]] == [41]
    assert [m["input_stretch"] for m in meta.model_config["members"]] == [3.0]
    scorer = Scorer.from_path(tmp_path / "rb")
    normalised = normalise_triplet(raw_triplets)
    expected = predict_logits(fuse_batch_norm(model), normalised)
    np.testing.assert_allclose(scorer.logits(raw_triplets), expected, rtol=1e-5, atol=1e-5)
    # Only the central 41 px of the normalised stamps reach the network.
    outside = normalised.copy()
    outside[..., :11, :] = 50.0
    np.testing.assert_allclose(
        scorer.logits(outside, normalised=True), expected, rtol=1e-5, atol=1e-5
    )


def test_missing_or_damaged_bundles_raise_model_not_available(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="no model bundle folder") as info:
        Scorer.from_path(tmp_path / "nowhere")
    assert info.value.reason
    with pytest.raises(ModelNotAvailable, match="no packaged weights"):
        Scorer.packaged("no_such_model")
    with pytest.raises(ModelNotAvailable):
        packaged_model_path("no_such_model")

    folder = tmp_path / "rb"
    save_model_bundle(folder, _model(0), name="rb", version="1", temperature=1.0)
    (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:-10])
    with pytest.raises(ModelNotAvailable, match="SHA-256"):
        Scorer.from_path(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelNotAvailable, match=r"missing weights\.pt"):
        Scorer.from_path(folder)

    save_model_bundle(folder, _model(0), name="rb", version="1", temperature=1.0)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["normalisation"] = "something_else"
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelNotAvailable, match="unknown input normalisation"):
        Scorer.from_path(folder)
    meta["normalisation"] = "none"
    meta["model_config"]["block_channels"] = [8, 16]  # does not match the weights
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelNotAvailable, match="weights do not load"):
        Scorer.from_path(folder)
    (folder / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelNotAvailable, match="unreadable"):
        Scorer.from_path(folder)


def test_scorer_checks_the_input_shape(tmp_path: Path) -> None:
    save_model_bundle(tmp_path, _model(0), name="rb", version="1", temperature=1.0)
    scorer = Scorer.from_path(tmp_path)
    with pytest.raises(BadImageShape):
        scorer.score(np.zeros((2, 3, 32, 32)))
    with pytest.raises(BadImageShape):
        scorer.score(np.zeros((2, 2, 63, 63)))


def test_shadow_mode_scores_with_both_models(tmp_path: Path, raw_triplets) -> None:
    save_model_bundle(tmp_path / "a", _model(0), name="rb", version="1", temperature=1.0)
    save_model_bundle(tmp_path / "b", _model(1), name="rb", version="2", temperature=2.0)
    champion, challenger = Scorer.from_path(tmp_path / "a"), Scorer.from_path(tmp_path / "b")
    shadow = shadow_score(champion, challenger, raw_triplets)
    assert (shadow.champion_version, shadow.challenger_version) == ("1", "2")
    np.testing.assert_allclose(shadow.champion, champion.score(raw_triplets))
    np.testing.assert_allclose(shadow.challenger, challenger.score(raw_triplets))
    np.testing.assert_allclose(shadow.disagreement, shadow.challenger - shadow.champion)
    assert not np.allclose(shadow.champion, shadow.challenger)


def test_threaded_normalisation_equals_one_call() -> None:
    scorer = Scorer.packaged("real_bogus")
    rng = np.random.default_rng(4)
    raw = rng.normal(50.0, 3.0, (300, 3, 63, 63)).astype(np.float32)
    raw[:7, :, :, :9] = np.nan  # cutouts at an image edge
    raw[10, 1] = np.nan  # a plane with no data
    raw[11, 2] = 5.0  # a constant plane
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = scorer.normalise(raw)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(threaded, normalise_triplet(raw))


def test_ensemble_bundle_round_trip_averages_members_and_views(
    tmp_path: Path, raw_triplets
) -> None:
    members = [_model(0), _model(1)]
    ensemble = TripletCnnEnsemble(members, views=(0, 2))
    meta = save_model_bundle(
        tmp_path / "ens", ensemble, name="real_bogus", version="8", temperature=1.3
    )
    assert meta.architecture == "TripletCnnEnsemble"
    assert meta.model_config["views"] == [0, 2] and len(meta.model_config["members"]) == 2
    loaded, loaded_meta = load_bundle(tmp_path / "ens")
    assert isinstance(loaded, TripletCnnEnsemble) and loaded_meta == meta
    x = normalise_triplet(raw_triplets)
    expected = np.mean(
        [
            predict_logits(fuse_batch_norm(m), np.ascontiguousarray(dihedral(x, k)))
            for m in members
            for k in (0, 2)
        ],
        axis=0,
    )
    scores = Scorer.from_path(tmp_path / "ens", batch_size=5).score(raw_triplets)
    np.testing.assert_allclose(scores, expit(expected / 1.3), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="single TripletCnnConfig"):
        loaded_meta.cnn_config()


def test_bundle_with_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    save_model_bundle(tmp_path / "rb", _model(0), name="real_bogus", version="1", temperature=1.0)
    meta_path = tmp_path / "rb" / METADATA_FILE
    data = json.loads(meta_path.read_text())
    data["architecture"] = "VisionTransformer"
    meta_path.write_text(json.dumps(data))
    with pytest.raises(ModelNotAvailable, match="unknown architecture 'VisionTransformer'"):
        Scorer.from_path(tmp_path / "rb")


@pytest.mark.parametrize(
    "config",
    [
        {"members": [], "views": [0]},
        {"members": "x", "views": [0]},
        {"view": [0, 2]},
        {"members": [{}], "views": "02"},
        {"members": [{}], "views": [0, 2], "extra": 1},
    ],
)
def test_malformed_ensemble_config_is_refused(tmp_path: Path, config: dict) -> None:
    ensemble = TripletCnnEnsemble([_model(0)], views=(0, 2))
    save_model_bundle(tmp_path / "ens", ensemble, name="real_bogus", version="1", temperature=1.0)
    meta_path = tmp_path / "ens" / METADATA_FILE
    data = json.loads(meta_path.read_text())
    data["model_config"] = config
    meta_path.write_text(json.dumps(data))
    with pytest.raises(ModelNotAvailable, match="malformed model_config"):
        load_bundle(tmp_path / "ens")


def test_ensembles_do_not_nest() -> None:
    inner = TripletCnnEnsemble([_model(0)])
    with pytest.raises(TypeError, match="must be TripletCnn, not TripletCnnEnsemble"):
        TripletCnnEnsemble([_model(1), inner])  # type: ignore[list-item]
