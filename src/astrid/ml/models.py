"""Neural networks for real/bogus classification of difference-image candidates.

Two models, both plain :class:`torch.nn.Module` subclasses built from a frozen config:

* :class:`TripletCnn` scores one candidate from its cutout triplet, a ``(3, 63, 63)``
  stack of science, reference and difference stamps (channel order as
  :class:`~astrid.science.detect.Cutouts`), and returns one logit. It follows the shape of
  braai (Duev et al. 2019, ZTF's real/bogus network): a few convolution blocks with max
  pooling, then a small dense head; global average and max pooling replace braai's
  flattening, which keeps it under 100k parameters and fast on a CPU.
* :class:`HeatmapUNet` maps a whole difference tile ``(1, ny, nx)`` to a heat map of logits
  of the same size, high where a real transient is; :func:`heatmap_scores` turns the heat
  map into one score per candidate position.

Inputs are expected already normalised (see :func:`astrid.ml.alerts.normalise_triplet`);
normalisation is deliberately kept out of the models so that one trained network can be
fed by any front end that applies the same normalisation, whose name the model's metadata
records.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "HeatmapUNet",
    "TripletCnn",
    "TripletCnnConfig",
    "TripletCnnEnsemble",
    "UNetConfig",
    "count_parameters",
    "dihedral_tensor",
    "fuse_batch_norm",
    "heatmap_scores",
    "predict_heatmap",
    "predict_logits",
    "views_as_weights",
]


@dataclass(frozen=True)
class TripletCnnConfig:
    """Architecture of :class:`TripletCnn`.

    Attributes
    ----------
    in_channels : int
        Input planes: science, reference and difference.
    cutout_size : int
        Side of the square stamps, in pixels (63 as ZTF and
        :func:`~astrid.science.detect.make_cutouts`). The network itself accepts any size;
        this records what it was trained on.
    stem_channels : int
        Channels of the first convolution (5 x 5, stride 2), which halves the stamp.
    block_channels : tuple of int
        Channels of the 3 x 3 convolution blocks after the stem; every block but the last
        is followed by a 2 x 2 max pooling.
    hidden : int
        Units of the dense layer of the head.
    dropout : float
        Dropout before the output layer, during training only.
    centre_window : int
        Side, in cells of the last feature map, of a central window whose average and
        maximum are passed to the head beside the whole map's; 0 pools the whole map
        only. The candidate sits at the stamp's centre, while other sources, residuals
        and cosmic rays can sit anywhere in it; the window gives the head the features
        of the candidate itself. With a 63 x 63 stamp the last map is 4 x 4 cells of
        16 px and a 2 x 2 window covers the central 32 x 32 px. Bundles written before
        this option existed hold no value and are read as 0.
    crop : int
        Side, in pixels, of the centred square of the stamp the network looks at; 0 looks
        at the whole stamp. The outer ring is dropped before the stem, so a pass costs
        about ``(crop / cutout_size) ** 2`` of a whole-stamp pass (the stem and the first
        block, at full and half resolution, dominate); inputs are still whole stamps,
        normalised as a whole. ``cutout_size - crop`` must be even, so the crop is centred
        on the candidate. With a 63 x 63 stamp and ``crop=47`` the last feature map is
        3 x 3 cells and ``centre_window=1`` is its middle cell. Bundles written before this
        option existed hold no value and are read as 0.
    input_stretch : float
        Softening ``s`` of an inverse hyperbolic sine applied to every input pixel before
        the stem, ``s * asinh(x / s)``: linear within about ``s`` noise units of the
        background, logarithmic beyond, so that the few pixels of a bright star or cosmic
        ray (thousands of noise units) do not set the scale of the stem's batch
        normalisation, and with it of a faint candidate's few noise units. 0 leaves the
        inputs as they are. The transform is odd and acts on each pixel alone, so it
        commutes with the symmetries of the square (exact views) and leaves the 0 of
        masked or cropped-away pixels at 0. Bundles written before this option existed
        hold no value and are read as 0.
    """

    in_channels: int = 3
    cutout_size: int = 63
    stem_channels: int = 16
    block_channels: tuple[int, ...] = (16, 32, 128, 128)
    hidden: int = 32
    dropout: float = 0.2
    centre_window: int = 2
    crop: int = 0
    input_stretch: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.input_stretch) and self.input_stretch >= 0):
            raise ValueError(f"input_stretch must be finite and >= 0, not {self.input_stretch}")
        if self.crop and not (0 < self.crop <= self.cutout_size):
            raise ValueError(f"crop must be 0 or in 1..{self.cutout_size}, not {self.crop}")
        if self.crop and (self.cutout_size - self.crop) % 2:
            raise ValueError(
                f"crop {self.crop} cannot be centred in a {self.cutout_size} px stamp "
                "(their difference must be even)"
            )
        if not self.block_channels:
            raise ValueError("block_channels must name at least one block")
        if self.centre_window < 0:
            raise ValueError(f"centre_window must be >= 0, not {self.centre_window}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")


class _ConvBlock(nn.Module):
    """Convolution, batch normalisation, ReLU and an optional 2 x 2 max pooling."""

    def __init__(
        self, n_in: int, n_out: int, *, kernel: int = 3, stride: int = 1, pool: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(n_out)
        self.pool: nn.Module = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.bn(self.conv(x)), inplace=True))


class TripletCnn(nn.Module):
    """Real/bogus classifier of candidate cutout triplets.

    Parameters
    ----------
    config : TripletCnnConfig
        Architecture; the default has about 210k parameters.

    Notes
    -----
    ``forward`` takes a float tensor of shape ``(n, 3, ny, nx)`` (science, reference,
    difference, normalised) and returns logits of shape ``(n,)``; ``sigmoid(logit)`` is the
    uncalibrated probability that the candidate is real. Calibrated probabilities divide
    the logit by the temperature fitted with :func:`astrid.ml.train.fit_temperature`.
    """

    def __init__(self, config: TripletCnnConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else TripletCnnConfig()
        c = self.config
        self.stem = _ConvBlock(c.in_channels, c.stem_channels, kernel=5, stride=2)
        blocks: list[nn.Module] = []
        n_in = c.stem_channels
        for i, n_out in enumerate(c.block_channels):
            blocks.append(_ConvBlock(n_in, n_out, pool=i < len(c.block_channels) - 1))
            n_in = n_out
        self.blocks = nn.Sequential(*blocks)
        # Average pooling sees the whole stamp; max pooling keeps a compact feature (a
        # point source, a cosmic ray) from being diluted by the empty rest of the stamp.
        pools = 4 if c.centre_window else 2
        self.head = nn.Sequential(
            nn.Linear(pools * n_in, c.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(c.dropout),
            nn.Linear(c.hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crop = self.config.crop
        ny, nx = x.shape[-2:]
        if crop and (ny > crop or nx > crop):
            y0, x0 = max(ny - crop, 0) // 2, max(nx - crop, 0) // 2
            x = x[..., y0 : y0 + crop, x0 : x0 + crop]
            x = x.contiguous(memory_format=torch.channels_last)
        stretch = self.config.input_stretch
        if stretch:
            x = torch.asinh(x / stretch) * stretch
        features = self.blocks(self.stem(x))
        parts = [features.mean(dim=(2, 3)), features.amax(dim=(2, 3))]
        window = self.config.centre_window
        if window:
            ny, nx = features.shape[2:]
            if window > min(ny, nx):
                raise ValueError(
                    f"centre_window {window} exceeds the {ny} x {nx} last feature map of "
                    f"a {tuple(x.shape[2:])} input"
                )
            y0, x0 = (ny - window) // 2, (nx - window) // 2
            centre = features[:, :, y0 : y0 + window, x0 : x0 + window]
            parts += [centre.mean(dim=(2, 3)), centre.amax(dim=(2, 3))]
        return self.head(torch.cat(parts, dim=1)).squeeze(1)


def dihedral_tensor(x: torch.Tensor, k: int) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square to the last two axes of a tensor.

    The same transform as :func:`astrid.ml.train.dihedral` on arrays.

    Parameters
    ----------
    x : torch.Tensor, shape (..., ny, nx)
        Square planes (for rotations by odd multiples of 90 degrees).
    k : int
        0-3 rotate by ``k`` times 90 degrees; 4-7 transpose first, then rotate by
        ``k - 4`` times 90 degrees.

    Returns
    -------
    torch.Tensor
        The transformed planes (``x`` itself for ``k = 0``).

    Raises
    ------
    ValueError
        If ``k`` is not in 0..7.
    """
    if not 0 <= k < 8:
        raise ValueError(f"k must be in 0..7, not {k}")
    out = x.transpose(-1, -2) if k >= 4 else x
    return torch.rot90(out, k % 4, dims=(-2, -1)) if k % 4 else out


