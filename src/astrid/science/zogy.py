"""ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27).

Given an aligned new (science) image ``N`` and reference ``R`` with their PSFs, background
noise levels and flux zero points, ZOGY builds, in Fourier space,

* the proper difference image ``D`` (eq. 13), whose noise is white with unit variance,
  its PSF ``P_D`` (eq. 14) and flux zero point ``F_D`` (eq. 15);
* the score image ``S = F_D D ⊗ P̄_D`` (eq. 12; equally ``S = S_N − S_R`` with
  ``S_N = k_n ⊗ N`` and ``S_R = k_r ⊗ R``, eqs. 17, 28-29, 31, 33, the form used when the
  astrometric terms need ``S_N`` and ``S_R``), the log-likelihood ratio for a new point
  source at each pixel;
* the corrected score ``S_corr`` (eq. 25), ``S`` divided by its per-pixel standard
  deviation including the source noise of both images (eqs. 26-27) and the noise from
  registration errors (eqs. 30-33);
* the PSF-photometry flux ``α = S / F_S`` of a point source at each pixel and its error
  (eqs. 41-43).

Conventions
-----------
Arrays are indexed ``[y, x]``; positions are 0-based pixel centres. The flux zero points
are relative: ``F_r = 1`` and ``F_n = flux_ratio``, the ratio of a star's counts in the
science image to its counts in the reference, fitted by :func:`fit_flux_scale`.
Fluxes reported by :func:`zogy_subtract` are in **science-image data units** (the counts
the transient adds to ``N``); divide by ``flux_ratio`` for reference-image units.

The science image is corrected for the fitted background offset (``N − offset``), both
images are put on a zero background (masked and NaN pixels are replaced by it, so nothing
rings across the image), and each FFT grid is zero-padded so that convolutions do not wrap
around. Spatially varying PSFs are handled by overlapping tiles, each subtracted with the
PSFs at its centre; the tile cores are stitched.

Speed: real FFTs (``rfft2``) in single precision on a ``next_fast_len`` grid with
``scipy.fft`` threads, in-place spectral arithmetic, and the PSF-dependent operators
computed once per PSF pair and grid (PSF spectra by separable DFT matrix products rather
than FFTs of mostly empty grids) and reused between tiles when the PSFs are constant. A
whole subtraction with source-noise and astrometric terms costs eight image-sized FFTs. An
optional GPU path (CuPy or PyTorch) runs the same arithmetic when requested.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import scipy.fft
from numpy.typing import NDArray
from scipy import ndimage

from astrid.errors import (
    BackendUnavailable,
    EmptyImage,
    InvalidPsf,
    ShapeMismatch,
    StarMatchFailed,
)
from astrid.exposure import check_image
from astrid.science.psf_model import PsfModel

__all__ = [
    "FluxScale",
    "FluxScaleConfig",
    "ZogyConfig",
    "ZogyResult",
    "fit_flux_scale",
    "zogy_subtract",
]

Backend = Literal["auto", "numpy", "cupy", "torch"]
PsfInput = NDArray[np.floating] | PsfModel
NoiseInput = float | NDArray[np.floating]

#: 1.4826 × MAD is the standard deviation of a Gaussian.
_MAD_TO_SIGMA = 1.4826
#: Largest number of pixels used for robust image statistics (a regular subsample above it).
_MAX_STAT_PIXELS = 1 << 20


# --------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZogyConfig:
    """Options of :func:`zogy_subtract`.

    Attributes
    ----------
    tiling : {"auto", "always", "never"}
        ``"auto"`` subtracts the whole image at once when both PSFs are constant and in
        overlapping tiles when either varies, whatever the image size, with cores no
        larger than the spacing of the varying model's grid (so that each tile's PSFs
        are those of its part of the field); ``"always"`` tiles with ``tile_size``
        regardless; ``"never"`` uses the PSFs at the image centre for the whole image.
    tile_size : int
        Largest side of the core of a tile in pixels (the part of the tile kept in the
        output). The image is split into equal cores of at most this size.
    tile_margin : int or None
        Overlap added around each core, in pixels; it must exceed the reach of the ZOGY
        kernels (a few PSF widths). ``None``: three times the larger PSF stamp, at least 32.
    padding : int or None
        Zero padding added to each FFT grid so that convolutions do not wrap around, in
        pixels. ``None``: the larger PSF stamp size, at least 16.
    astrometric_sigma_x : float
        Default registration noise along x in pixels (ZOGY's ``σ_x``, eqs. 30-33), used
        when :func:`zogy_subtract` is not given one.
    astrometric_sigma_y : float
        As ``astrometric_sigma_x``, along y.
    psf_error : float
        Fractional error of the PSF models, ``ε``: a term ``ε² (S_N² + S_R²)`` is added to
        the variance of ``S`` in ``S_corr``, as the astrometric terms are (eqs. 25, 30-33),
        so that the residual a PSF-model error leaves on a bright static source (about
        ``ε`` times its score) is not a detection. It caps ``S_corr`` of any source near
        ``1 / ε``; 0 leaves ZOGY's statistic unchanged.
    mask_dilation : int or None
        Radius in pixels by which masked and NaN pixels (and the image border) are grown
        in the output mask. ``None``: half the larger PSF stamp.
    backend : {"numpy", "auto", "cupy", "torch"}
        Where the FFT arithmetic runs. ``"numpy"``: ``scipy.fft`` on the CPU. ``"auto"``:
        CuPy, then PyTorch, when installed with a GPU, else numpy. ``"cupy"``/``"torch"``:
        that GPU library, or :class:`~astrid.errors.BackendUnavailable`.
    dtype : {"float32", "float64"}
        Floating-point precision of the FFTs and outputs.
    workers : int
        Threads for ``scipy.fft`` (``-1``: all cores).
    refit_offset : bool
        After subtracting, measure the sigma-clipped mean of ``D`` over usable pixels and,
        when it differs from zero by more than three standard errors (and 1e-3), take it
        as an error of ``flux_scale.background_offset`` and correct every output for it.
        The offset fitted on the unmatched images is biased by faint sources seen at
        different seeing; on ``D`` they cancel, so a constant left in ``D`` is the offset's
        error. ``D``, ``S`` and ``S_N`` are linear in ``N`` and a constant in ``N`` passes
        through the kernels as their value at zero frequency, so the correction is applied
        in closed form instead of a second subtraction (exact away from masked pixels and
        the border, which the output mask covers), at the cost of keeping the variance of
        ``S`` (and ``S_N`` when ``psf_error > 0``) as image-sized arrays until the end.
        The result's ``flux_scale`` carries the corrected offset.
    """

    tiling: Literal["auto", "always", "never"] = "auto"
    tile_size: int = 1024
    tile_margin: int | None = None
    padding: int | None = None
    astrometric_sigma_x: float = 0.0
    astrometric_sigma_y: float = 0.0
    psf_error: float = 0.0
    mask_dilation: int | None = None
    backend: Backend = "numpy"
    dtype: Literal["float32", "float64"] = "float32"
    workers: int = -1
    refit_offset: bool = False

    def __post_init__(self) -> None:
        if self.tile_size < 16:
            raise ValueError(f"tile_size must be at least 16 pixels, got {self.tile_size}")
        for name in ("tile_margin", "padding", "mask_dilation"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for value in (self.astrometric_sigma_x, self.astrometric_sigma_y):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"astrometric noise must be finite and >= 0, got {value}")
        if not (math.isfinite(self.psf_error) and 0 <= self.psf_error < 1):
            raise ValueError(f"psf_error must be in [0, 1), got {self.psf_error}")
        if self.tiling not in ("auto", "always", "never"):
            raise ValueError(f"unknown tiling {self.tiling!r}")
        if self.backend not in ("auto", "numpy", "cupy", "torch"):
            raise ValueError(f"unknown backend {self.backend!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"unknown dtype {self.dtype!r}")


@dataclass(frozen=True)
class FluxScaleConfig:
    """Options of :func:`fit_flux_scale`.

    Attributes
    ----------
    min_stars : int
        Stars that must survive selection and clipping; fewer raise
        :class:`~astrid.errors.StarMatchFailed`.
    min_snr : float
        A star is used only if its PSF-fit flux has at least this S/N in both images.
    clip_sigma : float
        Stars whose normalised residual from the fitted ratio deviates from the median by
        more than this many robust sigmas are rejected, iteratively.
    max_iterations : int
        Most clipping iterations.
    background_clip_sigma : float
        For the background offset: pixels further than this many sigmas from the median
        in either image are treated as sources and ignored, and the offset is a
        sigma-clipped median of ``N − ratio·R`` with this threshold.
    star_exclusion_radius : float or None
        Pixels within this radius of a given star are ignored for the background offset.
        ``None``: the larger PSF stamp size.
    """

    min_stars: int = 5
    min_snr: float = 10.0
    clip_sigma: float = 3.0
    max_iterations: int = 10
    background_clip_sigma: float = 3.0
    star_exclusion_radius: float | None = None


@dataclass(frozen=True)
class FluxScale:
    """Photometric tie of a science image to its reference.

    The science image is modelled as ``N = flux_ratio · R + background_offset`` (after
    PSF matching), i.e. ZOGY's flux zero points are ``F_n = flux_ratio`` and ``F_r = 1``.
    Build one directly (``FluxScale(flux_ratio=1.0)``) when the tie is known exactly.

    Attributes
    ----------
    flux_ratio : float
        ``F_n / F_r``: counts of a star in the science image per count in the reference.
    background_offset : float
        Level of ``N − flux_ratio · R`` on empty sky, in science data units; it is
        subtracted from ``N`` before the subtraction.
    flux_ratio_error : float
        1-sigma uncertainty of ``flux_ratio`` (NaN when not measured).
    background_offset_error : float
        1-sigma uncertainty of ``background_offset`` in science data units (NaN when not
        measured).
    n_stars : int
        Stars used in the final fit (0 when not measured).
    n_rejected : int
        Stars measured but rejected by sigma clipping.
    used : ndarray of bool, shape (n_input_stars,)
        For each star given to :func:`fit_flux_scale`, whether it entered the final fit
        (empty when not measured).
    """

    flux_ratio: float
    background_offset: float = 0.0
    flux_ratio_error: float = math.nan
    background_offset_error: float = math.nan
    n_stars: int = 0
    n_rejected: int = 0
    used: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flux_ratio) and self.flux_ratio > 0):
            raise ValueError(f"flux_ratio must be finite and > 0, got {self.flux_ratio}")
        if not math.isfinite(self.background_offset):
            raise ValueError(f"background_offset must be finite, got {self.background_offset}")


@dataclass(frozen=True)
class ZogyResult:
    """Products of a ZOGY subtraction (all images shape (ny, nx), of the configured dtype).

    Attributes
    ----------
    difference : ndarray
        Proper difference image ``D`` (eq. 13). Its noise is white with unit variance
        where the background noise equals the scalar levels used in the kernels; a point
        source of science-image flux ``f`` appears in it as
        ``(f / flux_ratio) · difference_zero_point · P_D``.
    difference_psf : PsfModel
        PSF ``P_D`` of ``difference`` (eq. 14), unit sum; one stamp per tile (a 1x1 grid
        when untiled).
    difference_zero_point : float
        Flux zero point ``F_D`` of ``difference`` (eq. 15), with ``F_r = 1``.
    transient_psf : PsfModel
        PSF in ``difference`` of a point source that is new in the science image, at
        each position: ``F_n F_r P̂_r P̂_n(x) / (F_D sqrt(σ_n² F_r² |P̂_r|² + σ_r² F_n²
        |P̂_n|²))`` with the tile's PSFs in the kernel and the science PSF at ``x`` in the
        numerator (eqs. 13-14 applied to a source drawn with the local PSF), unit sum.
        It equals ``difference_psf`` at the tile centres and follows the science PSF's
        variation inside a tile (nodes on a grid of sub-tile cells), so PSF photometry
        of transients on ``difference`` is not biased by the tiles' constant PSFs. A
        1x1 grid when both PSFs are constant.
    score : ndarray
        Score image ``S = F_D D ⊗ P̄_D`` (eqs. 12, 17) divided by its standard deviation
        for background noise alone, ``sqrt(F_S)`` (``F_S`` of eq. 41 equals the variance of
        ``S`` in that case), so it reads in sigmas on pure background. The paper's ``S`` is
        ``score · sqrt(flux_normalisation)``.
    score_corrected : ndarray
        ``S_corr`` (eq. 25): ``S`` divided by ``sqrt(V(S_N) + V(S_R) + V_ast(S_N) +
        V_ast(S_R))``, with source noise from the variance images (eqs. 26-29) and the
        astrometric terms (eqs. 30-33), and the PSF-model term of
        ``ZogyConfig.psf_error``. The statistic to threshold for detection.
    flux : ndarray
        PSF-photometry flux of a point source centred at each pixel, ``α = S / F_S``
        (eq. 42), converted to science-image data units (``α · flux_ratio``). Negative
        where the source is brighter in the reference.
    flux_error : ndarray
        1-sigma error of ``flux`` (eq. 43: ``sqrt(V(S_N) + V(S_R)) / F_S``, background and
        source noise; the astrometric terms are not included), in the same units.
    mask : ndarray of bool
        True where the outputs are unreliable: pixels masked or non-finite in either
        input, grown by ``mask_dilation``, and the image border of that width. Outputs
        there are finite but must not be used.
    flux_scale : FluxScale
        The photometric tie that was applied.
    flux_normalisation : ndarray, shape (n_tiles_y, n_tiles_x)
        ``F_S`` (eq. 41) of each tile, with ``F_r = 1`` (units of ``S`` per unit of
        reference-scale flux).
    noise_science : float
        Background noise sigma of the science image used in the kernels (data units).
    noise_reference : float
        Background noise sigma of the reference used in the kernels (data units).
    astrometric_sigma : tuple of float
        ``(σ_x, σ_y)`` registration noise in pixels that was applied.
    backend : str
        Backend that ran the FFTs (``"numpy"``, ``"cupy"`` or ``"torch"``).
    """

    difference: NDArray[np.floating]
    difference_psf: PsfModel
    difference_zero_point: float
    transient_psf: PsfModel
    score: NDArray[np.floating]
    score_corrected: NDArray[np.floating]
    flux: NDArray[np.floating]
    flux_error: NDArray[np.floating]
    mask: NDArray[np.bool_]
    flux_scale: FluxScale
    flux_normalisation: NDArray[np.float64]
    noise_science: float
    noise_reference: float
    astrometric_sigma: tuple[float, float]
    backend: str


# --------------------------------------------------------------------------------------
# Array backends
# --------------------------------------------------------------------------------------


class _ArrayBackend:
    """The few array operations ZOGY needs beyond arithmetic, for one library.

    Arithmetic, ``.real``, ``.imag``, ``.conj()``, slicing and ``.sum()`` are shared by
    numpy, CuPy and PyTorch arrays; FFTs, transfers and a few functions are not.
    """

    def __init__(self, name: str, dtype: type[np.floating], workers: int) -> None:
        self.name = name
        self.dtype = dtype
        self.workers = workers
        self._mod: Any = None
        self._device: Any = None
        if name == "cupy":
            self._mod = importlib.import_module("cupy")
        elif name == "torch":
            self._mod = importlib.import_module("torch")
            self._device = self._mod.device("cuda")

    def asarray(self, a: NDArray[Any]) -> Any:
        arr = np.ascontiguousarray(a, dtype=self.dtype)
        if self.name == "numpy":
            return arr
        if self.name == "cupy":
            return self._mod.asarray(arr)
        return self._mod.as_tensor(arr, device=self._device)

    def as_complex(self, a: NDArray[Any]) -> Any:
        arr = np.ascontiguousarray(a)
        if self.name == "numpy":
            return arr
        if self.name == "cupy":
            return self._mod.asarray(arr)
        return self._mod.as_tensor(arr, device=self._device)

    def to_numpy(self, a: Any) -> NDArray[Any]:
        if self.name == "numpy":
            return np.asarray(a)
        if self.name == "cupy":
            return np.asarray(self._mod.asnumpy(a))
        return np.asarray(a.detach().cpu().numpy())

    def rfft2(self, a: Any, shape: tuple[int, int]) -> Any:
        if self.name == "numpy":
            return scipy.fft.rfft2(a, s=shape, workers=self.workers)
        if self.name == "cupy":
            return self._mod.fft.rfft2(a, s=shape)
        return self._mod.fft.rfft2(a, s=shape)

    def irfft2(self, a: Any, shape: tuple[int, int]) -> Any:
        if self.name == "numpy":
            return scipy.fft.irfft2(a, s=shape, workers=self.workers)
        if self.name == "cupy":
            return self._mod.fft.irfft2(a, s=shape)
        return self._mod.fft.irfft2(a, s=shape)

    def conj_inplace(self, a: Any) -> Any:
        if self.name == "numpy":
            return np.conjugate(a, out=a)
        if self.name == "cupy":
            return self._mod.conjugate(a, out=a)
        return self._mod.conj_physical_(a)

    def sqrt(self, a: Any) -> Any:
        return np.sqrt(a) if self.name == "numpy" else self._mod.sqrt(a)

    def maximum(self, a: Any, floor: float) -> Any:
        if self.name == "numpy":
            return np.maximum(a, a.dtype.type(floor))
        if self.name == "cupy":
            return self._mod.maximum(a, floor)
        return self._mod.clamp(a, min=floor)

    def sum64(self, a: Any) -> float:
        if self.name == "torch":
            return float(a.sum(dtype=self._mod.float64))
        return float(a.sum(dtype=np.float64))


def _select_backend(config: ZogyConfig) -> _ArrayBackend:
    """Resolve ``config.backend`` to an available backend (see :class:`ZogyConfig`)."""
    dtype: type[np.floating] = np.float32 if config.dtype == "float32" else np.float64
    requested = config.backend
    if requested == "numpy":
        return _ArrayBackend("numpy", dtype, config.workers)
    candidates = ("cupy", "torch") if requested == "auto" else (requested,)
    reasons = []
    for name in candidates:
        reason = _gpu_unavailable_reason(name)
        if reason is None:
            return _ArrayBackend(name, dtype, config.workers)
        reasons.append(reason)
    if requested == "auto":
        return _ArrayBackend("numpy", dtype, config.workers)
    raise BackendUnavailable(requested, reasons[0])


def _gpu_unavailable_reason(name: str) -> str | None:
    """Why GPU library ``name`` cannot be used, or None when it can."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return f"the {name} package is not installed"
    try:
        if name == "cupy":
            n_devices = int(mod.cuda.runtime.getDeviceCount())
            return None if n_devices > 0 else "CuPy sees no CUDA device"
        return None if bool(mod.cuda.is_available()) else "PyTorch sees no CUDA device"
    except Exception as exc:  # a broken driver raises library-specific errors
        return f"{name} cannot reach a GPU: {exc}"


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_stamp(stamp: Any, which: str) -> NDArray[np.float64]:
    """Validate a PSF stamp and return it normalised to unit sum (float64)."""
    arr = np.asarray(stamp)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise InvalidPsf(which, arr.shape, "a PSF stamp must be a square 2-D array")
    if arr.shape[0] % 2 != 1:
        raise InvalidPsf(which, arr.shape, "a PSF stamp must have an odd size (centred)")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InvalidPsf(which, arr.shape, f"a PSF stamp must be real, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    total = float(arr[finite].sum())
    if n_bad:
        raise InvalidPsf(
            which, arr.shape, f"{n_bad} non-finite pixels", n_non_finite=n_bad, total=total
        )
    if not total > 0:
        raise InvalidPsf(which, arr.shape, f"stamp sums to {total:g}", total=total)
    return arr / total


def _check_psf(psf: PsfInput, which: str) -> PsfInput:
    """Validate a stamp or every stamp of a model; return a normalised stamp or the model."""
    if isinstance(psf, PsfModel):
        for iy in range(psf.stamps.shape[0]):
            for ix in range(psf.stamps.shape[1]):
                _check_stamp(psf.stamps[iy, ix], f"{which} (grid stamp {iy}, {ix})")
        return psf
    return _check_stamp(psf, which)


def _psf_at(psf: PsfInput, x: float, y: float) -> NDArray[np.float64]:
    """Normalised PSF stamp at a 0-based position."""
    if isinstance(psf, PsfModel):
        s = np.asarray(psf.at(x, y), dtype=np.float64)
        return s / s.sum()
    return np.asarray(psf, dtype=np.float64)


def _psf_size(psf: PsfInput) -> int:
    return psf.size if isinstance(psf, PsfModel) else int(psf.shape[0])


def _is_constant(psf: PsfInput) -> bool:
    return psf.is_constant if isinstance(psf, PsfModel) else True


def _subsample(values: NDArray[Any]) -> NDArray[Any]:
    """A regular subsample of at most about ``_MAX_STAT_PIXELS`` of a 1-D array."""
    step = max(1, values.size // _MAX_STAT_PIXELS)
    return values[::step]


def _robust_median_sigma(values: NDArray[Any]) -> tuple[float, float]:
    """Median and 1.4826 MAD of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    med = float(np.median(v))
    return med, float(_MAD_TO_SIGMA * np.median(np.abs(v - med)))


def _noise_level(
    sigma: NoiseInput, shape: tuple[int, int], good: NDArray[np.bool_], name: str
) -> tuple[float, NDArray[np.float64] | None]:
    """Scalar background sigma for the kernels and the sigma map (None when scalar)."""
    if np.ndim(sigma) == 0:
        value = float(np.asarray(sigma))
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
        return value, None
    arr = np.asarray(sigma, dtype=np.float64)
    if arr.shape != shape:
        raise ShapeMismatch({"image": shape, name: arr.shape})
    usable = arr[good & np.isfinite(arr) & (arr > 0)]
    if usable.size == 0:
        raise ValueError(f"{name} has no finite, positive value on usable pixels")
    return float(np.median(_subsample(usable))), arr


# --------------------------------------------------------------------------------------
# PSF-dependent operators (eqs. 13-15, 28-29, 41)
# --------------------------------------------------------------------------------------


@dataclass
class _Operators:
    """Fourier-space operators of one PSF pair on one FFT grid (rfft half-plane).

    ``d_n``, ``d_r``: ``D̂ = d_n N̂ − d_r R̂`` (eq. 13). ``s_op = F_D conj(P̂_D)`` (eqs. 12,
    14), so that ``Ŝ = s_op D̂``, and ``s_op d_n = k̂_n``, ``s_op d_r = k̂_r`` (eqs. 28-29)
    give ``Ŝ_N`` and ``Ŝ_R`` (eqs. 31, 33). ``k2_n``, ``k2_r``: FTs of ``k_n²`` and ``k_r²``
    for the source-noise convolutions (eqs. 26-27), or None when not needed.
    """

    grid: tuple[int, int]
    d_n: Any
    d_r: Any
    s_op: Any
    k2_n: Any
    k2_r: Any
    flux_normalisation: float
    sum_k2_n: float
    sum_k2_r: float


def _embed_centred(stamp: NDArray[np.float64], grid: tuple[int, int]) -> NDArray[np.float64]:
    """A grid-sized array holding ``stamp`` with its centre pixel at index [0, 0] (wrapped)."""
    size = stamp.shape[0]
    half = size // 2
    out = np.zeros(grid, dtype=np.float64)
    rows = (np.arange(size) - half) % grid[0]
    cols = (np.arange(size) - half) % grid[1]
    out[np.ix_(rows, cols)] = stamp
    return out


#: Stamps up to this size get their grid spectrum from two small matrix products (cheaper
#: than an FFT of the mostly empty grid); larger ones from an FFT.
_MATMUL_DFT_MAX_SIZE = 64


def _centred_spectrum(bk: _ArrayBackend, stamp: NDArray[np.float64], grid: tuple[int, int]) -> Any:
    """``rfft2`` on ``grid`` of a centred odd stamp placed with its centre at [0, 0].

    A separable DFT: ``E_y · stamp · E_x`` with ``E`` the DFT matrices restricted to the
    stamp's pixel offsets, which costs ``O(size · grid)`` instead of an FFT of the grid.
    """
    size = stamp.shape[0]
    if size > _MATMUL_DFT_MAX_SIZE:
        return bk.rfft2(bk.asarray(_embed_centred(stamp, grid)), grid)
    offsets = np.arange(size) - size // 2
    ky = np.arange(grid[0])
    kx = np.arange(grid[1] // 2 + 1)
    # Phases reduced modulo the grid in integers keep the exponentials exact.
    e_y = np.exp((-2j * np.pi / grid[0]) * (np.outer(ky, offsets) % grid[0]))
    e_x = np.exp((-2j * np.pi / grid[1]) * (np.outer(offsets, kx) % grid[1]))
    complex_dtype = np.complex64 if bk.dtype == np.float32 else np.complex128
    right = (stamp @ e_x).astype(complex_dtype)
    left = e_y.astype(complex_dtype)
    return bk.as_complex(left) @ bk.as_complex(right)


def _half_plane_sum(bk: _ArrayBackend, a: Any, nx_full: int) -> float:
    """Sum over the full Fourier plane of a Hermitian-symmetric quantity given on the
    ``rfft`` half-plane: every column counts twice except 0 and, for even ``nx_full``,
    the Nyquist column."""
    total = 2.0 * bk.sum64(a) - bk.sum64(a[:, 0])
    if nx_full % 2 == 0:
        total -= bk.sum64(a[:, -1])
    return total


def _operators(
    bk: _ArrayBackend,
    psf_n: NDArray[np.float64],
    psf_r: NDArray[np.float64],
    grid: tuple[int, int],
    *,
    sigma_n: float,
    sigma_r: float,
    f_n: float,
    f_r: float,
    squares: tuple[NDArray[np.float64], NDArray[np.float64]] | None,
) -> _Operators:
    """Build the ZOGY operators of a PSF pair on an FFT grid (see :class:`_Operators`).

    ``squares``: real-space ``(k_n², k_r²)`` as centred stamps (from
    :func:`_small_grid_kernels`) whose FTs are needed for the source-noise terms, or None.
    """
    p_n = _centred_spectrum(bk, psf_n, grid)
    p_r = _centred_spectrum(bk, psf_r, grid)
    abs2_n = p_n.real**2 + p_n.imag**2
    abs2_r = p_r.real**2 + p_r.imag**2
    # Denominator of eqs. 13-14 (squared): σ_n² F_r² |P̂_r|² + σ_r² F_n² |P̂_n|². The tiny
    # term only keeps 0/0 (both PSFs exactly zero at a frequency) finite; elsewhere the
    # ratios stay exact, which keeps D white at all frequencies.
    den = abs2_r * (sigma_n**2 * f_r**2)
    den += abs2_n * (sigma_r**2 * f_n**2)
    den += float(np.finfo(bk.dtype).tiny)
    inv_sqrt = 1.0 / bk.sqrt(den)
    d_n = p_r * (inv_sqrt * f_r)  # eq. 13, the factor of N̂
    d_r = p_n * (inv_sqrt * f_n)  # eq. 13, the factor of R̂
    # F_D conj(P̂_D) = F_r F_n conj(P̂_r P̂_n) / sqrt(den) (eqs. 12, 14): Ŝ = s_op D̂.
    p_n *= p_r
    del p_r
    p_n *= inv_sqrt * (f_r * f_n)
    s_op = bk.conj_inplace(p_n)
    del p_n, inv_sqrt
    # With a = |P̂_n|²/den and b = |P̂_r|²/den: the eq. 41 integrand is F_n² F_r² a b den,
    # |k̂_n|² = F_n² F_r⁴ a b² den and |k̂_r|² = F_r² F_n⁴ a² b den (eqs. 28-29).
    abs2_n /= den
    abs2_r /= den
    den *= abs2_n
    den *= abs2_r
    n_pix = grid[0] * grid[1]
    nx_full = grid[1]
    flux_norm = (f_n**2 * f_r**2) * _half_plane_sum(bk, den, nx_full) / n_pix  # eq. 41
    # Parseval: Σ_x k(x)² = Σ_f |k̂(f)|² / n_pix (the constant part of eqs. 26-27).
    abs2_r *= den
    sum_k2_n = (f_n**2 * f_r**4) * _half_plane_sum(bk, abs2_r, nx_full) / n_pix
    abs2_n *= den
    sum_k2_r = (f_r**2 * f_n**4) * _half_plane_sum(bk, abs2_n, nx_full) / n_pix
    del abs2_n, abs2_r, den
    k2_n = k2_r = None
    if squares is not None:
        if max(squares[0].shape[0], squares[1].shape[0]) <= min(grid):
            k2_n = _centred_spectrum(bk, squares[0], grid)
            k2_r = _centred_spectrum(bk, squares[1], grid)
        else:  # a grid smaller than the kernels: square them on the grid itself
            k2_n = bk.rfft2(bk.irfft2(s_op * d_n, grid) ** 2, grid)
            k2_r = bk.rfft2(bk.irfft2(s_op * d_r, grid) ** 2, grid)
    return _Operators(grid, d_n, d_r, s_op, k2_n, k2_r, flux_norm, sum_k2_n, sum_k2_r)


def _small_grid_kernels(
    psf_n: NDArray[np.float64],
    psf_r: NDArray[np.float64],
    *,
    sigma_n: float,
    sigma_r: float,
    f_n: float,
    f_r: float,
    f_d: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``P_D`` (eq. 14) as a unit-sum stamp the size of the PSFs, and the real-space kernels
    ``k_n``, ``k_r`` (eqs. 28-29) as centred stamps twice that size, in double precision.

    The kernels are products of the PSFs' transforms with a bounded factor, so they reach
    about as far as the broader PSF (at most ~sqrt(2) times); a grid four times the stamp
    holds them without wrap-around.
    """
    size = psf_n.shape[0]
    m = scipy.fft.next_fast_len(max(4 * size, 64), real=True)
    p_n = np.fft.rfft2(_embed_centred(psf_n, (m, m)))
    p_r = np.fft.rfft2(_embed_centred(psf_r, (m, m)))
    abs2_n = np.abs(p_n) ** 2
    abs2_r = np.abs(p_r) ** 2
    den = sigma_n**2 * f_r**2 * abs2_r + sigma_r**2 * f_n**2 * abs2_n
    den = np.maximum(den, np.finfo(np.float64).tiny)
    p_d_hat = f_r * f_n * p_r * p_n / (f_d * np.sqrt(den))  # eq. 14
    k_n_hat = f_n * f_r**2 * np.conj(p_n) * abs2_r / den  # eq. 29
    k_r_hat = f_r * f_n**2 * np.conj(p_r) * abs2_n / den  # eq. 28

    def centred(spectrum: NDArray[np.complex128], half: int) -> NDArray[np.float64]:
        image = np.fft.irfft2(spectrum, s=(m, m))
        idx = np.arange(-half, half + 1) % m
        return np.asarray(image[np.ix_(idx, idx)], dtype=np.float64)

    p_d = centred(p_d_hat, size // 2)
    half_k = min(size, m // 2 - 1)
    return p_d / p_d.sum(), centred(k_n_hat, half_k), centred(k_r_hat, half_k)


def _trim_stamp(stamp: NDArray[np.float64], rel: float = 1e-8) -> NDArray[np.float64]:
    """The smallest centred odd sub-stamp holding every pixel above ``rel`` times the peak."""
    half = stamp.shape[0] // 2
    ys, xs = np.nonzero(np.abs(stamp) > rel * float(np.abs(stamp).max()))
    if ys.size == 0:
        return stamp[half : half + 1, half : half + 1]
    r = int(max(np.abs(ys - half).max(), np.abs(xs - half).max()))
    return stamp[half - r : half + r + 1, half - r : half + r + 1]


def _stamp_fwhm(stamp: NDArray[np.float64]) -> float:
    """FWHM in pixels of the Gaussian with the stamp's second moments."""
    half = stamp.shape[0] // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    w = np.clip(stamp, 0.0, None)
    w = w / w.sum()
    xc = float((w * x).sum())
    yc = float((w * y).sum())
    var = float((w * ((x - xc) ** 2 + (y - yc) ** 2)).sum()) / 2.0
    return 2.0 * math.sqrt(2.0 * math.log(2.0)) * math.sqrt(max(var, 0.0))


# --------------------------------------------------------------------------------------
# One tile
# --------------------------------------------------------------------------------------


def _add_gradient_squares(bk: _ArrayBackend, a: Any, var_x: float, var_y: float, out: Any) -> None:
    """``out += var_x (∂a/∂x)² + var_y (∂a/∂y)²``, central differences (one-sided at edges)."""
    for var, axis in ((var_x, 1), (var_y, 0)):
        if var <= 0:
            continue
        if axis == 1:
            inner, first, last = out[:, 1:-1], out[:, 0], out[:, -1]
            d = a[:, 2:] - a[:, :-2]
            e0, e1 = a[:, 1] - a[:, 0], a[:, -1] - a[:, -2]
        else:
            inner, first, last = out[1:-1, :], out[0, :], out[-1, :]
            d = a[2:, :] - a[:-2, :]
            e0, e1 = a[1, :] - a[0, :], a[-1, :] - a[-2, :]
        d *= 0.5 * math.sqrt(var)
        d *= d
        inner += d
        first += (e0 * e0) * var
        last += (e1 * e1) * var


def _zogy_tile(
    bk: _ArrayBackend,
    ops: _Operators,
    new: NDArray[np.floating],
    ref: NDArray[np.floating],
    excess_n: NDArray[np.floating] | None,
    excess_r: NDArray[np.floating] | None,
    *,
    sigma_n: float,
    sigma_r: float,
    f_n: float,
    ast_x: float,
    ast_y: float,
    psf_error: float,
    core: tuple[slice, slice],
    out: dict[str, NDArray[np.floating]],
    out_core: tuple[slice, slice],
) -> None:
    """Subtract one tile and write its ``core`` into ``out[...][out_core]``.

    ``new`` and ``ref`` are on a zero background with bad pixels filled; ``excess_*`` are
    the variance maps minus the kernels' ``σ²`` (None: constant variance).
    """
    ny, nx = new.shape
    grid = ops.grid
    n_hat = bk.rfft2(bk.asarray(new), grid)
    n_hat *= ops.d_n
    r_hat = bk.rfft2(bk.asarray(ref), grid)
    r_hat *= ops.d_r
    astrometric = ast_x > 0 or ast_y > 0
    if astrometric or psf_error > 0:
        spectrum = n_hat - r_hat  # eq. 13
        out["difference"][out_core] = bk.to_numpy(bk.irfft2(spectrum, grid)[:ny, :nx][core])
        del spectrum
        n_hat *= ops.s_op  # k̂_n N̂
        s_n = bk.irfft2(n_hat, grid)[:ny, :nx]  # eq. 31
        del n_hat
        r_hat *= ops.s_op  # k̂_r R̂
        s_r = bk.irfft2(r_hat, grid)[:ny, :nx]  # eq. 33
        del r_hat
        score = s_n - s_r  # eq. 17 (equal to F_D D ⊗ P̄_D, eq. 12)
    else:
        n_hat -= r_hat  # eq. 13
        del r_hat
        out["difference"][out_core] = bk.to_numpy(bk.irfft2(n_hat, grid)[:ny, :nx][core])
        n_hat *= ops.s_op  # eq. 12: Ŝ = F_D conj(P̂_D) D̂
        score = bk.irfft2(n_hat, grid)[:ny, :nx]
        del n_hat

    # Eqs. 26-27 with V(ε) = σ² + excess: the constant part is σ² Σ k² (Parseval), the
    # excess (source noise, background variations, zero-variance fills) is convolved with k².
    v_const = sigma_n**2 * ops.sum_k2_n + sigma_r**2 * ops.sum_k2_r
    v_s: Any = None
    if excess_n is not None and excess_r is not None:
        spectrum = bk.rfft2(bk.asarray(excess_n), grid)
        spectrum *= ops.k2_n
        other = bk.rfft2(bk.asarray(excess_r), grid)
        other *= ops.k2_r
        spectrum += other
        del other
        v_s = bk.irfft2(spectrum, grid)[:ny, :nx]
        del spectrum
        v_s += v_const
        # Round-off can leave tiny or negative values where the fill has zero variance.
        v_s = bk.maximum(v_s, 1e-6 * v_const)
    if astrometric or psf_error > 0:
        # Eqs. 30, 32: V_ast(S_N) + V_ast(S_R) = Σ_i σ_i² ((∂S_N/∂i)² + (∂S_R/∂i)²).
        v_total = v_s + 0.0 if v_s is not None else bk.asarray(np.full((ny, nx), v_const))
        if astrometric:
            _add_gradient_squares(bk, s_n, ast_x**2, ast_y**2, v_total)
            _add_gradient_squares(bk, s_r, ast_x**2, ast_y**2, v_total)
        if psf_error > 0:
            # A fractional PSF-model error leaves ~ε S_N and ε S_R of each source in S.
            v_total += (s_n * s_n + s_r * s_r) * psf_error**2
            if "score_science" in out:
                out["score_science"][out_core] = bk.to_numpy(s_n[core])
        del s_n, s_r
        v_score = v_total
        del v_total
    else:
        v_score = v_s
    if v_score is None:
        score_corr = score * (1.0 / math.sqrt(v_const))  # eq. 25
        if "score_variance" in out:
            out["score_variance"][out_core] = v_const
    else:
        score_corr = score / bk.sqrt(v_score)  # eq. 25
        if "score_variance" in out:
            out["score_variance"][out_core] = bk.to_numpy(v_score[core])
        del v_score
    out["score_corrected"][out_core] = bk.to_numpy(score_corr[core])
    del score_corr
    out["score"][out_core] = bk.to_numpy(score[core] * (1.0 / math.sqrt(ops.flux_normalisation)))
    to_flux = f_n / ops.flux_normalisation  # eq. 42, then × F_n for science units
    out["flux"][out_core] = bk.to_numpy(score[core] * to_flux)
    if v_s is None:
        out["flux_error"][out_core] = math.sqrt(v_const) * to_flux  # eq. 43
    else:
        out["flux_error"][out_core] = bk.to_numpy(bk.sqrt(v_s[core]) * to_flux)  # eq. 43


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def _split(n: int, core: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into the fewest near-equal pieces of at most ``core``."""
    count = max(1, math.ceil(n / core))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _grow(bad: NDArray[np.bool_], radius: int) -> NDArray[np.bool_]:
    """Dilate by a square of half-side ``radius`` and add a border of that width."""
    out = bad
    if radius > 0 and bad.any():
        size = 2 * radius + 1
        grown = ndimage.maximum_filter1d(bad.view(np.uint8), size, axis=0, mode="constant")
        grown = ndimage.maximum_filter1d(grown, size, axis=1, mode="constant")
        out = grown.astype(bool)
    else:
        out = bad.copy()
    if radius > 0:
        out[:radius, :] = True
        out[-radius:, :] = True
        out[:, :radius] = True
        out[:, -radius:] = True
    return out


def zogy_subtract(
    science: NDArray[np.floating],
    reference: NDArray[np.floating],
    *,
    psf_science: PsfInput,
    psf_reference: PsfInput,
    noise_science: NoiseInput,
    noise_reference: NoiseInput,
    flux_scale: FluxScale,
    variance_science: NDArray[np.floating] | None = None,
    variance_reference: NDArray[np.floating] | None = None,
    mask_science: NDArray[np.bool_] | None = None,
    mask_reference: NDArray[np.bool_] | None = None,
    astrometric_sigma_x: float | None = None,
    astrometric_sigma_y: float | None = None,
    config: ZogyConfig | None = None,
) -> ZogyResult:
    """Subtract a reference from a science image with ZOGY (Zackay, Ofek & Gal-Yam 2016).

    Parameters
    ----------
    science : ndarray, shape (ny, nx)
        New image ``N``, aligned to the reference, background-subtracted up to the
        constant ``flux_scale.background_offset`` (data units). NaN marks missing data.
    reference : ndarray, shape (ny, nx)
        Reference image ``R`` on the same pixel grid (its own data units).
    psf_science, psf_reference : ndarray, shape (size, size), or PsfModel
        PSFs ``P_n`` and ``P_r``: centred stamps of odd size (normalised here to unit sum),
        or models, possibly varying over the field (evaluated at tile centres).
    noise_science, noise_reference : float or ndarray, shape (ny, nx)
        Background noise sigma ``σ_n``, ``σ_r`` (data units), without source noise. A map's
        median over usable pixels is used in the kernels; the map itself enters the
        variance of ``S`` when no variance image is given.
    flux_scale : FluxScale
        Photometric tie from :func:`fit_flux_scale` (or built directly when known):
        ``F_n = flux_ratio``, ``F_r = 1``, and the background offset removed from ``N``.
    variance_science, variance_reference : ndarray, shape (ny, nx), or None
        Per-pixel variance of each image including source noise (data units squared),
        e.g. an exposure's variance plane. Their excess over ``σ²`` is the source-noise
        term of ``S_corr`` (eqs. 26-27). ``None``: the noise map squared, or a constant
        ``σ²`` (no source noise).
    mask_science, mask_reference : ndarray of bool, shape (ny, nx), or None
        True for bad pixels. Bad or non-finite pixels of either image are replaced by the
        background in both before any FFT and flagged (grown) in the result's ``mask``.
    astrometric_sigma_x, astrometric_sigma_y : float or None
        Registration noise ``σ_x``, ``σ_y`` in pixels (eqs. 30-33). ``None``: the
        configured defaults.
    config : ZogyConfig or None
        Options; ``None`` uses the defaults.

    Returns
    -------
    ZogyResult
        Difference, its PSF and zero point, score images, PSF-photometry flux and error,
        and the output mask.

    Raises
    ------
    ShapeMismatch
        If the images, maps and masks do not share one shape.
    BadImageShape, EmptyImage
        If an image is not 2-D, or no pixel is usable in both.
    InvalidPsf
        If a PSF stamp is not square and odd-sized, or has non-finite values or a
        non-positive sum.
    BackendUnavailable
        If ``config.backend`` names a GPU library that cannot be used here.
    """
    cfg = config or ZogyConfig()
    bk = _select_backend(cfg)
    new_in = check_image(science, "science")
    ref_in = check_image(reference, "reference")
    shape = (int(new_in.shape[0]), int(new_in.shape[1]))
    planes: dict[str, tuple[int, ...]] = {"science": new_in.shape, "reference": ref_in.shape}
    for name, plane in (
        ("variance_science", variance_science),
        ("variance_reference", variance_reference),
        ("mask_science", mask_science),
        ("mask_reference", mask_reference),
    ):
        if plane is not None:
            planes[name] = np.shape(plane)
    if len(set(planes.values())) != 1:
        raise ShapeMismatch(planes)
    p_n = _check_psf(psf_science, "psf_science")
    p_r = _check_psf(psf_reference, "psf_reference")
    dtype = bk.dtype
    if dtype == np.float32:
        new, ref = new_in, ref_in
    else:
        new = np.asarray(science, dtype=np.float64)
        ref = np.asarray(reference, dtype=np.float64)

    bad = ~(np.isfinite(new) & np.isfinite(ref))
    for plane in (mask_science, mask_reference):
        if plane is not None:
            bad |= np.asarray(plane, dtype=bool)
    var_maps: list[NDArray[np.floating] | None] = []
    for plane in (variance_science, variance_reference):
        if plane is None:
            var_maps.append(None)
        else:
            v = np.asarray(plane, dtype=dtype)
            bad |= ~np.isfinite(v)
            var_maps.append(v)
    good = ~bad
    n_good = int(np.count_nonzero(good))
    if n_good == 0:
        raise EmptyImage(0, bad.size)
    sigma_n, sigma_map_n = _noise_level(noise_science, shape, good, "noise_science")
    sigma_r, sigma_map_r = _noise_level(noise_reference, shape, good, "noise_reference")
    for sigma_map in (sigma_map_n, sigma_map_r):
        if sigma_map is not None:
            bad |= ~np.isfinite(sigma_map)
    good = ~bad

    f_n = float(flux_scale.flux_ratio)
    f_r = 1.0
    f_d = f_r * f_n / math.sqrt(sigma_n**2 * f_r**2 + sigma_r**2 * f_n**2)  # eq. 15
    ast_x = cfg.astrometric_sigma_x if astrometric_sigma_x is None else astrometric_sigma_x
    ast_y = cfg.astrometric_sigma_y if astrometric_sigma_y is None else astrometric_sigma_y
    if not (math.isfinite(ast_x) and math.isfinite(ast_y) and ast_x >= 0 and ast_y >= 0):
        raise ValueError(f"astrometric noise must be finite and >= 0, got ({ast_x}, {ast_y})")

    # Put both images on a zero background: the reference level (its robust median) is
    # removed from R and, scaled, from N − offset, so that N − F_n R is unchanged while the
    # fill of bad pixels and the FFT zero padding both equal the background.
    step = max(1, math.isqrt(ref.size // _MAX_STAT_PIXELS))
    ref_level, _ = _robust_median_sigma(ref[::step, ::step][good[::step, ::step]])
    if not math.isfinite(ref_level):  # no usable pixel in the subsample
        ref_level, _ = _robust_median_sigma(ref[good])
    new_level = float(flux_scale.background_offset) + f_n * ref_level
    new = new - dtype(new_level)
    new[bad] = 0
    ref = ref - dtype(ref_level)
    ref[bad] = 0

    # Variance excess over the kernels' σ² (eqs. 26-27); filled pixels have zero variance.
    excess: list[NDArray[np.floating] | None] = []
    for var_map, sigma_map, sigma in (
        (var_maps[0], sigma_map_n, sigma_n),
        (var_maps[1], sigma_map_r, sigma_r),
    ):
        full = var_map
        if full is None and sigma_map is not None:
            full = sigma_map.astype(dtype) ** 2
        if full is None:
            excess.append(None)
        else:
            extra = full - dtype(sigma**2)
            extra[bad] = -(sigma**2)
            excess.append(extra)
    if (excess[0] is None) != (excess[1] is None):
        excess = [
            e if e is not None else np.where(bad, dtype(-(s**2)), dtype(0)).astype(dtype)
            for e, s in zip(excess, (sigma_n, sigma_r), strict=True)
        ]
    need_squares = excess[0] is not None

    max_size = max(_psf_size(p_n), _psf_size(p_r))
    pad = cfg.padding if cfg.padding is not None else max(16, max_size)
    margin = cfg.tile_margin if cfg.tile_margin is not None else max(32, 3 * max_size)
    dilation = cfg.mask_dilation if cfg.mask_dilation is not None else max_size // 2
    constant = _is_constant(p_n) and _is_constant(p_r)
    tiled = cfg.tiling == "always" or (cfg.tiling == "auto" and not constant)
    core_y = core_x = cfg.tile_size
    if cfg.tiling == "auto" and not constant:
        # At least one tile per node of a varying PSF grid: a tile uses the PSFs at its
        # centre, and a PSF mismatch leaves residuals of static sources.
        n_y = max(math.ceil(shape[0] / cfg.tile_size), *(_grid_count(p, 0) for p in (p_n, p_r)))
        n_x = max(math.ceil(shape[1] / cfg.tile_size), *(_grid_count(p, 1) for p in (p_n, p_r)))
        core_y = max(16, math.ceil(shape[0] / n_y))
        core_x = max(16, math.ceil(shape[1] / n_x))
    rows = _split(shape[0], core_y) if tiled else [(0, shape[0])]
    cols = _split(shape[1], core_x) if tiled else [(0, shape[1])]
    if not tiled:
        margin = 0

    keys = ["difference", "score", "score_corrected", "flux", "flux_error"]
    if cfg.refit_offset:  # the variance of S in S_corr and S_N, for the refit
        keys += ["score_variance", "score_science"] if cfg.psf_error > 0 else ["score_variance"]
    outputs = {key: np.empty(shape, dtype=dtype) for key in keys}
    flux_norms = np.empty((len(rows), len(cols)), dtype=np.float64)
    pd_stamps = np.empty((len(rows), len(cols), max_size, max_size), dtype=np.float32)
    pd_fwhm = np.empty((len(rows), len(cols)), dtype=np.float64)
    cache: dict[tuple[int, int], _Operators] = {}
    for iy, (y0, y1) in enumerate(rows):
        for ix, (x0, x1) in enumerate(cols):
            ey0, ey1 = max(0, y0 - margin), min(shape[0], y1 + margin)
            ex0, ex1 = max(0, x0 - margin), min(shape[1], x1 + margin)
            xc, yc = 0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)
            stamp_n = _pad_stamp(_psf_at(p_n, xc, yc), max_size)
            stamp_r = _pad_stamp(_psf_at(p_r, xc, yc), max_size)
            grid = (
                scipy.fft.next_fast_len(max(ey1 - ey0 + pad, max_size), real=True),
                scipy.fft.next_fast_len(max(ex1 - ex0 + pad, max_size), real=True),
            )
            pd, k_n, k_r = _small_grid_kernels(
                stamp_n, stamp_r, sigma_n=sigma_n, sigma_r=sigma_r, f_n=f_n, f_r=f_r, f_d=f_d
            )
            ops = cache.get(grid) if constant else None
            if ops is None:
                ops = _operators(
                    bk,
                    stamp_n,
                    stamp_r,
                    grid,
                    sigma_n=sigma_n,
                    sigma_r=sigma_r,
                    f_n=f_n,
                    f_r=f_r,
                    squares=(_trim_stamp(k_n**2), _trim_stamp(k_r**2)) if need_squares else None,
                )
                if constant:
                    cache = {grid: ops}  # keep one grid's operators alive at a time
            _zogy_tile(
                bk,
                ops,
                new[ey0:ey1, ex0:ex1],
                ref[ey0:ey1, ex0:ex1],
                None if excess[0] is None else excess[0][ey0:ey1, ex0:ex1],
                None if excess[1] is None else excess[1][ey0:ey1, ex0:ex1],
                sigma_n=sigma_n,
                sigma_r=sigma_r,
                f_n=f_n,
                ast_x=float(ast_x),
                ast_y=float(ast_y),
                psf_error=float(cfg.psf_error),
                core=(slice(y0 - ey0, y1 - ey0), slice(x0 - ex0, x1 - ex0)),
                out=outputs,
                out_core=(slice(y0, y1), slice(x0, x1)),
            )
            flux_norms[iy, ix] = ops.flux_normalisation
            pd_stamps[iy, ix] = pd
            pd_fwhm[iy, ix] = _stamp_fwhm(pd)

    mask = _grow(bad, dilation)
    if cfg.refit_offset:
        flux_scale = _refit_offset(
            outputs,
            mask,
            flux_scale,
            rows=rows,
            cols=cols,
            flux_norms=flux_norms,
            sigma_n=sigma_n,
            sigma_r=sigma_r,
            f_d=f_d,
            psf_error=float(cfg.psf_error),
        )

    difference_psf = PsfModel(
        stamps=pd_stamps,
        grid_x=np.array([0.5 * (a + b - 1) for a, b in cols], dtype=np.float64),
        grid_y=np.array([0.5 * (a + b - 1) for a, b in rows], dtype=np.float64),
        fwhm=float(np.median(pd_fwhm)),
        fwhm_grid=pd_fwhm,
    )
    transient_psf = _transient_psf(
        p_n,
        p_r,
        rows,
        cols,
        max_size,
        difference_psf,
        sigma_n=sigma_n,
        sigma_r=sigma_r,
        f_n=f_n,
        f_r=f_r,
    )
    return ZogyResult(
        difference=outputs["difference"],
        difference_psf=difference_psf,
        difference_zero_point=f_d,
        transient_psf=transient_psf,
        score=outputs["score"],
        score_corrected=outputs["score_corrected"],
        flux=outputs["flux"],
        flux_error=outputs["flux_error"],
        mask=mask,
        flux_scale=flux_scale,
        flux_normalisation=flux_norms,
        noise_science=sigma_n,
        noise_reference=sigma_r,
        astrometric_sigma=(float(ast_x), float(ast_y)),
        backend=bk.name,
    )


def _clipped_mean(
    image: NDArray[np.floating], good: NDArray[np.bool_], *, clip: float = 3.0
) -> tuple[float, float]:
    """Sigma-clipped mean of an image's good pixels and its standard error.

    Median/MAD clipping at ``clip`` sigma, iterated to convergence (at most 5 times), on
    at most ~4 million pixels (a regular subsample above that).

    Returns
    -------
    mean, error : float
        ``(0, inf)`` when fewer than 100 finite good pixels remain.
    """
    v = np.asarray(image, np.float64)[good]
    v = v[np.isfinite(v)]
    if v.size < 100:
        return 0.0, math.inf
    if v.size > 4_000_000:
        v = v[:: v.size // 2_000_000]
    keep = np.ones(v.size, bool)
    for _ in range(5):
        med = np.median(v[keep])
        sig = 1.4826 * np.median(np.abs(v[keep] - med))
        new = np.abs(v - med) <= clip * sig
        if np.array_equal(new, keep):
            break
        keep = new
    kept = v[keep]
    return float(np.mean(kept)), float(np.std(kept) / np.sqrt(kept.size))


def _refit_offset(
    outputs: dict[str, NDArray[np.floating]],
    mask: NDArray[np.bool_],
    flux_scale: FluxScale,
    *,
    rows: list[tuple[int, int]],
    cols: list[tuple[int, int]],
    flux_norms: NDArray[np.float64],
    sigma_n: float,
    sigma_r: float,
    f_d: float,
    psf_error: float,
) -> FluxScale:
    """Remove a constant left in ``D`` from every output (see ``ZogyConfig.refit_offset``).

    A constant ``c`` added to ``N`` adds ``c F_r / sqrt(σ_n² F_r² + σ_r² F_n²)`` to ``D``
    (eq. 13 at zero frequency, unit-sum PSFs), ``F_D`` times that to ``S`` (``P̂_D(0) =
    1``, eq. 12), hence ``ΔS / sqrt(F_S)`` to ``score``, ``ΔS F_n / F_S`` to ``flux`` and
    ``ΔS`` to ``S_N``, which changes the PSF-error term ``ε² S_N²`` of the variance of
    ``S`` in ``S_corr`` (the astrometric terms hold only gradients and do not change);
    ``flux_error`` does not change. Updates ``outputs`` in place and returns the flux
    scale with the corrected offset.
    """
    variance = outputs.pop("score_variance")
    s_n = outputs.pop("score_science", None)
    d_offset, d_error = _clipped_mean(outputs["difference"], ~mask)
    if not abs(d_offset) > max(3.0 * d_error, 1e-3):
        return flux_scale
    f_n = float(flux_scale.flux_ratio)
    dtype = outputs["difference"].dtype.type
    outputs["difference"] -= dtype(d_offset)
    delta_s = f_d * d_offset
    if s_n is not None:
        # S_N moves with N, so the PSF-error term ε² S_N² of V(S) moves with it.
        s_n -= dtype(0.5 * delta_s)
        s_n *= dtype(-2.0 * delta_s * psf_error**2)
        variance += s_n
        del s_n
    for iy, (y0, y1) in enumerate(rows):
        for ix, (x0, x1) in enumerate(cols):
            core = (slice(y0, y1), slice(x0, x1))
            f_s = float(flux_norms[iy, ix])
            outputs["score"][core] -= dtype(delta_s / math.sqrt(f_s))
            outputs["flux"][core] -= dtype(delta_s * f_n / f_s)
            score = outputs["score"][core] * dtype(math.sqrt(f_s))
            score /= np.sqrt(variance[core])
            outputs["score_corrected"][core] = score
    correction = d_offset * math.sqrt(sigma_n**2 + f_n**2 * sigma_r**2)
    return replace(flux_scale, background_offset=flux_scale.background_offset + correction)


def _grid_count(psf: PsfInput, axis: int) -> int:
    """Grid nodes of a PSF model along ``axis`` (0: y, 1: x); 1 for a stamp."""
    if not isinstance(psf, PsfModel):
        return 1
    return len(psf.grid_y) if axis == 0 else len(psf.grid_x)


def _grid_spacing(psf: PsfInput) -> float:
    """Smallest spacing of a varying model's grid in pixels (inf for a constant PSF)."""
    if not isinstance(psf, PsfModel) or psf.is_constant:
        return math.inf
    steps = [np.diff(g) for g in (psf.grid_x, psf.grid_y) if len(g) > 1]
    return float(min(float(np.min(d)) for d in steps)) if steps else math.inf


def _sub_centres(start: int, stop: int, n: int) -> list[float]:
    """Centres of ``n`` equal sub-cells of the pixel range ``[start, stop)``."""
    edges = np.linspace(start, stop, n + 1)
    return [0.5 * (a + b) - 0.5 for a, b in itertools.pairwise(edges)]


def _transient_psf(
    p_n: PsfInput,
    p_r: PsfInput,
    rows: list[tuple[int, int]],
    cols: list[tuple[int, int]],
    size: int,
    difference_psf: PsfModel,
    *,
    sigma_n: float,
    sigma_r: float,
    f_n: float,
    f_r: float,
) -> PsfModel:
    """PSF of ``D`` for a source new in the science image, on sub-tile nodes.

    A source drawn with the science PSF ``P_n(x)`` in a tile whose kernels use ``P_n^t``
    and ``P_r^t`` appears in ``D`` (eq. 13) as ``F_n F_r P̂_r^t P̂_n(x) / sqrt(den^t)``; its
    shape follows ``P_n(x)``, which varies inside the tile when the science PSF does.
    Each tile gets ``s x s`` nodes (``s`` from the ratio of tile to science-grid
    spacing) at the centres of equal sub-cells, so that bilinear interpolation between
    nodes follows the science model's own bilinear variation.
    """
    if _is_constant(p_n):
        return difference_psf
    spacing = _grid_spacing(p_n)
    tile = max(max(b - a for a, b in rows), max(b - a for a, b in cols))
    sub = int(min(8, max(1, math.ceil(2.0 * tile / spacing))))
    grid_y = [c for a, b in rows for c in _sub_centres(a, b, sub)]
    grid_x = [c for a, b in cols for c in _sub_centres(a, b, sub)]
    m = scipy.fft.next_fast_len(max(4 * size, 64), real=True)
    half = size // 2
    idx = np.arange(-half, half + 1) % m
    stamps = np.empty((len(grid_y), len(grid_x), size, size), dtype=np.float32)
    fwhm = np.empty((len(grid_y), len(grid_x)), dtype=np.float64)
    for ty, (y0, y1) in enumerate(rows):
        for tx, (x0, x1) in enumerate(cols):
            xc, yc = 0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)
            pn_t = np.fft.rfft2(_embed_centred(_pad_stamp(_psf_at(p_n, xc, yc), size), (m, m)))
            pr_t = np.fft.rfft2(_embed_centred(_pad_stamp(_psf_at(p_r, xc, yc), size), (m, m)))
            den = sigma_n**2 * f_r**2 * np.abs(pr_t) ** 2 + sigma_r**2 * f_n**2 * np.abs(pn_t) ** 2
            kernel = pr_t / np.sqrt(np.maximum(den, np.finfo(np.float64).tiny))
            for j in range(sub):
                gy = ty * sub + j
                for i in range(sub):
                    gx = tx * sub + i
                    here = _pad_stamp(_psf_at(p_n, grid_x[gx], grid_y[gy]), size)
                    spectrum = kernel * np.fft.rfft2(_embed_centred(here, (m, m)))
                    image = np.fft.irfft2(spectrum, s=(m, m))[np.ix_(idx, idx)]
                    image /= image.sum()
                    stamps[gy, gx] = image
                    fwhm[gy, gx] = _stamp_fwhm(image)
    return PsfModel(
        stamps=stamps,
        grid_x=np.asarray(grid_x, dtype=np.float64),
        grid_y=np.asarray(grid_y, dtype=np.float64),
        fwhm=float(np.median(fwhm)),
        fwhm_grid=fwhm,
    )


def _pad_stamp(stamp: NDArray[np.float64], size: int) -> NDArray[np.float64]:
    """Zero-pad a centred odd stamp to ``size`` (odd, not smaller)."""
    extra = (size - stamp.shape[0]) // 2
    return np.pad(stamp, extra) if extra > 0 else stamp


# --------------------------------------------------------------------------------------
# Photometric tie
# --------------------------------------------------------------------------------------


def _shift_stamp(stamp: NDArray[np.float64], dy: float, dx: float) -> NDArray[np.float64]:
    """A stamp shifted by a sub-pixel ``(dy, dx)`` with a Fourier phase ramp (zero-padded
    so nothing wraps around)."""
    size = stamp.shape[0]
    pad = size // 2 + 1
    big = np.pad(stamp, pad)
    n = big.shape[0]
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    spectrum = np.fft.rfft2(big) * np.exp(-2j * np.pi * (ky * dy + kx * dx))
    return np.fft.irfft2(spectrum, s=big.shape)[pad : pad + size, pad : pad + size]


def _psf_fit_fluxes(
    image: NDArray[np.floating],
    bad: NDArray[np.bool_],
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    psf_at: Callable[[float, float], NDArray[np.float64]],
    saturation: float | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """PSF-fit flux (with a local constant background) of each star and its error.

    The PSF stamp is shifted to the star's sub-pixel position (Fourier shift: unlike a
    spline it does not blur a sharp PSF, which would bias the flux by up to ~0.5 % for a
    2.5-pixel FWHM) and fitted by linear least squares over the stamp; the error is from
    the fit residuals. Stars whose stamp leaves the image or touches a bad or saturated
    pixel get NaN.
    """
    ny, nx = image.shape
    flux = np.full(x.size, np.nan)
    error = np.full(x.size, np.nan)
    for i in range(x.size):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        stamp = psf_at(float(x[i]), float(y[i]))
        half = stamp.shape[0] // 2
        ix, iy = round(float(x[i])), round(float(y[i]))
        if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
            continue
        window = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        data = image[window].astype(np.float64)
        if bad[window].any() or (saturation is not None and bool((data >= saturation).any())):
            continue
        model = _shift_stamp(stamp, float(y[i] - iy), float(x[i] - ix))
        p = model.ravel()
        d = data.ravel()
        n = p.size
        sp, spp, sd, spd = p.sum(), (p * p).sum(), d.sum(), (p * d).sum()
        det = n * spp - sp * sp
        if det <= 0:
            continue
        f = (n * spd - sp * sd) / det
        b = (spp * sd - sp * spd) / det
        resid = d - f * p - b
        dof = max(n - 2, 1)
        var_f = float((resid * resid).sum()) / dof * n / det
        flux[i] = f
        error[i] = math.sqrt(max(var_f, 0.0))
    return flux, error


def fit_flux_scale(
    science: NDArray[np.floating],
    reference: NDArray[np.floating],
    *,
    x: NDArray[np.floating],
    y: NDArray[np.floating],
    psf_science: PsfInput,
    psf_reference: PsfInput,
    mask_science: NDArray[np.bool_] | None = None,
    mask_reference: NDArray[np.bool_] | None = None,
    saturation_science: float | None = None,
    saturation_reference: float | None = None,
    config: FluxScaleConfig | None = None,
) -> FluxScale:
    """Fit the flux ratio ``F_n / F_r`` and background offset of a science image.

    Each star is measured in both images by PSF fitting at the given position (flux and
    local background free), so the ratio does not depend on the two seeings. The ratio
    is the weighted least-squares slope through the origin of science against reference
    flux, with errors in both, iteratively sigma-clipped on the normalised residuals
    (variable stars, blends and bad fits drop out). The background offset is the
    sigma-clipped median of ``N − ratio·R`` over source-free pixels (away from the given
    stars and within a few sigmas of the median in both images).

    Parameters
    ----------
    science, reference : ndarray, shape (ny, nx)
        Aligned images (data units). NaN marks missing data.
    x, y : array_like of float, shape (n_stars,)
        0-based pixel positions of the same stars in both images (bright, isolated and
        unsaturated ones work best).
    psf_science, psf_reference : ndarray or PsfModel
        PSFs of the two images (odd centred stamps or models).
    mask_science, mask_reference : ndarray of bool, or None
        True for bad pixels; stars touching one are skipped.
    saturation_science, saturation_reference : float or None
        Data levels at or above which a pixel is saturated (in the images' own units);
        stars touching one are skipped. ``None``: no check.
    config : FluxScaleConfig or None
        Options; ``None`` uses the defaults.

    Returns
    -------
    FluxScale

    Raises
    ------
    ShapeMismatch
        If the images, masks or position arrays disagree in shape.
    InvalidPsf
        If a PSF stamp is unusable.
    StarMatchFailed
        If fewer than ``config.min_stars`` stars are measurable and survive clipping.
    EmptyImage
        If no pixel is usable for the background offset.
    """
    cfg = config or FluxScaleConfig()
    new = check_image(science, "science")
    ref = check_image(reference, "reference")
    planes: dict[str, tuple[int, ...]] = {"science": new.shape, "reference": ref.shape}
    if mask_science is not None:
        planes["mask_science"] = np.shape(mask_science)
    if mask_reference is not None:
        planes["mask_reference"] = np.shape(mask_reference)
    if len(set(planes.values())) != 1:
        raise ShapeMismatch(planes)
    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ShapeMismatch({"x": xs.shape, "y": ys.shape})
    p_n = _check_psf(psf_science, "psf_science")
    p_r = _check_psf(psf_reference, "psf_reference")

    bad_n = ~np.isfinite(new)
    bad_r = ~np.isfinite(ref)
    if mask_science is not None:
        bad_n |= np.asarray(mask_science, dtype=bool)
    if mask_reference is not None:
        bad_r |= np.asarray(mask_reference, dtype=bool)

    def at_n(px: float, py: float) -> NDArray[np.float64]:
        return _psf_at(p_n, px, py)

    def at_r(px: float, py: float) -> NDArray[np.float64]:
        return _psf_at(p_r, px, py)

    f_sci, e_sci = _psf_fit_fluxes(new, bad_n, xs, ys, at_n, saturation_science)
    f_ref, e_ref = _psf_fit_fluxes(ref, bad_r, xs, ys, at_r, saturation_reference)
    with np.errstate(invalid="ignore", divide="ignore"):
        measured = (
            np.isfinite(f_sci)
            & np.isfinite(f_ref)
            & (e_sci > 0)
            & (e_ref > 0)
            & (f_sci >= cfg.min_snr * e_sci)
            & (f_ref >= cfg.min_snr * e_ref)
        )
    n_measured = int(np.count_nonzero(measured))
    detail = f"{n_measured} of {xs.size} stars measurable at S/N >= {cfg.min_snr:g} in both"
    if n_measured < cfg.min_stars:
        raise StarMatchFailed(n_measured, cfg.min_stars, detail)

    used = measured.copy()
    ratio = float(np.median(f_sci[used] / f_ref[used]))
    for _ in range(cfg.max_iterations):
        w = 1.0 / (e_sci**2 + ratio**2 * e_ref**2)
        ratio = float(np.sum((w * f_sci * f_ref)[used]) / np.sum((w * f_ref**2)[used]))
        resid = (f_sci - ratio * f_ref) * np.sqrt(1.0 / (e_sci**2 + ratio**2 * e_ref**2))
        med, scale = _robust_median_sigma(resid[used])
        # Residuals are in units of each star's own error, so their scatter is at least
        # 1; a MAD from a handful of stars can come out far below that by chance and
        # would then clip stars that agree within their errors.
        scale = max(scale, 1.0)
        keep = measured & (np.abs(resid - med) <= cfg.clip_sigma * scale)
        if int(np.count_nonzero(keep)) < cfg.min_stars:
            raise StarMatchFailed(
                int(np.count_nonzero(keep)), cfg.min_stars, detail + ", after clipping"
            )
        if np.array_equal(keep, used):
            break
        used = keep
    w = 1.0 / (e_sci**2 + ratio**2 * e_ref**2)
    resid = (f_sci - ratio * f_ref) * np.sqrt(w)
    n_used = int(np.count_nonzero(used))
    chi2_red = float(np.sum(resid[used] ** 2)) / max(n_used - 1, 1)
    ratio_error = math.sqrt(max(chi2_red, 1.0) / float(np.sum((w * f_ref**2)[used])))

    offset, offset_error = _background_offset(new, ref, bad_n | bad_r, xs, ys, ratio, p_n, p_r, cfg)
    return FluxScale(
        flux_ratio=ratio,
        background_offset=offset,
        flux_ratio_error=ratio_error,
        background_offset_error=offset_error,
        n_stars=n_used,
        n_rejected=n_measured - n_used,
        used=used,
    )


def _background_offset(
    new: NDArray[np.floating],
    ref: NDArray[np.floating],
    bad: NDArray[np.bool_],
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    ratio: float,
    psf_n: PsfInput,
    psf_r: PsfInput,
    cfg: FluxScaleConfig,
) -> tuple[float, float]:
    """Sigma-clipped median of ``N − ratio·R`` over source-free pixels, and its error.

    Large images are sampled on a regular sub-grid of about ``_MAX_STAT_PIXELS`` pixels,
    which leaves the error (~1.25 sigma / 1000 for a million pixels) far below the noise.
    """
    ny, nx = new.shape
    keep = ~bad
    radius = cfg.star_exclusion_radius
    if radius is None:
        radius = float(max(_psf_size(psf_n), _psf_size(psf_r)))
    r = math.ceil(radius)
    if r > 0:
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disk = (xx**2 + yy**2) <= radius**2
        for xi, yi in zip(x, y, strict=True):
            if not (np.isfinite(xi) and np.isfinite(yi)):
                continue
            cx, cy = round(float(xi)), round(float(yi))
            ya, yb = max(0, cy - r), min(ny, cy + r + 1)
            xa, xb = max(0, cx - r), min(nx, cx + r + 1)
            if ya >= yb or xa >= xb:
                continue
            sub = disk[ya - (cy - r) : yb - (cy - r), xa - (cx - r) : xb - (cx - r)]
            keep[ya:yb, xa:xb] &= ~sub
    step = max(1, math.isqrt(new.size // _MAX_STAT_PIXELS))
    keep = keep[::step, ::step]
    new_s = new[::step, ::step].astype(np.float64)
    ref_s = ref[::step, ::step].astype(np.float64)
    k = cfg.background_clip_sigma
    # Symmetric cuts in each image remove sources without biasing the noise median.
    for img in (new_s, ref_s):
        med, sig = _robust_median_sigma(img[keep])
        if math.isfinite(sig) and sig > 0:
            keep &= np.abs(img - med) <= k * sig
    delta = (new_s - ratio * ref_s)[keep]
    if delta.size == 0:
        raise EmptyImage(0, new.size)
    for _ in range(10):
        med, sig = _robust_median_sigma(delta)
        if not (math.isfinite(sig) and sig > 0):
            break
        clipped = delta[np.abs(delta - med) <= k * sig]
        if clipped.size == delta.size or clipped.size == 0:
            break
        delta = clipped
    med, sig = _robust_median_sigma(delta)
    # Standard error of a median of Gaussian samples: sqrt(pi/2) sigma / sqrt(n).
    return med, math.sqrt(math.pi / 2.0) * sig / math.sqrt(delta.size)
