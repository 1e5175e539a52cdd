"""Alard-Lupton image subtraction with noise decorrelation.

The image with the better seeing (the smaller PSF FWHM), the *template* ``T``, is
convolved with a spatially varying kernel ``K`` to match the other, the *target* ``M``
(Alard & Lupton 1998, ApJ 503, 325; Alard 2000, A&AS 144, 363)::

    M(x, y) ≈ (K_xy ⊗ T)(x, y) + B(x, y)

The kernel is a linear combination of Gaussian-polynomial basis functions (AL98 §2; the
HOTPANTS default, Becker 2015, ASCL 1504.004: Gaussians of three widths times
``u^i v^j`` up to degrees 6, 4 and 2), each coefficient a polynomial in the image
position (A00 §2), and ``B`` is a polynomial differential background. The coefficients
are fitted by weighted linear least squares on stamps around stars, rejecting stamps
whose residual chi2 is an outlier.

Flux scale. The first basis function sums to 1 and every other one sums to 0 (A00), so
the kernel sum, the photometric scale, is the first coefficient alone; with
``constant_flux_scale`` that coefficient has no spatial terms.

Which image is convolved, and the sign. With ``s = sum(K)`` (at each pixel):

* reference sharper (``convolved="reference"``, the usual case)::

      D = N - (K ⊗ R + B)

* science sharper (``convolved="science"``)::

      D = (K ⊗ N + B - R) / s

In both cases a source that is brighter in the science image ``N`` than in the
reference ``R`` is positive in ``D``, and its flux in ``D`` is in science-image units.

Noise decorrelation (Reiss & Lupton 2016, LSST DMTN-021). Convolving one image
correlates its noise, so ``D``'s noise is not white. With ``σ_u²`` and ``σ_c²``
the per-pixel noise variances of the unconvolved and the convolved image and ``κ`` the
matching kernel at the image centre (``κ̂(k)`` its Fourier transform, ``s = κ̂(0)``),
the decorrelation filter is::

    φ̂(k) = sqrt((σ_u² + s² σ_c²) / (σ_u² + |κ̂(k)|² σ_c²))

which reduces to DMTN-021's ``sqrt((σ_N² + σ_R²) / (σ_N² + κ̂² σ_R²))`` for ``s = 1``.
``φ̂(0) = 1``, so fluxes are preserved, and ``φ ⊗ D`` has the flat power spectrum
``σ_u² + s² σ_c²`` (divided by ``s²`` when the science is convolved). Its per-pixel
variance is computed from the final effective filters of each input image::

    V = (σ_u² Σ φ² + σ_c² Σ (φ ⊗ κ)²) / g²,   g = 1 (reference convolved) or s (science)

with the local variance maps in place of ``σ²`` when they are given. The PSF of the
decorrelated difference is ``P_D = φ ⊗ κ ⊗ P_T / s``, and the score image, the
matched-filter significance with unit variance on noise, is::

    S = g (φ ⊗ D) ⊗ P̃_D / sqrt(σ_u² Σ (φ ⊗ P̃_D)² + σ_c² Σ (φ ⊗ κ ⊗ P̃_D)²)

with ``P̃_D(x, y) = P_D(-x, -y)``; the denominator is ``sqrt(V Σ P_D²)`` when ``φ``
whitens exactly, and it stays right (with the local variance maps) where the noise
differs from the median levels ``φ`` was built for. Near masked pixels it counts only
the filter weight on valid pixels.

Convolution speed. The spatially varying convolution is regrouped by spatial term,
``Σ_k Σ_s a_ks P_s(x, y) (T ⊗ B_k) = Σ_s P_s(x, y) (T ⊗ K_s)`` with
``K_s = Σ_k a_ks B_k``, so a full image needs one forward real FFT and one inverse per
spatial term; on stamps the separable basis (Gaussian × polynomial in ``u`` times the
same in ``v``) is applied with 1-D convolutions.

Conventions. Arrays are indexed ``[y, x]``; positions are 0-based pixel centres. Kernels
are stamps ``K[v + h, u + h]`` in true-convolution orientation,
``(K ⊗ T)(x, y) = Σ_uv K(u, v) T(x - u, y - v)``. Spatial polynomials use the
normalised coordinates ``ξ = (x - x_c) / x_c``, ``η = (y - y_c) / y_c`` with
``x_c = (nx - 1) / 2``, ``y_c = (ny - 1) / 2`` (both in ``[-1, 1]``) and the term order
``1, ξ, η, ξ², ξη, η², ...`` (by total degree, then increasing power of ``η``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import scipy.fft
import scipy.linalg
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from astrid.errors import ShapeMismatch, TooFewStamps
from astrid.exposure import check_image
from astrid.science.psf_model import PsfModel, gaussian_fwhm_to_sigma

__all__ = [
    "AlardLuptonConfig",
    "AlardLuptonResult",
    "KernelFit",
    "MatchingKernel",
    "decorrelation_kernel",
    "fit_matching_kernel",
    "subtract_alard_lupton",
]

#: 1.4826 × MAD is the standard deviation of a Gaussian.
_MAD_TO_SIGMA = 1.4826
#: Smallest base Gaussian width (pixels) of the automatic basis, for nearly equal seeing.
_MIN_BASE_SIGMA = 0.5
#: Relative singular-value floor when orthonormalising the kernel basis.
_BASIS_RCOND = 1e-7


@dataclass(frozen=True)
class AlardLuptonConfig:
    """Options of :func:`subtract_alard_lupton` and :func:`fit_matching_kernel`.

    Attributes
    ----------
    kernel_half_size : int or None
        Half-width ``h`` of the ``(2h + 1)``-pixel square kernel. ``None``: 2.5 times the
        widest basis Gaussian, between 3 and 40 pixels.
    gaussian_sigmas : tuple of float
        Widths of the basis Gaussians in units of the base width (the HOTPANTS values
        0.7, 1.5, 3.0).
    gaussian_degrees : tuple of int
        Degree of the polynomial ``u^i v^j`` (``i + j <= degree``) multiplying each
        Gaussian, one per entry of ``gaussian_sigmas``.
    base_sigma : float or None
        Base width in pixels. ``None``: the Gaussian width of the matching kernel
        between the two PSFs, ``sqrt(σ_large² - σ_small²)`` from their FWHMs, at least
        0.5 pixel.
    spatial_degree : int or None
        Degree of the polynomial in ``(x, y)`` of each kernel coefficient (0: a constant
        kernel). ``None``: 2 when there are ``stamps_per_spatial_term`` usable stamps per
        term of the quadratic (6 terms), else 1. A quadratic fitted to 20-30 stamps
        follows their noise between them and leaves residuals at bright stars (false
        positives on transient-free simulated pairs: 1.12 and 1.00 per image with degree
        2, 0.25 and 0.56 with degree 1, 0.56 and 1.81 with a constant kernel).
    stamps_per_spatial_term : int
        Usable stamps needed per spatial term when ``spatial_degree`` is ``None``.
    background_degree : int
        Degree of the differential background polynomial (0: a constant offset).
    constant_flux_scale : bool
        Keep the kernel sum (photometric scale) constant over the image.
    stamp_half_size : int or None
        Half-width of each square fit stamp around a star, in pixels. ``None``: the
        larger of the kernel half-size and twice the larger FWHM.
    clip_sigma : float
        Stamps whose reduced chi2 exceeds the median by this many robust standard
        deviations (1.4826 MAD) are rejected and the fit repeated.
    max_iterations : int
        Most fit-and-reject rounds.
    min_stamps : int
        Fewest usable stamps the fit accepts (raised to the number of spatial terms
        when that is larger).
    refit_background : bool
        In :func:`subtract_alard_lupton`, refine the differential background after the
        kernel fit on every unmasked pixel outside the cores of bright sources, by
        sigma-clipped least squares. The stamps alone sample little sky and the
        background there trades off against the kernel wings; the whole image pins it
        down.
    model_error : float
        Fractional error of the matching-kernel model, ``ε``: a term
        ``2 ε² (P̃ ⊗ φ ⊗ T)²`` (``T`` the unconvolved image less its median) is added to the
        variance of the score, as ``ZogyConfig.psf_error`` does for ZOGY, so that the
        residual a kernel error leaves at a bright static source is not a detection. 0
        leaves the score's variance to the pixel noise.
    """

    kernel_half_size: int | None = None
    gaussian_sigmas: tuple[float, ...] = (0.7, 1.5, 3.0)
    gaussian_degrees: tuple[int, ...] = (6, 4, 2)
    base_sigma: float | None = None
    spatial_degree: int | None = None
    stamps_per_spatial_term: int = 10
    background_degree: int = 1
    constant_flux_scale: bool = True
    stamp_half_size: int | None = None
    clip_sigma: float = 3.0
    max_iterations: int = 5
    min_stamps: int = 10
    refit_background: bool = True
    model_error: float = 0.0

    def __post_init__(self) -> None:
        if len(self.gaussian_sigmas) != len(self.gaussian_degrees) or not self.gaussian_sigmas:
            raise ValueError("gaussian_sigmas and gaussian_degrees must be non-empty and match")
        if min(self.gaussian_sigmas) <= 0 or min(self.gaussian_degrees) < 0:
            raise ValueError("gaussian_sigmas must be positive and gaussian_degrees >= 0")
        if (self.spatial_degree is not None and self.spatial_degree < 0) or (
            self.background_degree < 0
        ):
            raise ValueError("spatial_degree and background_degree must be >= 0")
        if self.stamps_per_spatial_term < 1:
            raise ValueError("stamps_per_spatial_term must be >= 1")
        if self.kernel_half_size is not None and self.kernel_half_size < 1:
            raise ValueError("kernel_half_size must be >= 1")
        if self.stamp_half_size is not None and self.stamp_half_size < 1:
            raise ValueError("stamp_half_size must be >= 1")
        if self.clip_sigma <= 0 or self.max_iterations < 1 or self.min_stamps < 1:
            raise ValueError("clip_sigma, max_iterations and min_stamps must be positive")


@dataclass(frozen=True)
class MatchingKernel:
    """A fitted spatially varying convolution kernel and differential background.

    ``K_xy = Σ_k (Σ_s coefficients[k, s] P_s(ξ, η)) basis[k]`` and
    ``B(x, y) = Σ_t background[t] Q_t(ξ, η)``, with ``P_s``, ``Q_t`` the monomials of the
    normalised coordinates in the module's term order.

    Attributes
    ----------
    basis : ndarray, shape (n_basis, 2h + 1, 2h + 1)
        Basis stamps ``[v + h, u + h]``; ``basis[0]`` sums to 1, all others to 0.
    coefficients : ndarray, shape (n_basis, n_spatial)
        Spatial polynomial coefficients of each basis stamp.
    background : ndarray, shape (n_background,)
        Differential background polynomial coefficients, in target-image data units.
    spatial_degree : int
        Degree of the kernel's spatial polynomials.
    background_degree : int
        Degree of the background polynomial.
    shape : tuple of int
        ``(ny, nx)`` of the image the normalised coordinates refer to.
    """

    basis: NDArray[np.float64]
    coefficients: NDArray[np.float64]
    background: NDArray[np.float64]
    spatial_degree: int
    background_degree: int
    shape: tuple[int, int]

    @property
    def half_size(self) -> int:
        """Kernel half-width ``h`` in pixels."""
        return int(self.basis.shape[1] // 2)

    def at(self, x: float, y: float) -> NDArray[np.float64]:
        """Kernel stamp, shape ``(2h + 1, 2h + 1)``, at a 0-based pixel position."""
        terms = _poly_terms_at(self.spatial_degree, self.shape, x, y)
        return np.asarray(np.tensordot(self.coefficients @ terms, self.basis, axes=1), np.float64)

    def flux_scale_at(self, x: float, y: float) -> float:
        """Kernel sum (photometric scale) at a 0-based pixel position."""
        terms = _poly_terms_at(self.spatial_degree, self.shape, x, y)
        return float(self.coefficients[0] @ terms)

    def background_at(self, x: float, y: float) -> float:
        """Differential background at a 0-based pixel position (target data units)."""
        return float(self.background @ _poly_terms_at(self.background_degree, self.shape, x, y))

    def background_image(self) -> NDArray[np.float64]:
        """Differential background over the whole grid, shape ``shape``."""
        return _poly_image(self.background, self.background_degree, self.shape)

    def flux_scale_image(self) -> NDArray[np.float64]:
        """Kernel sum over the whole grid, shape ``shape``."""
        return _poly_image(self.coefficients[0], self.spatial_degree, self.shape)

    def convolve(self, image: NDArray[np.floating], *, workers: int = 1) -> NDArray[np.float64]:
        """Convolve an image with the spatially varying kernel (background not added).

        Computed as ``Σ_s P_s(ξ, η) (image ⊗ K_s)`` with one real FFT of the zero-padded
        image and one inverse per spatial term, in single precision (take out a large
        constant level first: ``K ⊗ c`` is ``c`` times :meth:`flux_scale_image`); pixels
        within ``h`` of the border see zeros beyond it.

        Parameters
        ----------
        image : ndarray, shape ``shape``
            Image to convolve (finite values).
        workers : int
            Threads for ``scipy.fft``.

        Returns
        -------
        ndarray, shape ``shape``, float64
        """
        img = np.asarray(image, np.float64)
        if img.shape != self.shape:
            raise ShapeMismatch({"image": img.shape, "kernel grid": self.shape})
        stamps = np.asarray(np.tensordot(self.coefficients.T, self.basis, axes=1), np.float64)
        exps = _exponents(self.spatial_degree)
        xi, eta = _normalised_axes(self.shape)
        out = np.zeros(self.shape)
        live = [s for s in range(len(exps)) if np.any(self.coefficients[:, s] != 0)]
        convs = _fft_convolve_many(img, [stamps[s] for s in live], workers)
        for s, conv in zip(live, convs, strict=True):
            i, j = exps[s]
            if j:
                conv *= (eta**j)[:, None].astype(np.float32)
            if i:
                conv *= (xi**i)[None, :].astype(np.float32)
            out += conv
        return out


@dataclass(frozen=True)
class KernelFit:
    """Outcome of :func:`fit_matching_kernel`.

    Attributes
    ----------
    kernel : MatchingKernel
        The fitted kernel and background.
    stamp_x, stamp_y : ndarray of int, shape (n_usable,)
        0-based centre pixel of each usable stamp.
    stamp_chi2 : ndarray, shape (n_usable,)
        Reduced chi2 of each stamp's residual against the final fit.
    stamp_used : ndarray of bool, shape (n_usable,)
        Stamps kept by the last fit (the others were rejected by clipping).
    n_stamps_used : int
        Stamps in the final fit.
    n_stamps_rejected : int
        Usable stamps rejected as chi2 outliers.
    n_stamps_unusable : int
        Star positions whose stamp left the image or held masked or non-finite pixels.
    residual_rms : float
        RMS of the noise-normalised residual ``(M - K ⊗ T - B) / σ`` over the pixels of
        the kept stamps (1 for a noise-limited fit).
    """

    kernel: MatchingKernel
    stamp_x: NDArray[np.int64]
    stamp_y: NDArray[np.int64]
    stamp_chi2: NDArray[np.float64]
    stamp_used: NDArray[np.bool_]
    n_stamps_used: int
    n_stamps_rejected: int
    n_stamps_unusable: int
    residual_rms: float


@dataclass(frozen=True)
class AlardLuptonResult:
    """Outcome of :func:`subtract_alard_lupton`. Images are float32, shape (ny, nx).

    Attributes
    ----------
    difference : ndarray
        ``D`` in science-image data units (see the module notes for the sign), with
        correlated noise; 0 within the kernel half-size of unusable input pixels and of
        the border (a subset of ``mask``).
    decorrelated : ndarray
        ``φ ⊗ D``, the difference with white noise; same flux scale; 0 where masked.
    variance : ndarray
        Per-pixel variance of ``decorrelated`` (data units squared), from the module's
        ``V`` with the input variance maps; infinite where an input variance was
        unusable.
    score : ndarray
        Matched-filter significance of ``decorrelated`` with its PSF, unit variance on
        noise; input to :func:`astrid.science.detect.detect_candidates`.
    mask : ndarray of bool
        Pixels whose values depend on masked, non-finite or out-of-image input pixels:
        the unusable input pixels grown by twice the kernel half-size (the kernel and
        decorrelation footprints), and a border of the same width.
    psf : PsfModel
        PSF of ``decorrelated`` (``φ ⊗ κ ⊗ P_T / s``), unit sum, on a 3x3 grid when the
        kernel or an input PSF varies over the image. ``φ`` sharpens, so the PSF has
        shallow negative side lobes (a few per cent of its sum when the convolved
        image is the noisier one); PSF-fit photometry must keep them to be unbiased.
    kernel : ndarray, shape (2h + 1, 2h + 1)
        Matching kernel at the image centre (``[v + h, u + h]``).
    decorrelation_kernel : ndarray, shape (2h + 1, 2h + 1)
        ``φ`` in real space, unit sum.
    flux_scale : float
        Kernel sum at the image centre: flux in the target image per unit flux in the
        convolved one, i.e. science / reference when ``convolved == "reference"`` and
        reference / science when ``convolved == "science"`` (see
        :attr:`science_over_reference`).
    background : ndarray, shape (n_background,)
        Differential background coefficients (target-image data units, module term
        order); ``background[0]`` is its value at the image centre.
    n_stamps_used : int
        Stamps in the final kernel fit.
    n_stamps_rejected : int
        Stamps rejected as chi2 outliers.
    n_stamps_unusable : int
        Star positions with no usable stamp (edge, masked or non-finite pixels).
    residual_rms : float
        RMS of the noise-normalised fit residual over the kept stamps.
    convolved : {"science", "reference"}
        Which image was convolved (the one with the smaller PSF FWHM; the reference on a
        tie).
    noise_sigma : float
        Per-pixel noise of ``decorrelated`` at the image noise levels,
        ``sqrt(σ_u² Σφ² + σ_c² Σ(φ⊗κ)²) / g``.
    kernel_fit : KernelFit
        The full kernel solution and stamp statistics.
    config : AlardLuptonConfig
        The options used.
    """

    difference: NDArray[np.float32]
    decorrelated: NDArray[np.float32]
    variance: NDArray[np.float32]
    score: NDArray[np.float32]
    mask: NDArray[np.bool_]
    psf: PsfModel
    kernel: NDArray[np.float64]
    decorrelation_kernel: NDArray[np.float64]
    flux_scale: float
    background: NDArray[np.float64]
    n_stamps_used: int
    n_stamps_rejected: int
    n_stamps_unusable: int
    residual_rms: float
    convolved: Literal["science", "reference"]
    noise_sigma: float
    kernel_fit: KernelFit
    config: AlardLuptonConfig = field(default_factory=AlardLuptonConfig)

    @property
    def science_over_reference(self) -> float:
        """Photometric ratio science / reference at the image centre."""
        return self.flux_scale if self.convolved == "reference" else 1.0 / self.flux_scale


# --------------------------------------------------------------------------------------
# Polynomials over the image


def _exponents(degree: int) -> list[tuple[int, int]]:
    """``(i, j)`` of ``ξ^i η^j`` by total degree, then increasing ``j``."""
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def _normalised_axes(shape: tuple[int, int]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    ny, nx = shape
    xc, yc = max((nx - 1) / 2.0, 0.5), max((ny - 1) / 2.0, 0.5)
    return (np.arange(nx, dtype=np.float64) - xc) / xc, (np.arange(ny, dtype=np.float64) - yc) / yc


def _poly_terms(
    degree: int, shape: tuple[int, int], x: NDArray[np.floating], y: NDArray[np.floating]
) -> NDArray[np.float64]:
    """Monomials at positions, shape ``(n, n_terms)``."""
    ny, nx = shape
    xc, yc = max((nx - 1) / 2.0, 0.5), max((ny - 1) / 2.0, 0.5)
    xi = (np.asarray(x, np.float64) - xc) / xc
    eta = (np.asarray(y, np.float64) - yc) / yc
    return np.stack([xi**i * eta**j for i, j in _exponents(degree)], axis=-1)


def _poly_terms_at(degree: int, shape: tuple[int, int], x: float, y: float) -> NDArray[np.float64]:
    return _poly_terms(degree, shape, np.array([x]), np.array([y]))[0]


def _poly_image(
    coefficients: NDArray[np.float64], degree: int, shape: tuple[int, int]
) -> NDArray[np.float64]:
    """``Σ c_ij ξ^i η^j`` over the grid, as ``Σ_j η^j (Σ_i c_ij ξ^i)``: one pass per ``j``."""
    xi, eta = _normalised_axes(shape)
    by_j: dict[int, NDArray[np.float64]] = {}
    for c, (i, j) in zip(coefficients, _exponents(degree), strict=True):
        if c != 0:
            by_j[j] = by_j.get(j, np.zeros_like(xi)) + c * xi**i
    out = np.zeros(shape)
    for j, row in by_j.items():
        out += (eta**j)[:, None] * row[None, :]
    return out


# --------------------------------------------------------------------------------------
# Kernel basis


@dataclass(frozen=True)
class _Basis:
    """Raw separable Gaussian-polynomial functions and the map to the fitted basis.

    ``basis = transform @ raw`` (flattened stamps); ``raw[r] = outer(g_y, g_x)`` with the
    1-D factors ``factors[gauss][power]``.
    """

    half: int
    factors: list[list[NDArray[np.float64]]]
    raw_index: list[tuple[int, int, int]]  # (gauss, i, j) per raw function
    transform: NDArray[np.float64]  # (n_basis, n_raw)
    stamps: NDArray[np.float64]  # (n_basis, 2h + 1, 2h + 1)


def _make_basis(sigmas: tuple[float, ...], degrees: tuple[int, ...], half: int) -> _Basis:
    """Build the Alard (2000) basis: first function of unit sum, the rest of zero sum.

    The zero-sum functions are orthonormalised (SVD, dropping near-degenerate
    combinations) for a well-conditioned fit; they span the same space.
    """
    u = np.arange(-half, half + 1, dtype=np.float64)
    factors: list[list[NDArray[np.float64]]] = []
    raw_index: list[tuple[int, int, int]] = []
    for g, (sigma, degree) in enumerate(zip(sigmas, degrees, strict=True)):
        gauss = np.exp(-0.5 * (u / sigma) ** 2)
        factors.append([gauss * (u / sigma) ** p for p in range(degree + 1)])
        raw_index += [(g, i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    raw = np.array([np.outer(factors[g][j], factors[g][i]).ravel() for g, i, j in raw_index])
    sums = raw.sum(axis=1)
    n_raw = len(raw)
    first = np.zeros(n_raw)
    first[0] = 1.0 / sums[0]
    # Zero-sum combinations: raw_k - sum(raw_k) * B_0 for k >= 1.
    zero_sum = np.eye(n_raw)[1:] - np.outer(sums[1:], first)
    u_mat, sv, _ = np.linalg.svd(zero_sum @ raw, full_matrices=False)
    keep = sv > _BASIS_RCOND * sv[0]
    # diag(1/sv) U^T (zero_sum raw) = V^T: orthonormal zero-sum stamps.
    rest = (u_mat[:, keep] / sv[keep]).T @ zero_sum
    transform = np.vstack([first, rest])
    size = 2 * half + 1
    stamps = (transform @ raw).reshape(-1, size, size)
    return _Basis(half, factors, raw_index, transform, stamps)


def _convolve_stamps(cutouts: NDArray[np.float64], basis: _Basis) -> NDArray[np.float64]:
    """Convolve template cutouts with every basis function (separably), valid part only.

    Parameters
    ----------
    cutouts : ndarray, shape (n, L, L)
        Template cutouts with ``L = 2 (h_s + h) + 1``.

    Returns
    -------
    ndarray, shape (n, (2 h_s + 1)**2, n_basis)
    """
    h = basis.half
    n, size, _ = cutouts.shape
    inner = size - 2 * h
    raw = np.empty((n, inner * inner, len(basis.raw_index)))
    by_gi: dict[tuple[int, int], NDArray[np.float64]] = {}
    for r, (g, i, j) in enumerate(basis.raw_index):
        if (g, i) not in by_gi:
            conv_x = ndimage.convolve1d(cutouts, basis.factors[g][i], axis=2, mode="constant")
            by_gi[(g, i)] = conv_x[:, :, h : h + inner]
        conv = ndimage.convolve1d(by_gi[(g, i)], basis.factors[g][j], axis=1, mode="constant")
        raw[:, :, r] = conv[:, h : h + inner, :].reshape(n, -1)
    n_raw = raw.shape[2]
    return (raw.reshape(-1, n_raw) @ basis.transform.T).reshape(n, inner * inner, -1)


# --------------------------------------------------------------------------------------
# Convolution


def _fft_convolve_many(
    image: NDArray[np.floating], kernels: list[NDArray[np.float64]], workers: int
) -> list[NDArray[np.float32]]:
    """``image ⊗ kernel`` ('same' size, zeros beyond the edges) for odd square kernels.

    The image is transformed once and shared between the kernels (zero-padded to a common
    size). Single precision: the round-off, ~1e-7 of the image RMS, is far below any
    pixel noise (callers remove a large constant level first).
    """
    if len(kernels) == 0:
        return []
    ny, nx = image.shape
    size = max(k.shape[0] for k in kernels)
    h = size // 2
    fshape = (
        scipy.fft.next_fast_len(ny + size - 1, real=True),
        scipy.fft.next_fast_len(nx + size - 1, real=True),
    )
    f_image = scipy.fft.rfft2(np.asarray(image, np.float32), s=fshape, workers=workers)
    # A small kernel's transform on the big grid as two matrix products (a direct DFT
    # over its few non-zero rows and columns), much cheaper than a full-size FFT.
    dft_y = np.exp((-2j * np.pi / fshape[0]) * np.outer(np.arange(fshape[0]), np.arange(size)))
    dft_x = np.exp(
        (-2j * np.pi / fshape[1]) * np.outer(np.arange(size), np.arange(fshape[1] // 2 + 1))
    )
    dft_y, dft_x = dft_y.astype(np.complex64), dft_x.astype(np.complex64)
    out = []
    for k in kernels:
        pad = (size - k.shape[0]) // 2
        padded = np.pad(np.asarray(k, np.float64), pad).astype(np.complex64)
        f_k = dft_y @ (padded @ dft_x)
        f_k *= f_image
        full = scipy.fft.irfft2(f_k, s=fshape, workers=workers, overwrite_x=True)
        out.append(full[h : h + ny, h : h + nx])
    return out


def _convolve_small(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Full 2-D convolution of two small stamps."""
    pad_y, pad_x = b.shape[0] // 2, b.shape[1] // 2
    padded = np.pad(np.asarray(a, np.float64), ((pad_y, pad_y), (pad_x, pad_x)))
    return np.asarray(ndimage.convolve(padded, b, mode="constant", cval=0.0), np.float64)


