"""Adapters that run other subtraction codes on an AstrID pair, for the benchmark.

Each peer gets the same aligned science/reference pair (raw images with their sky, the
AstrID mask's unusable pixels as its bad-pixel mask, the header's gain) and returns a
score image (a detection statistic in sigmas) with the seconds its steps took. Files a
peer needs are written to ``workdir``; writing them is not counted.

Peers (the ``bench-peers`` extra installs the Python ones):

* ``stdpipe-zogy``: stdpipe's ZOGY (:func:`stdpipe.subtraction.run_zogy`) on PSFs from
  its PSFEx wrapper (:func:`stdpipe.psf.run_psfex`); needs the ``psfex`` and
  ``source-extractor`` executables (Debian packages of those names). Score: its
  ``S_corr``. Steps: ``psf`` (PSFEx on both images) and ``subtract``.
* ``sfft``: SFFT (Hu et al. 2022), crowded flavour (``Easy_CrowdedPacket``) with the
  NumPy backend; needs the SExtractor executable (as ``sex`` or ``sextractor``: a link
  to Debian's ``source-extractor`` is put on ``PATH`` when only that exists). SFFT
  returns a difference image only; its score is the difference filtered with a
  Gaussian of the science FWHM, divided by the filtered image's background RMS map
  (sep, 64-pixel mesh), as SExtractor would detect on it. Steps: ``subtract`` (the
  whole packet: SExtractor preprocessing, function compilation and the solve).
* ``properimage``: properimage's ZOGY (:func:`properimage.operations.subtract`,
  Gaussian-fitted PSFs, flux ratio and shift fitted). Score: its ``S_corr``. Steps:
  ``setup`` (building both ``SingleImage`` objects: background and source finding) and
  ``subtract`` (the rest, PSF fits included, as properimage does them lazily).

A peer that is not installed, or fails, raises :class:`PeerUnavailable` with the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from astrid.exposure import Exposure

__all__ = ["PEERS", "PeerResult", "PeerUnavailable", "check_peer", "run_peer"]

PEERS = ("stdpipe-zogy", "sfft", "properimage")


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says why."""


@dataclass
class PeerResult:
    """What a peer produced on one pair.

    Attributes
    ----------
    score : ndarray, shape (ny, nx)
        Detection statistic in the peer's own sigma units.
    valid : ndarray of bool, shape (ny, nx)
        Where the peer's output is usable (finite, not masked by it).
    times : dict of str to float
        Seconds per step; ``subtract`` is always present.
    notes : str
        Anything worth reporting (fitted flux ratio, convolved side, ...).
    """

    score: NDArray[np.float32]
    valid: NDArray[np.bool_]
    times: dict[str, float] = field(default_factory=dict)
    notes: str = ""


def _bad_pixels(exposure: Exposure) -> NDArray[np.bool_]:
    from astrid.exposure import UNUSABLE

    return ((exposure.mask & np.uint16(UNUSABLE)) != 0) | ~np.isfinite(exposure.data)


def check_peer(name: str) -> str | None:
    """Why ``name`` cannot run here, or ``None`` when it can."""
    try:
        if name == "stdpipe-zogy":
            import stdpipe.subtraction  # noqa: F401

            missing = [exe for exe in ("psfex",) if shutil.which(exe) is None]
            if shutil.which("source-extractor") is None and shutil.which("sex") is None:
                missing.append("source-extractor")
            if missing:
                return f"stdpipe needs the executables {', '.join(missing)} (Debian packages)"
        elif name == "sfft":
            import sfft.EasyCrowdedPacket  # noqa: F401

            if not any(shutil.which(e) for e in ("sex", "sextractor", "source-extractor")):
                return "sfft needs SExtractor (Debian package source-extractor)"
        elif name == "properimage":
            import properimage.operations  # noqa: F401
        else:
            return f"unknown peer {name!r}"
    except ImportError as exc:
        how = (
            "see docs/benchmarks_subtraction.md, Installing the peers"
            if name == "properimage"
            else "pip install -e '.[bench-peers]'"
        )
        return f"{name} is not installed ({exc}); {how}"
    return None


