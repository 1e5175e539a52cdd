"""Background and noise maps.

A thin, typed layer over sep's SExtractor-style mesh background: the image is cut into
boxes, each box's background is a sigma-clipped mode estimate, the box grid is median
filtered and spline-interpolated back to full resolution. The same algorithm as
SExtractor, so its maps are comparable to SExtractor's ``BACKGROUND`` and
``BACKGROUND_RMS`` check images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from numpy.typing import NDArray

from astrid.errors import EmptyImage, ShapeMismatch
from astrid.exposure import check_image

__all__ = ["BackgroundConfig", "BackgroundResult", "estimate_background"]


@dataclass(frozen=True)
class BackgroundConfig:
    """Options of :func:`estimate_background`.

    Attributes
    ----------
    box_size : int
        Side of the background mesh boxes in pixels (SExtractor ``BACK_SIZE``).
    filter_size : int
        Median filter over the box grid, in boxes (SExtractor ``BACK_FILTERSIZE``).
    filter_threshold : float
        Only boxes deviating by more than this from the filtered value are filtered
        (SExtractor ``BACK_FILTTHRESH``).
    """

    box_size: int = 64
    filter_size: int = 3
    filter_threshold: float = 0.0


@dataclass(frozen=True)
class BackgroundResult:
    """Background estimate of an image.

    Attributes
    ----------
    background : ndarray, shape (ny, nx), float32
        Background level per pixel, in data units.
    rms : ndarray, shape (ny, nx), float32
        Background noise (1-sigma) per pixel, in data units.
    global_background : float
        Mean background over the mesh.
    global_rms : float
        Mean background noise over the mesh.
    """

    background: NDArray[np.float32]
    rms: NDArray[np.float32]
    global_background: float
    global_rms: float


def estimate_background(
    data: NDArray[np.floating],
    *,
    mask: NDArray[np.bool_] | None = None,
    config: BackgroundConfig | None = None,
) -> BackgroundResult:
    """Estimate the background level and noise of an image.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Image. Non-finite pixels are ignored.
    mask : ndarray of bool, shape (ny, nx), or None
        True where pixels must be ignored (bad, saturated, sources). ``None``: none.
    config : BackgroundConfig or None
        Options; ``None`` uses the defaults.

    Returns
    -------
    BackgroundResult

    Raises
    ------
    ShapeMismatch
        If ``mask`` and ``data`` differ in shape.
    EmptyImage
        If no pixel is usable.
    """
    cfg = config or BackgroundConfig()
    arr = np.ascontiguousarray(check_image(data, "data"), dtype=np.float32)
    ignore = ~np.isfinite(arr)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != arr.shape:
            raise ShapeMismatch({"data": arr.shape, "mask": m.shape})
        ignore |= m
    n_good = int(arr.size - np.count_nonzero(ignore))
    if n_good == 0:
        raise EmptyImage(0, arr.size)
    clean = np.where(ignore, 0.0, arr).astype(np.float32)
    box = int(min(cfg.box_size, max(arr.shape)))
    bkg = sep.Background(
        clean,
        mask=ignore,
        bw=box,
        bh=box,
        fw=cfg.filter_size,
        fh=cfg.filter_size,
        fthresh=cfg.filter_threshold,
    )
    return BackgroundResult(
        background=bkg.back(dtype=np.float32),
        rms=bkg.rms(dtype=np.float32),
        global_background=float(bkg.globalback),
        global_rms=float(bkg.globalrms),
    )
