"""Read and write exposures as FITS.

Reading accepts what observatories ship: a single-HDU image, multi-extension files
(one exposure per image extension, with ``VAR``/``VARIANCE`` and ``DQ``/``MASK`` planes
used when present), and NOIRLab Community Pipeline triplets where ``*_ooi_*`` (image)
sits beside ``*_ood_*`` (data-quality) and ``*_oow_*`` (inverse variance).

Writing produces a self-describing multi-extension file: the primary HDU carries the
original header; ``SCI``, ``VARIANCE`` and ``MASK`` extensions hold the planes
(``MASK`` documents its bits as ``MP_*`` cards); ``PSF``, ``PSFGRID`` and ``PSFFWHM``
hold the PSF model; ``PROVENANCE`` is a key/value table.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning
from numpy.typing import NDArray

from astrid import __version__
from astrid.errors import CorruptFitsFile
from astrid.exposure import Exposure, ExposureMeta, MaskBit, check_image, robust_sigma
from astrid.science.psf_model import PsfModel

__all__ = [
    "KEYWORDS",
    "file_sha256",
    "meta_from_header",
    "read_exposure",
    "read_exposures",
    "wcs_from_header",
    "write_exposure",
]

#: Header keywords searched, in order, for each metadata attribute.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "time": ("DATE-OBS", "MJD-OBS", "DATE-BEG", "MJD-BEG"),
    "band": ("FILTER", "BAND", "FILTNAME", "FILTER1"),
    "exposure_time": ("EXPTIME", "EXPOSURE", "ITIME", "EXPTIM"),
    "gain": ("GAIN", "EGAIN", "GAINA", "CCDGAIN", "ARAWGAIN"),
    "read_noise": ("RDNOISE", "READNOIS", "RON", "RDNOISEA", "READNOISE"),
    "saturation": ("SATURATE", "SATURATA", "SATLEVEL", "MAXLIN"),
    "zero_point": ("MAGZERO", "MAGZPT", "ZEROPT", "MAGZP", "ZP"),
    "airmass": ("AIRMASS", "SECZ", "AMSTART"),
    "instrument": ("INSTRUME", "DETECTOR"),
    "telescope": ("TELESCOP", "OBSERVAT"),
    "object_name": ("OBJECT",),
}

#: NOIRLab Community Pipeline data-quality codes (values, not bits) to AstrID flags.
_CP_DQ_CODES: dict[int, MaskBit] = {
    1: MaskBit.BAD,
    2: MaskBit.NO_DATA,
    3: MaskBit.SATURATED,
    4: MaskBit.SATURATED,  # bleed trail
    5: MaskBit.COSMIC_RAY,
    6: MaskBit.BAD,
    7: MaskBit.BAD,
    8: MaskBit.BAD,
}

_VARIANCE_NAMES = ("VAR", "VARIANCE")
_MASK_NAMES = ("DQ", "MASK", "BPM")
_FORMAT_KEY = "AST_FMT"
_FORMAT = "astrid-exposure-1"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open(path: str | Path) -> fits.HDUList:
    p = Path(path)
    if not p.is_file():
        raise CorruptFitsFile(str(path), "no such file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(p, memmap=False, lazy_load_hdus=False)
            for hdu in hdul:
                _ = hdu.data  # force the read so truncation shows here
        for w in caught:
            if "truncat" in str(w.message).lower():
                hdul.close()
                raise CorruptFitsFile(str(path), str(w.message))
    except CorruptFitsFile:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise CorruptFitsFile(str(path), f"{type(exc).__name__}: {exc}") from exc
    return hdul


def _is_image(hdu: Any) -> bool:
    return (
        isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)
        and hdu.data is not None
        and hdu.data.ndim >= 2
    )


def _first(header: fits.Header, keys: Iterable[str]) -> Any:
    for k in keys:
        if k in header and header[k] not in (None, "", "UNKNOWN"):
            return header[k]
    return None


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _parse_time(header: fits.Header) -> Time | None:
    scale = str(header.get("TIMESYS", "UTC")).strip().lower()
    if scale not in Time.SCALES:
        scale = "utc"
    for key in ("DATE-OBS", "DATE-BEG"):
        v = header.get(key)
        if isinstance(v, str) and v.strip():
            s = v.strip()
            if "T" not in s and isinstance(header.get("TIME-OBS") or header.get("UT"), str):
                s = f"{s}T{(header.get('TIME-OBS') or header.get('UT')).strip()}"
            try:
                return Time(s, format="isot" if "T" in s else "iso", scale=scale)
            except ValueError:
                try:
                    return Time(s, scale=scale)
                except ValueError:
                    continue
    for key in ("MJD-OBS", "MJD-BEG"):
        f = _float(header.get(key))
        if f is not None:
            return Time(f, format="mjd", scale=scale)
    return None


def meta_from_header(header: fits.Header) -> ExposureMeta:
    """Extract :class:`ExposureMeta` from a header, recording what was not found."""
    values: dict[str, Any] = {}
    missing: dict[str, tuple[str, ...]] = {}
    for name, keys in KEYWORDS.items():
        if name == "time":
            v: Any = _parse_time(header)
        elif name in ("band", "instrument", "telescope", "object_name"):
            raw = _first(header, keys)
            v = str(raw).strip() or None if raw is not None else None
            if name == "band" and v:
                v = v.split()[0]  # "z DECam SDSS c0004 ..." -> "z"
        else:
            v = _float(_first(header, keys))
        values[name] = v
        if v is None:
            missing[name] = keys
    return ExposureMeta(**values, missing=missing)


def wcs_from_header(header: fits.Header) -> tuple[WCS | None, str]:
    """Celestial WCS from a header, or ``None`` with the reason it is unusable."""
    if not any(str(header.get(f"CTYPE{i}", "")).strip() for i in (1, 2)):
        return None, "no CTYPE1/CTYPE2 keywords"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(header, naxis=2)
    except Exception as exc:  # astropy raises many types for malformed WCS
        return None, f"unparsable WCS ({type(exc).__name__}: {exc})"
    if not w.has_celestial:
        return None, f"CTYPEs {tuple(w.wcs.ctype)} are not celestial"
    return w.celestial, ""


def _cp_sibling(path: Path, kind: str) -> Path | None:
    if "_ooi_" not in path.name:
        return None
    p = path.with_name(path.name.replace("_ooi_", f"_{kind}_"))
    return p if p.is_file() else None


def _default_variance(data: NDArray[np.float32], gain: float | None) -> NDArray[np.float32]:
    """Sky noise (robust) plus source Poisson noise above the median when the gain is known."""
    finite = np.isfinite(data)
    sigma = robust_sigma(data[finite])
    var = np.full(data.shape, sigma**2, np.float32)
    if gain is not None and gain > 0:
        med = float(np.median(data[finite]))
        excess = np.where(finite, np.clip(data - med, 0.0, None), 0.0)
        var += (excess / gain).astype(np.float32)
    return var


def _mask_from_cp_dq(dq: NDArray[np.integer]) -> NDArray[np.uint16]:
    out = np.zeros(dq.shape, np.uint16)
    for code, bit in _CP_DQ_CODES.items():
        out[dq == code] |= np.uint16(bit)
    out[(dq > 8)] |= np.uint16(MaskBit.BAD)
    return out


def read_exposures(path: str | Path) -> list[Exposure]:
    """Read every image extension of a file as an exposure.

    Variance and mask extensions (``VAR``, ``VARIANCE``, ``DQ``, ``MASK``) are attached to
    the science plane rather than returned on their own. An AstrID-written file yields one
    exposure.
    """
    hdul = _open(path)
    with hdul:
        if hdul[0].header.get(_FORMAT_KEY) == _FORMAT:
            return [_read_own(Path(path), hdul)]
        indices = [
            i
            for i, h in enumerate(hdul)
            if _is_image(h)
            and str(h.name).upper() not in _VARIANCE_NAMES + _MASK_NAMES
            and str(h.name).upper() not in ("SKYFIT", "PSF")
        ]
        if not indices:
            raise CorruptFitsFile(str(path), "no image data in any HDU")
        return [_read_foreign(Path(path), hdul, i) for i in indices]


def read_exposure(path: str | Path, *, hdu: int | str | None = None) -> Exposure:
    """Read one exposure from a FITS file.

    Parameters
    ----------
    path : str or Path
        The image file. For a Community Pipeline ``*_ooi_*`` file the matching
        ``*_ood_*`` mask and ``*_oow_*`` weight are read when they sit beside it.
    hdu : int, str or None
        Which HDU holds the image; ``None`` takes the first image HDU.

    Returns
    -------
    Exposure
        With variance from a variance/weight plane when present, otherwise estimated
        (robust sky noise plus Poisson noise of sources when the gain is known); mask
        with non-finite pixels ``NO_DATA`` and pixels at or above ``SATURATE``
        flagged ``SATURATED``.

    Raises
    ------
    CorruptFitsFile
        Unreadable, truncated, or without image data.
    BadImageShape, EmptyImage
        Image not 2-D or with no finite pixel.
    """
    p = Path(path)
    if hdu is None:
        return read_exposures(p)[0]
    hdul = _open(p)
    with hdul:
        try:
            index = hdul.index_of(hdu)
        except (KeyError, IndexError) as exc:
            raise CorruptFitsFile(str(p), f"no HDU {hdu!r}") from exc
        if not _is_image(hdul[index]):
            raise CorruptFitsFile(str(p), f"HDU {hdu!r} holds no image")
        if hdul[0].header.get(_FORMAT_KEY) == _FORMAT:
            return _read_own(p, hdul)
        return _read_foreign(p, hdul, index)


def _merged_header(hdul: fits.HDUList, index: int) -> fits.Header:
    header = hdul[0].header.copy() if index != 0 else fits.Header()
    for k in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "NEXTEND"):
        header.remove(k, ignore_missing=True, remove_all=True)
    for card in hdul[index].header.cards:
        if card.keyword in ("COMMENT", "HISTORY", ""):
            continue
        try:
            header[card.keyword] = (card.value, card.comment)
        except (ValueError, KeyError, fits.VerifyError):
            continue  # non-standard cards (e.g. ESO-LOG lines) are not carried over
    return header


def _read_foreign(path: Path, hdul: fits.HDUList, index: int) -> Exposure:
    hdu = hdul[index]
    raw = np.asarray(hdu.data)
    if raw.ndim > 2:
        squeezed = np.squeeze(raw)
        raw = squeezed
    data = check_image(raw, f"HDU {index} of {path.name}")
    header = _merged_header(hdul, index)
    meta = meta_from_header(header)
    wcs, why = wcs_from_header(header)
    if wcs is None:
        missing = dict(meta.missing)
        missing["wcs"] = (f"CTYPE1/CTYPE2/CRVAL/CRPIX/CD: {why}",)
        meta = ExposureMeta(**{**meta.__dict__, "missing": missing})

    mask = np.zeros(data.shape, np.uint16)
    variance: NDArray[np.float32] | None = None
    ext_names = [str(h.name).upper() for h in hdul]
    ver = hdu.ver if hasattr(hdu, "ver") else 1
    for name in _VARIANCE_NAMES:
        if name in ext_names:
            v = _matching_plane(hdul, name, ver, data.shape)
            if v is not None:
                variance = v.astype(np.float32)
                break
    for name in _MASK_NAMES:
        if name in ext_names:
            m = _matching_plane(hdul, name, ver, data.shape)
            if m is not None:
                mask |= np.where(m != 0, np.uint16(MaskBit.BAD), np.uint16(0)).astype(np.uint16)
                break

    sources = {"image": file_sha256(path)}
    dq_path = _cp_sibling(path, "ood")
    if dq_path is not None:
        with fits.open(dq_path, memmap=False) as dq_hdul:
            dq = np.asarray(dq_hdul[index].data)
        if dq.shape == data.shape:
            mask |= _mask_from_cp_dq(dq)
            sources["dq"] = file_sha256(dq_path)
    wt_path = _cp_sibling(path, "oow")
    if wt_path is not None and variance is None:
        with fits.open(wt_path, memmap=False) as wt_hdul:
            w = np.asarray(wt_hdul[index].data, dtype=np.float64)
        if w.shape == data.shape:
            positive = np.isfinite(w) & (w > 0)
            variance = np.where(positive, 1.0 / np.where(positive, w, 1.0), np.inf).astype(
                np.float32
            )
            mask |= np.where(positive, np.uint16(0), np.uint16(MaskBit.NO_DATA)).astype(np.uint16)
            sources["weight"] = file_sha256(wt_path)

    finite = np.isfinite(data)
    mask |= np.where(finite, np.uint16(0), np.uint16(MaskBit.NO_DATA)).astype(np.uint16)
    if meta.saturation is not None:
        with np.errstate(invalid="ignore"):
            sat = finite & (data >= meta.saturation)
        mask |= np.where(sat, np.uint16(MaskBit.SATURATED), np.uint16(0)).astype(np.uint16)
    if variance is None:
        variance = _default_variance(data, meta.gain)
        variance_source = "estimated"
    else:
        variance_source = "file"
    bad_var = ~np.isfinite(variance) | (variance <= 0)
    if bad_var.any():
        mask |= np.where(bad_var, np.uint16(MaskBit.NO_DATA), np.uint16(0)).astype(np.uint16)
        variance = np.where(bad_var, np.inf, variance).astype(np.float32)

    provenance = {f"input_{k}_sha256": v for k, v in sources.items()}
    provenance["input_path"] = path.name
    provenance["input_hdu"] = str(index)
    provenance["variance_source"] = variance_source
    return Exposure(
        data=data,
        variance=variance,
        mask=mask,
        wcs=wcs,
        meta=meta,
        header=header,
        provenance=provenance,
    )


def _matching_plane(
    hdul: fits.HDUList, name: str, ver: int, shape: tuple[int, ...]
) -> NDArray[Any] | None:
    try:
        h = hdul[name, ver]
    except KeyError:
        try:
            h = hdul[name]
        except KeyError:
            return None
    arr = np.asarray(h.data) if h.data is not None else None
    return arr if arr is not None and arr.shape == shape else None


def _read_own(path: Path, hdul: fits.HDUList) -> Exposure:
    missing = [name for name in ("SCI", "VARIANCE", "MASK") if name not in hdul]
    if missing:
        raise CorruptFitsFile(
            str(path),
            f"an AstrID exposure file without its {', '.join(missing)} extension(s) "
            "(truncated or damaged)",
        )
    sci = hdul["SCI"]
    data = check_image(np.asarray(sci.data), f"SCI of {path.name}")
    variance = np.asarray(hdul["VARIANCE"].data, np.float32)
    mask = np.asarray(hdul["MASK"].data, np.uint16)
    header = _merged_header(hdul, hdul.index_of("SCI"))
    for k in list(header.keys()):
        if k.startswith("AST_") or k.startswith("MP_"):
            header.remove(k, ignore_missing=True, remove_all=True)
    meta = meta_from_header(header)
    wcs, _ = wcs_from_header(sci.header)
    psf = None
    if "PSF" in hdul:
        ph = hdul["PSF"]
        stamps = np.asarray(ph.data, np.float32)
        grid = hdul["PSFGRID"].data
        fwhm_grid = np.asarray(hdul["PSFFWHM"].data, np.float64)
        psf = PsfModel(
            stamps=stamps,
            grid_x=np.asarray(grid["x"][: stamps.shape[1]], np.float64),
            grid_y=np.asarray(grid["y"][: stamps.shape[0]], np.float64),
            fwhm=float(ph.header["FWHM"]),
            fwhm_grid=fwhm_grid,
            n_stars=int(ph.header.get("NSTARS", 0)),
        )
    provenance: dict[str, str] = {}
    if "PROVENANCE" in hdul:
        table = hdul["PROVENANCE"].data
        provenance = {str(k): str(v) for k, v in zip(table["key"], table["value"], strict=True)}
    provenance.setdefault("input_path", path.name)
    return Exposure(
        data=data,
        variance=variance,
        mask=mask,
        wcs=wcs,
        psf=psf,
        meta=meta,
        header=header,
        provenance=provenance,
    )


def write_exposure(exposure: Exposure, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an exposure as a multi-extension FITS file.

    The primary header keeps the exposure's original header cards (without structural
    and WCS keywords, which live on ``SCI``) and the AstrID version; provenance goes to
    a ``PROVENANCE`` table of key/value strings.

    Returns
    -------
    Path
        The written path.
    """
    p = Path(path)
    primary = fits.PrimaryHDU()
    skip = {
        "SIMPLE",
        "BITPIX",
        "NAXIS",
        "NAXIS1",
        "NAXIS2",
        "EXTEND",
        "BZERO",
        "BSCALE",
        "BLANK",
        "XTENSION",
        "PCOUNT",
        "GCOUNT",
        "EXTNAME",
        "CHECKSUM",
        "DATASUM",
    }
    wcs_keys = set(exposure.wcs.to_header(relax=True).keys()) if exposure.wcs else set()
    for card in exposure.header.cards:
        if card.keyword in skip or card.keyword in wcs_keys or card.keyword.startswith("PV"):
            continue
        try:
            primary.header.append(card, end=True)
        except (ValueError, fits.VerifyError):
            continue
    primary.header[_FORMAT_KEY] = (_FORMAT, "AstrID exposure file layout")
    primary.header["AST_VER"] = (__version__, "AstrID version that wrote this file")
    if exposure.meta.time is not None and "DATE-OBS" not in primary.header:
        primary.header["DATE-OBS"] = exposure.meta.time.utc.isot
    sci_header = exposure.wcs.to_header(relax=True) if exposure.wcs is not None else fits.Header()
    sci = fits.ImageHDU(exposure.data.astype(np.float32), header=sci_header, name="SCI")
    var = fits.ImageHDU(exposure.variance.astype(np.float32), name="VARIANCE")
    msk = fits.ImageHDU(exposure.mask.astype(np.uint16), name="MASK")
    for key, value, comment in MaskBit.header_cards():
        msk.header[key] = (value, comment)
    items = sorted(exposure.provenance.items())
    prov = fits.BinTableHDU.from_columns(
        [
            fits.Column(
                "key", f"{max([len(k) for k, _ in items] + [1])}A", array=[k for k, _ in items]
            ),
            fits.Column(
                "value",
                f"{max([len(str(v)) for _, v in items] + [1])}A",
                array=[str(v) for _, v in items],
            ),
        ],
        name="PROVENANCE",
    )
    hdus: list[Any] = [primary, sci, var, msk, prov]
    if exposure.psf is not None:
        psf = exposure.psf
        ph = fits.ImageHDU(psf.stamps.astype(np.float32), name="PSF")
        ph.header["FWHM"] = (psf.fwhm, "median PSF FWHM [pix]")
        ph.header["NSTARS"] = (psf.n_stars, "stars used for the model")
        n = max(len(psf.grid_x), len(psf.grid_y))
        gx = np.full(n, np.nan)
        gy = np.full(n, np.nan)
        gx[: len(psf.grid_x)] = psf.grid_x
        gy[: len(psf.grid_y)] = psf.grid_y
        grid = fits.BinTableHDU.from_columns(
            [fits.Column("x", "D", array=gx), fits.Column("y", "D", array=gy)], name="PSFGRID"
        )
        hdus += [ph, grid, fits.ImageHDU(psf.fwhm_grid.astype(np.float64), name="PSFFWHM")]
    p.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(p, overwrite=overwrite, output_verify="silentfix")
    return p