def run_peer(
    name: str,
    science: Exposure,
    reference: Exposure,
    *,
    workdir: Path,
    fwhm_science: float,
    threads: int = 2,
) -> PeerResult:
    """Run peer ``name`` on an aligned pair.

    Parameters
    ----------
    name : str
        One of :data:`PEERS`.
    science, reference : Exposure
        The pair on one pixel grid, sky not subtracted.
    workdir : Path
        Scratch folder for the files a peer needs.
    fwhm_science : float
        Science PSF FWHM in pixels (for turning a bare difference into a score).
    threads : int
        Threads a peer may use.

    Raises
    ------
    PeerUnavailable
        The peer is not installed, lacks an executable, or failed.
    """
    reason = check_peer(name)
    if reason is not None:
        raise PeerUnavailable(reason)
    runner = {"stdpipe-zogy": _stdpipe_zogy, "sfft": _sfft, "properimage": _properimage}[name]
    try:
        return runner(science, reference, workdir, fwhm_science, threads)
    except PeerUnavailable:
        raise
    except Exception as exc:  # a peer's own failure is reported, not hidden
        raise PeerUnavailable(f"{name} failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------
# stdpipe


def _stdpipe_zogy(
    science: Exposure, reference: Exposure, workdir: Path, fwhm: float, threads: int
) -> PeerResult:
    from stdpipe import psf as stdpipe_psf
    from stdpipe import subtraction

    image = science.data.astype(np.float64)
    template = reference.data.astype(np.float64)
    mask, template_mask = _bad_pixels(science), _bad_pixels(reference)
    gain_n = science.meta.gain or 1.0
    gain_r = reference.meta.gain or 1.0
    sex = shutil.which("source-extractor") or shutil.which("sex")
    times: dict[str, float] = {}
    t = time.perf_counter()
    image_psf, image_obj = stdpipe_psf.run_psfex(
        image, mask=mask, gain=gain_n, get_obj=True, _tmpdir=str(workdir), _sex_exe=sex
    )
    template_psf, template_obj = stdpipe_psf.run_psfex(
        template,
        mask=template_mask,
        gain=gain_r,
        get_obj=True,
        _tmpdir=str(workdir),
        _sex_exe=sex,
    )
    times["psf"] = time.perf_counter() - t
    t = time.perf_counter()
    _, score = subtraction.run_zogy(
        image,
        template,
        mask=mask,
        template_mask=template_mask,
        image_gain=gain_n,
        template_gain=gain_r,
        image_psf=image_psf,
        template_psf=template_psf,
        image_obj=image_obj,
        template_obj=template_obj,
        nthreads=threads,
    )
    times["subtract"] = time.perf_counter() - t
    score = np.asarray(score, np.float32)
    valid = np.isfinite(score) & ~(mask | template_mask)
    return PeerResult(
        score=score,
        valid=valid,
        times=times,
        notes=f"PSFEx FWHM {image_psf['fwhm']:.2f}/{template_psf['fwhm']:.2f} pix",
    )


# --------------------------------------------------------------------------------------
# sfft


def _write_plain_fits(exposure: Exposure, path: Path) -> None:
    """A single-HDU FITS with GAIN and SATURATE, as SExtractor-based tools read."""
    from astropy.io import fits

    header = exposure.wcs.to_header() if exposure.wcs is not None else fits.Header()
    header["GAIN"] = exposure.meta.gain or 1.0
    header["SATURATE"] = exposure.meta.saturation or float(np.nanmax(exposure.data)) + 1.0
    fits.PrimaryHDU(exposure.data.astype(np.float32), header=header).writeto(path, overwrite=True)


@contextlib.contextmanager
def _sextractor_on_path(workdir: Path) -> Iterator[None]:
    """Make ``sex`` callable when only Debian's ``source-extractor`` is installed."""
    old = os.environ.get("PATH", "")
    if shutil.which("sex") is None and shutil.which("sextractor") is None:
        exe = shutil.which("source-extractor")
        if exe is None:
            raise PeerUnavailable("SExtractor executable not found")
        links = workdir / "bin"
        links.mkdir(exist_ok=True)
        (links / "sex").symlink_to(exe)
        os.environ["PATH"] = f"{links}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _score_from_difference(
    difference: NDArray[np.floating], bad: NDArray[np.bool_], fwhm: float
) -> NDArray[np.float32]:
    """Gaussian-filtered difference over its background RMS map (SExtractor-style)."""
    import sep
    from scipy import ndimage

    bad = np.ascontiguousarray(bad)
    d = np.ascontiguousarray(np.where(bad, 0.0, difference), np.float32)
    sigma = fwhm / 2.3548
    filtered = ndimage.gaussian_filter(d, sigma, mode="constant")
    bkg = sep.Background(filtered, mask=bad, bw=64, bh=64)
    return ((filtered - bkg.back()) / bkg.rms()).astype(np.float32)