class TripletCnnEnsemble(nn.Module):
    """Mean logit of one or more :class:`TripletCnn` over symmetries of the input.

    Every member scores every view (a rotation or reflection of the stamps, see
    :func:`dihedral_tensor`), and the logits are averaged: ``members x views`` network
    passes per triplet. Averaging independently trained networks (an ensemble) or the
    views of one network (test-time augmentation) lowers the variance of the score; the
    networks were trained with every flip and rotation, so each view is an input they know.

    Parameters
    ----------
    members : sequence of TripletCnn
        Networks taking the same input shape.
    views : sequence of int
        Dihedral transforms (0-7, distinct) applied to the input; ``(0,)`` is the input
        as given.

    Raises
    ------
    TypeError
        If a member is not a :class:`TripletCnn` (ensembles do not nest).
    ValueError
        If there are no members, they take different inputs, or the views are not
        distinct integers in 0..7.

    Notes
    -----
    ``forward`` takes ``(n, 3, ny, nx)`` normalised triplets and returns ``(n,)`` logits,
    like :class:`TripletCnn`. ``config`` is the first member's, so code that asks a
    classifier for its input shape (``in_channels``, ``cutout_size``) treats the ensemble
    like one network.
    """

    def __init__(self, members: Sequence[TripletCnn], views: Sequence[int] = (0,)) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        others = sorted({type(m).__name__ for m in members if not isinstance(m, TripletCnn)})
        if others:
            raise TypeError(f"ensemble members must be TripletCnn, not {', '.join(others)}")
        shapes = {(m.config.in_channels, m.config.cutout_size) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"members take different inputs (channels, size): {sorted(shapes)}")
        views = tuple(int(k) for k in views)
        if not views or len(set(views)) != len(views) or not all(0 <= k < 8 for k in views):
            raise ValueError(f"views must be distinct integers in 0..7, not {views}")
        self.members = nn.ModuleList(members)
        self.views = views

    @property
    def config(self) -> TripletCnnConfig:
        """The first member's configuration (input shape)."""
        first = self.members[0]
        assert isinstance(first, TripletCnn)
        return first.config

    @property
    def member_configs(self) -> tuple[TripletCnnConfig, ...]:
        """Each member's configuration."""
        return tuple(m.config for m in self.members)  # type: ignore[misc]

    @property
    def n_passes(self) -> int:
        """Network passes per triplet: members times views."""
        return len(self.members) * len(self.views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for k in self.views:
            view = dihedral_tensor(x, k)
            if k:
                view = view.contiguous(memory_format=torch.channels_last)
            for member in self.members:
                logits = member(view)
                total = logits if total is None else total + logits
        assert total is not None
        return total / self.n_passes


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`HeatmapUNet`.

    Attributes
    ----------
    in_channels : int
        Input planes; 1 for a difference image (or its significance image).
    base_channels : int
        Channels at full resolution; each level down doubles them.
    depth : int
        Number of 2 x 2 down-samplings. Tiles whose sides are not multiples of
        ``2**depth`` are zero-padded on the far side and the output cropped back.
    """

    in_channels: int = 1
    base_channels: int = 8
    depth: int = 2

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, not {self.depth}")
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be positive, not {self.base_channels}")


class _DoubleConv(nn.Module):
    """Two 3 x 3 convolutions, each with batch normalisation and ReLU."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.first = _ConvBlock(n_in, n_out)
        self.second = _ConvBlock(n_out, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class HeatmapUNet(nn.Module):
    """Small U-Net that turns a difference tile into a heat map of real transients.

    Parameters
    ----------
    config : UNetConfig
        Architecture; the default (8 base channels, depth 2) has about 30k parameters.

    Notes
    -----
    ``forward`` takes ``(n, 1, ny, nx)`` (normalised difference tiles, any size; 64 x 64 to
    256 x 256 are typical) and returns logits of shape ``(n, 1, ny, nx)``, aligned pixel
    for pixel with the input. It is trained against disks of 1 around the true positions
    of real transients (:func:`astrid.ml.train.heatmap_target`).
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else UNetConfig()
        c = self.config
        widths = [c.base_channels * 2**level for level in range(c.depth + 1)]
        self.encoders = nn.ModuleList()
        n_in = c.in_channels
        for width in widths[:-1]:
            self.encoders.append(_DoubleConv(n_in, width))
            n_in = width
        self.bottleneck = _DoubleConv(widths[-2], widths[-1])
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(c.depth - 1, -1, -1):
            self.upsamplers.append(
                nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
            )
            self.decoders.append(_DoubleConv(2 * widths[level], widths[level]))
        self.output = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ny, nx = x.shape[-2:]
        multiple = 2**self.config.depth
        pad_y, pad_x = (-ny) % multiple, (-nx) % multiple
        if pad_y or pad_x:
            x = F.pad(x, (0, pad_x, 0, pad_y))
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(
            self.upsamplers, self.decoders, reversed(skips), strict=True
        ):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.output(x)[..., :ny, :nx]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fuse_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference, with batch normalisation folded into convolutions.

    Each convolution block's batch normalisation (in its evaluation form, with the running
    statistics) is merged into the preceding convolution's weights and bias, which removes
    a pass over every activation. The result computes the same function as
    ``model.eval()`` up to float rounding; it is in evaluation mode and not for training.

    Parameters
    ----------
    model : nn.Module
        A :class:`TripletCnn` or :class:`HeatmapUNet` (any module built of their blocks).

    Returns
    -------
    nn.Module
        The fused copy; ``model`` is unchanged.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, _ConvBlock) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return fused


def _dihedral_inverse(k: int) -> int:
    """The transform undoing :func:`dihedral_tensor`'s ``k``: rotations go back, reflections
    (4-7) are their own inverse."""
    return (4 - k) % 4 if k < 4 else k


def _views_are_exact(config: TripletCnnConfig) -> bool:
    """Whether every layer of a :class:`TripletCnn` maps its stamp symmetrically.

    A rotation or reflection of the input then rotates or reflects every feature map the
    same way: the strided stem's outputs are centred on pixels ``0, 2, ..., n - 1`` (``n``
    odd), each max pooling pairs cells ``(0, 1), ..., (n - 2, n - 1)`` (``n`` even), and
    the centre window sits in the middle of the last map (the same parity as its side).
    """
    size = config.cutout_size
    n = config.crop if config.crop and size > config.crop else size
    if (n - 1) % 2:
        return False
    n = (n - 1) // 2 + 1
    for _ in config.block_channels[:-1]:
        if n % 2:
            return False
        n //= 2
    window = config.centre_window
    return not window or (window <= n and (n - window) % 2 == 0)


def views_as_weights(model: TripletCnnEnsemble) -> TripletCnnEnsemble:
    """The same ensemble with its views moved from the input into the weights.

    A convolution of a rotated (or reflected) input is the rotated convolution of the
    input with the inversely rotated kernel; when every layer maps the stamp symmetrically
    (odd stamp side, even sides before each pooling, a centred window), the pooled features,
    and so the logit, of a view equal those of the untransformed input through a copy of
    the network whose kernels were transformed back. One such copy per member and view
    scores the input as given: the same passes, without transforming every batch for every
    view (a copy of the stamps in memory each time).

    Parameters
    ----------
    model : TripletCnnEnsemble
        Members and views, for inference (fused or not).

    Returns
    -------
    TripletCnnEnsemble
        ``members x views`` members and the single view 0, computing the same logits up to
        float rounding; ``model`` itself when it has only view 0 or when a view would not be
        exact for its ``cutout_size``.
    """
    if model.views == (0,):
        return model
    configs = model.member_configs
    if not all(_views_are_exact(c) for c in configs):
        return model
    baked: list[TripletCnn] = []
    for member in model.members:
        for k in model.views:
            rotated = copy.deepcopy(member)
            inverse = _dihedral_inverse(k)
            with torch.no_grad():
                for module in rotated.modules():
                    if isinstance(module, nn.Conv2d):
                        module.weight.copy_(dihedral_tensor(module.weight.clone(), inverse))
            baked.append(rotated)  # type: ignore[arg-type]
    return TripletCnnEnsemble(baked, views=(0,))


def predict_logits(
    model: nn.Module,
    triplets: ArrayLike,
    *,
    batch_size: int = 256,
) -> NDArray[np.float32]:
    """Logits of a triplet classifier for a stack of normalised triplets.

    The model is put in evaluation mode and its parameters in ``channels_last`` memory
    layout (faster convolutions on CPUs; both changes stay on ``model``), then run under
    :func:`torch.inference_mode` batch by batch. For serving, pass the output of
    :func:`fuse_batch_norm`, as :class:`~astrid.ml.serve.Scorer` does.

    Parameters
    ----------
    model : nn.Module
        A :class:`TripletCnn` (or any module mapping ``(n, 3, ny, nx)`` to ``(n,)``).
    triplets : array_like, shape (n, 3, ny, nx)
        Normalised cutout triplets.
    batch_size : int
        Triplets per forward pass.

    Returns
    -------
    ndarray of float32, shape (n,)
        One logit per triplet.
    """
    data = np.ascontiguousarray(triplets, dtype=np.float32)
    if data.ndim != 4:
        raise ValueError(f"expected triplets of shape (n, 3, ny, nx), got {data.shape}")
    model.eval()
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    out = np.empty(len(data), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = torch.from_numpy(data[start : start + batch_size])
            batch = batch.contiguous(memory_format=torch.channels_last)
            out[start : start + len(batch)] = model(batch).float().numpy()
    return out


def predict_heatmap(model: nn.Module, tiles: ArrayLike) -> NDArray[np.float32]:
    """Heat-map logits of a :class:`HeatmapUNet` for one tile or a stack of tiles.

    Parameters
    ----------
    model : nn.Module
        The U-Net.
    tiles : array_like, shape (ny, nx) or (n, ny, nx) or (n, 1, ny, nx)
        Normalised difference tiles.

    Returns
    -------
    ndarray of float32
        Logits with the shape of ``tiles``.
    """
    data = np.ascontiguousarray(tiles, dtype=np.float32)
    shape = data.shape
    if data.ndim == 2:
        data = data[None, None]
    elif data.ndim == 3:
        data = data[:, None]
    elif data.ndim != 4:
        raise ValueError(
            f"expected tiles of shape (ny, nx), (n, ny, nx) or (n, 1, ny, nx), got {shape}"
        )
    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(data)).float().numpy()
    return logits.reshape(shape)


def heatmap_scores(
    heatmap: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    radius: float = 3.0,
    logits: bool = True,
) -> NDArray[np.float64]:
    """Score candidates from a heat map: the largest probability within ``radius``.

    Parameters
    ----------
    heatmap : array_like, shape (ny, nx)
        Output of :class:`HeatmapUNet` for one tile (logits), or probabilities.
    x, y : array_like, shape (n,)
        0-based pixel positions of the candidates in the tile (``x`` along columns).
    radius : float
        Pixels whose centres lie within this distance of a candidate are considered.
    logits : bool
        True when ``heatmap`` holds logits (a sigmoid is applied), False when it already
        holds probabilities.

    Returns
    -------
    ndarray of float64, shape (n,)
        The maximum of ``sigmoid(heatmap)`` over each candidate's disk; NaN for a
        candidate whose disk contains no pixel of the tile.
    """
    grid = np.asarray(heatmap, dtype=np.float64)
    if grid.ndim != 2:
        raise ValueError(f"expected a 2-D heat map, got shape {grid.shape}")
    if radius < 0:
        raise ValueError(f"radius must be non-negative, not {radius}")
    probs = expit(grid) if logits else grid
    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if xs.shape != ys.shape:
        raise ValueError(f"x and y differ in shape: {xs.shape} and {ys.shape}")
    ny, nx = grid.shape
    out = np.full(xs.shape, np.nan)
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        x0, x1 = max(0, int(np.ceil(xi - radius))), min(nx, int(np.floor(xi + radius)) + 1)
        y0, y1 = max(0, int(np.ceil(yi - radius))), min(ny, int(np.floor(yi + radius)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = (xx - xi) ** 2 + (yy - yi) ** 2 <= radius**2
        if inside.any():
            out[i] = float(probs[y0:y1, x0:x1][inside].max())
    return out
