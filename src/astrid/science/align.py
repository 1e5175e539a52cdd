"""Alignment: resample a reference exposure onto a science exposure's pixel grid.

The output pixel ``(x, y)`` of the science grid takes the reference value at the
reference pixel ``(x', y') = F(x, y)``. The mapping ``F`` is one of:

* ``"wcs"``: science pixel -> sky (science WCS) -> reference pixel (reference WCS),
  distortions (TPV, SIP) included;
* ``"wcs+stars"``: the WCS mapping preceded by a similarity correction (shift,
  rotation, scale) fitted to matched stars, when that correction moves the science grid
  by more than ``max_wcs_error_pix``; the WCS distortion terms are kept;
* ``"stars"``: a similarity transform alone, when a WCS is missing.

Stars are matched by asterism (triangle-invariant) matching with astroalign on the
two star lists (never on the images, which would detect the stars again), then the
transform is refined by least squares on every pair of mutual nearest neighbours.

Resampling method, and why
--------------------------
``F`` is smooth, so it is evaluated exactly only on a coarse grid of nodes (every
``map_step`` = 32 pixels: 17 thousand WCS evaluations instead of 16.7 million for a
4096x4096 image) and interpolated between nodes with cubic convolution. Against a
per-pixel evaluation the error is 1e-9 pixel for two TAN WCSs and 1e-7 pixel for the
TPV WCSs of two different DECam CCDs over a whole 4096x2048 CCD. The image is then
interpolated at ``F(x, y)`` with a local separable kernel: Keys cubic convolution
(a = -0.5, 4x4 taps, ``order=3``, the default) or bilinear (2x2 taps, ``order=1``).
Indices and weights are computed once per block of rows and serve the data, the
variance (packed with the data into one complex plane, so one gather and one multiply
per tap serve both) and the mask; blocks run in threads (numpy releases the GIL).

CPU seconds for a 4096x4096 float32 pair with TAN WCS (shift (3.3, -1.7) px, rotation
0.3 deg), on the 2-core development machine (wall-clock times there were inflated by
other jobs, so CPU time is the fair comparison; the chosen method took 1.0 to 2.0 s
of wall time with two threads there):

======================================================================  =========
method (planes resampled)                                               CPU s
======================================================================  =========
coarse map + Keys cubic, shared weights (data, variance, mask): chosen  1.3 - 1.8
coarse map + bilinear, shared weights (data, variance, mask)            0.8 - 1.1
coarse map + scipy ``map_coordinates``, spline order 3 (d, v, mask)     5.8 - 7.0
coarse map + scipy ``map_coordinates``, order 1 (data, variance, mask)  2.8 - 3.3
reproject ``reproject_interp`` bilinear, defaults (data only)           19.5
reproject ``reproject_interp`` bicubic, ``roundtrip_coords=False``      11.0
reproject ``reproject_interp`` bilinear, no round trip, ``parallel=2``  11.5
reproject ``reproject_adaptive``, ``conserve_flux=True`` (data only)    39.9
======================================================================  =========

reproject evaluates the WCS at every pixel and then interpolates each plane
separately; the mask would need one more call per bit plane. The whole
:func:`align_to` with the star lists given (as the PSF stage has them) took 1.7 to
2.1 CPU s; detecting stars here instead costs 1.3 to 2.3 s per 4k image.

Cubic convolution was chosen over the faster bilinear kernel because bilinear
interpolation smooths by an amount that depends on the sub-pixel phase of ``F``: under
a small rotation the phase beats across the image, so the reference's effective PSF
and noise level vary on scales of a hundred pixels, which a PSF-matching kernel cannot
follow. Cubic convolution smooths far less (white-noise variance factor 0.41 at the
worst phase, against 0.25 for bilinear) and, unlike scipy's cubic B-spline (whose
prefilter is an infinite recursive filter, and which costs 4 times more here), has a 4x4
support, so a masked or NaN pixel affects only the 16 output pixels around it and can
be flagged exactly. The flux-conserving adaptive resampling of reproject handles noise
and flux best, but for the data plane alone it takes over 20 times the CPU time the
chosen method needs for all three planes, far beyond the 8 s budget of the whole chain.
``order=1`` remains for when speed matters most.

Variance and mask
-----------------
The variance is interpolated with the same kernel as the data (an approximation). It
ignores the noise correlation that interpolation introduces: for a locally constant
input variance ``var`` and uncorrelated input noise, an interpolated pixel has variance
``sum(w**2) * var`` (0.41 to 1 times ``var`` for cubic, depending on the sub-pixel
phase; 0.25 to 1 for bilinear) while the propagated variance is ``var``. So the
propagated variance overestimates the per-pixel variance (by up to 2.4x for cubic) but
is right for sums over areas larger than the kernel (apertures, PSF fits), where the
covariances between neighbouring output pixels add back in.

Mask bits propagate so that every output pixel whose interpolation kernel touches a
flagged input pixel carries that flag (the mask is OR-dilated by the kernel footprint
and sampled at the kernel's corner). Output pixels outside the reference image are
flagged ``NO_DATA`` (data NaN, variance inf); pixels within ``edge_width`` reference
pixels of the reference image's border are flagged ``EDGE``. Input pixels that are
``NO_DATA`` or not finite are zero-filled before interpolation, and every output pixel
they touch is ``NO_DATA`` with NaN data.

Flux
----
With ``conserve_flux`` (the default) the resampled data are multiplied by the Jacobian
determinant of ``F`` (reference pixels per science pixel) and the variance by its
square, so the total flux of a source, and hence the reference's photometric zero
point, is kept when the pixel scales differ.

Pixel convention: 0-based pixel centres, ``x`` along columns, arrays indexed ``[y, x]``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, NoConvergence
from numpy.typing import ArrayLike, NDArray

from astrid.errors import InsufficientOverlap, NoCelestialWcs, ShapeMismatch, StarMatchFailed
from astrid.exposure import UNUSABLE, Exposure, MaskBit
from astrid.science.background import BackgroundConfig, estimate_background
from astrid.science.stars import StarConfig, find_sources, select_stars

__all__ = [
    "AlignConfig",
    "AlignmentResult",
    "AlignmentWarning",
    "PixelMap",
    "ResampledArrays",
    "StarMatch",
    "align_to",
    "detect_star_positions",
    "match_stars",
    "resample_arrays",
]

_NO_DATA = np.uint16(MaskBit.NO_DATA)
_EDGE = np.uint16(MaskBit.EDGE)
#: Padding (pixels) around input planes so that every kernel tap has an index.
_PAD = 3
#: Target number of output pixels per block processed by one thread.
_BLOCK_PIXELS = 1 << 16
#: Value given to map nodes where the WCS has no solution; far outside any image.
_FAR = -1.0e7


class AlignmentWarning(UserWarning):
    """A data-quality problem of an alignment that did not stop it (e.g. no residual)."""


@dataclass(frozen=True)
class AlignConfig:
    """Options of :func:`align_to`.

    Attributes
    ----------
    method : {"auto", "wcs", "wcs+stars", "stars"}
        ``"wcs"``: map through the two WCSs (both required). ``"wcs+stars"``: the WCS
        map corrected by a similarity transform fitted to matched stars (keeps the
        WCS distortion terms, removes a zero-point shift or rotation error).
        ``"stars"``: a similarity transform from matched stars alone. ``"auto"``:
        without two WCSs, ``"stars"``; with them, ``"wcs+stars"`` when the WCS is off
        by more than ``max_wcs_error_pix`` (see there), else ``"wcs"`` (also when too
        few stars match).
    order : {1, 3}
        Interpolation kernel: 1 bilinear (2x2 taps), 3 Keys cubic convolution (4x4 taps).
    max_wcs_error_pix : float
        In ``"auto"``, largest accepted WCS error (science pixels). When the median
        distance between the WCS-predicted and measured positions of matched stars
        exceeds it (or cannot be measured), a similarity correction is fitted to the
        stars, and it is applied when it moves some corner or the centre of the science
        grid by more than this; centroid noise inflates the median distance but hardly
        the fitted correction. ZOGY leaves a dipole on every bright star of a pair
        misregistered by a few tenths of a pixel, so the default (0.15 px) corrects
        such errors (``bench/registration.py``).
    min_matched_stars : int
        Star pairs needed for a ``"stars"`` or ``"wcs+stars"`` solution, and for
        judging the WCS in ``"auto"`` (at least 3).
    match_radius_pix : float
        Pairing radius (science pixels) for stars once a mapping is known; used for the
        refinement of the star solution and the residual.
    max_stars : int
        Brightest stars per exposure used for asterism matching.
    min_overlap : float
        Smallest fraction of the science grid that the reference must cover.
    edge_width : float
        Output pixels within this many reference pixels of the reference image border
        are flagged ``EDGE``; at least the kernel half-width (2 for cubic) to cover
        pixels whose kernel reaches past the border.
    conserve_flux : bool
        Multiply by the Jacobian determinant of the mapping so source fluxes (and the
        reference zero point) are kept when pixel scales differ.
    map_step : int
        Spacing (science pixels) of the coarse grid on which the mapping is evaluated
        exactly.
    workers : int
        Threads used for resampling; 0 uses every core available to the process.
    stars : StarConfig
        Star detection and selection for matching and for the residual. For small tiles
        with few stars lower ``min_snr``, ``edge_margin`` and ``isolation_radius``.
    background : BackgroundConfig
        Background estimation before star detection.
    """

    method: Literal["auto", "wcs", "wcs+stars", "stars"] = "auto"
    order: Literal[1, 3] = 3
    max_wcs_error_pix: float = 0.15
    min_matched_stars: int = 5
    match_radius_pix: float = 2.0
    max_stars: int = 50
    min_overlap: float = 0.1
    edge_width: float = 2.0
    conserve_flux: bool = True
    map_step: int = 32
    workers: int = 0
    stars: StarConfig = field(default_factory=StarConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)


@dataclass(frozen=True)
class AlignmentResult:
    """Outcome of :func:`align_to`.

    Attributes
    ----------
    aligned : Exposure
        The reference resampled onto the science grid: science's shape and WCS,
        reference's metadata, header (without its WCS cards) and provenance (plus the
        alignment's). The PSF is ``None`` (the reference PSF is not valid on the new
        grid without re-estimation).
    method : {"wcs", "wcs+stars", "stars"}
        How the mapping was obtained (see :class:`AlignConfig`).
    n_matched : int
        Star pairs within ``match_radius_pix`` after alignment (0 when none could be
        detected or paired).
    rms_pix : float
        Astrometric residual after alignment: root mean square of the 2-D distance
        between science star positions and mapped reference star positions, in science
        pixels; NaN when ``n_matched`` is 0.
    rms_arcsec : float or None
        ``rms_pix`` times the science pixel scale; ``None`` when the science exposure has
        no WCS.
    overlap_fraction : float
        Fraction of the science grid inside the reference image footprint.
    transform : ndarray, shape (3, 3), or None
        Similarity transform on homogeneous 0-based pixels ``(x, y, 1)``. For
        ``"stars"`` it takes reference pixels to science pixels; for ``"wcs+stars"`` it
        takes WCS-predicted science positions to measured ones (the correction); ``None``
        for ``"wcs"``.
    wcs_error_pix : float or None
        Median distance (science pixels) between the WCS-predicted and measured
        positions of paired stars (mutual nearest neighbours within
        ``match_radius_pix``, or asterism matches when those are too few or too far
        off); ``None`` when not measured (method ``"stars"``, no WCS on one side, or
        too few stars).
    """

    aligned: Exposure
    method: str
    n_matched: int
    rms_pix: float
    rms_arcsec: float | None
    overlap_fraction: float
    transform: NDArray[np.float64] | None
    wcs_error_pix: float | None = None


@dataclass(frozen=True)
class ResampledArrays:
    """Planes resampled by :func:`resample_arrays`.

    Attributes
    ----------
    data : ndarray, shape (ny, nx), float32
        Resampled data; NaN where ``mask`` has ``NO_DATA``.
    variance : ndarray, shape (ny, nx), float32
        Resampled variance (same kernel as the data); inf where ``NO_DATA``.
    mask : ndarray, shape (ny, nx), uint16
        Propagated :class:`~astrid.exposure.MaskBit` flags plus ``NO_DATA`` outside the
        input footprint and ``EDGE`` near its border.
    overlap_fraction : float
        Fraction of output pixels inside the input image footprint.
    """

    data: NDArray[np.float32]
    variance: NDArray[np.float32]
    mask: NDArray[np.uint16]
    overlap_fraction: float


@dataclass(frozen=True)
class StarMatch:
    """Similarity transform between two star lists, from :func:`match_stars`.

    Attributes
    ----------
    transform : ndarray, shape (3, 3)
        Takes a reference pixel ``(x, y, 1)`` to a science pixel (0-based).
    reference_xy : ndarray, shape (n, 2)
        Matched reference star positions (pixels).
    science_xy : ndarray, shape (n, 2)
        The science star paired with each row of ``reference_xy``.
    rms_pix : float
        RMS 2-D residual of the pairs under ``transform`` (science pixels).
    """

    transform: NDArray[np.float64]
    reference_xy: NDArray[np.float64]
    science_xy: NDArray[np.float64]
    rms_pix: float

    @property
    def n_matched(self) -> int:
        """Number of star pairs."""
        return len(self.reference_xy)

    @property
    def rotation_deg(self) -> float:
        """Rotation angle of ``transform`` in degrees (counter-clockwise in x, y)."""
        return float(np.degrees(np.arctan2(self.transform[1, 0], self.transform[0, 0])))

    @property
    def scale(self) -> float:
        """Scale factor of ``transform`` (science pixels per reference pixel)."""
        return float(np.hypot(self.transform[0, 0], self.transform[1, 0]))


# ---------------------------------------------------------------------------------------
# Cubic convolution weights and the coarse pixel map
# ---------------------------------------------------------------------------------------


def _keys_weights(t: NDArray[Any]) -> tuple[NDArray[Any], ...]:
    """Keys (a=-0.5) cubic convolution weights of taps -1, 0, 1, 2 at fraction ``t``."""
    t2 = t * t
    w0 = t2 - 0.5 * t - 0.5 * t2 * t
    w3 = 0.5 * (t2 * t - t2)
    w1 = 1.0 - t2 + 3.0 * w3  # = 1.5 t^3 - 2.5 t^2 + 1
    w2 = 1.0 - w0 - w1 - w3  # weights sum to 1
    return w0, w1, w2, w3


def _node_weights(n: int, step: int, m: int) -> NDArray[np.float64]:
    """Dense ``(n, m)`` matrix interpolating ``m`` nodes at ``-step + k*step`` to ``0..n-1``."""
    u = (np.arange(n, dtype=np.float64) + step) / step
    k = np.clip(np.floor(u).astype(np.intp), 1, m - 3)
    w = _keys_weights(u - k)
    out = np.zeros((n, m))
    rows = np.arange(n)
    for j, wj in enumerate(w):
        out[rows, k - 1 + j] += wj
    return out


@dataclass(frozen=True)
class PixelMap:
    """Smooth mapping from output (science) pixels to input (reference) pixels.

    Sampled exactly on a coarse grid of nodes at ``-step + k*step`` along each axis
    (reaching at least one node past each image edge) and interpolated between them
    with cubic convolution, which reproduces affine and quadratic mappings exactly.

    Attributes
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the output grid.
    step : int
        Node spacing in output pixels.
    input_x, input_y : ndarray, shape (my, mx), float64
        Input pixel coordinates (0-based) at each node; a huge negative value where the
        mapping is undefined (the sky position has no pixel in the input projection).
    """

    shape: tuple[int, int]
    step: int
    input_x: NDArray[np.float64]
    input_y: NDArray[np.float64]

    @staticmethod
    def nodes(shape: tuple[int, int], step: int) -> tuple[NDArray[np.float64], ...]:
        """Node coordinates ``(node_x (mx,), node_y (my,))`` for an output ``shape``."""
        ny, nx = shape
        mx = (nx - 1) // step + 4
        my = (ny - 1) // step + 4
        return (
            -float(step) + step * np.arange(mx, dtype=np.float64),
            -float(step) + step * np.arange(my, dtype=np.float64),
        )

    @classmethod
    def from_function(
        cls,
        func: Callable[[NDArray[np.float64], NDArray[np.float64]], tuple[NDArray[Any], ...]],
        shape: tuple[int, int],
        *,
        step: int = 32,
    ) -> PixelMap:
        """Sample ``func(x, y) -> (x_in, y_in)`` (arrays of output pixels) on the nodes."""
        if step < 1:
            raise ValueError(f"step must be a positive number of pixels, got {step}")
        node_x, node_y = cls.nodes(shape, step)
        gx, gy = np.meshgrid(node_x, node_y)
        xin, yin = func(gx, gy)
        xin = np.asarray(xin, np.float64).reshape(gx.shape)
        yin = np.asarray(yin, np.float64).reshape(gx.shape)
        undefined = ~(np.isfinite(xin) & np.isfinite(yin))
        xin = np.where(undefined, _FAR, xin)
        yin = np.where(undefined, _FAR, yin)
        return cls(shape=(int(shape[0]), int(shape[1])), step=int(step), input_x=xin, input_y=yin)

    @classmethod
    def from_matrix(cls, matrix: ArrayLike, shape: tuple[int, int], *, step: int = 32) -> PixelMap:
        """Map through a 3x3 matrix taking output ``(x, y, 1)`` to input ``(x, y, 1)``."""
        m = np.asarray(matrix, np.float64)
        if m.shape != (3, 3):
            raise ShapeMismatch({"matrix": m.shape, "expected": (3, 3)})

        def func(x: NDArray[np.float64], y: NDArray[np.float64]) -> tuple[NDArray[Any], ...]:
            w = m[2, 0] * x + m[2, 1] * y + m[2, 2]
            return (
                (m[0, 0] * x + m[0, 1] * y + m[0, 2]) / w,
                (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / w,
            )

        return cls.from_function(func, shape, step=step)

    @classmethod
    def from_wcs(
        cls, output_wcs: WCS, input_wcs: WCS, shape: tuple[int, int], *, step: int = 32
    ) -> PixelMap:
        """Map output pixels to sky with ``output_wcs`` and sky to input pixels.

        The two WCSs may use different celestial frames (e.g. FK5 and ICRS).
        """

        def func(x: NDArray[np.float64], y: NDArray[np.float64]) -> tuple[NDArray[Any], ...]:
            return _wcs_to_wcs(output_wcs, input_wcs, x, y)

        return cls.from_function(func, shape, step=step)

    def evaluate(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], ...]:
        """Input coordinates ``(x_in, y_in)`` of output pixels ``(x, y)`` (any shape).

        Points outside the output grid are extrapolated from the edge nodes.
        """
        xa = np.asarray(x, np.float64)
        ya = np.asarray(y, np.float64)
        my, mx = self.input_x.shape
        ux = (xa + self.step) / self.step
        uy = (ya + self.step) / self.step
        kx = np.clip(np.floor(ux).astype(np.intp), 1, mx - 3)
        ky = np.clip(np.floor(uy).astype(np.intp), 1, my - 3)
        wx = _keys_weights(ux - kx)
        wy = _keys_weights(uy - ky)
        outs = []
        for grid in (self.input_x, self.input_y):
            acc = np.zeros(np.broadcast(xa, ya).shape)
            for j, wyj in enumerate(wy):
                for i, wxi in enumerate(wx):
                    acc += wyj * wxi * grid[ky - 1 + j, kx - 1 + i]
            outs.append(acc)
        return outs[0], outs[1]

    def jacobian_nodes(self) -> NDArray[np.float64]:
        """``|det dF|`` (input pixel area per output pixel) at each node, shape (my, mx)."""
        dxdy, dxdx = np.gradient(self.input_x, self.step, edge_order=2)
        dydy, dydx = np.gradient(self.input_y, self.step, edge_order=2)
        jac = np.abs(dxdx * dydy - dxdy * dydx)
        return np.where((self.input_x <= _FAR / 2) | (self.input_y <= _FAR / 2), 1.0, jac)

    def footprint_fraction(self, input_shape: tuple[int, int], *, stride: int = 8) -> float:
        """Fraction of output pixels (sampled every ``stride``) inside the input image."""
        ny, nx = self.shape
        ys = np.arange(0, ny, stride, dtype=np.float64)
        xs = np.arange(0, nx, stride, dtype=np.float64)
        gx, gy = np.meshgrid(xs, ys)
        xin, yin = self.evaluate(gx, gy)
        return float(np.mean(_inside(xin, yin, input_shape)))


def _inside(xin: NDArray[Any], yin: NDArray[Any], shape: tuple[int, int]) -> NDArray[np.bool_]:
    ny, nx = shape
    with np.errstate(invalid="ignore"):
        return (xin >= -0.5) & (xin <= nx - 0.5) & (yin >= -0.5) & (yin <= ny - 0.5)


def _wcs_to_wcs(
    from_wcs: WCS, to_wcs: WCS, x: NDArray[np.float64], y: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pixel positions in ``to_wcs`` of pixels ``(x, y)`` of ``from_wcs``; NaN if none."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        sky = from_wcs.pixel_to_world(x, y)
        try:
            xo, yo = to_wcs.world_to_pixel(sky)
        except NoConvergence as exc:  # SIP inversion diverged for far-away points
            sol = np.asarray(exc.best_solution, np.float64)
            bad = np.zeros(len(sol), bool)
            for idx in (exc.divergent, exc.slow_conv):
                if idx is not None:
                    bad[np.asarray(idx, np.intp)] = True
            sol[bad] = np.nan
            xo = sol[:, 0].reshape(np.shape(x))
            yo = sol[:, 1].reshape(np.shape(x))
    return np.asarray(xo, np.float64), np.asarray(yo, np.float64)


# ---------------------------------------------------------------------------------------
# Resampling kernel
# ---------------------------------------------------------------------------------------


def _workers(n: int) -> int:
    if n > 0:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _fill_padding(padded: NDArray[Any]) -> None:
    """Replicate the edge pixels of the interior into the ``_PAD`` border, in place."""
    p = _PAD
    padded[:p, p:-p] = padded[p, p:-p]
    padded[-p:, p:-p] = padded[-p - 1, p:-p]
    padded[:, :p] = padded[:, p : p + 1]
    padded[:, -p:] = padded[:, -p - 1 : -p]


def _dilate_forward(mask: NDArray[np.uint16], k: int) -> NDArray[np.uint16]:
    """OR of ``mask[y:y+k, x:x+k]`` at each ``(y, x)`` (flags of a kernel's taps)."""
    rows = mask.copy()
    for i in range(1, k):
        rows[:, :-i] |= mask[:, i:]
    out = rows.copy()
    for j in range(1, k):
        out[:-j, :] |= rows[j:, :]
    return out


def resample_arrays(
    data: ArrayLike,
    variance: ArrayLike,
    mask: ArrayLike,
    *,
    pixel_map: PixelMap,
    order: Literal[1, 3] = 3,
    edge_width: float = 2.0,
    conserve_flux: bool = True,
    workers: int = 0,
) -> ResampledArrays:
    """Resample data, variance and mask planes through a pixel map.

    Parameters
    ----------
    data : array_like, shape (ny_in, nx_in)
        Input image (data units). Non-finite pixels are treated as ``NO_DATA``.
    variance : array_like, shape (ny_in, nx_in)
        Its variance (data units squared); interpolated with the same kernel (see the
        module notes on the correlation this ignores).
    mask : array_like of uint16, shape (ny_in, nx_in)
        :class:`~astrid.exposure.MaskBit` flags.
    pixel_map : PixelMap
        Output pixel -> input pixel; its ``shape`` is the output shape.
    order : {1, 3}
        1 bilinear, 3 Keys cubic convolution.
    edge_width : float
        Output pixels within this many input pixels of the input border get ``EDGE``.
    conserve_flux : bool
        Scale data by the Jacobian determinant of the map (variance by its square).
    workers : int
        Threads; 0 uses every available core.

    Returns
    -------
    ResampledArrays

    Raises
    ------
    ShapeMismatch
        If the three input planes differ in shape.
    ValueError
        If ``order`` is not 1 or 3.
    """
    arr = np.asarray(data, np.float32)
    var = np.asarray(variance, np.float32)
    msk = np.asarray(mask, np.uint16)
    if not (arr.shape == var.shape == msk.shape) or arr.ndim != 2:
        raise ShapeMismatch({"data": arr.shape, "variance": var.shape, "mask": msk.shape})
    if order not in (1, 3):
        raise ValueError(f"order must be 1 (bilinear) or 3 (cubic), got {order}")
    ny_in, nx_in = arr.shape
    taps = 4 if order == 3 else 2
    first_tap = 1 if order == 3 else 0

    no_data = (msk & _NO_DATA) != 0
    no_data |= ~np.isfinite(arr)
    no_data |= ~np.isfinite(var)
    any_no_data = bool(no_data.any())
    # Data and variance travel together as one complex plane: one gather and one
    # multiply per kernel tap serve both. Padding replicates the edge pixels.
    packed_2d = np.empty((ny_in + 2 * _PAD, nx_in + 2 * _PAD), np.complex64)
    inner = packed_2d[_PAD:-_PAD, _PAD:-_PAD]
    inner.real = arr
    inner.imag = var
    if any_no_data:
        inner[no_data] = 0.0
    _fill_padding(packed_2d)
    packed_p = packed_2d.ravel()
    work_mask = msk.copy()
    if any_no_data:
        work_mask[no_data] |= _NO_DATA
    mask_p: NDArray[np.uint16] | None = None
    if any_no_data or bool(work_mask.any()):
        mask_2d = np.empty(packed_2d.shape, np.uint16)
        mask_2d[_PAD:-_PAD, _PAD:-_PAD] = work_mask
        _fill_padding(mask_2d)
        mask_p = _dilate_forward(mask_2d, taps).ravel()
    del work_mask, no_data
    row_len = nx_in + 2 * _PAD
    offsets = [j * row_len + i for j in range(taps) for i in range(taps)]

    ny, nx = pixel_map.shape
    step = pixel_map.step
    my, mx = pixel_map.input_x.shape
    # Interpolate the node grid along x once (the map is smooth); along y each row then
    # needs only its 4 node rows, shared by every row of a block inside one interval.
    wx_nodes = _node_weights(nx, step, mx)
    hx = np.ascontiguousarray(pixel_map.input_x @ wx_nodes.T)
    hy = np.ascontiguousarray(pixel_map.input_y @ wx_nodes.T)
    hj = pixel_map.jacobian_nodes() @ wx_nodes.T if conserve_flux else None
    rows = np.arange(ny, dtype=np.float64)
    u = (rows + step) / step
    k_rows = np.clip(np.floor(u).astype(np.intp), 1, my - 3) - 1
    wy_rows = np.ascontiguousarray(np.column_stack(_keys_weights(u - (k_rows + 1))))

    out_data = np.empty((ny, nx), np.float32)
    out_var = np.empty((ny, nx), np.float32)
    out_mask = np.empty((ny, nx), np.uint16)
    n_inside = np.zeros(ny, np.int64)
    lo_x, hi_x = edge_width - 0.5, nx_in - 0.5 - edge_width
    lo_y, hi_y = edge_width - 0.5, ny_in - 0.5 - edge_width

    def block(r0: int, r1: int) -> None:
        k = int(k_rows[r0])
        w_rows = wy_rows[r0:r1]
        xin = w_rows @ hx[k : k + 4]
        yin = w_rows @ hy[k : k + 4]
        inside = _inside(xin, yin, (ny_in, nx_in))
        n_inside[r0:r1] = np.count_nonzero(inside, axis=1)
        edge = (xin < lo_x) | (xin > hi_x) | (yin < lo_y) | (yin > hi_y)
        edge &= inside
        np.clip(xin, -1.0, float(nx_in), out=xin)
        np.clip(yin, -1.0, float(ny_in), out=yin)
        ix = np.floor(xin)
        iy = np.floor(yin)
        tx = (xin - ix).astype(np.float32)
        ty = (yin - iy).astype(np.float32)
        base = iy.astype(np.intp)
        base += _PAD - first_tap
        base *= row_len
        base += ix.astype(np.intp)
        base += _PAD - first_tap
        # complex weights: a complex-by-complex multiply is cheaper than a cast per tap
        if order == 3:
            wx = [w.astype(np.complex64) for w in _keys_weights(tx)]
            wy = [w.astype(np.complex64) for w in _keys_weights(ty)]
        else:
            wx = [(1.0 - tx).astype(np.complex64), tx.astype(np.complex64)]
            wy = [(1.0 - ty).astype(np.complex64), ty.astype(np.complex64)]
        tap = np.empty(base.shape, np.complex64)
        row = np.empty(base.shape, np.complex64)
        acc = np.zeros(base.shape, np.complex64)
        for j in range(taps):
            row.fill(0.0)
            for i in range(taps):
                packed_p[offsets[j * taps + i] :].take(base, out=tap, mode="clip")
                tap *= wx[i]
                row += tap
            row *= wy[j]
            acc += row
        d = out_data[r0:r1]
        v = out_var[r0:r1]
        d[...] = acc.real
        v[...] = acc.imag
        if hj is not None:
            # The Jacobian varies on the scale of the image: one row per block suffices.
            jac = (w_rows[(r1 - r0) // 2] @ hj[k : k + 4]).astype(np.float32)
            d *= jac
            v *= jac * jac
        if order == 3:
            np.maximum(v, 0.0, out=v)  # overshoot next to steep variance changes
        m = out_mask[r0:r1]
        if mask_p is not None:
            mask_p.take(base, out=m, mode="clip")
        else:
            m.fill(0)
        m[~inside] = _NO_DATA
        m[edge] |= _EDGE
        no = (m & _NO_DATA) != 0
        d[no] = np.nan
        v[no] = np.inf

    # Blocks of a few rows (cache-sized), each inside one node interval of the map.
    rows_per_block = max(
        (b for b in range(1, step + 1) if step % b == 0 and b * nx <= _BLOCK_PIXELS),
        default=1,
    )
    starts = list(range(0, ny, rows_per_block))
    n_threads = min(_workers(workers), len(starts))
    if n_threads <= 1:
        for r0 in starts:
            block(r0, min(ny, r0 + rows_per_block))
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for _ in pool.map(lambda r0: block(r0, min(ny, r0 + rows_per_block)), starts):
                pass
    return ResampledArrays(
        data=out_data,
        variance=out_var,
        mask=out_mask,
        overlap_fraction=float(n_inside.sum() / max(1, ny * nx)),
    )


# ---------------------------------------------------------------------------------------
# Stars: detection, asterism matching, residuals
# ---------------------------------------------------------------------------------------


def detect_star_positions(
    exposure: Exposure,
    *,
    stars: StarConfig | None = None,
    background: BackgroundConfig | None = None,
    max_stars: int = 50,
) -> NDArray[np.float64]:
    """Positions of the brightest clean stars of an exposure.

    Parameters
    ----------
    exposure : Exposure
        Image with variance and mask.
    stars, background : StarConfig, BackgroundConfig or None
        Detection and selection options (``None``: defaults).
    max_stars : int
        At most this many stars are returned.

    Returns
    -------
    ndarray, shape (n, 2)
        ``(x, y)`` 0-based pixel positions, brightest first.
    """
    data = exposure.data
    unusable = ((exposure.mask & np.uint16(UNUSABLE)) != 0) | ~np.isfinite(data)
    saturated = (exposure.mask & np.uint16(MaskBit.SATURATED)) != 0
    bkg = estimate_background(data, mask=unusable, config=background)
    with np.errstate(invalid="ignore"):
        noise = np.sqrt(exposure.variance)
    sources = find_sources(
        data,
        background=bkg.background,
        noise=noise,
        mask=unusable,
        saturated=saturated,
        config=stars,
    )
    selected = select_stars(sources, exposure.shape, config=stars)
    xy = np.column_stack([np.asarray(selected["x"]), np.asarray(selected["y"])])
    return xy[:max_stars].astype(np.float64).reshape(-1, 2)


def _as_xy(points: Any, name: str) -> NDArray[np.float64]:
    if hasattr(points, "colnames"):
        points = np.column_stack([np.asarray(points["x"]), np.asarray(points["y"])])
    xy = np.asarray(points, np.float64)
    if xy.size == 0:
        return np.zeros((0, 2))
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ShapeMismatch({name: xy.shape, "expected": (len(xy), 2)})
    return xy[np.all(np.isfinite(xy), axis=1)]


def _apply(matrix: NDArray[np.float64], xy: NDArray[np.float64]) -> NDArray[np.float64]:
    h = np.column_stack([xy, np.ones(len(xy))]) @ matrix.T
    return h[:, :2] / h[:, 2:3]


def _fit_similarity(src: NDArray[np.float64], dst: NDArray[np.float64]) -> NDArray[np.float64]:
    """Least-squares ``x' = a x - b y + tx, y' = b x + a y + ty`` as a 3x3 matrix."""
    n = len(src)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    design[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty], [0.0, 0.0, 1.0]])


def _pair_nearest(
    predicted: NDArray[np.float64], target: NDArray[np.float64], radius: float
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Mutual nearest neighbours closer than ``radius``: indices into both lists."""
    empty = np.zeros(0, np.intp)
    if len(predicted) == 0 or len(target) == 0:
        return empty, empty
    from scipy.spatial import cKDTree

    d_pt, i_pt = cKDTree(target).query(predicted, k=1)
    _, i_tp = cKDTree(predicted).query(target, k=1)
    idx_p = np.arange(len(predicted))
    keep = (d_pt <= radius) & (i_tp[i_pt] == idx_p)
    return idx_p[keep].astype(np.intp), np.asarray(i_pt[keep], np.intp)


def _largest_shift(transform: NDArray[np.float64], shape: tuple[int, int]) -> float:
    """Largest displacement (pixels) ``transform`` applies at the corners or centre of a grid."""
    ny, nx = shape
    points = np.array(
        [[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [(nx - 1) / 2, (ny - 1) / 2]],
        np.float64,
    )
    return float(np.max(np.hypot(*(_apply(transform, points) - points).T)))


def _median_distance(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    return float(np.median(np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1])))


def _rms(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    if len(a) == 0:
        return float("nan")
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))


def match_stars(
    reference_xy: ArrayLike,
    science_xy: ArrayLike,
    *,
    min_matched: int = 5,
    match_radius: float = 2.0,
    max_stars: int = 50,
) -> StarMatch:
    """Similarity transform from reference to science star positions.

    Asterism (triangle-invariant) matching with ``astroalign.find_transform`` on the
    star lists (not the images), followed by least-squares refinement on every pair of
    mutual nearest neighbours within ``match_radius`` under the current transform
    (three iterations).

    Parameters
    ----------
    reference_xy, science_xy : array_like, shape (n, 2), or Table with ``x``, ``y``
        0-based pixel positions, brightest first.
    min_matched : int
        Pairs required (at least 3).
    match_radius : float
        Pairing radius in science pixels for the refinement.
    max_stars : int
        Brightest stars of each list given to astroalign.

    Returns
    -------
    StarMatch

    Raises
    ------
    StarMatchFailed
        Fewer than 3 stars on a side, no consistent asterism, or fewer than
        ``min_matched`` pairs after refinement.
    ShapeMismatch
        If a list is not of shape (n, 2).
    """
    import astroalign

    ref = _as_xy(reference_xy, "reference_xy")
    sci = _as_xy(science_xy, "science_xy")
    need = max(3, int(min_matched))
    if min(len(ref), len(sci)) < 3:
        raise StarMatchFailed(
            0, need, f"{len(ref)} reference and {len(sci)} science stars; need 3 on each side"
        )
    try:
        transform, _ = astroalign.find_transform(
            ref[:max_stars], sci[:max_stars], max_control_points=max_stars
        )
    except (ValueError, TypeError, astroalign.MaxIterError) as exc:
        raise StarMatchFailed(
            0, need, f"asterism matching of {len(ref)} and {len(sci)} stars: {exc}"
        ) from exc
    match = _refine(np.asarray(transform.params, np.float64), ref, sci, match_radius)
    if match.n_matched < need:
        raise StarMatchFailed(
            match.n_matched, need, f"pairs within {match_radius} px after asterism matching"
        )
    return match


def _refine(
    matrix: NDArray[np.float64],
    ref: NDArray[np.float64],
    sci: NDArray[np.float64],
    match_radius: float,
) -> StarMatch:
    """Least-squares refinement of ``matrix`` on mutual nearest neighbours (3 iterations)."""
    for _ in range(3):
        idx_r, idx_s = _pair_nearest(_apply(matrix, ref), sci, match_radius)
        if len(idx_r) < 3:
            break
        matrix = _fit_similarity(ref[idx_r], sci[idx_s])
    idx_r, idx_s = _pair_nearest(_apply(matrix, ref), sci, match_radius)
    return StarMatch(
        transform=matrix,
        reference_xy=ref[idx_r],
        science_xy=sci[idx_s],
        rms_pix=_rms(_apply(matrix, ref[idx_r]), sci[idx_s]),
    )


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------

_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CRVAL\d|CRPIX\d|CDELT\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|"
    r"PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|A_\w+|B_\w+|AP_\w+|"
    r"BP_\w+|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|CRDER\d|CSYER\d)$"
)


def _header_without_wcs(header: fits.Header) -> fits.Header:
    out = header.copy()
    for key in {k for k in out.keys() if _WCS_KEY.match(k)}:
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


def _wcs_prediction(
    science: Exposure, reference: Exposure, reference_xy: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Science pixel positions of reference pixels through the two WCSs."""
    assert science.wcs is not None and reference.wcs is not None
    if len(reference_xy) == 0:
        return np.zeros((0, 2))
    x, y = _wcs_to_wcs(reference.wcs, science.wcs, reference_xy[:, 0], reference_xy[:, 1])
    return np.column_stack([x, y])


def align_to(
    science: Exposure,
    reference: Exposure,
    *,
    config: AlignConfig | None = None,
    science_stars: ArrayLike | None = None,
    reference_stars: ArrayLike | None = None,
) -> AlignmentResult:
    """Resample ``reference`` onto the pixel grid of ``science``.

    Parameters
    ----------
    science : Exposure
        Defines the output grid (shape and WCS).
    reference : Exposure
        Resampled; its variance and mask are propagated.
    config : AlignConfig or None
        Options; ``None`` uses the defaults.
    science_stars, reference_stars : array_like, shape (n, 2), Table, or None
        Star positions ``(x, y)`` (0-based pixels, brightest first) already measured,
        e.g. by the PSF stage; ``None`` detects them here with ``config.stars``
        (about a second per 4k x 4k image).

    Returns
    -------
    AlignmentResult

    Raises
    ------
    NoCelestialWcs
        ``method`` is ``"wcs"`` or ``"wcs+stars"`` and an exposure has no WCS.
    StarMatchFailed
        Stars are needed (``method`` ``"stars"`` or ``"wcs+stars"``, or ``"auto"``
        without two WCSs) and fewer than ``min_matched_stars`` pairs are found.
    InsufficientOverlap
        The reference covers less than ``min_overlap`` of the science grid.

    Warns
    -----
    AlignmentWarning
        When no star pair is found to measure the residual, or when ``"auto"`` finds
        the WCS off by more than ``max_wcs_error_pix`` but cannot match enough stars to
        correct it.
    """
    cfg = config or AlignConfig()
    if cfg.method not in ("auto", "wcs", "stars", "wcs+stars"):
        raise ValueError(f"method must be auto, wcs, stars or wcs+stars, got {cfg.method!r}")
    have_wcs = science.wcs is not None and reference.wcs is not None
    if cfg.method in ("wcs", "wcs+stars") and not have_wcs:
        which = "science" if science.wcs is None else "reference"
        raise NoCelestialWcs(f"the {which} exposure", f"alignment method {cfg.method!r} needs both")

    wcs_map: PixelMap | None = None
    if have_wcs and cfg.method != "stars":
        assert science.wcs is not None and reference.wcs is not None
        wcs_map = PixelMap.from_wcs(science.wcs, reference.wcs, science.shape, step=cfg.map_step)
        coarse = wcs_map.footprint_fraction(
            reference.shape, stride=max(4, max(science.shape) // 128)
        )
        if coarse < cfg.min_overlap:
            raise InsufficientOverlap(coarse, cfg.min_overlap)

    def stars_of(exposure: Exposure, given: ArrayLike | None, name: str) -> NDArray[np.float64]:
        if given is not None:
            return _as_xy(given, name)[: cfg.max_stars]
        return detect_star_positions(
            exposure, stars=cfg.stars, background=cfg.background, max_stars=cfg.max_stars
        )

    def match(ref: NDArray[np.float64], sci: NDArray[np.float64]) -> StarMatch:
        return match_stars(
            ref,
            sci,
            min_matched=cfg.min_matched_stars,
            match_radius=cfg.match_radius_pix,
            max_stars=cfg.max_stars,
        )

    def correct(wcs_stars: NDArray[np.float64], sci: NDArray[np.float64]) -> StarMatch:
        # Stars already within the pairing radius of their WCS positions are paired
        # directly (asterism matching can fail on a few stars whose triangles are
        # ambiguous); a larger WCS error needs the asterisms.
        near = _refine(np.eye(3), wcs_stars, sci, cfg.match_radius_pix)
        if near.n_matched >= max(3, cfg.min_matched_stars):
            return near
        return match(wcs_stars, sci)

    sci_xy = stars_of(science, science_stars, "science_stars")
    ref_xy = stars_of(reference, reference_stars, "reference_stars")
    # Reference stars placed on the science grid by the WCSs.
    wcs_xy = _wcs_prediction(science, reference, ref_xy) if wcs_map is not None else None

    method: str
    transform: NDArray[np.float64] | None = None
    wcs_error: float | None = None
    if cfg.method == "stars" or (cfg.method == "auto" and wcs_map is None):
        star_match = match(ref_xy, sci_xy)
        method = "stars"
        transform = star_match.transform
        predicted = _apply(transform, ref_xy)
        pixel_map = PixelMap.from_matrix(np.linalg.inv(transform), science.shape, step=cfg.map_step)
    else:
        assert wcs_map is not None and wcs_xy is not None
        method, pixel_map, predicted = "wcs", wcs_map, wcs_xy
        correction: StarMatch | None = None
        if cfg.method in ("auto", "wcs"):
            # Cheap check first: when enough stars sit near their WCS positions, the
            # offsets measure the WCS error without asterism matching.
            idx_w, idx_s = _pair_nearest(wcs_xy, sci_xy, cfg.match_radius_pix)
            if len(idx_w) >= max(3, cfg.min_matched_stars):
                wcs_error = _median_distance(wcs_xy[idx_w], sci_xy[idx_s])
        if cfg.method == "wcs+stars":
            correction = correct(wcs_xy, sci_xy)
        elif cfg.method == "auto" and (wcs_error is None or wcs_error > cfg.max_wcs_error_pix):
            try:
                correction = correct(wcs_xy, sci_xy)
            except StarMatchFailed as exc:
                correction = None  # the WCS stands
                if wcs_error is not None:
                    warnings.warn(
                        f"WCS off by {wcs_error:.2f} px (more than {cfg.max_wcs_error_pix}) "
                        f"but it could not be corrected with stars: {exc}",
                        AlignmentWarning,
                        stacklevel=2,
                    )
        if correction is not None:
            wcs_error = _median_distance(correction.reference_xy, correction.science_xy)
        # The decision rests on the fitted correction, not on the median distance (which
        # centroid noise inflates): its largest displacement over the science grid.
        if correction is not None and (
            cfg.method == "wcs+stars"
            or _largest_shift(correction.transform, science.shape) > cfg.max_wcs_error_pix
        ):
            method = "wcs+stars"
            transform = correction.transform
            predicted = _apply(transform, wcs_xy)
            pixel_map = _corrected_map(wcs_map, science, reference, transform, cfg.map_step)

    resampled = resample_arrays(
        reference.data,
        reference.variance,
        reference.mask,
        pixel_map=pixel_map,
        order=cfg.order,
        edge_width=cfg.edge_width,
        conserve_flux=cfg.conserve_flux,
        workers=cfg.workers,
    )
    if resampled.overlap_fraction < cfg.min_overlap:
        raise InsufficientOverlap(resampled.overlap_fraction, cfg.min_overlap)

    idx_r, idx_s = _pair_nearest(predicted, sci_xy, cfg.match_radius_pix)
    n_matched = len(idx_r)
    rms_pix = _rms(predicted[idx_r], sci_xy[idx_s])
    if n_matched == 0:
        warnings.warn(
            f"alignment residual not measured: no star pair within {cfg.match_radius_pix} px "
            f"({len(sci_xy)} science and {len(ref_xy)} reference stars)",
            AlignmentWarning,
            stacklevel=2,
        )
    scale = science.pixel_scale
    rms_arcsec = rms_pix * scale if scale is not None else None

    provenance = dict(reference.provenance)
    provenance.update(
        {
            "align_method": method,
            "align_order": str(cfg.order),
            "align_n_matched": str(n_matched),
            "align_rms_pix": f"{rms_pix:.4f}",
            "align_conserve_flux": str(cfg.conserve_flux),
        }
    )
    for key in ("input_image_sha256", "input_path"):
        if key in science.provenance:
            provenance[f"aligned_to_{key.removeprefix('input_')}"] = science.provenance[key]
    aligned = Exposure(
        data=resampled.data,
        variance=resampled.variance,
        mask=resampled.mask,
        wcs=science.wcs.deepcopy() if science.wcs is not None else None,
        psf=None,
        meta=reference.meta,
        header=_header_without_wcs(reference.header),
        provenance=provenance,
    )
    return AlignmentResult(
        aligned=aligned,
        method=method,
        n_matched=n_matched,
        rms_pix=rms_pix,
        rms_arcsec=rms_arcsec,
        overlap_fraction=resampled.overlap_fraction,
        transform=transform,
        wcs_error_pix=wcs_error,
    )


def _corrected_map(
    wcs_map: PixelMap,
    science: Exposure,
    reference: Exposure,
    correction: NDArray[np.float64],
    step: int,
) -> PixelMap:
    """WCS map preceded by the inverse of a science-pixel correction.

    ``correction`` takes WCS-predicted science positions to measured ones, so a science
    pixel ``p`` shows the reference at ``F_wcs(correction^-1 p)``.
    """
    assert science.wcs is not None and reference.wcs is not None
    inverse = np.linalg.inv(correction)
    sci_wcs, ref_wcs = science.wcs, reference.wcs

    def func(x: NDArray[np.float64], y: NDArray[np.float64]) -> tuple[NDArray[Any], ...]:
        w = inverse[2, 0] * x + inverse[2, 1] * y + inverse[2, 2]
        xs = (inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2]) / w
        ys = (inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2]) / w
        return _wcs_to_wcs(sci_wcs, ref_wcs, xs, ys)

    return PixelMap.from_function(func, wcs_map.shape, step=step)