def _sfft(
    science: Exposure, reference: Exposure, workdir: Path, fwhm: float, threads: int
) -> PeerResult:
    from sfft.EasyCrowdedPacket import Easy_CrowdedPacket

    sci_path, ref_path = workdir / "science.fits", workdir / "reference.fits"
    _write_plain_fits(science, sci_path)
    _write_plain_fits(reference, ref_path)
    bad = _bad_pixels(science) | _bad_pixels(reference)
    log = io.StringIO()
    with _sextractor_on_path(workdir), contextlib.redirect_stdout(log):
        t = time.perf_counter()
        out = Easy_CrowdedPacket.ECP(
            FITS_REF=str(ref_path),
            FITS_SCI=str(sci_path),
            FITS_DIFF=None,
            ForceConv="AUTO",
            PriorBanMask=bad.T,  # sfft's arrays are the FITS data transposed
            BACKEND_4SUBTRACT="Numpy",
            NUM_CPU_THREADS_4SUBTRACT=threads,
            VERBOSE_LEVEL=1,
        )
        elapsed = time.perf_counter() - t
    difference = np.ascontiguousarray(np.asarray(out[0], np.float64).T)
    text = log.getvalue()
    solve = re.search(r"Report: SFFT-SUBTRACTION TAKES \[([\d.]+) s\]", text)
    compile_ = re.search(r"Function Compilations of SFFT-SUBTRACTION TAKES \[([\d.]+) s\]", text)
    side = "REF" if "Reference Image is Convolved" in text else "SCI"
    invalid = bad | ~np.isfinite(difference)
    score = _score_from_difference(difference, invalid, fwhm)
    notes = f"convolved {side}; flux scaling {float(out[3]):.4f}"
    if solve:
        notes += f"; its solve {float(solve.group(1)):.1f} s"
    if compile_:
        notes += f", compilation {float(compile_.group(1)):.1f} s"
    return PeerResult(score=score, valid=~invalid, times={"subtract": elapsed}, notes=notes)


# --------------------------------------------------------------------------------------
# properimage


def _properimage(
    science: Exposure, reference: Exposure, workdir: Path, fwhm: float, threads: int
) -> PeerResult:
    import logging

    from properimage import operations
    from properimage.single_image import SingleImageGaussPSF

    logging.getLogger("properimage").setLevel(logging.WARNING)
    mask_n, mask_r = _bad_pixels(science), _bad_pixels(reference)
    here = Path.cwd()
    os.chdir(workdir)
    try:
        t = time.perf_counter()
        new = SingleImageGaussPSF(
            science.data.astype(np.float64), mask=mask_n, gain=science.meta.gain
        )
        ref = SingleImageGaussPSF(
            reference.data.astype(np.float64), mask=mask_r, gain=reference.meta.gain
        )
        setup = time.perf_counter() - t
        t = time.perf_counter()
        _, _, score, mix_mask = operations.subtract(ref=ref, new=new)
        elapsed = time.perf_counter() - t
    finally:
        os.chdir(here)
    score = np.asarray(score, np.float32)
    valid = np.isfinite(score) & ~np.asarray(mix_mask, bool) & ~(mask_n | mask_r)
    return PeerResult(
        score=score, valid=valid, times={"setup": setup, "subtract": elapsed}, notes=""
    )
