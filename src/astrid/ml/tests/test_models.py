"""Tests of the network architectures and the heat-map scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from astrid.ml.models import (
    HeatmapUNet,
    TripletCnn,
    TripletCnnConfig,
    TripletCnnEnsemble,
    UNetConfig,
    count_parameters,
    dihedral_tensor,
    fuse_batch_norm,
    heatmap_scores,
    predict_heatmap,
    predict_logits,
    views_as_weights,
)
from astrid.ml.train import dihedral

torch.set_num_threads(1)


def test_triplet_cnn_is_small_and_gives_one_logit_per_triplet() -> None:
    torch.manual_seed(0)
    model = TripletCnn()
    assert count_parameters(model) < 250_000
    x = np.random.default_rng(0).normal(size=(5, 3, 63, 63)).astype(np.float32)
    logits = predict_logits(model, x, batch_size=2)
    assert logits.shape == (5,)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))


def test_fused_batch_norm_computes_the_same_function() -> None:
    torch.manual_seed(1)
    model = TripletCnn(TripletCnnConfig(block_channels=(8, 16)))
    for module in model.modules():  # non-trivial running statistics and affine terms
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    x = np.random.default_rng(1).normal(size=(4, 3, 63, 63)).astype(np.float32)
    expected = predict_logits(model, x)
    fused = fuse_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    np.testing.assert_allclose(predict_logits(fused, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (100, 77), (31, 45)])
def test_unet_keeps_the_tile_shape(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = HeatmapUNet(UNetConfig(base_channels=4, depth=2))
    tiles = np.random.default_rng(0).normal(size=(2, *shape))
    heat = predict_heatmap(model, tiles)
    assert heat.shape == (2, *shape)
    assert predict_heatmap(model, tiles[0]).shape == shape


def test_default_unet_runs_on_a_256_tile() -> None:
    torch.manual_seed(0)
    model = HeatmapUNet()
    assert count_parameters(model) < 250_000
    heat = predict_heatmap(model, np.zeros((1, 1, 256, 256), np.float32))
    assert heat.shape == (1, 1, 256, 256)


def test_heatmap_scores_take_the_maximum_within_the_radius() -> None:
    heat = np.full((10, 12), -10.0)
    heat[5, 7] = 3.0  # row y=5, column x=7
    heat[0, 0] = 1.0
    scores = heatmap_scores(
        heat, x=[7.0, 9.0, 10.0, 0.4, 50.0], y=[5.0, 5.0, 5.0, 0.3, 50.0], radius=2.0
    )
    assert scores[0] == pytest.approx(expit(3.0))
    assert scores[1] == pytest.approx(expit(3.0))  # distance exactly 2: inside
    assert scores[2] == pytest.approx(expit(-10.0))  # distance 3: outside
    assert scores[3] == pytest.approx(expit(1.0))
    assert np.isnan(scores[4])  # no pixel of the tile within reach
    probs = expit(heat)
    np.testing.assert_allclose(
        heatmap_scores(probs, [7.0], [5.0], radius=0.0, logits=False), [expit(3.0)]
    )


def test_centre_window_widens_the_head_and_defaults_on() -> None:
    assert TripletCnnConfig().centre_window == 2
    narrow = TripletCnn(TripletCnnConfig(centre_window=0))
    wide = TripletCnn()
    # Average and maximum of the last block's channels over the central window.
    extra = 2 * wide.config.block_channels[-1] * wide.config.hidden
    assert count_parameters(wide) - count_parameters(narrow) == extra
    with pytest.raises(ValueError, match="centre_window"):
        TripletCnnConfig(centre_window=-1)


def test_centre_window_larger_than_the_feature_map_is_refused() -> None:
    model = TripletCnn(TripletCnnConfig(centre_window=4))
    with pytest.raises(ValueError, match="exceeds"):
        predict_logits(model, np.zeros((1, 3, 31, 31), dtype=np.float32))


def test_crop_looks_only_at_the_centre_of_the_stamp() -> None:
    torch.manual_seed(2)
    cropped = TripletCnn(TripletCnnConfig(crop=47, centre_window=1)).eval()
    whole = TripletCnn(TripletCnnConfig(centre_window=1)).eval()
    whole.load_state_dict(cropped.state_dict())
    x = np.random.default_rng(2).normal(size=(4, 3, 63, 63)).astype(np.float32)
    inner = np.ascontiguousarray(x[..., 8:55, 8:55])
    expected = predict_logits(whole, inner)
    np.testing.assert_allclose(predict_logits(cropped, x), expected, rtol=1e-5, atol=1e-5)
    # The outer ring does not matter; a stamp already at the crop's size is used as it is.
    ring = x.copy()
    ring[..., :8, :] = 1e3
    np.testing.assert_allclose(predict_logits(cropped, ring), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict_logits(cropped, inner), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("crop", "message"), [(-1, "crop must be"), (64, "crop must be"), (46, "centred")]
)
def test_crop_must_fit_and_be_centred(crop: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TripletCnnConfig(crop=crop)


def test_input_stretch_is_asinh_of_the_inputs_before_the_stem() -> None:
    torch.manual_seed(3)
    stretched = TripletCnn(TripletCnnConfig(crop=47, centre_window=1, input_stretch=3.0)).eval()
    plain = TripletCnn(TripletCnnConfig(crop=47, centre_window=1)).eval()
    plain.load_state_dict(stretched.state_dict())
    x = np.random.default_rng(3).normal(size=(4, 3, 63, 63)).astype(np.float32)
    x[:, :, 31, 31] = 5e3  # a bright pixel: compressed to about 24 noise units
    expected = predict_logits(plain, (3.0 * np.arcsinh(x / 3.0)).astype(np.float32))
    np.testing.assert_allclose(predict_logits(stretched, x), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(predict_logits(plain, x), expected, atol=1e-3)


@pytest.mark.parametrize("stretch", [-1.0, float("nan"), float("inf")])
def test_input_stretch_must_be_finite_and_not_negative(stretch: float) -> None:
    with pytest.raises(ValueError, match="input_stretch"):
        TripletCnnConfig(input_stretch=stretch)


@pytest.mark.parametrize(
    "config",
    [
        TripletCnnConfig(),
        TripletCnnConfig(crop=47, centre_window=1),
        TripletCnnConfig(crop=31),
        TripletCnnConfig(crop=47, centre_window=1, input_stretch=3.0),
    ],
)
def test_views_as_weights_give_the_same_logits(config: TripletCnnConfig) -> None:
    torch.manual_seed(5)
    members = [TripletCnn(config), TripletCnn(config)]
    for member in members:  # non-trivial running statistics, so fusing matters too
        member.train()
        with torch.no_grad():
            member(torch.randn(16, 3, 63, 63))
    ensemble = fuse_batch_norm(TripletCnnEnsemble(members, views=range(8)))
    assert isinstance(ensemble, TripletCnnEnsemble)
    baked = views_as_weights(ensemble)
    assert baked is not ensemble and baked.views == (0,) and baked.n_passes == 16
    x = np.random.default_rng(5).normal(size=(6, 3, 63, 63)).astype(np.float32)
    np.testing.assert_allclose(
        predict_logits(baked, x), predict_logits(ensemble, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "config",
    [
        TripletCnnConfig(crop=47, centre_window=2),  # a 2-cell window in a 3 x 3 map
        TripletCnnConfig(cutout_size=64),  # the stride-2 stem is not centred
        TripletCnnConfig(crop=39, centre_window=0),  # 20 -> 10 -> 5 cannot pool evenly
    ],
)
def test_views_stay_on_the_input_where_weights_would_differ(config: TripletCnnConfig) -> None:
    ensemble = TripletCnnEnsemble([TripletCnn(config)], views=(0, 2))
    assert views_as_weights(ensemble) is ensemble


@pytest.mark.parametrize("k", range(8))
def test_dihedral_tensor_matches_the_array_transform(k: int) -> None:
    x = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    np.testing.assert_array_equal(dihedral_tensor(torch.from_numpy(x), k).numpy(), dihedral(x, k))


def test_ensemble_is_the_mean_logit_over_members_and_views() -> None:
    small = TripletCnnConfig(stem_channels=4, block_channels=(8, 8))
    torch.manual_seed(0)
    members = [TripletCnn(small).eval(), TripletCnn(small).eval()]
    x = torch.randn(6, 3, 63, 63)
    ensemble = TripletCnnEnsemble(members, views=(0, 5)).eval()
    assert ensemble.n_passes == 4 and ensemble.config == small
    with torch.no_grad():
        expected = torch.stack([m(dihedral_tensor(x, k)) for m in members for k in (0, 5)]).mean(0)
        torch.testing.assert_close(ensemble(x), expected)
        # A single network with the identity view is that network.
        torch.testing.assert_close(TripletCnnEnsemble(members[:1]).eval()(x), members[0](x))
    # Scores of a rotated stamp differ from the stamp's for one network, but an ensemble
    # over all four rotations gives every rotation of a stamp the same score.
    rot = TripletCnnEnsemble(members[:1], views=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            rot(torch.rot90(x, 1, dims=(2, 3))), rot(x), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(
    ("views", "message"),
    [((), "distinct integers"), ((0, 0), "distinct integers"), ((8,), "distinct integers")],
)
def test_ensemble_refuses_bad_views(views: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TripletCnnEnsemble([TripletCnn()], views=views)


def test_ensemble_refuses_members_with_different_inputs() -> None:
    with pytest.raises(ValueError, match="different inputs"):
        TripletCnnEnsemble([TripletCnn(), TripletCnn(TripletCnnConfig(cutout_size=31))])
    with pytest.raises(ValueError, match="at least one member"):
        TripletCnnEnsemble([])
