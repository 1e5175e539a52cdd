"""The PSF model type carried by an exposure.

A PSF is stored as normalised pixel stamps on a regular grid of field positions; a
constant PSF is a 1x1 grid. Evaluating the model at a position interpolates bilinearly
between the four nearest grid stamps, which is how spatial variation is represented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["PsfModel", "gaussian_fwhm_to_sigma"]

#: FWHM / sigma of a Gaussian, 2 sqrt(2 ln 2).
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def gaussian_fwhm_to_sigma(fwhm: float) -> float:
    """Return the Gaussian sigma for a FWHM in the same units."""
    return float(fwhm) / _FWHM_PER_SIGMA


@dataclass(frozen=True)
class PsfModel:
    """A pixelised, possibly spatially varying point-spread function.

    Attributes
    ----------
    stamps : ndarray, shape (n_grid_y, n_grid_x, size, size)
        PSF images sampled at the native pixel scale, each summing to 1, centred on the
        central pixel (``size`` is odd).
    grid_x : ndarray, shape (n_grid_x,)
        0-based x pixel coordinate of each grid column's centre, increasing.
    grid_y : ndarray, shape (n_grid_y,)
        0-based y pixel coordinate of each grid row's centre, increasing.
    fwhm : float
        Median FWHM over the grid, in pixels.
    fwhm_grid : ndarray, shape (n_grid_y, n_grid_x)
        FWHM of each stamp, in pixels.
    n_stars : int
        Stars that went into the model (0 for an analytic model).
    """

    stamps: NDArray[np.float32]
    grid_x: NDArray[np.float64]
    grid_y: NDArray[np.float64]
    fwhm: float
    fwhm_grid: NDArray[np.float64]
    n_stars: int = 0

    def __post_init__(self) -> None:
        if self.stamps.ndim != 4 or self.stamps.shape[2] != self.stamps.shape[3]:
            raise ValueError(f"stamps must be (ny, nx, size, size), got {self.stamps.shape}")
        if self.stamps.shape[2] % 2 != 1:
            raise ValueError("PSF stamp size must be odd")
        if self.stamps.shape[:2] != (len(self.grid_y), len(self.grid_x)):
            raise ValueError("grid coordinates do not match the stamp grid")

    @property
    def size(self) -> int:
        """Side of each stamp in pixels."""
        return int(self.stamps.shape[2])

    @property
    def is_constant(self) -> bool:
        """True when the model has a single stamp."""
        return self.stamps.shape[0] == 1 and self.stamps.shape[1] == 1

    @classmethod
    def constant(cls, stamp: NDArray[np.floating], *, fwhm: float, n_stars: int = 0) -> PsfModel:
        """Build a model with one stamp valid everywhere.

        Parameters
        ----------
        stamp : ndarray, shape (size, size)
            PSF image; it is normalised to unit sum.
        fwhm : float
            Its FWHM in pixels.
        n_stars : int
            Stars that went into it.
        """
        s = np.asarray(stamp, dtype=np.float64)
        s = s / s.sum()
        return cls(
            stamps=s.astype(np.float32)[None, None],
            grid_x=np.array([0.0]),
            grid_y=np.array([0.0]),
            fwhm=float(fwhm),
            fwhm_grid=np.array([[float(fwhm)]]),
            n_stars=n_stars,
        )

    @classmethod
    def gaussian(cls, fwhm: float, *, size: int | None = None) -> PsfModel:
        """An analytic circular Gaussian PSF of the given FWHM (pixels)."""
        sigma = gaussian_fwhm_to_sigma(fwhm)
        if size is None:
            size = 2 * int(np.ceil(4.0 * sigma)) + 1
        half = size // 2
        y, x = np.mgrid[-half : half + 1, -half : half + 1]
        stamp = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
        return cls.constant(stamp, fwhm=fwhm)

    def at(self, x: float, y: float) -> NDArray[np.float32]:
        """PSF stamp at a 0-based pixel position, bilinear between grid stamps.

        Outside the grid the nearest edge stamps are used. The result sums to 1.
        """
        if self.is_constant:
            return self.stamps[0, 0]
        wy, iy0, iy1 = _bracket(self.grid_y, y)
        wx, ix0, ix1 = _bracket(self.grid_x, x)
        s = (
            (1 - wy) * (1 - wx) * self.stamps[iy0, ix0]
            + (1 - wy) * wx * self.stamps[iy0, ix1]
            + wy * (1 - wx) * self.stamps[iy1, ix0]
            + wy * wx * self.stamps[iy1, ix1]
        )
        return (s / s.sum()).astype(np.float32)

    def fwhm_at(self, x: float, y: float) -> float:
        """FWHM in pixels at a position, bilinear between grid values."""
        if self.is_constant:
            return float(self.fwhm_grid[0, 0])
        wy, iy0, iy1 = _bracket(self.grid_y, y)
        wx, ix0, ix1 = _bracket(self.grid_x, x)
        g = self.fwhm_grid
        return float(
            (1 - wy) * (1 - wx) * g[iy0, ix0]
            + (1 - wy) * wx * g[iy0, ix1]
            + wy * (1 - wx) * g[iy1, ix0]
            + wy * wx * g[iy1, ix1]
        )


def _bracket(grid: NDArray[np.float64], v: float) -> tuple[float, int, int]:
    """Interpolation weight and the two grid indices around ``v`` (clamped at the ends)."""
    n = len(grid)
    if n == 1 or v <= grid[0]:
        return 0.0, 0, 0
    if v >= grid[-1]:
        return 0.0, n - 1, n - 1
    i1 = int(np.searchsorted(grid, v))
    i0 = i1 - 1
    w = (v - grid[i0]) / (grid[i1] - grid[i0])
    return float(w), i0, i1
