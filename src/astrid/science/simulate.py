"""Seeded simulation of realistic survey images with a truth table.

The simulator draws a *field* once (stars, galaxies, detector defects, a nominal TAN
WCS) and renders it at any number of *epochs*, each with its own seeing, sky, depth,
transparency and pointing, optionally with transients injected. Everything that was
put into an image is returned beside it: the true PSF, the noise-free sky, the pixels
hit by cosmic rays, and the positions, fluxes and ideal S/N of every source.

Model of one epoch, in the order it is applied:

1. **Geometry.** A sky position that falls on the reference (nominal) pixel grid at
   ``p_ref`` lands in the epoch at ``R(rotation) (p_ref - c) + c + (dx, dy)``, where
   ``c`` is the detector centre ``((nx - 1) / 2, (ny - 1) / 2)`` and ``R`` rotates from
   +x toward +y. The epoch's WCS keeps the reference tangent point, so
   ``wcs.world_to_pixel`` reproduces this mapping exactly.
2. **Photometry.** The epoch zero point (magnitude of a source giving 1 ADU in total) is
   ``zero_point - extinction * airmass + 2.5 log10(exposure_time * transparency)``; the
   sky (given in mag/arcsec² as seen at the telescope) is scaled by exposure time and
   transparency, not by extinction, and carries a linear gradient.
3. **PSF.** Moffat or Gaussian, elliptical, with FWHM and ellipticity varying smoothly
   over the detector (a focal-plane term growing as r² toward the corners, a random
   per-epoch linear tilt of the FWHM and a random per-epoch constant ellipticity).
   When the FWHM is under 3 pixels the profile's core is integrated over pixels by
   sub-sampling. The true PSF model (:class:`~astrid.science.psf_model.PsfModel`)
   samples this continuous PSF on a grid, in stamps holding 99.5 % of a Moffat's flux.
4. **Sources.** Stars and transients are drawn at their exact sub-pixel positions with
   the continuous PSF, in stamps the size of the PSF model's (vectorised, never over
   the full frame), normalised so that the part inside that stamp holds the source's
   flux; stars bright enough for their wings to show above the noise get larger
   stamps (up to 256 pixels from the centre) that add the wings beyond. Galaxies are
   Sersic profiles convolved, stamp by stamp with FFTs, with the true PSF model at
   their position.
5. **Noise and detector.** Photon noise (Poisson; drawn exactly below 100 electrons and
   from its normal approximation above, where the two cannot be told apart) and read
   noise; cosmic-ray charge; charge above the full well spills up and down its column
   (bleed trails); dead or hot columns; values clip at the saturation level.

Pixel convention: arrays are indexed ``[y, x]``; every position is a 0-based pixel
centre. Fluxes are in ADU summed over the source, magnitudes in the field's band.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.fft
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.time import Time
from astropy.wcs import WCS
from numpy.typing import NDArray
from scipy import ndimage, special

from astrid.exposure import Exposure, ExposureMeta, MaskBit
from astrid.science.psf_model import PsfModel

__all__ = [
    "EpochConditions",
    "FieldConfig",
    "PsfProfile",
    "SimulatedExposure",
    "SimulatedField",
    "SimulatedSurvey",
    "TransientKind",
    "TransientSpec",
    "add_point_sources",
    "point_source_snr",
    "random_conditions",
    "random_transients",
    "render_point_sources",
    "simulate_exposure",
    "simulate_field",
    "simulate_survey",
]

TransientKind = Literal["appearing", "supernova", "variable"]
"""Light-curve kinds of :class:`TransientSpec`."""

PsfProfile = Literal["moffat", "gaussian"]
"""PSF profiles of :class:`FieldConfig`."""

_TRANSIENT_KINDS: tuple[TransientKind, ...] = ("appearing", "supernova", "variable")
_INSTRUMENT = "AstrID simulator"
#: Photon counts at or above this many electrons are drawn from the normal approximation.
_POISSON_EXACT_BELOW = 100.0
#: Gaussian FWHM / sigma.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Fraction of a Moffat PSF's flux allowed outside the stamp of the PSF model.
_MOFFAT_FLUX_OUTSIDE = 0.005
#: Largest half-size of any stamp, in pixels.
_MAX_HALF = 256
#: Stamp pixels rendered per vectorised block (bounds temporary memory).
_BLOCK_PIXELS = 1 << 22
#: Seed-sequence keys of the independent random streams.
_KEY_FIELD, _KEY_CONDITIONS, _KEY_TRANSIENTS, _KEY_EPOCH, _KEY_EXPOSURE = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class FieldConfig:
    """The sky field and the detector that observes it.

    Attributes
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)`` in pixels.
    pixel_scale : float
        Pixel scale in arcsec per pixel.
    ra : float
        Right ascension of the field centre (ICRS), degrees.
    dec : float
        Declination of the field centre (ICRS), degrees.
    n_stars : int
        Stars drawn uniformly over the detector plus ``margin`` on every side.
    star_power_law_index : float
        ``alpha`` of the star flux distribution ``dN/dF ∝ F**-alpha``, truncated to
        ``star_mag_range`` (equivalently ``dN/dmag ∝ 10**(0.4 (alpha - 1) mag)``).
    star_mag_range : tuple of float
        ``(brightest, faintest)`` star magnitude.
    n_galaxies : int
        Galaxies drawn uniformly over the same area as the stars.
    galaxy_power_law_index : float
        ``alpha`` of the galaxy flux distribution ``dN/dF ∝ F**-alpha``.
    galaxy_mag_range : tuple of float
        ``(brightest, faintest)`` galaxy magnitude (total, before truncation).
    galaxy_radius_range : tuple of float
        Range of the half-light radius along the major axis, arcsec (log-uniform).
    galaxy_sersic_range : tuple of float
        Range of the Sersic index ``n`` (log-uniform; 1 is exponential, 4 de Vaucouleurs).
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise in electrons.
    full_well : float
        Full-well capacity in electrons; charge above it bleeds along the column.
    saturation : float or None
        Level in ADU at which pixel values clip; ``None`` uses ``full_well / gain``.
    zero_point : float
        Magnitude of a source giving 1 ADU per second above the atmosphere
        (airmass 0) at transparency 1.
    extinction : float
        Atmospheric extinction in magnitudes per airmass.
    band : str
        Band name written to the metadata.
    sky_gradient : float
        Fractional change of the sky level from the centre to an edge, along a random
        direction per epoch.
    n_bad_columns : int
        Dead or hot columns (whole, or from a row to the top), fixed on the detector.
    cosmic_ray_rate : float
        Cosmic-ray hits per megapixel per second of exposure.
    psf_profile : {"moffat", "gaussian"}
        Radial profile of the PSF.
    moffat_beta : float
        Moffat ``beta`` (must exceed 1.5).
    psf_variation : float
        Fractional FWHM change from the field centre to a corner (plus a random
        per-epoch tilt of up to the same amount across the field).
    psf_ellipticity : float
        PSF ellipticity ``1 - b/a`` reached at the corners by the focal-plane term; each
        epoch also has a random constant ellipticity of up to half this.
    psf_grid : int
        Grid points per axis on which the true PSF model is sampled.
    margin : int
        Pixels beyond each detector edge over which sources are also placed, so that
        shifted epochs and the wings of edge sources stay populated.
    """

    shape: tuple[int, int] = (1024, 1024)
    pixel_scale: float = 0.5
    ra: float = 150.0
    dec: float = 2.2
    n_stars: int = 1000
    star_power_law_index: float = 2.0
    star_mag_range: tuple[float, float] = (14.0, 23.5)
    n_galaxies: int = 300
    galaxy_power_law_index: float = 2.0
    galaxy_mag_range: tuple[float, float] = (17.0, 23.5)
    galaxy_radius_range: tuple[float, float] = (0.4, 3.0)
    galaxy_sersic_range: tuple[float, float] = (0.7, 4.0)
    gain: float = 1.5
    read_noise: float = 5.0
    full_well: float = 90000.0
    saturation: float | None = None
    zero_point: float = 25.0
    extinction: float = 0.1
    band: str = "r"
    sky_gradient: float = 0.02
    n_bad_columns: int = 2
    cosmic_ray_rate: float = 0.2
    psf_profile: PsfProfile = "moffat"
    moffat_beta: float = 3.0
    psf_variation: float = 0.1
    psf_ellipticity: float = 0.05
    psf_grid: int = 5
    margin: int = 16

    def __post_init__(self) -> None:
        ny, nx = self.shape
        if ny < 16 or nx < 16:
            raise ValueError(f"shape must be at least 16x16, got {self.shape}")
        for name in ("pixel_scale", "gain", "full_well"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_stars", "n_galaxies", "n_bad_columns", "margin", "read_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("star_mag_range", "galaxy_mag_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name} must be (brightest, faintest), got {(lo, hi)}")
        for name in ("galaxy_radius_range", "galaxy_sersic_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) > 0, got {(lo, hi)}")
        if self.saturation is not None and not self.saturation > 0:
            raise ValueError(f"saturation must be positive, got {self.saturation}")
        if self.psf_profile not in ("moffat", "gaussian"):
            raise ValueError(
                f"psf_profile must be 'moffat' or 'gaussian', not {self.psf_profile!r}"
            )
        if not self.moffat_beta > 1.5:
            raise ValueError(f"moffat_beta must exceed 1.5, got {self.moffat_beta}")
        if not 0 <= self.psf_ellipticity < 0.5:
            raise ValueError(f"psf_ellipticity must be in [0, 0.5), got {self.psf_ellipticity}")
        if not 0 <= self.psf_variation < 0.45:
            raise ValueError(f"psf_variation must be in [0, 0.45), got {self.psf_variation}")
        if self.psf_grid < 1:
            raise ValueError(f"psf_grid must be at least 1, got {self.psf_grid}")
        if self.cosmic_ray_rate < 0 or self.sky_gradient < 0:
            raise ValueError("cosmic_ray_rate and sky_gradient must not be negative")

    @property
    def saturation_level(self) -> float:
        """Clipping level in ADU (``saturation``, or ``full_well / gain``)."""
        return float(self.saturation if self.saturation is not None else self.full_well / self.gain)


@dataclass(frozen=True)
class EpochConditions:
    """Observing conditions of one epoch.

    Attributes
    ----------
    fwhm : float
        Seeing: FWHM of the PSF at the field centre in **arcsec** (geometric mean of the
        major- and minor-axis FWHM of the analytic profile).
    sky_brightness : float
        Sky surface brightness at the field centre, mag/arcsec².
    exposure_time : float
        Exposure time in seconds.
    transparency : float
        Fraction of the light transmitted by clouds (1 is photometric); scales both
        sources and sky.
    dx : float
        Pointing offset: shift of the sky on the detector along x, pixels.
    dy : float
        Pointing offset along y, pixels.
    rotation : float
        Rotation of the sky on the detector about its centre, degrees, from +x toward +y.
    mjd : float
        Start of the exposure, MJD (UTC).
    airmass : float
        Airmass (sets the extinction).
    satellite_trails : int
        Satellite or aircraft trails crossing this exposure: straight lines over the
        whole frame with the PSF's width, a peak 0.5-10 times the sky noise, half of
        them glinting (bright dots every 3-12 px along the line). Their angles,
        positions and brightness are drawn from the exposure's seed, independently of
        every other draw, so adding trails changes nothing else in the image.
    """

    fwhm: float = 1.2
    sky_brightness: float = 21.0
    exposure_time: float = 60.0
    transparency: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    rotation: float = 0.0
    mjd: float = 60000.0
    airmass: float = 1.0
    satellite_trails: int = 0

    def __post_init__(self) -> None:
        if self.satellite_trails < 0:
            raise ValueError(f"satellite_trails must not be negative, got {self.satellite_trails}")
        if not self.fwhm > 0:
            raise ValueError(f"fwhm must be positive, got {self.fwhm}")
        if not self.exposure_time > 0:
            raise ValueError(f"exposure_time must be positive, got {self.exposure_time}")
        if not 0 < self.transparency <= 1:
            raise ValueError(f"transparency must be in (0, 1], got {self.transparency}")
        if not self.airmass >= 1:
            raise ValueError(f"airmass must be at least 1, got {self.airmass}")
        if abs(self.rotation) > 5:
            raise ValueError(
                f"rotation must be a small angle (|rotation| <= 5 deg), got {self.rotation}"
            )


@dataclass(frozen=True)
class TransientSpec:
    """A transient (or variable) point source and its light curve.

    Attributes
    ----------
    kind : {"appearing", "supernova", "variable"}
        ``"appearing"``: constant magnitude ``mag`` from ``t0`` on, absent before.
        ``"supernova"``: absent before the explosion at ``t0``; flux rises as
        ``((t - t0) / rise_time)**2`` to the peak magnitude ``mag`` at
        ``t0 + rise_time``, then fades linearly in magnitude at ``decline_rate``.
        ``"variable"``: always present, ``mag + amplitude * sin(2π (t - t0) / period)``.
    ra : float
        Right ascension, degrees.
    dec : float
        Declination, degrees.
    mag : float
        Constant, peak or mean magnitude, by ``kind``.
    t0 : float
        Appearance time, explosion time or phase-zero time (MJD), by ``kind``.
    rise_time : float
        Supernova: days from explosion to peak.
    decline_rate : float
        Supernova: fading after peak, magnitudes per day.
    period : float
        Variable: period in days.
    amplitude : float
        Variable: semi-amplitude in magnitudes.
    epochs : tuple of int or None
        Inject only into these epoch indices; ``None``: every epoch in which the light
        curve is non-zero.
    host_galaxy : int
        ``id`` of the galaxy the transient sits on, or -1 (informational).
    host_star : int
        Variable only: ``id`` of the field star it replaces (that star is not drawn in
        the epochs the variable is injected into), or -1 for a new source.
    """

    kind: TransientKind
    ra: float
    dec: float
    mag: float
    t0: float = 60000.0
    rise_time: float = 15.0
    decline_rate: float = 0.03
    period: float = 1.0
    amplitude: float = 0.3
    epochs: tuple[int, ...] | None = None
    host_galaxy: int = -1
    host_star: int = -1

    def __post_init__(self) -> None:
        if self.kind not in _TRANSIENT_KINDS:
            raise ValueError(f"kind must be one of {_TRANSIENT_KINDS}, not {self.kind!r}")
        if not self.rise_time > 0 or not self.period > 0:
            raise ValueError("rise_time and period must be positive")
        if self.host_star >= 0 and self.kind != "variable":
            raise ValueError("only a variable can replace a host star")

    def magnitude_at(self, mjd: float) -> float:
        """Magnitude at a time (MJD); ``inf`` where the source is absent."""
        dt = float(mjd) - self.t0
        if self.kind == "appearing":
            return self.mag if dt >= 0 else math.inf
        if self.kind == "supernova":
            if dt <= 0:
                return math.inf
            if dt < self.rise_time:
                return self.mag - 5.0 * math.log10(dt / self.rise_time)
            return self.mag + self.decline_rate * (dt - self.rise_time)
        return self.mag + self.amplitude * math.sin(2.0 * math.pi * dt / self.period)

    def flux_at(self, mjd: float, zero_point: float) -> float:
        """Total flux in ADU at a time for an epoch zero point; 0 where absent."""
        m = self.magnitude_at(mjd)
        return 0.0 if not math.isfinite(m) else 10.0 ** (-0.4 * (m - zero_point))

    def injected_in(self, epoch: int) -> bool:
        """Whether ``epochs`` allows injection into epoch ``epoch``."""
        return self.epochs is None or epoch in self.epochs


# --------------------------------------------------------------------------------------
# results


@dataclass(frozen=True, eq=False)
class SimulatedField:
    """The sky and detector of a simulation, independent of any epoch.

    Attributes
    ----------
    config : FieldConfig
        The configuration it was drawn from.
    wcs : astropy.wcs.WCS
        TAN WCS of the reference (nominal) pointing: ``(ra, dec)`` at the detector
        centre, north up, east left, ``pixel_scale`` arcsec per pixel.
    stars : astropy.table.Table
        One row per star: ``id``, ``ra``, ``dec`` (deg), ``mag``, and ``x``, ``y``
        (0-based position on the reference grid, pixels).
    galaxies : astropy.table.Table
        One row per galaxy: ``id``, ``ra``, ``dec``, ``mag``, ``x``, ``y`` (reference
        grid), ``r_eff`` (major-axis half-light radius, arcsec), ``sersic_n``,
        ``axis_ratio`` (b/a), ``theta`` (major-axis angle from +x toward +y on the
        reference grid, deg).
    bad_columns : astropy.table.Table
        One row per defect: ``x`` (column), ``y_start``, ``y_stop`` (rows affected,
        stop exclusive), ``kind`` (``"dead"`` or ``"hot"``), ``level`` (ADU added to a
        hot column; 0 for dead ones).
    seed : int
        The seed it was drawn with.
    """

    config: FieldConfig
    wcs: WCS
    stars: Table
    galaxies: Table
    bad_columns: Table
    seed: int


@dataclass(frozen=True, eq=False)
class SimulatedExposure:
    """One simulated epoch and everything that went into it.

    Attributes
    ----------
    exposure : Exposure
        The image: ``data`` in ADU with the sky included; ``variance`` the true expected
        variance ``(sky + sources) / gain + (read_noise / gain)**2`` in ADU² (so the
        noise-free image is ``gain * variance - read_noise**2 / gain``); ``mask`` with
        ``SATURATED`` on clipped and bled pixels and ``BAD`` on bad columns (cosmic rays
        are *not* flagged); the epoch's TAN WCS; ``psf`` is ``None``.
    true_psf : PsfModel
        The PSF the image was rendered with, sampled centred on a
        ``psf_grid x psf_grid`` grid of detector positions (each stamp sums to 1; the
        FWHM values are those of the analytic profile, in pixels).
    conditions : EpochConditions
        The conditions it was observed under.
    epoch : int
        Epoch index.
    zero_point : float
        Magnitude of a source giving 1 ADU in total in this image.
    sky_level : float
        Sky at the detector centre, ADU per pixel.
    background : ndarray, shape (ny, nx), float32
        The noise-free sky, ADU per pixel.
    cosmic_rays : ndarray, shape (ny, nx), bool
        Pixels that received cosmic-ray charge.
    n_cosmic_rays : int
        Cosmic-ray hits (tracks and spots) in the image.
    trails : ndarray, shape (ny, nx), bool
        The cores of the satellite trails (within half a FWHM of each line); all False
        without trails.
    stars : astropy.table.Table
        Stars with their centre on the image: ``id`` (as in the field), ``x``, ``y``
        (0-based, this image), ``mag`` and ``flux`` (ADU) in this image, ``saturated``
        (the pixel under the centre is flagged ``SATURATED``), ``variable`` (the star
        is replaced in this image by a variable, whose ``mag`` and ``flux`` are given).
    galaxies : astropy.table.Table
        Galaxies with their centre on the image: ``id``, ``x``, ``y``, ``mag``, ``flux``.
    transients : astropy.table.Table
        One row per transient injected into this image with its centre on it; columns
        as :attr:`SimulatedSurvey.transients`.
    seed : int
        The seed of this epoch's random draws.
    """

    exposure: Exposure
    true_psf: PsfModel
    conditions: EpochConditions
    epoch: int
    zero_point: float
    sky_level: float
    background: NDArray[np.float32]
    cosmic_rays: NDArray[np.bool_]
    n_cosmic_rays: int
    trails: NDArray[np.bool_]
    stars: Table
    galaxies: Table
    transients: Table
    seed: int


@dataclass(frozen=True, eq=False)
class SimulatedSurvey:
    """The same field observed at several epochs, with transients and the truth.

    Attributes
    ----------
    field : SimulatedField
        The sky and detector (static stars and galaxies, bad columns, reference WCS).
    epochs : tuple of SimulatedExposure
        Each epoch, in order.
    transient_specs : tuple of TransientSpec
        The transients injected; a transient's ``id`` is its index here.
    """

    field: SimulatedField
    epochs: tuple[SimulatedExposure, ...]
    transient_specs: tuple[TransientSpec, ...] = ()

    @property
    def exposures(self) -> list[Exposure]:
        """The images, one per epoch."""
        return [e.exposure for e in self.epochs]

    @property
    def true_psfs(self) -> list[PsfModel]:
        """The true PSF model of each epoch."""
        return [e.true_psf for e in self.epochs]

    @property
    def conditions(self) -> list[EpochConditions]:
        """The conditions of each epoch."""
        return [e.conditions for e in self.epochs]

    @property
    def cosmic_rays(self) -> list[NDArray[np.bool_]]:
        """Per epoch, the boolean map of pixels hit by cosmic rays."""
        return [e.cosmic_rays for e in self.epochs]

    @property
    def reference_wcs(self) -> WCS:
        """The nominal WCS that pointing offsets are measured from."""
        return self.field.wcs

    @property
    def stars(self) -> Table:
        """Static stars: ``id``, ``ra``, ``dec``, ``mag``, reference-grid ``x``, ``y``."""
        return self.field.stars

    @property
    def galaxies(self) -> Table:
        """Galaxies (see :attr:`SimulatedField.galaxies`)."""
        return self.field.galaxies

    @property
    def transients(self) -> Table:
        """Truth of every transient in every epoch it was injected into.

        Columns: ``id`` (index into ``transient_specs``), ``epoch``, ``kind``, ``x``,
        ``y`` (0-based pixel position in that epoch's image), ``ra``, ``dec`` (deg),
        ``mjd``, ``mag`` and ``flux`` (ADU) of the source in that epoch, ``base_flux``
        (ADU of its quiescent counterpart in that epoch: for a variable the flux at its
        mean magnitude ``mag``, 0 otherwise), ``snr``, ``host_galaxy``, ``host_star``.

        ``snr`` is the S/N of an ideal PSF fit with known background and PSF:
        ``flux * sqrt(sum(P**2 / variance))`` over the pixels of the source's stamp,
        ``P`` being its rendered profile (unit sum) and ``variance`` the exposure's
        variance plane (sky, all sources including this one, and read noise).
        """
        return _stack_transient_tables([e.transients for e in self.epochs])

    @property
    def epoch_table(self) -> Table:
        """One row per epoch: conditions, zero point, sky level, PSF FWHM, cosmic rays."""
        rows = []
        for e in self.epochs:
            c = e.conditions
            rows.append(
                (
                    e.epoch,
                    c.mjd,
                    c.fwhm,
                    e.true_psf.fwhm,
                    c.sky_brightness,
                    e.sky_level,
                    c.exposure_time,
                    c.transparency,
                    c.airmass,
                    e.zero_point,
                    c.dx,
                    c.dy,
                    c.rotation,
                    e.n_cosmic_rays,
                    e.seed,
                )
            )
        names = (
            "epoch",
            "mjd",
            "fwhm",
            "fwhm_pix",
            "sky_brightness",
            "sky_level",
            "exposure_time",
            "transparency",
            "airmass",
            "zero_point",
            "dx",
            "dy",
            "rotation",
            "n_cosmic_rays",
            "seed",
        )
        if not rows:
            return Table(names=names)
        return Table(rows=rows, names=names)


# --------------------------------------------------------------------------------------
# random streams and geometry


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one purpose, derived from the user's seed."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def _derived_seed(seed: int, *key: int) -> int:
    """A plain integer seed for a sub-simulation, derived from the user's seed."""
    state = np.random.SeedSequence(int(seed), spawn_key=key).generate_state(1, np.uint32)
    return int(state[0])


def _centre(shape: tuple[int, int]) -> tuple[float, float]:
    return (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0


def _reference_wcs(config: FieldConfig) -> WCS:
    cx, cy = _centre(config.shape)
    scale = config.pixel_scale / 3600.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.wcs.crval = [config.ra, config.dec]
    w.wcs.crpix = [cx + 1.0, cy + 1.0]
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    w.pixel_shape = (config.shape[1], config.shape[0])
    return w


def _rotation_matrix(rotation_deg: float) -> NDArray[np.float64]:
    a = math.radians(rotation_deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _epoch_wcs(reference: WCS, shape: tuple[int, int], conditions: EpochConditions) -> WCS:
    """WCS of an epoch: ``p_epoch = R (p_ref - c) + c + d`` with the same tangent point."""
    cx, cy = _centre(shape)
    w = reference.deepcopy()
    w.wcs.crpix = [cx + conditions.dx + 1.0, cy + conditions.dy + 1.0]
    w.wcs.cd = np.asarray(reference.wcs.cd) @ _rotation_matrix(-conditions.rotation)
    w.wcs.set()
    return w


def _to_epoch(
    x_ref: NDArray[np.float64],
    y_ref: NDArray[np.float64],
    shape: tuple[int, int],
    conditions: EpochConditions,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    cx, cy = _centre(shape)
    r = _rotation_matrix(conditions.rotation)
    u = np.asarray(x_ref, np.float64) - cx
    v = np.asarray(y_ref, np.float64) - cy
    x = r[0, 0] * u + r[0, 1] * v + cx + conditions.dx
    y = r[1, 0] * u + r[1, 1] * v + cy + conditions.dy
    return x, y


def _power_law_mags(
    rng: np.random.Generator, n: int, alpha: float, mag_range: tuple[float, float]
) -> NDArray[np.float64]:
    """Magnitudes whose fluxes follow ``dN/dF ∝ F**-alpha`` within ``mag_range``."""
    f_max = 10.0 ** (-0.4 * mag_range[0])
    f_min = 10.0 ** (-0.4 * mag_range[1])
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-9:
        flux = f_min * (f_max / f_min) ** u
    else:
        k = 1.0 - alpha
        flux = (f_min**k + u * (f_max**k - f_min**k)) ** (1.0 / k)
    return np.asarray(-2.5 * np.log10(flux), np.float64)


def _in_image(
    x: NDArray[np.float64], y: NDArray[np.float64], shape: tuple[int, int]
) -> NDArray[np.bool_]:
    return (x >= -0.5) & (x < shape[1] - 0.5) & (y >= -0.5) & (y < shape[0] - 0.5)


# --------------------------------------------------------------------------------------
# the field


def simulate_field(config: FieldConfig, *, seed: int) -> SimulatedField:
    """Draw the static sky and detector defects of a field.

    Parameters
    ----------
    config : FieldConfig
        Field and detector.
    seed : int
        Seed; the same seed gives the same field.

    Returns
    -------
    SimulatedField
        Stars, galaxies, bad columns and the reference WCS.
    """
    rng = _rng(seed, _KEY_FIELD)
    ny, nx = config.shape
    m = config.margin
    wcs = _reference_wcs(config)

    def positions(n: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        x = rng.uniform(-0.5 - m, nx - 0.5 + m, n)
        y = rng.uniform(-0.5 - m, ny - 0.5 + m, n)
        return x, y

    sx, sy = positions(config.n_stars)
    smag = _power_law_mags(rng, config.n_stars, config.star_power_law_index, config.star_mag_range)
    sra, sdec = wcs.pixel_to_world_values(sx, sy)
    stars = Table(
        {
            "id": np.arange(config.n_stars, dtype=np.int64),
            "ra": np.asarray(sra, np.float64),
            "dec": np.asarray(sdec, np.float64),
            "mag": smag,
            "x": sx,
            "y": sy,
        }
    )
    _describe(stars, _STAR_DOCS)

    gx, gy = positions(config.n_galaxies)
    gmag = _power_law_mags(
        rng, config.n_galaxies, config.galaxy_power_law_index, config.galaxy_mag_range
    )
    lo, hi = config.galaxy_radius_range
    r_eff = np.exp(rng.uniform(math.log(lo), math.log(hi), config.n_galaxies))
    nlo, nhi = config.galaxy_sersic_range
    sersic_n = np.exp(rng.uniform(math.log(nlo), math.log(nhi), config.n_galaxies))
    axis_ratio = rng.uniform(0.3, 1.0, config.n_galaxies)
    theta = rng.uniform(0.0, 180.0, config.n_galaxies)
    gra, gdec = wcs.pixel_to_world_values(gx, gy)
    galaxies = Table(
        {
            "id": np.arange(config.n_galaxies, dtype=np.int64),
            "ra": np.asarray(gra, np.float64),
            "dec": np.asarray(gdec, np.float64),
            "mag": gmag,
            "x": gx,
            "y": gy,
            "r_eff": r_eff,
            "sersic_n": sersic_n,
            "axis_ratio": axis_ratio,
            "theta": theta,
        }
    )
    _describe(galaxies, _GALAXY_DOCS)

    n_bad = min(config.n_bad_columns, nx)
    columns = np.sort(rng.choice(nx, size=n_bad, replace=False)).astype(np.int64)
    whole = rng.random(n_bad) < 0.5
    y_start = np.where(whole, 0, rng.integers(0, ny, n_bad)).astype(np.int64)
    hot = rng.random(n_bad) < 0.5
    level = np.where(hot, rng.uniform(300.0, 3000.0, n_bad), 0.0)
    bad_columns = Table(
        {
            "x": columns,
            "y_start": y_start,
            "y_stop": np.full(n_bad, ny, np.int64),
            "kind": np.array(["hot" if h else "dead" for h in hot], dtype="U4"),
            "level": level,
        }
    )
    return SimulatedField(
        config=config,
        wcs=wcs,
        stars=stars,
        galaxies=galaxies,
        bad_columns=bad_columns,
        seed=int(seed),
    )


_STAR_DOCS = {
    "id": "star identifier (row in the field's star table)",
    "ra": "right ascension [deg]",
    "dec": "declination [deg]",
    "mag": "magnitude in the field's band",
    "x": "0-based x [pix] (reference grid in the field table, the image in an epoch table)",
    "y": "0-based y [pix]",
    "flux": "total flux in this image [ADU]",
    "saturated": "the pixel under the centre is flagged SATURATED",
    "variable": "replaced in this image by a variable (flux and mag are the variable's)",
}
_GALAXY_DOCS = {
    **{k: v for k, v in _STAR_DOCS.items() if k not in ("saturated", "variable")},
    "id": "galaxy identifier (row in the field's galaxy table)",
    "r_eff": "major-axis half-light radius [arcsec]",
    "sersic_n": "Sersic index",
    "axis_ratio": "minor/major axis ratio",
    "theta": "major-axis angle from +x toward +y on the reference grid [deg]",
}
_TRANSIENT_DOCS = {
    "id": "transient identifier (index into the transient specs)",
    "epoch": "epoch index",
    "kind": "light-curve kind: appearing, supernova or variable",
    "x": "0-based x in this epoch's image [pix]",
    "y": "0-based y in this epoch's image [pix]",
    "ra": "right ascension [deg]",
    "dec": "declination [deg]",
    "mjd": "epoch time [MJD, UTC]",
    "mag": "magnitude in this epoch",
    "flux": "total flux in this epoch's image [ADU]",
    "base_flux": "quiescent flux in this epoch (a variable at its mean mag) [ADU]",
    "snr": "ideal PSF-fit S/N: flux * sqrt(sum(P**2 / variance))",
    "host_galaxy": "id of the host galaxy, or -1",
    "host_star": "id of the replaced field star, or -1",
}


def _describe(table: Table, docs: dict[str, str]) -> None:
    for name in table.colnames:
        if name in docs:
            table[name].description = docs[name]


# --------------------------------------------------------------------------------------
# PSF field


@dataclass(frozen=True)
class _PsfField:
    """The continuous PSF of one epoch as a function of detector position."""

    profile: str
    beta: float
    fwhm0: float  # pixels, field centre
    variation: float
    ellipticity: float
    tilt: tuple[float, float]
    e_const: tuple[float, float]
    centre: tuple[float, float]
    half_size: tuple[float, float]
    oversample: int = 1  # sub-samples per pixel and axis in the core
    core: int = 0  # half-size of the central block that is sub-sampled, pixels
    radius: int = 0  # half-size of the PSF-model stamp, pixels
    major: float = 0.0  # largest major-axis FWHM over the detector, pixels

    def shape_at(
        self, x: NDArray[np.float64], y: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """FWHM (pixels), ellipticity ``1 - b/a`` and major-axis angle (rad) at positions."""
        u = (np.asarray(x, np.float64) - self.centre[0]) / self.half_size[0]
        v = (np.asarray(y, np.float64) - self.centre[1]) / self.half_size[1]
        u = np.clip(u, -1.5, 1.5)
        v = np.clip(v, -1.5, 1.5)
        r2 = u * u + v * v
        tilt = self.tilt[0] * u + self.tilt[1] * v
        fwhm = self.fwhm0 * np.clip(1.0 + self.variation * (0.5 * r2 + tilt), 0.5, None)
        e1 = self.e_const[0] + self.ellipticity * 0.5 * (u * u - v * v)
        e2 = self.e_const[1] + self.ellipticity * 0.5 * (2.0 * u * v)
        e = np.clip(np.hypot(e1, e2), 0.0, 0.8)
        theta = 0.5 * np.arctan2(e2, e1)
        return fwhm, e, theta

    def _axis_factor(self) -> float:
        if self.profile == "moffat":
            return 1.0 / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        return 1.0 / _FWHM_PER_SIGMA

    def quadratic(
        self, x: NDArray[np.float64], y: NDArray[np.float64]
    ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """Coefficients of ``rho² = qxx dx² + 2 qxy dx dy + qyy dy²`` at positions."""
        fwhm, e, theta = self.shape_at(x, y)
        q = 1.0 - e
        k = self._axis_factor()
        sa = fwhm / np.sqrt(q) * k
        sb = fwhm * np.sqrt(q) * k
        c, s = np.cos(theta), np.sin(theta)
        ia, ib = 1.0 / sa**2, 1.0 / sb**2
        qxx = c * c * ia + s * s * ib
        qyy = s * s * ia + c * c * ib
        qxy = c * s * (ia - ib)
        return qxx.astype(np.float32), qxy.astype(np.float32), qyy.astype(np.float32)

    def max_major_fwhm(self, shape: tuple[int, int]) -> float:
        gy, gx = np.mgrid[0 : shape[0] : complex(0, 9), 0 : shape[1] : complex(0, 9)]
        fwhm, e, _ = self.shape_at(gx.ravel(), gy.ravel())
        return float(np.max(fwhm / np.sqrt(1.0 - e)))

    def profile_values(self, rho2: NDArray[np.float32]) -> NDArray[np.float32]:
        """Unnormalised profile at ``rho2``; integer and half-integer Moffat ``beta`` use
        products, several times faster than a general power."""
        if self.profile == "gaussian":
            return np.exp(np.float32(-0.5) * rho2, dtype=np.float32)
        t = np.float32(1.0) + rho2
        twice = 2.0 * self.beta
        if abs(twice - round(twice)) < 1e-9 and self.beta <= 8:
            whole = int(self.beta)
            acc = t.copy()
            for _ in range(whole - 1):
                acc *= t
            if round(twice) % 2:
                acc *= np.sqrt(t)
            return np.reciprocal(acc, out=acc)
        return np.exp(np.float32(-self.beta) * np.log(t), dtype=np.float32)

    def wing_radius(self, peak: NDArray[np.float64], threshold: float) -> NDArray[np.float64]:
        """Radius (pixels, major axis) where a profile of this peak falls to ``threshold``."""
        scale = self.major * self._axis_factor()
        ratio = np.maximum(np.asarray(peak, np.float64) / threshold, 1.0)
        if self.profile == "moffat":
            return np.asarray(scale * np.sqrt(ratio ** (1.0 / self.beta) - 1.0), np.float64)
        return np.asarray(scale * np.sqrt(2.0 * np.log(ratio)), np.float64)


def _make_psf_field(
    config: FieldConfig, conditions: EpochConditions, rng: np.random.Generator
) -> _PsfField:
    ny, nx = config.shape
    angle = rng.uniform(0.0, 2.0 * math.pi)
    tilt_size = rng.uniform(0.0, 1.0)
    e_angle = rng.uniform(0.0, 2.0 * math.pi)
    e_size = rng.uniform(0.0, 0.5 * config.psf_ellipticity)
    fwhm0 = conditions.fwhm / config.pixel_scale
    base = _PsfField(
        profile=config.psf_profile,
        beta=config.moffat_beta,
        fwhm0=fwhm0,
        variation=config.psf_variation,
        ellipticity=config.psf_ellipticity,
        tilt=(tilt_size * math.cos(angle), tilt_size * math.sin(angle)),
        e_const=(e_size * math.cos(e_angle), e_size * math.sin(e_angle)),
        centre=_centre(config.shape),
        half_size=(max(nx / 2.0, 1.0), max(ny / 2.0, 1.0)),
    )
    fwhm_min = (
        fwhm0
        * max(0.5, 1.0 - 2.0 * config.psf_variation)
        * math.sqrt(1.0 - 2.0 * config.psf_ellipticity)
    )
    oversample = 1 if fwhm_min >= 3.0 else (2 if fwhm_min >= 1.5 else 4)
    core = math.ceil(1.5 * fwhm0)
    major = base.max_major_fwhm(config.shape)
    if config.psf_profile == "moffat":
        alpha = major * base._axis_factor()
        x = math.sqrt(_MOFFAT_FLUX_OUTSIDE ** (1.0 / (1.0 - config.moffat_beta)) - 1.0)
        radius = math.ceil(x * alpha)
    else:
        radius = math.ceil(2.5 * major)
    radius = int(min(max(radius, 3), _MAX_HALF // 2))
    return _PsfField(
        **{
            **base.__dict__,
            "oversample": oversample,
            "core": core,
            "radius": radius,
            "major": major,
        }
    )


def _profile_stamps(
    psf: _PsfField,
    fx: NDArray[np.float32],
    fy: NDArray[np.float32],
    qxx: NDArray[np.float32],
    qxy: NDArray[np.float32],
    qyy: NDArray[np.float32],
    half: int,
) -> NDArray[np.float32]:
    """PSF stamps ``(n, 2 half + 1, 2 half + 1)``, normalised to unit sum over the central
    ``2 psf.radius + 1`` box; ``fx``, ``fy`` are source offsets from the stamp's centre
    pixel. Pixels are sampled at their centres, except those of the central
    ``2 psf.core + 1`` block, which are integrated with ``psf.oversample**2`` sub-samples
    (the profile is curved there; in the wings a centre sample is accurate)."""
    a = qxx[:, None, None]
    b = np.float32(2.0) * qxy[:, None, None]
    c = qyy[:, None, None]
    fx3 = fx[:, None, None]
    fy3 = fy[:, None, None]

    def sample(offs: NDArray[np.float32], sub_x: float, sub_y: float) -> NDArray[np.float32]:
        dx = offs[None, None, :] + np.float32(sub_x) - fx3
        dy = offs[None, :, None] + np.float32(sub_y) - fy3
        return psf.profile_values(a * dx * dx + b * dx * dy + c * dy * dy)

    out = sample(np.arange(-half, half + 1, dtype=np.float32), 0.0, 0.0)
    o = psf.oversample
    k = min(psf.core, half)
    if o > 1 and k >= 0:
        core_offs = np.arange(-k, k + 1, dtype=np.float32)
        acc = np.zeros((len(fx), 2 * k + 1, 2 * k + 1), np.float32)
        for sy in range(o):
            for sx in range(o):
                acc += sample(core_offs, (sx + 0.5) / o - 0.5, (sy + 0.5) / o - 0.5)
        out[:, half - k : half + k + 1, half - k : half + k + 1] = acc / np.float32(o * o)
    r = min(psf.radius, half)
    inner = out[:, half - r : half + r + 1, half - r : half + r + 1].sum(axis=(1, 2))
    out /= inner[:, None, None]
    return out


def _true_psf(psf: _PsfField, shape: tuple[int, int], n_grid: int) -> PsfModel:
    ny, nx = shape
    grid_x = np.linspace(0.0, nx - 1.0, n_grid) if n_grid > 1 else np.array([(nx - 1) / 2.0])
    grid_y = np.linspace(0.0, ny - 1.0, n_grid) if n_grid > 1 else np.array([(ny - 1) / 2.0])
    gx, gy = np.meshgrid(grid_x, grid_y)
    qxx, qxy, qyy = psf.quadratic(gx.ravel(), gy.ravel())
    zero = np.zeros(gx.size, np.float32)
    stamps = _profile_stamps(psf, zero, zero, qxx, qxy, qyy, psf.radius)
    fwhm_grid, _, _ = psf.shape_at(gx.ravel(), gy.ravel())
    size = 2 * psf.radius + 1
    return PsfModel(
        stamps=stamps.reshape(len(grid_y), len(grid_x), size, size).astype(np.float32),
        grid_x=grid_x.astype(np.float64),
        grid_y=grid_y.astype(np.float64),
        fwhm=float(np.median(fwhm_grid)),
        fwhm_grid=fwhm_grid.reshape(len(grid_y), len(grid_x)).astype(np.float64),
        n_stars=0,
    )


# --------------------------------------------------------------------------------------
# rendering


def _add_stamps(
    image: NDArray[np.float32],
    ix: NDArray[np.int64],
    iy: NDArray[np.int64],
    stamps: NDArray[np.float32],
) -> None:
    """Add ``stamps`` (n, s, s) centred on pixels ``(iy, ix)`` into ``image`` in place."""
    ny, nx = image.shape
    half = stamps.shape[1] // 2
    offs = np.arange(-half, half + 1, dtype=np.int64)
    xs = ix[:, None] + offs[None, :]
    ys = iy[:, None] + offs[None, :]
    okx = (xs >= 0) & (xs < nx)
    oky = (ys >= 0) & (ys < ny)
    if okx.all() and oky.all():
        flat = ys[:, :, None] * nx + xs[:, None, :]
        np.add.at(image.reshape(-1), flat.ravel(), stamps.ravel())
        return
    ok = oky[:, :, None] & okx[:, None, :]
    flat = ys[:, :, None] * nx + xs[:, None, :]
    np.add.at(image.reshape(-1), flat[ok], stamps[ok])


def _overlaps(
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    half: NDArray[np.int64] | int,
    shape: tuple[int, int],
) -> NDArray[np.bool_]:
    return (
        (x + half >= -0.5)
        & (x - half < shape[1] - 0.5)
        & (y + half >= -0.5)
        & (y - half < shape[0] - 0.5)
    )


def _render_points(
    image: NDArray[np.float32],
    psf: _PsfField,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    flux: NDArray[np.float64],
    half: NDArray[np.int64],
) -> None:
    """Add point sources with per-source stamp half-sizes into ``image`` in place."""
    keep = _overlaps(x, y, half, image.shape) & (flux > 0)
    x, y, flux, half = x[keep], y[keep], flux[keep], half[keep]
    for h in np.unique(half):
        sel = np.flatnonzero(half == h)
        per_block = max(1, _BLOCK_PIXELS // (2 * int(h) + 1) ** 2)
        for start in range(0, len(sel), per_block):
            idx = sel[start : start + per_block]
            ix = np.rint(x[idx]).astype(np.int64)
            iy = np.rint(y[idx]).astype(np.int64)
            qxx, qxy, qyy = psf.quadratic(x[idx], y[idx])
            stamps = _profile_stamps(
                psf,
                (x[idx] - ix).astype(np.float32),
                (y[idx] - iy).astype(np.float32),
                qxx,
                qxy,
                qyy,
                int(h),
            )
            stamps *= flux[idx].astype(np.float32)[:, None, None]
            _add_stamps(image, ix, iy, stamps)


def _point_halves(
    psf: _PsfField, flux: NDArray[np.float64], peak_fraction: float, threshold: float
) -> NDArray[np.int64]:
    """Stamp half-size per point source: the PSF radius, doubled while wings stay visible."""
    radius = psf.radius
    half = np.full(len(flux), radius, np.int64)
    if len(flux) == 0:
        return half
    need = psf.wing_radius(flux * peak_fraction, threshold)
    h = radius
    while h < _MAX_HALF:
        more = need > h
        if not more.any():
            break
        h = min(2 * h, _MAX_HALF)
        half[more] = h
    return half


def _sersic_b(n: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(special.gammaincinv(2.0 * n, 0.5), np.float64)


def _galaxy_intrinsic(
    dx: NDArray[np.float32],
    dy: NDArray[np.float32],
    r_eff: NDArray[np.float32],
    n_inv: NDArray[np.float32],
    b_n: NDArray[np.float32],
    q: NDArray[np.float32],
    cos_t: NDArray[np.float32],
    sin_t: NDArray[np.float32],
    truncate: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Sersic surface brightness (unnormalised) at offsets; arrays broadcast per galaxy."""
    xp = dx * cos_t + dy * sin_t
    yp = (-dx * sin_t + dy * cos_t) / q
    rho = np.sqrt(xp * xp + yp * yp) / r_eff
    val = np.exp(-b_n * np.power(rho, n_inv, dtype=np.float32), dtype=np.float32)
    return np.where(rho <= truncate, val, np.float32(0.0)).astype(np.float32)


#: Odd stamp sides with only the prime factors 3, 5 and 7, where FFTs are fast.
_GALAXY_SIDES = np.array(
    [
        9,
        15,
        21,
        25,
        27,
        35,
        45,
        49,
        63,
        75,
        81,
        105,
        125,
        135,
        147,
        175,
        189,
        225,
        243,
        245,
        315,
        343,
        375,
        405,
        441,
        525,
    ],
    np.int64,
)


def _grid_weights(
    grid: NDArray[np.float64], v: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """Vectorised bilinear bracket of ``PsfModel`` (weight of the upper node, nodes)."""
    n = len(grid)
    if n == 1:
        zeros = np.zeros(len(v), np.int64)
        return np.zeros(len(v)), zeros, zeros
    i1 = np.clip(np.searchsorted(grid, v), 1, n - 1).astype(np.int64)
    i0 = i1 - 1
    w = np.clip((v - grid[i0]) / (grid[i1] - grid[i0]), 0.0, 1.0)
    return w, i0, i1


def _render_galaxies(
    image: NDArray[np.float32],
    true_psf: PsfModel,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    flux: NDArray[np.float64],
    r_eff_pix: NDArray[np.float64],
    sersic_n: NDArray[np.float64],
    axis_ratio: NDArray[np.float64],
    theta_deg: NDArray[np.float64],
    threshold: float,
) -> None:
    """Add PSF-convolved Sersic galaxies into ``image`` in place.

    Each galaxy's profile is truncated at 5 half-light radii, or where its surface
    brightness falls below ``threshold`` (ADU per pixel) if that is closer (but not
    inside 2 half-light radii), sampled at pixel centres
    (with 5x5 sub-samples in the central 5x5 pixels, where a cusp is steep), normalised
    to its flux, and convolved by FFT with the true PSF model at its position (the same
    bilinear interpolation between grid stamps as ``PsfModel.at``, done on the stamps'
    Fourier transforms).
    """
    r = true_psf.size // 2
    sides = _GALAXY_SIDES[_GALAXY_SIDES // 2 > r + 2]
    if len(sides) == 0:
        sides = np.array([2 * (r + 8) + 1], np.int64)
    b_all = _sersic_b(sersic_n)
    # central surface brightness (ADU/pix) of the untruncated profile
    centre = (
        flux
        * b_all ** (2.0 * sersic_n)
        / (2.0 * np.pi * axis_ratio * r_eff_pix**2 * sersic_n * special.gamma(2.0 * sersic_n))
    )
    reach = (np.log(np.maximum(centre / threshold, 1.0)) / b_all) ** sersic_n
    trunc_re = np.clip(reach, 2.0, 5.0)
    need = np.ceil(trunc_re * r_eff_pix + r + 1).astype(np.int64)
    half = sides[np.minimum(np.searchsorted(sides // 2, need), len(sides) - 1)] // 2
    keep = _overlaps(x, y, half, (image.shape[0], image.shape[1])) & (flux > 0)
    wx, gx0, gx1 = _grid_weights(true_psf.grid_x, x)
    wy, gy0, gy1 = _grid_weights(true_psf.grid_y, y)
    sub = (np.arange(5, dtype=np.float32) + 0.5) / 5 - 0.5
    fine = (np.arange(-2, 3)[:, None] + sub[None, :]).ravel().astype(np.float32)
    for h in np.unique(half[keep]):
        h = int(h)
        sel = np.flatnonzero(keep & (half == h))
        size = 2 * h + 1
        # Fourier transforms of the grid's PSF stamps, centred on the origin
        kern = np.zeros((*true_psf.stamps.shape[:2], size, size), np.float32)
        kern[:, :, h - r : h + r + 1, h - r : h + r + 1] = true_psf.stamps
        kern_hat = scipy.fft.rfft2(np.fft.ifftshift(kern, axes=(2, 3)), axes=(2, 3))
        per_block = max(1, _BLOCK_PIXELS // (size * size))
        offs = np.arange(-h, h + 1, dtype=np.float32)
        for start in range(0, len(sel), per_block):
            idx = sel[start : start + per_block]
            ix = np.rint(x[idx]).astype(np.int64)
            iy = np.rint(y[idx]).astype(np.int64)
            fx = (x[idx] - ix).astype(np.float32)[:, None, None]
            fy = (y[idx] - iy).astype(np.float32)[:, None, None]
            t = np.deg2rad(theta_deg[idx])
            per = {
                "r_eff": r_eff_pix[idx],
                "n_inv": 1.0 / sersic_n[idx],
                "b_n": b_all[idx],
                "q": axis_ratio[idx],
                "cos_t": np.cos(t),
                "sin_t": np.sin(t),
                "truncate": np.minimum(trunc_re[idx], (h - r - 1) / r_eff_pix[idx]),
            }
            p3 = {k: v.astype(np.float32)[:, None, None] for k, v in per.items()}
            stamp = _galaxy_intrinsic(offs[None, None, :] - fx, offs[None, :, None] - fy, **p3)
            core = _galaxy_intrinsic(fine[None, None, :] - fx, fine[None, :, None] - fy, **p3)
            stamp[:, h - 2 : h + 3, h - 2 : h + 3] = core.reshape(len(idx), 5, 5, 5, 5).mean(
                axis=(2, 4)
            )
            total = stamp.sum(axis=(1, 2))
            stamp *= (flux[idx] / np.where(total > 0, total, 1.0)).astype(np.float32)[:, None, None]
            ax = wx[idx].astype(np.float32)[:, None, None]
            ay = wy[idx].astype(np.float32)[:, None, None]
            k_hat = (1 - ay) * (1 - ax) * kern_hat[gy0[idx], gx0[idx]]
            k_hat += (1 - ay) * ax * kern_hat[gy0[idx], gx1[idx]]
            k_hat += ay * (1 - ax) * kern_hat[gy1[idx], gx0[idx]]
            k_hat += ay * ax * kern_hat[gy1[idx], gx1[idx]]
            k_hat *= scipy.fft.rfft2(stamp, axes=(1, 2))
            conv = scipy.fft.irfft2(k_hat, s=(size, size), axes=(1, 2)).astype(np.float32)
            _add_stamps(image, ix, iy, conv)


def _sky(
    shape: tuple[int, int], level: float, gradient: float, angle: float
) -> NDArray[np.float32]:
    ny, nx = shape
    cx, cy = _centre(shape)
    u = (np.arange(nx, dtype=np.float32) - np.float32(cx)) / np.float32(max(nx / 2.0, 1.0))
    v = (np.arange(ny, dtype=np.float32) - np.float32(cy)) / np.float32(max(ny / 2.0, 1.0))
    gx = np.float32(level * gradient * math.cos(angle))
    gy = np.float32(level * gradient * math.sin(angle))
    return (np.float32(level) + gx * u[None, :] + gy * v[:, None]).astype(np.float32)


def _cosmic_rays(
    rng: np.random.Generator, shape: tuple[int, int], n: int
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Flat pixel indices and electrons deposited by ``n`` cosmic rays.

    70 % are straight tracks of 2 to 15 pixels at a random angle; the rest are spots of
    1 to 4 adjacent pixels. Each hit pixel receives a log-normal charge (median 1500 e-).
    """
    ny, nx = shape
    indices: list[NDArray[np.int64]] = []
    for _ in range(n):
        x0 = rng.uniform(0, nx)
        y0 = rng.uniform(0, ny)
        if rng.random() < 0.7:
            length = rng.uniform(2.0, 15.0)
            a = rng.uniform(0.0, math.pi)
            t = np.arange(0.0, length, 0.5)
            px = np.floor(x0 + t * math.cos(a)).astype(np.int64)
            py = np.floor(y0 + t * math.sin(a)).astype(np.int64)
        else:
            k = int(rng.integers(1, 5))
            cells = rng.permutation(4)[:k]
            px = np.floor(x0).astype(np.int64) + (cells % 2)
            py = np.floor(y0).astype(np.int64) + (cells // 2)
        ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        indices.append(np.unique(py[ok] * nx + px[ok]))
    if not indices:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    flat = np.concatenate(indices)
    charge = rng.lognormal(math.log(1500.0), 0.6, len(flat)).astype(np.float32)
    return flat, charge


def _bleed(charge: NDArray[np.float32], full_well: float) -> NDArray[np.bool_]:
    """Spill charge above ``full_well`` up and down its column, in place.

    The excess of each run of over-full pixels is split evenly between the two
    directions and fills the next pixels up to the full well; charge that reaches the
    detector edge is lost. Returns the pixels left at the full well (bled or saturated).
    """
    over = charge > full_well
    full = np.zeros(charge.shape, bool)
    cols = np.flatnonzero(over.any(axis=0))
    fw = float(full_well)
    for col in cols:
        c = charge[:, col].astype(np.float64)
        hot = c > fw
        edges = np.flatnonzero(np.diff(np.concatenate(([0], hot.view(np.int8), [0]))))
        runs = list(zip(edges[::2], edges[1::2] - 1, strict=True))
        excess = [float(np.sum(c[a : b + 1] - fw)) for a, b in runs]
        for a, b in runs:
            c[a : b + 1] = fw
        for (a, b), e in zip(runs, excess, strict=True):
            _spill(c, b + 1, 1, 0.5 * e, fw)
            _spill(c, a - 1, -1, 0.5 * e, fw)
        charge[:, col] = c.astype(np.float32)
        full[:, col] = c >= fw
    return full


def _spill(c: NDArray[np.float64], start: int, step: int, amount: float, fw: float) -> None:
    if amount <= 0 or start < 0 or start >= len(c):
        return
    view = c[start:] if step > 0 else c[start::-1]
    room = np.clip(fw - view, 0.0, None)
    cum = np.cumsum(room)
    k = int(np.searchsorted(cum, amount))
    view[:k] = np.maximum(view[:k], fw)  # filled to exactly the full well
    if k < len(view):
        view[k] += amount - (cum[k - 1] if k > 0 else 0.0)


# --------------------------------------------------------------------------------------
# one epoch


def _render_trails(
    image: NDArray[np.float32],
    n: int,
    fwhm: float,
    sky_sigma: float,
    rng: np.random.Generator,
) -> NDArray[np.bool_]:
    """Add ``n`` straight trails across ``image`` (in place), in its data units.

    Each crosses the whole frame through a random point at a random angle, with a
    Gaussian cross-section of the seeing's FWHM (pixels) and a peak of 0.5-10 times the
    sky noise ``sky_sigma`` (log-uniform). Half glint: their brightness along the line
    is a train of Gaussian dots, every 3-12 px. Returns the trails' cores: the pixels
    within half a FWHM of a line (glinting or not).
    """
    ny, nx = image.shape
    cores = np.zeros((ny, nx), dtype=bool)
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        angle = rng.uniform(0.0, math.pi)
        peak = sky_sigma * math.exp(rng.uniform(math.log(0.5), math.log(10.0)))
        glint = rng.random() < 0.5
        period = rng.uniform(3.0, 12.0)
        c, s = math.cos(angle), math.sin(angle)
        across = (xx - x0) * s - (yy - y0) * c
        near = np.abs(across) < 5.0 * sigma + 1.0
        profile = np.exp(-0.5 * (across[near] / sigma) ** 2)
        if glint:
            along = (xx[near] - x0) * c + (yy[near] - y0) * s
            phase = np.mod(along, period) - 0.5 * period
            profile *= np.exp(-0.5 * (phase / max(sigma, 0.5)) ** 2)
        image[near] += np.float32(peak) * profile.astype(np.float32)
        cores |= np.abs(across) <= 0.5 * fwhm
    return cores


def simulate_exposure(
    field: SimulatedField,
    conditions: EpochConditions,
    *,
    seed: int,
    transients: Sequence[TransientSpec] = (),
    epoch: int = 0,
) -> SimulatedExposure:
    """Render one epoch of a field.

    Parameters
    ----------
    field : SimulatedField
        The sky and detector, from :func:`simulate_field`.
    conditions : EpochConditions
        Seeing, sky, depth, pointing and time of this epoch.
    seed : int
        Seed of this epoch's random draws (PSF and sky-gradient orientation, noise,
        cosmic rays); the same seed gives the same image.
    transients : sequence of TransientSpec
        Transients to inject where their light curve is non-zero at ``conditions.mjd``
        and their ``epochs`` allow ``epoch``; their ``id`` is their index here.
    epoch : int
        Index of this epoch, for ``TransientSpec.epochs`` and the truth tables.

    Returns
    -------
    SimulatedExposure
        The exposure and its truth.
    """
    config = field.config
    shape = config.shape
    ny, nx = shape
    rng = _rng(seed, _KEY_EXPOSURE)
    psf = _make_psf_field(config, conditions, rng)
    sky_angle = rng.uniform(0.0, 2.0 * math.pi)

    zp_sky = config.zero_point + 2.5 * math.log10(
        conditions.exposure_time * conditions.transparency
    )
    zero_point = zp_sky - config.extinction * conditions.airmass
    sky_level = 10.0 ** (-0.4 * (conditions.sky_brightness - zp_sky)) * config.pixel_scale**2
    background = _sky(shape, sky_level, config.sky_gradient, sky_angle)
    wcs = _epoch_wcs(field.wcs, shape, conditions)
    true_psf = _true_psf(psf, shape, config.psf_grid)
    peak_fraction = float(true_psf.stamps.max())
    sky_sigma = math.sqrt(sky_level / config.gain + (config.read_noise / config.gain) ** 2)

    # transients injected into this epoch
    t_rows: list[tuple[int, TransientSpec, float, float]] = []  # id, spec, flux, base flux
    replaced: dict[int, float] = {}  # host star id -> flux of its variable this epoch
    for tid, spec in enumerate(transients):
        if not spec.injected_in(epoch):
            continue
        flux = spec.flux_at(conditions.mjd, zero_point)
        if flux <= 0:
            continue
        base = 10.0 ** (-0.4 * (spec.mag - zero_point)) if spec.kind == "variable" else 0.0
        t_rows.append((tid, spec, flux, base))
        if spec.host_star >= 0:
            replaced[spec.host_star] = flux
    t_ra = np.array([s.ra for _, s, _, _ in t_rows], np.float64)
    t_dec = np.array([s.dec for _, s, _, _ in t_rows], np.float64)
    t_flux = np.array([f for _, _, f, _ in t_rows], np.float64)
    if t_rows:
        t_xr, t_yr = field.wcs.world_to_pixel_values(t_ra, t_dec)
        t_x, t_y = _to_epoch(np.asarray(t_xr), np.asarray(t_yr), shape, conditions)
    else:
        t_x = t_y = np.zeros(0, np.float64)

    stars = field.stars
    s_keep = ~np.isin(np.asarray(stars["id"]), np.fromiter(replaced, np.int64, len(replaced)))
    s_variable = ~s_keep
    s_x, s_y = _to_epoch(np.asarray(stars["x"]), np.asarray(stars["y"]), shape, conditions)
    s_flux = 10.0 ** (-0.4 * (np.asarray(stars["mag"], np.float64) - zero_point))
    s_epoch_flux = s_flux.copy()  # what is in this image (a variable replaces its host)
    for star_id, flux in replaced.items():
        s_epoch_flux[np.asarray(stars["id"]) == star_id] = flux

    sources = np.zeros(shape, np.float32)
    px = np.concatenate([s_x[s_keep], t_x])
    py = np.concatenate([s_y[s_keep], t_y])
    pf = np.concatenate([s_flux[s_keep], t_flux])
    halves = _point_halves(psf, pf, peak_fraction, 0.2 * sky_sigma)
    _render_points(sources, psf, px, py, pf, halves)

    gal = field.galaxies
    g_x, g_y = _to_epoch(np.asarray(gal["x"]), np.asarray(gal["y"]), shape, conditions)
    g_flux = 10.0 ** (-0.4 * (np.asarray(gal["mag"], np.float64) - zero_point))
    _render_galaxies(
        sources,
        true_psf,
        g_x,
        g_y,
        g_flux,
        np.asarray(gal["r_eff"], np.float64) / config.pixel_scale,
        np.asarray(gal["sersic_n"], np.float64),
        np.asarray(gal["axis_ratio"], np.float64),
        np.asarray(gal["theta"], np.float64) + conditions.rotation,
        0.1 * sky_sigma,
    )

    trails = np.zeros(shape, dtype=bool)
    if conditions.satellite_trails:
        trails = _render_trails(
            sources,
            conditions.satellite_trails,
            conditions.fwhm / config.pixel_scale,
            sky_sigma,
            _rng(seed, _KEY_EXPOSURE, 1),
        )

    model = sources
    model += background
    np.maximum(model, 0.0, out=model)
    gain = np.float32(config.gain)
    rn = np.float32(config.read_noise)
    variance = model / gain
    variance += (rn / gain) ** 2

    # photon and read noise, in electrons (in-place steps: these are full frames)
    electrons = model
    electrons *= gain
    z = rng.standard_normal(shape, dtype=np.float32)
    charge = electrons + rn * rn
    np.sqrt(charge, out=charge)
    charge *= z
    charge += electrons
    low = electrons < _POISSON_EXACT_BELOW
    if low.any():
        charge[low] = (
            rng.poisson(electrons[low].astype(np.float64)).astype(np.float32) + rn * z[low]
        )

    n_cr = int(rng.poisson(config.cosmic_ray_rate * nx * ny / 1e6 * conditions.exposure_time))
    cr_flat, cr_charge = _cosmic_rays(rng, shape, n_cr)
    np.add.at(charge.reshape(-1), cr_flat, cr_charge)
    cosmic_rays = np.zeros(shape, bool)
    cosmic_rays.reshape(-1)[cr_flat] = True

    del electrons, model, sources
    bled = _bleed(charge, config.full_well)
    data = charge
    data /= gain

    mask = np.zeros(shape, np.uint16)
    for row in field.bad_columns:
        col, y0, y1 = int(row["x"]), int(row["y_start"]), int(row["y_stop"])
        if row["kind"] == "dead":
            data[y0:y1, col] = rn * z[y0:y1, col] / gain
        else:
            data[y0:y1, col] += np.float32(row["level"])
        mask[y0:y1, col] |= np.uint16(MaskBit.BAD)
    saturation = np.float32(config.saturation_level)
    saturated = bled | (data >= saturation)
    np.minimum(data, saturation, out=data)
    mask[saturated] |= np.uint16(MaskBit.SATURATED)

    meta = ExposureMeta(
        time=Time(conditions.mjd, format="mjd", scale="utc"),
        band=config.band,
        exposure_time=conditions.exposure_time,
        gain=config.gain,
        read_noise=config.read_noise,
        saturation=config.saturation_level,
        zero_point=zero_point,
        airmass=conditions.airmass,
        instrument=_INSTRUMENT,
        object_name="simulated field",
    )
    exposure = Exposure(
        data=data,
        variance=variance.astype(np.float32, copy=False),
        mask=mask,
        wcs=wcs,
        psf=None,
        meta=meta,
        header=_header(meta, conditions, sky_level, epoch),
        provenance={
            "simulator": "astrid.science.simulate",
            "simulation_field_seed": str(field.seed),
            "simulation_seed": str(int(seed)),
            "simulation_epoch": str(epoch),
        },
    )

    # truth tables
    on = _in_image(s_x, s_y, shape)
    s_ix = np.clip(np.rint(s_x[on]).astype(np.int64), 0, nx - 1)
    s_iy = np.clip(np.rint(s_y[on]).astype(np.int64), 0, ny - 1)
    star_table = Table(
        {
            "id": np.asarray(stars["id"])[on],
            "x": s_x[on],
            "y": s_y[on],
            "mag": zero_point - 2.5 * np.log10(s_epoch_flux[on]),
            "flux": s_epoch_flux[on],
            "saturated": (mask[s_iy, s_ix] & np.uint16(MaskBit.SATURATED)) != 0,
            "variable": s_variable[on],
        }
    )
    _describe(star_table, _STAR_DOCS)
    g_on = _in_image(g_x, g_y, shape)
    galaxy_table = Table(
        {
            "id": np.asarray(gal["id"])[g_on],
            "x": g_x[g_on],
            "y": g_y[g_on],
            "mag": np.asarray(gal["mag"])[g_on],
            "flux": g_flux[g_on],
        }
    )
    _describe(galaxy_table, _GALAXY_DOCS)
    transient_table = _transient_truth(
        t_rows, t_x, t_y, exposure.variance, psf, epoch, conditions.mjd, zero_point, shape
    )
    return SimulatedExposure(
        exposure=exposure,
        true_psf=true_psf,
        conditions=conditions,
        epoch=int(epoch),
        zero_point=float(zero_point),
        sky_level=float(sky_level),
        background=background,
        cosmic_rays=cosmic_rays,
        n_cosmic_rays=n_cr,
        trails=trails,
        stars=star_table,
        galaxies=galaxy_table,
        transients=transient_table,
        seed=int(seed),
    )


def _header(
    meta: ExposureMeta, conditions: EpochConditions, sky_level: float, epoch: int
) -> fits.Header:
    h = fits.Header()
    h["INSTRUME"] = (meta.instrument, "simulated camera")
    h["OBJECT"] = (meta.object_name, "target")
    h["FILTER"] = (meta.band, "band")
    h["EXPTIME"] = (meta.exposure_time, "exposure time [s]")
    h["GAIN"] = (meta.gain, "gain [e-/ADU]")
    h["RDNOISE"] = (meta.read_noise, "read noise [e-]")
    h["SATURATE"] = (meta.saturation, "saturation level [ADU]")
    h["MAGZERO"] = (meta.zero_point, "mag of a source giving 1 ADU in total")
    h["AIRMASS"] = (meta.airmass, "airmass")
    h["TIMESYS"] = ("UTC", "time scale")
    h["MJD-OBS"] = (conditions.mjd, "start of exposure [MJD]")
    if meta.time is not None:
        h["DATE-OBS"] = (meta.time.utc.isot, "start of exposure (UTC)")
    h["SIMEPOCH"] = (epoch, "simulated epoch index")
    h["SIMFWHM"] = (conditions.fwhm, "simulated seeing FWHM at centre [arcsec]")
    h["SIMSKY"] = (sky_level, "simulated sky at centre [ADU/pix]")
    h["SIMTRANS"] = (conditions.transparency, "simulated transparency")
    h["SIMDX"] = (conditions.dx, "simulated pointing offset x [pix]")
    h["SIMDY"] = (conditions.dy, "simulated pointing offset y [pix]")
    h["SIMROT"] = (conditions.rotation, "simulated rotation [deg]")
    return h


def _transient_truth(
    rows: list[tuple[int, TransientSpec, float, float]],
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    variance: NDArray[np.float32],
    psf: _PsfField,
    epoch: int,
    mjd: float,
    zero_point: float,
    shape: tuple[int, int],
) -> Table:
    on = _in_image(x, y, shape) if len(rows) else np.zeros(0, bool)
    keep = [i for i in range(len(rows)) if on[i]]
    xs, ys = x[keep], y[keep]
    flux = np.array([rows[i][2] for i in keep], np.float64)
    snr = np.zeros(len(keep), np.float64)
    if keep:
        r = psf.radius
        ix = np.rint(xs).astype(np.int64)
        iy = np.rint(ys).astype(np.int64)
        qxx, qxy, qyy = psf.quadratic(xs, ys)
        stamps = _profile_stamps(
            psf, (xs - ix).astype(np.float32), (ys - iy).astype(np.float32), qxx, qxy, qyy, r
        )
        for k in range(len(keep)):
            p, v = _cutout_pair(stamps[k], variance, int(ix[k]), int(iy[k]))
            good = np.isfinite(v) & (v > 0)
            snr[k] = flux[k] * math.sqrt(float(np.sum(p[good].astype(np.float64) ** 2 / v[good])))
    table = Table(
        {
            "id": np.array([rows[i][0] for i in keep], np.int64),
            "epoch": np.full(len(keep), epoch, np.int64),
            "kind": np.array([rows[i][1].kind for i in keep], dtype="U10"),
            "x": xs,
            "y": ys,
            "ra": np.array([rows[i][1].ra for i in keep], np.float64),
            "dec": np.array([rows[i][1].dec for i in keep], np.float64),
            "mjd": np.full(len(keep), mjd, np.float64),
            "mag": zero_point - 2.5 * np.log10(flux) if keep else np.zeros(0),
            "flux": flux,
            "base_flux": np.array([rows[i][3] for i in keep], np.float64),
            "snr": snr,
            "host_galaxy": np.array([rows[i][1].host_galaxy for i in keep], np.int64),
            "host_star": np.array([rows[i][1].host_star for i in keep], np.int64),
        }
    )
    _describe(table, _TRANSIENT_DOCS)
    return table


def _stack_transient_tables(tables: Sequence[Table]) -> Table:
    nonempty = [t for t in tables if len(t)]
    if not nonempty:
        return tables[0][:0].copy() if tables else Table()
    out = vstack(nonempty, join_type="exact", metadata_conflicts="silent")
    _describe(out, _TRANSIENT_DOCS)
    return out


def _cutout_pair(
    stamp: NDArray[np.float32], image: NDArray[np.float32], ix: int, iy: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The parts of ``stamp`` (centred on pixel ``(iy, ix)``) and ``image`` that overlap."""
    ny, nx = image.shape
    h = stamp.shape[0] // 2
    x0, x1 = max(ix - h, 0), min(ix + h + 1, nx)
    y0, y1 = max(iy - h, 0), min(iy + h + 1, ny)
    if x0 >= x1 or y0 >= y1:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    s = stamp[y0 - (iy - h) : y1 - (iy - h), x0 - (ix - h) : x1 - (ix - h)]
    return s, image[y0:y1, x0:x1]


# --------------------------------------------------------------------------------------
# conditions, transients, survey


def random_conditions(
    n_epochs: int,
    *,
    seed: int,
    start_mjd: float = 60000.0,
    cadence: float = 3.0,
    fwhm_range: tuple[float, float] = (0.8, 2.0),
    max_offset: float = 3.0,
    max_rotation: float = 0.05,
) -> list[EpochConditions]:
    """Draw plausible, varied observing conditions for a sequence of epochs.

    Parameters
    ----------
    n_epochs : int
        Number of epochs.
    seed : int
        Seed; the same seed gives the same conditions.
    start_mjd : float
        Time of the first epoch (MJD).
    cadence : float
        Days between epochs (each time is jittered by up to ±0.2 d).
    fwhm_range : tuple of float
        Seeing FWHM range, arcsec (uniform).
    max_offset : float
        Largest pointing offset along each axis, pixels (uniform in ±max_offset).
    max_rotation : float
        Largest rotation, degrees (uniform in ±max_rotation).

    Returns
    -------
    list of EpochConditions
        Sky brightness 20–21.5 mag/arcsec², exposure time 30–120 s, transparency
        0.6–1, airmass 1–1.8, in time order.
    """
    if n_epochs < 0:
        raise ValueError(f"n_epochs must not be negative, got {n_epochs}")
    rng = _rng(seed, _KEY_CONDITIONS)
    out = []
    for i in range(n_epochs):
        out.append(
            EpochConditions(
                fwhm=float(rng.uniform(*fwhm_range)),
                sky_brightness=float(rng.uniform(20.0, 21.5)),
                exposure_time=float(rng.choice([30.0, 60.0, 90.0, 120.0])),
                transparency=float(rng.uniform(0.6, 1.0)),
                dx=float(rng.uniform(-max_offset, max_offset)),
                dy=float(rng.uniform(-max_offset, max_offset)),
                rotation=float(rng.uniform(-max_rotation, max_rotation)),
                mjd=float(start_mjd + i * cadence + rng.uniform(-0.2, 0.2)),
                airmass=float(rng.uniform(1.0, 1.8)),
            )
        )
    return out


def random_transients(
    field: SimulatedField,
    mjds: Sequence[float],
    n: int,
    *,
    seed: int,
    kinds: Sequence[TransientKind] = _TRANSIENT_KINDS,
    mag_range: tuple[float, float] = (18.0, 21.5),
    host_fraction: float = 0.5,
    edge: int = 32,
) -> list[TransientSpec]:
    """Draw transients for a field observed at times ``mjds``.

    The ``i``-th transient has kind ``kinds[i % len(kinds)]``. Appearing sources appear,
    and supernovae explode, after the first epoch (so the first epoch can serve as a
    reference) and before the last; a variable takes over a field star with a magnitude
    in ``mag_range`` when there is one. Appearing sources and supernovae sit on a galaxy
    (within 1.5 half-light radii of its centre) with probability ``host_fraction``.

    Parameters
    ----------
    field : SimulatedField
        The field (hosts are drawn from its stars and galaxies).
    mjds : sequence of float
        Epoch times (MJD).
    n : int
        Number of transients.
    seed : int
        Seed; the same seed gives the same transients.
    kinds : sequence of {"appearing", "supernova", "variable"}
        Kinds, assigned in turn.
    mag_range : tuple of float
        Range of the constant, peak or mean magnitude (uniform).
    host_fraction : float
        Probability that an appearing source or supernova is placed on a galaxy.
    edge : int
        Minimum distance from the detector edge on the reference grid, pixels.

    Returns
    -------
    list of TransientSpec
    """
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    if n and not kinds:
        raise ValueError("kinds must not be empty")
    rng = _rng(seed, _KEY_TRANSIENTS)
    ny, nx = field.config.shape
    edge = int(min(edge, (min(nx, ny) - 1) // 4))
    times = np.sort(np.asarray(mjds, np.float64)) if len(mjds) else np.array([60000.0])
    first, last = float(times[0]), float(times[-1])

    def inside(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.bool_]:
        return (x >= edge) & (x <= nx - 1 - edge) & (y >= edge) & (y <= ny - 1 - edge)

    gal = field.galaxies
    hosts = np.flatnonzero(inside(np.asarray(gal["x"]), np.asarray(gal["y"])))
    stars = field.stars
    smag = np.asarray(stars["mag"])
    star_pool = list(
        np.flatnonzero(
            inside(np.asarray(stars["x"]), np.asarray(stars["y"]))
            & (smag >= mag_range[0])
            & (smag <= mag_range[1])
        )
    )
    rng.shuffle(star_pool)
    specs: list[TransientSpec] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        mag = float(rng.uniform(*mag_range))
        host_galaxy = -1
        host_star = -1
        x = float(rng.uniform(edge, nx - 1 - edge))
        y = float(rng.uniform(edge, ny - 1 - edge))
        if kind == "variable" and star_pool:
            host_star = int(star_pool.pop())
            x, y = float(stars["x"][host_star]), float(stars["y"][host_star])
            mag = float(smag[host_star])
        elif kind != "variable" and len(hosts) and rng.random() < host_fraction:
            g = int(rng.choice(hosts))
            host_galaxy = int(gal["id"][g])
            rad = float(gal["r_eff"][g]) / field.config.pixel_scale * 1.5 * math.sqrt(rng.random())
            ang = rng.uniform(0.0, 2.0 * math.pi)
            x = float(np.clip(gal["x"][g] + rad * math.cos(ang), edge, nx - 1 - edge))
            y = float(np.clip(gal["y"][g] + rad * math.sin(ang), edge, ny - 1 - edge))
        ra, dec = field.wcs.pixel_to_world_values(x, y)
        if kind == "appearing":
            t0 = float(rng.uniform(first, last)) if last > first else first - 1.0
            t0 = max(t0, first + 1e-3) if last > first else t0
            spec = TransientSpec(kind, float(ra), float(dec), mag, t0=t0, host_galaxy=host_galaxy)
        elif kind == "supernova":
            t0 = (
                float(rng.uniform(first, first + 0.5 * (last - first)))
                if last > first
                else first - 5.0
            )
            t0 = max(t0, first + 1e-3) if last > first else t0
            spec = TransientSpec(
                kind,
                float(ra),
                float(dec),
                mag,
                t0=t0,
                rise_time=float(rng.uniform(10.0, 20.0)),
                decline_rate=float(rng.uniform(0.01, 0.05)),
                host_galaxy=host_galaxy,
            )
        else:
            spec = TransientSpec(
                kind,
                float(ra),
                float(dec),
                mag,
                t0=float(first - rng.uniform(0.0, 10.0)),
                period=float(np.exp(rng.uniform(math.log(0.3), math.log(10.0)))),
                amplitude=float(rng.uniform(0.2, 0.8)),
                host_star=host_star,
            )
        specs.append(spec)
    return specs


def simulate_survey(
    config: FieldConfig,
    *,
    seed: int,
    n_epochs: int | None = None,
    n_transients: int = 0,
    conditions: Sequence[EpochConditions] | None = None,
    transients: Sequence[TransientSpec] = (),
    transient_kinds: Sequence[TransientKind] = _TRANSIENT_KINDS,
    transient_mag_range: tuple[float, float] = (18.0, 21.5),
    host_fraction: float = 0.5,
) -> SimulatedSurvey:
    """Simulate a field observed at several epochs, with transients and their truth.

    Parameters
    ----------
    config : FieldConfig
        Field and detector.
    seed : int
        Seed of everything; the same seed and arguments give identical output. The
        field is ``simulate_field(config, seed=seed)``; each epoch has its own derived
        seed (``epoch_table["seed"]``), so one epoch can be re-rendered alone with
        :func:`simulate_exposure`.
    n_epochs : int or None
        Number of epochs; ``None`` takes ``len(conditions)``, or 2 without conditions.
    n_transients : int
        Random transients drawn with :func:`random_transients`, added after the
        explicit ``transients``.
    conditions : sequence of EpochConditions or None
        Conditions of each epoch; ``None`` draws them with :func:`random_conditions`.
    transients : sequence of TransientSpec
        Explicit transients; they take the first ids.
    transient_kinds : sequence of {"appearing", "supernova", "variable"}
        Kinds of the random transients, assigned in turn.
    transient_mag_range : tuple of float
        Magnitude range of the random transients.
    host_fraction : float
        Probability that a random appearing source or supernova sits on a galaxy.

    Returns
    -------
    SimulatedSurvey
        Exposures, true PSFs, and truth tables of stars, galaxies, transients and
        cosmic rays.
    """
    if conditions is not None:
        if n_epochs is not None and n_epochs != len(conditions):
            raise ValueError(f"n_epochs={n_epochs} but {len(conditions)} conditions were given")
        conds = list(conditions)
    else:
        conds = random_conditions(2 if n_epochs is None else n_epochs, seed=seed)
    field_ = simulate_field(config, seed=seed)
    specs = list(transients)
    specs += random_transients(
        field_,
        [c.mjd for c in conds],
        n_transients,
        seed=seed,
        kinds=transient_kinds,
        mag_range=transient_mag_range,
        host_fraction=host_fraction,
    )
    epochs = tuple(
        simulate_exposure(
            field_, c, seed=_derived_seed(seed, _KEY_EPOCH, i), transients=specs, epoch=i
        )
        for i, c in enumerate(conds)
    )
    return SimulatedSurvey(field=field_, epochs=epochs, transient_specs=tuple(specs))


# --------------------------------------------------------------------------------------
# injection into existing images


def _shifted_stamp(psf: PsfModel, x: float, y: float) -> tuple[NDArray[np.float32], int, int]:
    """The PSF at ``(x, y)``, shifted by its sub-pixel offset (cubic spline), unit sum,
    with the pixel ``(ix, iy)`` it is centred on."""
    ix, iy = round(x), round(y)
    stamp = psf.at(x, y).astype(np.float64)
    fx, fy = x - ix, y - iy
    if fx or fy:
        shifted = ndimage.shift(stamp, (fy, fx), order=3, mode="constant", cval=0.0)
        total = shifted.sum()
        stamp = shifted * (stamp.sum() / total) if total > 0 else stamp
    return stamp.astype(np.float32), ix, iy


def _as_points(
    x: NDArray[np.floating] | Sequence[float] | float,
    y: NDArray[np.floating] | Sequence[float] | float,
    flux: NDArray[np.floating] | Sequence[float] | float | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    xa = np.atleast_1d(np.asarray(x, np.float64))
    ya = np.atleast_1d(np.asarray(y, np.float64))
    fa = np.atleast_1d(np.asarray(1.0 if flux is None else flux, np.float64))
    xa, ya, fa = np.broadcast_arrays(xa, ya, fa)
    if xa.ndim != 1:
        raise ValueError("x, y and flux must be scalars or 1-D arrays")
    return xa, ya, fa


def render_point_sources(
    shape: tuple[int, int],
    x: NDArray[np.floating] | Sequence[float] | float,
    y: NDArray[np.floating] | Sequence[float] | float,
    flux: NDArray[np.floating] | Sequence[float] | float,
    psf: PsfModel,
) -> NDArray[np.float32]:
    """Noise-free image of point sources drawn with a PSF model.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)``.
    x, y : float or ndarray, shape (n,)
        0-based pixel positions.
    flux : float or ndarray, shape (n,)
        Total flux of each source (data units); the PSF stamp at each position sums to 1.
    psf : PsfModel
        PSF; its stamp at each position (``psf.at``) is shifted to the sub-pixel
        position with cubic-spline interpolation.

    Returns
    -------
    ndarray, shape (ny, nx), float32
        The sources alone (parts falling outside the image are dropped).
    """
    ny, nx = int(shape[0]), int(shape[1])
    xa, ya, fa = _as_points(x, y, flux)
    image = np.zeros((ny, nx), np.float32)
    for xi, yi, fi in zip(xa, ya, fa, strict=True):
        stamp, ix, iy = _shifted_stamp(psf, float(xi), float(yi))
        h = stamp.shape[0] // 2
        x0, x1 = max(ix - h, 0), min(ix + h + 1, nx)
        y0, y1 = max(iy - h, 0), min(iy + h + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        image[y0:y1, x0:x1] += (
            np.float32(fi) * stamp[y0 - (iy - h) : y1 - (iy - h), x0 - (ix - h) : x1 - (ix - h)]
        )
    return image


def add_point_sources(
    data: NDArray[np.floating],
    x: NDArray[np.floating] | Sequence[float] | float,
    y: NDArray[np.floating] | Sequence[float] | float,
    flux: NDArray[np.floating] | Sequence[float] | float,
    psf: PsfModel,
    *,
    gain: float | None = None,
    seed: int | None = None,
) -> NDArray[np.float32]:
    """A copy of ``data`` with PSF-shaped point sources added (injection).

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Image (ADU); not modified.
    x, y : float or ndarray, shape (n,)
        0-based pixel positions.
    flux : float or ndarray, shape (n,)
        Total flux of each source, ADU.
    psf : PsfModel
        PSF to draw them with (see :func:`render_point_sources`).
    gain : float or None
        Electrons per ADU. When given, the sources' own Poisson noise is added; ``None``
        adds them noise-free. To keep a variance plane consistent, add
        ``render_point_sources(...) / gain`` to it.
    seed : int or None
        Seed of the Poisson noise; required when ``gain`` is given.

    Returns
    -------
    ndarray, shape (ny, nx), float32
        ``data`` plus the sources.
    """
    arr = np.asarray(data, np.float32)
    if arr.ndim != 2:
        raise ValueError(f"data must be 2-D, got shape {arr.shape}")
    model = render_point_sources((arr.shape[0], arr.shape[1]), x, y, flux, psf)
    out = arr + model
    if gain is not None:
        if seed is None:
            raise ValueError("seed is required to draw Poisson noise (gain given)")
        if not gain > 0:
            raise ValueError(f"gain must be positive, got {gain}")
        rng = np.random.default_rng(seed)
        lam = np.clip(model.astype(np.float64), 0.0, None) * gain
        hit = lam > 0
        out[hit] += ((rng.poisson(lam[hit]) - lam[hit]) / gain).astype(np.float32)
    return out


def point_source_snr(
    variance: NDArray[np.floating],
    x: NDArray[np.floating] | Sequence[float] | float,
    y: NDArray[np.floating] | Sequence[float] | float,
    flux: NDArray[np.floating] | Sequence[float] | float,
    psf: PsfModel,
) -> NDArray[np.float64]:
    """Ideal PSF-fit signal-to-noise of point sources.

    The S/N of the inverse-variance weighted PSF fit with known PSF and background,
    ``flux * sqrt(sum(P**2 / variance))``, summed over the stamp pixels on the image
    with finite, positive variance; ``P`` is the PSF at the position (unit sum).

    Parameters
    ----------
    variance : ndarray, shape (ny, nx)
        Per-pixel variance, data units squared (it should include the sources' own
        Poisson noise for a faithful S/N of bright sources).
    x, y : float or ndarray, shape (n,)
        0-based pixel positions.
    flux : float or ndarray, shape (n,)
        Total flux, data units.
    psf : PsfModel
        PSF (see :func:`render_point_sources`).

    Returns
    -------
    ndarray, shape (n,), float64
        S/N of each source (0 when no pixel of its stamp is on the image).
    """
    var = np.asarray(variance, np.float32)
    xa, ya, fa = _as_points(x, y, flux)
    out = np.zeros(len(xa), np.float64)
    for k, (xi, yi, fi) in enumerate(zip(xa, ya, fa, strict=True)):
        stamp, ix, iy = _shifted_stamp(psf, float(xi), float(yi))
        p, v = _cutout_pair(stamp, var, ix, iy)
        good = np.isfinite(v) & (v > 0)
        out[k] = fi * math.sqrt(float(np.sum(p[good].astype(np.float64) ** 2 / v[good])))
    return out