# --------------------------------------------------------------------------------------
# Inputs


def _psf_of(psf: PsfModel | float, which: str) -> PsfModel:
    if isinstance(psf, PsfModel):
        return psf
    fwhm = float(psf)
    if not np.isfinite(fwhm) or fwhm <= 0:
        raise ValueError(f"{which} PSF FWHM must be a positive number of pixels, got {psf!r}")
    return PsfModel.gaussian(fwhm)


def _variance_of(
    variance: NDArray[np.floating] | float | None,
    data: NDArray[np.float64],
    good: NDArray[np.bool_],
    which: str,
) -> NDArray[np.float64] | float:
    """Constant or per-pixel variance; ``None`` estimates a constant from the data."""
    if variance is None:
        values = data[good]
        step = max(1, values.size // (1 << 20))
        values = values[::step]
        med = np.median(values)
        return float((_MAD_TO_SIGMA * np.median(np.abs(values - med))) ** 2)
    if np.ndim(variance) == 0:
        v = float(variance)
        if not v > 0:
            raise ValueError(f"{which} variance must be positive, got {v}")
        return v
    arr = np.asarray(variance, np.float64)
    if arr.shape != data.shape:
        raise ShapeMismatch({which: data.shape, f"{which} variance": arr.shape})
    return arr


def _unusable_variance(variance: NDArray[np.float64] | float) -> NDArray[np.bool_] | bool:
    """Pixels whose variance is not a positive finite number (none for a constant)."""
    if isinstance(variance, float):
        return False
    return ~(np.isfinite(variance) & (variance > 0))


def _median_variance(variance: NDArray[np.float64] | float, good: NDArray[np.bool_]) -> float:
    if isinstance(variance, float):
        return variance
    values = variance[good & np.isfinite(variance) & (variance > 0)]
    step = max(1, values.size // (1 << 20))
    return float(np.median(values[::step]))


def _at_pixels(
    variance: NDArray[np.float64] | float, rows: NDArray[np.intp], cols: NDArray[np.intp]
) -> NDArray[np.float64] | float:
    if isinstance(variance, float):
        return variance
    return variance[rows, cols]


def _grow(bad: NDArray[np.bool_], radius: int) -> NDArray[np.bool_]:
    """Grow a mask by a square of half-width ``radius`` and flag a border as wide."""
    out = bad.copy()
    if radius <= 0:
        return out
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size:
        # Only the band of rows holding bad pixels needs the filter.
        y0, y1 = max(0, rows[0] - radius), min(bad.shape[0], rows[-1] + radius + 1)
        band = ndimage.maximum_filter(bad[y0:y1].view(np.uint8), size=2 * radius + 1)
        out[y0:y1] = band.astype(bool)
    out[:radius] = True
    out[-radius:] = True
    out[:, :radius] = True
    out[:, -radius:] = True
    return out


# --------------------------------------------------------------------------------------
# Kernel fit


def _auto_sizes(
    config: AlardLuptonConfig, fwhm_small: float, fwhm_large: float
) -> tuple[tuple[float, ...], int, int]:
    """Basis Gaussian widths (pixels), kernel half-size and stamp half-size."""
    if config.base_sigma is not None:
        base = float(config.base_sigma)
    else:
        s_small, s_large = gaussian_fwhm_to_sigma(fwhm_small), gaussian_fwhm_to_sigma(fwhm_large)
        base = max(math.sqrt(max(s_large**2 - s_small**2, 0.0)), _MIN_BASE_SIGMA)
    sigmas = tuple(base * f for f in config.gaussian_sigmas)
    half = config.kernel_half_size
    if half is None:
        half = int(min(max(math.ceil(2.5 * max(sigmas)), 3), 40))
    stamp = config.stamp_half_size
    if stamp is None:
        stamp = max(half, math.ceil(2.0 * fwhm_large))
    return sigmas, half, int(stamp)


def fit_matching_kernel(
    template: NDArray[np.floating],
    target: NDArray[np.floating],
    *,
    x: ArrayLike,
    y: ArrayLike,
    template_fwhm: float,
    target_fwhm: float,
    template_variance: NDArray[np.floating] | float | None = None,
    target_variance: NDArray[np.floating] | float | None = None,
    mask: NDArray[np.bool_] | None = None,
    config: AlardLuptonConfig | None = None,
) -> KernelFit:
    """Fit ``target ≈ K_xy ⊗ template + B`` on stamps around stars (AL98, A00).

    Each stamp is a ``(2 h_s + 1)``-pixel square of ``target`` centred on a star's
    nearest pixel; its model uses the template out to ``h_s + h``. Within a stamp the
    kernel coefficients and background are evaluated at the stamp centre (as HOTPANTS
    does), so the normal equations are a sum of per-stamp blocks. Pixels are weighted by
    ``1 / (V_target + Σκ² V_template)``, with ``Σκ²`` from the previous iteration (0 at the
    first). After each fit, stamps whose reduced chi2 exceeds
    ``median + clip_sigma * 1.4826 MAD`` are dropped and the fit repeated.

    Parameters
    ----------
    template : ndarray, shape (ny, nx)
        Image to be convolved (the better seeing).
    target : ndarray, shape (ny, nx)
        Image to be matched, on the same pixel grid.
    x, y : array_like, shape (n,)
        0-based pixel positions of bright, unsaturated, isolated stars.
    template_fwhm, target_fwhm : float
        PSF FWHMs in pixels, for the automatic basis widths and sizes.
    template_variance, target_variance : ndarray, float or None
        Per-pixel variance (data units squared), a constant, or ``None`` for a constant
        estimated from the data (1.4826 MAD, squared).
    mask : ndarray of bool or None
        True for pixels unusable in either image.
    config : AlardLuptonConfig or None
        Options.

    Returns
    -------
    KernelFit

    Raises
    ------
    ShapeMismatch
        If the images, variances, mask or ``x``/``y`` disagree in shape.
    TooFewStamps
        If fewer than ``min_stamps`` usable stamps remain.
    """
    cfg = config or AlardLuptonConfig()
    tmpl = check_image(template, "template").astype(np.float64)
    targ = check_image(target, "target").astype(np.float64)
    if tmpl.shape != targ.shape:
        raise ShapeMismatch({"template": tmpl.shape, "target": targ.shape})
    bad = ~np.isfinite(tmpl) | ~np.isfinite(targ)
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.shape != tmpl.shape:
            raise ShapeMismatch({"template": tmpl.shape, "mask": m.shape})
        bad |= m
    var_t = _variance_of(template_variance, tmpl, ~bad, "template")
    var_m = _variance_of(target_variance, targ, ~bad, "target")
    bad |= _unusable_variance(var_t) | _unusable_variance(var_m)
    sigmas, half, stamp_half = _auto_sizes(
        cfg, min(template_fwhm, target_fwhm), max(template_fwhm, target_fwhm)
    )
    return _fit(tmpl, targ, var_t, var_m, bad, x, y, sigmas, half, stamp_half, cfg)


def _fit(
    tmpl: NDArray[np.float64],
    targ: NDArray[np.float64],
    var_t: NDArray[np.float64] | float,
    var_m: NDArray[np.float64] | float,
    bad: NDArray[np.bool_],
    x: ArrayLike,
    y: ArrayLike,
    sigmas: tuple[float, ...],
    half: int,
    stamp_half: int,
    cfg: AlardLuptonConfig,
) -> KernelFit:
    shape = (int(tmpl.shape[0]), int(tmpl.shape[1]))
    ny, nx = shape
    xs = np.atleast_1d(np.asarray(x, np.float64))
    ys = np.atleast_1d(np.asarray(y, np.float64))
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ShapeMismatch({"x": xs.shape, "y": ys.shape})
    least_degree = 1 if cfg.spatial_degree is None else cfg.spatial_degree
    n_required = max(
        cfg.min_stamps, len(_exponents(least_degree)), len(_exponents(cfg.background_degree))
    )

    # Usable stamps: the template cutout inside the image and free of bad pixels.
    reach = stamp_half + half
    finite = np.isfinite(xs) & np.isfinite(ys)
    cx = np.floor(np.where(finite, xs, -1e9) + 0.5).astype(np.int64)
    cy = np.floor(np.where(finite, ys, -1e9) + 0.5).astype(np.int64)
    inside = finite & (cx >= reach) & (cx < nx - reach) & (cy >= reach) & (cy < ny - reach)
    if bad.any():
        n_bad = ndimage.uniform_filter(bad.astype(np.float64), size=2 * reach + 1, mode="constant")
        inside[inside] &= n_bad[cy[inside], cx[inside]] < 0.5 / (2 * reach + 1) ** 2
    cx, cy = cx[inside], cy[inside]
    # One stamp per centre pixel.
    _, first = np.unique(cy * nx + cx, return_index=True)
    first = np.sort(first)
    cx, cy = cx[first], cy[first]
    n_unusable = len(xs) - len(cx)
    if len(cx) < n_required:
        raise TooFewStamps(len(cx), n_required)
    if cfg.spatial_degree is None:
        quadratic = len(cx) >= cfg.stamps_per_spatial_term * len(_exponents(2))
        cfg = replace(cfg, spatial_degree=2 if quadratic else 1)
    assert cfg.spatial_degree is not None
    n_spatial = len(_exponents(cfg.spatial_degree))

    basis = _make_basis(sigmas, tuple(cfg.gaussian_degrees), half)
    n_basis = len(basis.stamps)
    offs = np.arange(-reach, reach + 1)
    cut_rows = cy[:, None, None] + offs[None, :, None]
    cut_cols = cx[:, None, None] + offs[None, None, :]
    columns = _convolve_stamps(tmpl[cut_rows, cut_cols], basis)  # (n, n_pix, n_basis)
    inner = np.arange(-stamp_half, stamp_half + 1)
    dy, dx = np.meshgrid(inner, inner, indexing="ij")
    rows = cy[:, None] + dy.ravel()[None, :]
    cols = cx[:, None] + dx.ravel()[None, :]
    data = targ[rows, cols]
    vm = np.broadcast_to(_at_pixels(var_m, rows, cols), data.shape)
    vt = np.broadcast_to(_at_pixels(var_t, rows, cols), data.shape)
    n_stamps, n_pix = data.shape
    # Local design: the basis columns plus a constant for the background.
    design = np.concatenate([columns, np.ones((n_stamps, n_pix, 1))], axis=2)

    # Global unknowns: each local column (basis k, or the background constant) times a
    # monomial of the stamp position. With V_n = [P(x_n), Q(x_n)] the kernel (P) and
    # background (Q) monomials, the normal matrix over all (column, monomial) pairs is
    # Σ_n N_n ⊗ V_n V_nᵀ; the allowed pairs are then selected.
    spatial = _poly_terms(cfg.spatial_degree, shape, cx, cy)  # (n, n_spatial)
    bg_terms = _poly_terms(cfg.background_degree, shape, cx, cy)  # (n, n_bg)
    n_bg = bg_terms.shape[1]
    monomials = np.concatenate([spatial, bg_terms], axis=1)  # (n, n_u)
    n_local, n_u = n_basis + 1, n_spatial + n_bg
    allowed = np.zeros((n_local, n_u), bool)
    allowed[:n_basis, :n_spatial] = True
    allowed[n_basis, n_spatial:] = True
    if cfg.constant_flux_scale:
        allowed[0, 1:n_spatial] = False
    selected = np.flatnonzero(allowed.ravel())
    outer = (monomials[:, :, None] * monomials[:, None, :]).reshape(n_stamps, -1)

    used = np.ones(n_stamps, bool)
    kernel_sq_sum = 0.0
    n_rejected = 0
    for iteration in range(cfg.max_iterations):
        weight = 1.0 / (vm + kernel_sq_sum * vt)
        wd_t = (design[used] * weight[used][:, :, None]).transpose(0, 2, 1)
        normal = (wd_t @ design[used]).reshape(int(used.sum()), -1)  # (n, n_local²)
        rhs = (wd_t @ data[used][:, :, None])[:, :, 0]  # (n, n_local)
        a_full = (normal.T @ outer[used]).reshape(n_local, n_local, n_u, n_u)
        a_full = a_full.transpose(0, 2, 1, 3).reshape(n_local * n_u, n_local * n_u)
        b_full = (rhs.T @ monomials[used]).ravel()
        solution = _solve(a_full[np.ix_(selected, selected)], b_full[selected])
        coef_full = np.zeros(n_local * n_u)
        coef_full[selected] = solution
        coef_full = coef_full.reshape(n_local, n_u)
        local = monomials @ coef_full.T  # (n, n_local)
        resid = data - (design @ local[:, :, None])[:, :, 0]
        chi2 = np.mean(resid**2 * weight, axis=1)
        coefficients = coef_full[:n_basis, :n_spatial]
        centre = _poly_terms_at(cfg.spatial_degree, shape, (nx - 1) / 2.0, (ny - 1) / 2.0)
        kernel_centre = np.tensordot(coefficients @ centre, basis.stamps, axes=1)
        kernel_sq_sum = float(np.sum(kernel_centre**2))
        med = float(np.median(chi2[used]))
        spread = _MAD_TO_SIGMA * float(np.median(np.abs(chi2[used] - med)))
        reject = used & (chi2 > med + cfg.clip_sigma * spread)
        if not reject.any() or iteration == cfg.max_iterations - 1:
            break
        used &= ~reject
        n_rejected += int(reject.sum())
        if int(used.sum()) < n_required:
            raise TooFewStamps(int(used.sum()), n_required)
    # Final statistics with the final weights.
    weight = 1.0 / (vm + kernel_sq_sum * vt)
    chi2 = np.mean(resid**2 * weight, axis=1)
    residual_rms = float(np.sqrt(np.mean(chi2[used])))
    kernel = MatchingKernel(
        basis=basis.stamps,
        coefficients=coefficients,
        background=coef_full[n_basis, n_spatial:].copy(),
        spatial_degree=cfg.spatial_degree,
        background_degree=cfg.background_degree,
        shape=shape,
    )
    return KernelFit(
        kernel=kernel,
        stamp_x=cx,
        stamp_y=cy,
        stamp_chi2=chi2,
        stamp_used=used,
        n_stamps_used=int(used.sum()),
        n_stamps_rejected=n_rejected,
        n_stamps_unusable=int(n_unusable),
        residual_rms=residual_rms,
    )


def _solve(a_mat: NDArray[np.float64], b_vec: NDArray[np.float64]) -> NDArray[np.float64]:
    """Solve the symmetric normal equations after scaling them to a unit diagonal."""
    diag = np.sqrt(np.clip(np.diag(a_mat), 1e-300, None))
    scaled = a_mat / np.outer(diag, diag)
    try:
        z = scipy.linalg.solve(scaled, b_vec / diag, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        z = scipy.linalg.lstsq(scaled, b_vec / diag, cond=1e-12)[0]
    return np.asarray(z / diag, np.float64)


#: Most pixels used by the background refit (a regular subsample above it).
_MAX_BACKGROUND_PIXELS = 1 << 20


def _refit_background(
    kernel: MatchingKernel,
    target: NDArray[np.float64],
    convolved: NDArray[np.float64],
    bad: NDArray[np.bool_],
    clip_sigma: float,
    convolved_noise: float,
) -> MatchingKernel:
    """Refine the background polynomial on the residual ``target - K ⊗ T`` of faint pixels.

    Pixels where ``K ⊗ T`` exceeds its median by more than 5 times its own noise
    (``convolved_noise``, or the residual's noise when larger) are left out: the cores of
    stars, whose residuals carry the kernel's errors. The cut is one-sided and far out in
    the noise of ``K ⊗ T``, which also enters the residual, so it does not bias the mean.
    Three rounds of ``clip_sigma`` clipping of the residual drop transients and artefacts.
    """
    ny, nx = kernel.shape
    step = max(1, int(np.sqrt(ny * nx / _MAX_BACKGROUND_PIXELS)))
    sub = (slice(None, None, step), slice(None, None, step))
    rows, cols = np.mgrid[0:ny:step, 0:nx:step]
    good = ~bad[sub]
    conv = convolved[sub][good]
    resid = target[sub][good] - conv
    terms = _poly_terms(kernel.background_degree, kernel.shape, cols[good], rows[good])
    resid = resid - terms @ kernel.background
    if resid.size < 10 * terms.shape[1]:
        return kernel
    noise = _MAD_TO_SIGMA * float(np.median(np.abs(resid - np.median(resid))))
    use = conv - np.median(conv) < 5.0 * max(convolved_noise, noise)
    if np.count_nonzero(use) < 10 * terms.shape[1]:
        return kernel
    t, r = terms[use], resid[use]
    keep = np.ones(len(r), bool)
    delta = np.zeros(terms.shape[1])
    for _ in range(3):
        delta = np.linalg.lstsq(t[keep], r[keep], rcond=None)[0]
        res = r - t @ delta
        spread = _MAD_TO_SIGMA * float(np.median(np.abs(res[keep] - np.median(res[keep]))))
        new_keep = np.abs(res) < clip_sigma * spread
        if np.array_equal(new_keep, keep) or np.count_nonzero(new_keep) < 10 * t.shape[1]:
            break
        keep = new_keep
    return replace(kernel, background=kernel.background + delta)


# --------------------------------------------------------------------------------------
# Decorrelation


def decorrelation_kernel(
    kernel: NDArray[np.floating],
    *,
    variance_unconvolved: float,
    variance_convolved: float,
    half_size: int | None = None,
) -> NDArray[np.float64]:
    """Real-space noise decorrelation filter of an Alard-Lupton difference (DMTN-021).

    ``φ̂(k) = sqrt((σ_u² + s² σ_c²) / (σ_u² + |κ̂(k)|² σ_c²))`` with ``s = Σκ``, evaluated
    on a grid four times the kernel size, transformed back and cropped (DMTN-021,
    generalised to a kernel of sum ``s`` so that ``φ̂(0) = 1``).

    Parameters
    ----------
    kernel : ndarray, shape (2h + 1, 2h + 1)
        Matching kernel ``κ`` (at the image centre).
    variance_unconvolved : float
        Per-pixel noise variance ``σ_u²`` of the image that was not convolved.
    variance_convolved : float
        Per-pixel noise variance ``σ_c²`` of the image that was convolved with ``κ``.
    half_size : int or None
        Half-width of the returned stamp; ``None``: that of ``kernel``.

    Returns
    -------
    ndarray, shape (2 half_size + 1, 2 half_size + 1)
        ``φ`` centred on its central pixel, normalised to unit sum.
    """
    k = np.asarray(kernel, np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 != 1:
        raise ValueError(f"kernel must be an odd square stamp, got shape {k.shape}")
    if variance_unconvolved < 0 or variance_convolved < 0:
        raise ValueError("variances must be non-negative")
    half = k.shape[0] // 2 if half_size is None else int(half_size)
    grid = scipy.fft.next_fast_len(4 * max(k.shape[0], 2 * half + 1))
    k_hat2 = np.abs(scipy.fft.fft2(k, s=(grid, grid))) ** 2
    s = float(k.sum())
    numerator = variance_unconvolved + s**2 * variance_convolved
    denominator = np.maximum(variance_unconvolved + k_hat2 * variance_convolved, 1e-12 * numerator)
    phi_hat = np.sqrt(numerator / denominator) if numerator > 0 else np.ones_like(k_hat2)
    phi = np.fft.fftshift(np.real(scipy.fft.ifft2(phi_hat)))
    c = grid // 2
    phi = phi[c - half : c + half + 1, c - half : c + half + 1]
    return np.asarray(phi / phi.sum(), np.float64)


# --------------------------------------------------------------------------------------
# PSFs


def _stamp_fwhm(stamp: NDArray[np.float64]) -> float:
    """FWHM (pixels) of the circle with the area above half maximum (5x upsampled)."""
    up = ndimage.zoom(stamp, 5, order=3)
    area = np.count_nonzero(up >= 0.5 * up.max()) / 25.0
    return float(2.0 * np.sqrt(area / np.pi))


def _crop(stamp: NDArray[np.float64], half: int) -> NDArray[np.float64]:
    c = stamp.shape[0] // 2
    half = min(half, c)
    return stamp[c - half : c + half + 1, c - half : c + half + 1]


def _difference_psf(
    kernel: MatchingKernel,
    phi: NDArray[np.float64],
    template_psf: PsfModel,
    target_psf: PsfModel,
) -> PsfModel:
    """``φ ⊗ κ ⊗ P_T / s`` at the centre, or on a 3x3 grid when anything varies."""
    ny, nx = kernel.shape
    varies = kernel.spatial_degree > 0 or not template_psf.is_constant or not target_psf.is_constant
    n_grid = 3 if varies else 1
    gx = (np.arange(n_grid) + 0.5) * nx / n_grid - 0.5
    gy = (np.arange(n_grid) + 0.5) * ny / n_grid - 0.5
    half = max(template_psf.size, target_psf.size) // 2 + kernel.half_size
    stamps = []
    for yy in gy:
        row = []
        for xx in gx:
            p = _convolve_small(kernel.at(xx, yy), np.asarray(template_psf.at(xx, yy), float))
            p = _crop(_convolve_small(p, phi), half)
            row.append(p / p.sum())
        stamps.append(row)
    arr = np.array(stamps)
    fwhm_grid = np.array([[_stamp_fwhm(s) for s in row] for row in arr])
    return PsfModel(
        stamps=arr.astype(np.float32),
        grid_x=gx.astype(np.float64) if n_grid > 1 else np.array([0.0]),
        grid_y=gy.astype(np.float64) if n_grid > 1 else np.array([0.0]),
        fwhm=float(np.median(fwhm_grid)),
        fwhm_grid=fwhm_grid,
        n_stars=0,
    )


# --------------------------------------------------------------------------------------
# Entry point


def subtract_alard_lupton(
    science: NDArray[np.floating],
    reference: NDArray[np.floating],
    *,
    science_psf: PsfModel | float,
    reference_psf: PsfModel | float,
    star_x: ArrayLike,
    star_y: ArrayLike,
    science_variance: NDArray[np.floating] | float | None = None,
    reference_variance: NDArray[np.floating] | float | None = None,
    mask: NDArray[np.bool_] | None = None,
    config: AlardLuptonConfig | None = None,
    workers: int = 1,
) -> AlardLuptonResult:
    """Subtract an aligned reference from a science image by Alard-Lupton kernel matching.

    The image with the smaller PSF FWHM is convolved to match the other (the reference
    on a tie); the difference is formed so that a source brighter in the science image is
    positive, in science-image flux units; its noise is then decorrelated (DMTN-021) and a
    matched-filter score image computed.

    When the science image has the better seeing it is the one convolved: the kernel ``K``
    maps it onto the reference (``R ≈ K ⊗ N + B``, so ``s = ΣK`` is reference / science)
    and ``D = (K ⊗ N + B - R) / s``; the order of the terms keeps a transient in ``N``
    positive and the division by ``s`` puts its flux in science units. The result then
    has ``convolved == "science"``, its ``flux_scale`` is reference / science
    (``science_over_reference`` is always science / reference) and its ``background`` is
    in reference units.

    Parameters
    ----------
    science : ndarray, shape (ny, nx)
        Science (new) image, background-subtracted or not (the differential background is
        fitted).
    reference : ndarray, shape (ny, nx)
        Reference image resampled onto the science pixel grid.
    science_psf, reference_psf : PsfModel or float
        PSF of each image, or its FWHM in pixels for a circular Gaussian.
    star_x, star_y : array_like, shape (n,)
        0-based pixel positions of bright, unsaturated, isolated stars for the kernel fit.
    science_variance, reference_variance : ndarray, float or None
        Per-pixel variance (data units squared), a constant, or ``None`` for a constant
        estimated from the image (1.4826 MAD, squared).
    mask : ndarray of bool or None
        True for pixels unusable in either image (non-finite pixels are added).
    config : AlardLuptonConfig or None
        Options.
    workers : int
        Threads for the FFTs (``scipy.fft``).

    Returns
    -------
    AlardLuptonResult

    Raises
    ------
    ShapeMismatch
        If the images, variances or mask differ in shape, or ``star_x``/``star_y`` do.
    TooFewStamps
        If too few stars give usable stamps for the kernel fit.
    """
    cfg = config or AlardLuptonConfig()
    sci = check_image(science, "science").astype(np.float64)
    ref = check_image(reference, "reference").astype(np.float64)
    if sci.shape != ref.shape:
        raise ShapeMismatch({"science": sci.shape, "reference": ref.shape})
    shape = (int(sci.shape[0]), int(sci.shape[1]))
    bad = ~np.isfinite(sci) | ~np.isfinite(ref)
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.shape != shape:
            raise ShapeMismatch({"science": shape, "mask": m.shape})
        bad |= m
    var_sci = _variance_of(science_variance, sci, ~bad, "science")
    var_ref = _variance_of(reference_variance, ref, ~bad, "reference")
    bad |= _unusable_variance(var_sci) | _unusable_variance(var_ref)
    psf_sci = _psf_of(science_psf, "science")
    psf_ref = _psf_of(reference_psf, "reference")
    convolved: Literal["science", "reference"] = (
        "science" if psf_sci.fwhm < psf_ref.fwhm else "reference"
    )
    if convolved == "reference":
        tmpl, targ, var_t, var_m, psf_t, psf_m = ref, sci, var_ref, var_sci, psf_ref, psf_sci
    else:
        tmpl, targ, var_t, var_m, psf_t, psf_m = sci, ref, var_sci, var_ref, psf_sci, psf_ref
    sigmas, half, stamp_half = _auto_sizes(cfg, psf_t.fwhm, psf_m.fwhm)
    fit = _fit(tmpl, targ, var_t, var_m, bad, star_x, star_y, sigmas, half, stamp_half, cfg)
    kernel = fit.kernel

    # Difference in science units (positive for a source brighter in the science). The
    # template's typical level is taken out before the single-precision FFTs and put back
    # exactly (K ⊗ c = s(x, y) c).
    level = float(np.median(tmpl[~bad][:: max(1, int(np.count_nonzero(~bad) >> 20))]))
    model = kernel.convolve(np.where(bad, 0.0, tmpl - level), workers=workers)
    model += level * kernel.flux_scale_image()
    bad_d = _grow(bad, half)
    xc, yc = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
    kappa = kernel.at(xc, yc)
    good = ~bad
    sigma2_u = _median_variance(var_m, good)
    sigma2_c = _median_variance(var_t, good)
    if cfg.refit_background:
        convolved_noise = math.sqrt(float(np.sum(kappa**2)) * sigma2_c)
        kernel = _refit_background(kernel, targ, model, bad_d, cfg.clip_sigma, convolved_noise)
        fit = replace(fit, kernel=kernel)
    model += kernel.background_image()
    if convolved == "reference":
        difference = targ - model
        gain: NDArray[np.float64] | float = 1.0
    else:
        gain = (
            kernel.flux_scale_image()
            if not cfg.constant_flux_scale
            else float(kernel.coefficients[0, 0])
        )
        difference = (model - targ) / gain
    del model
    difference[bad_d] = 0.0

    # Decorrelation with the kernel at the centre and the median noise levels.
    flux_scale = float(kappa.sum())
    phi = decorrelation_kernel(
        kappa, variance_unconvolved=sigma2_u, variance_convolved=sigma2_c, half_size=half
    )
    sum_phi2 = float(np.sum(phi**2))
    sum_phik2 = float(np.sum(_convolve_small(phi, kappa) ** 2))
    g_centre = 1.0 if convolved == "reference" else flux_scale
    noise_sigma = math.sqrt(sigma2_u * sum_phi2 + sigma2_c * sum_phik2) / g_centre
    variance = (var_m * sum_phi2 + var_t * sum_phik2) / np.square(gain)
    variance_map = np.broadcast_to(np.asarray(variance, np.float64), shape)
    if bad.any():
        # Unusable input variances (masked anyway) become infinite: no weight in a fit.
        variance_map = np.where(np.isfinite(variance_map), variance_map, np.inf)
    psf = _difference_psf(kernel, phi, psf_t, psf_m)
    flipped = np.asarray(psf.at(xc, yc), np.float64)[::-1, ::-1]

    # φ ⊗ D and the score numerator (φ ⊗ P̃_D) ⊗ D share one transform of D.
    filter_u = _convolve_small(phi, flipped)  # acts on the unconvolved image
    filter_c = _convolve_small(filter_u, kappa)  # and on the convolved one
    decorrelated, score = _fft_convolve_many(difference, [phi, filter_u], workers)
    bad_out = _grow(bad, 2 * half)
    decorrelated[bad_out] = 0.0
    # Var(S) from the effective filters on each input, V_u Σ(φ⊗P̃)² + V_c Σ(φ⊗κ⊗P̃)²:
    # V Σ P² when φ whitens exactly, and still right where the local noise differs from
    # the medians φ was built for. Near masked pixels (zeros in D) it is scaled by the
    # filter weight that falls on valid pixels.
    sum_u2, sum_c2 = float(np.sum(filter_u**2)), float(np.sum(filter_c**2))
    score_variance = (var_m * sum_u2 + var_t * sum_c2) / np.square(gain)
    if bad.any():
        valid = (~bad_d).astype(np.float64)
        (covered,) = _fft_convolve_many(valid, [filter_u**2], workers)
        score_variance = score_variance * np.clip(covered / sum_u2, 0.0, 1.0)
    if cfg.model_error > 0:
        # A fractional kernel-model error leaves ~ε of each static source in D: the term
        # ε² (S_T² + S_M²) of ZOGY's S_corr, with both matched-filter responses taken as
        # that of the unconvolved image (the two agree at static sources).
        good_d = ~bad_d
        level = float(np.median(targ[good_d][:: max(1, int(np.count_nonzero(good_d)) // 200_000)]))
        (source_score,) = _fft_convolve_many(
            np.where(good_d, targ - level, 0.0), [filter_u], workers
        )
        score_variance = score_variance + (2.0 * cfg.model_error**2) * np.square(
            source_score / gain
        )
    score_variance = np.where(np.isfinite(score_variance), score_variance, 0.0)
    floor = 1e-6 * float(np.max(score_variance))
    score /= np.sqrt(np.maximum(score_variance, floor))
    score[bad_out] = 0.0

    return AlardLuptonResult(
        difference=difference.astype(np.float32),
        decorrelated=decorrelated.astype(np.float32),
        variance=variance_map.astype(np.float32),
        score=score.astype(np.float32),
        mask=bad_out,
        psf=psf,
        kernel=kappa,
        decorrelation_kernel=phi,
        flux_scale=flux_scale,
        background=kernel.background.copy(),
        n_stamps_used=fit.n_stamps_used,
        n_stamps_rejected=fit.n_stamps_rejected,
        n_stamps_unusable=fit.n_stamps_unusable,
        residual_rms=fit.residual_rms,
        convolved=convolved,
        noise_sigma=noise_sigma,
        kernel_fit=fit,
        config=cfg,
    )
