"""Reading ZTF and Rubin alert packets into cutout triplets for a real/bogus classifier.

Public alert streams ship, with every detection, three small stamps centred on it: the
science image, the reference (template) and their difference. This module reads those
packets into :class:`Alert` objects and turns their stamps into a fixed-size, normalised
``(3, size, size)`` triplet with :func:`alert_triplet`. :func:`normalise_triplet` is the one
normalisation used for every classifier input, so that AstrID's own candidate cutouts and
survey alert cutouts reach a model in the same units.

Formats read
------------
- ZTF Avro packets (``ztf.alert`` schemas 2.x/3.x up to 4.02): ``candid``, ``objectId``, a
  ``candidate`` record (``ra``, ``dec``, ``jd``, ``fid``, ``rb``, ``drb`` from schema 3.3
  on) and cutouts ``cutoutScience``, ``cutoutTemplate``, ``cutoutDifference`` whose
  ``stampData`` is a gzipped FITS image.
- ZTF alerts exported as JSON by Kowalski (MongoDB extended JSON): the same fields, with
  ``stampData`` given as ``{"$binary": <base64>}``.
- Rubin/LSST Avro packets (``lsst.v9_0``): ``diaSourceId``, a ``diaSource`` record (``ra``,
  ``dec``, ``midpointMjdTai``, ``band``, ``reliability``, ``diaObjectId``) and cutouts that
  are plain (not gzipped) multi-extension FITS files; the image is the first HDU holding
  2-D data (the variance and PSF extensions are not read).

An Avro container may hold any number of alert records; all are read.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import math
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import fastavro
import numpy as np
from astropy.io import fits
from astropy.time import Time
from numpy.typing import ArrayLike, NDArray

from astrid.errors import AlertFormatError

__all__ = [
    "Alert",
    "AlertFailure",
    "AlertReader",
    "alert_triplet",
    "normalise_triplet",
    "read_alerts",
]

#: Cutout fields of both ZTF and Rubin packets, in triplet order, with the Alert field each fills.
_CUTOUT_FIELDS = (
    ("cutoutScience", "science"),
    ("cutoutTemplate", "reference"),
    ("cutoutDifference", "difference"),
)

#: ZTF filter id (``candidate.fid``) to band name.
_ZTF_BANDS = {1: "g", 2: "r", 3: "i"}

#: Offset between Julian date and modified Julian date, days.
_MJD_OFFSET = 2400000.5

#: Scale factor from the median absolute deviation to a Gaussian standard deviation.
_MAD_TO_SIGMA = 1.482602218505602

_AVRO_MAGIC = b"Obj\x01"
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, eq=False)
class Alert:
    """One alert packet's identifiers, position, time, scores and cutouts.

    Instances compare by identity (their cutouts are arrays); the cutout arrays are read-only.
    """

    alert_id: int
    """The detection's id: ZTF ``candid`` or Rubin ``diaSourceId``."""
    id_name: Literal["candid", "diaSourceId"]
    """Which id ``alert_id`` is: ``"candid"`` (ZTF) or ``"diaSourceId"`` (Rubin)."""
    object_id: str | int | None
    """The object the detection belongs to: ZTF ``objectId`` (``"ZTF23ablepma"``) or Rubin
    ``diaObjectId`` (int); ``None`` when the packet names none (a Rubin solar-system source)."""
    survey: Literal["ZTF", "Rubin"]
    """Which survey issued the packet."""
    ra: float
    """Right ascension of the detection, degrees (ICRS)."""
    dec: float
    """Declination of the detection, degrees (ICRS)."""
    mjd: float
    """Modified Julian date of the detection, days, in the scale given by ``time_scale``.
    ZTF: ``candidate.jd - 2400000.5``, the start of the exposure, UTC. Rubin:
    ``diaSource.midpointMjdTai``, the middle of the exposure, TAI (37 s ahead of UTC
    in 2025). Use :attr:`time` to compare the two."""
    time_scale: Literal["utc", "tai"]
    """Time scale of ``mjd``: ``"utc"`` for ZTF, ``"tai"`` for Rubin."""
    band: str
    """Filter: ``"g"``, ``"r"``, ``"i"`` for ZTF (from ``candidate.fid`` 1, 2, 3; another id
    gives ``"fid<N>"``); Rubin's ``diaSource.band`` (``"u"`` to ``"y"``)."""
    scores: Mapping[str, float]
    """Real/bogus scores the packet carries, by their packet name: ZTF ``rb`` (random forest,
    all schemas) and ``drb`` (deep real/bogus, schema 3.3 on); Rubin ``reliability``. A score
    the packet lacks (or sets to null or NaN) is absent from the mapping."""
    science: NDArray[np.float32] = field(repr=False)
    """Science cutout, 2-D ``[y, x]``, as shipped (ZTF counts with the sky level in;
    Rubin nJy, background-subtracted). May hold NaN (ZTF masked pixels); ZTF stamps
    clipped at a CCD edge are smaller than 63 x 63."""
    reference: NDArray[np.float32] = field(repr=False)
    """Reference (template) cutout, 2-D, as shipped."""
    difference: NDArray[np.float32] = field(repr=False)
    """Difference cutout, 2-D, as shipped."""
    source: str
    """Path of the file the alert was read from."""
    detection: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The packet's detection record as read: ZTF ``candidate`` or Rubin ``diaSource``
    (``magpsf``, ``isdiffpos``, ``snr``, ``psfFlux``, flags...)."""

    @property
    def time(self) -> Time:
        """The detection time as an astropy `~astropy.time.Time` in its own scale."""
        return Time(self.mjd, format="mjd", scale=self.time_scale)


class AlertFailure(NamedTuple):
    """A file that could not be read as alert packets."""

    path: str
    """The file."""
    reason: str
    """Why (the :class:`~astrid.errors.AlertFormatError` reason)."""


class AlertReader(Iterator[Alert]):
    """Iterator over the alerts of files and folders; see :func:`read_alerts`.

    Attributes
    ----------
    failures : list of AlertFailure
        Files skipped so far with ``errors="skip"`` (empty with ``errors="raise"``), filled
        as the iteration reaches them.
    """

    def __init__(
        self, paths: Iterable[str | Path], *, errors: Literal["raise", "skip"] = "raise"
    ) -> None:
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        self.errors = errors
        self.failures: list[AlertFailure] = []
        self._alerts = self._generate(paths)

    def __iter__(self) -> AlertReader:
        return self

    def __next__(self) -> Alert:
        return next(self._alerts)

    def _generate(self, paths: Iterable[str | Path]) -> Iterator[Alert]:
        for path in _expand(paths):
            try:
                alerts = _read_file(path)
            except AlertFormatError as exc:
                if self.errors == "raise":
                    raise
                self.failures.append(AlertFailure(exc.path, exc.reason))
                continue
            yield from alerts


def read_alerts(
    paths: str | Path | Iterable[str | Path], *, errors: Literal["raise", "skip"] = "raise"
) -> AlertReader:
    """Read ZTF and Rubin alert packets from files and folders.

    Parameters
    ----------
    paths : path or iterable of paths
        Avro packet files (ZTF or Rubin, any number of records each), Kowalski JSON exports
        of ZTF alerts (one alert object or a list of them), or folders, searched recursively
        for ``*.avro`` and ``*.json`` (in sorted order; other files are ignored). A file given
        explicitly is read whatever its name, by its content.
    errors : {"raise", "skip"}
        ``"raise"``: the first unreadable file raises. ``"skip"``: an unreadable file yields
        no alert (not even the good records of a partly corrupt container) and is recorded
        in the returned reader's ``failures``.

    Returns
    -------
    AlertReader
        A lazy iterator of :class:`Alert`, in file order and record order within a file;
        each file is read whole when the iteration reaches it.

    Raises
    ------
    AlertFormatError
        With ``errors="raise"``, during iteration: a path that does not exist, a file that is
        not Avro or JSON alerts, a truncated or corrupt container, a record without alert
        identifiers or without a cutout, or a cutout that is not valid (gzipped) FITS.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    return AlertReader(paths, errors=errors)


def alert_triplet(
    alert: Alert, *, size: int = 63, normalise: bool = True, clip: float | None = None
) -> NDArray[np.float32]:
    """Stack an alert's science, reference and difference cutouts into a classifier input.

    Each cutout is placed on a ``size`` x ``size`` grid so that its pixel ``(n_y // 2,
    n_x // 2)`` (0-based; its centre, where the alert's source sits for full stamps) lands
    on pixel ``(size // 2, size // 2)``: a smaller stamp is padded around, a larger one
    cropped around its centre. Padding is NaN, which :func:`normalise_triplet` sets to the
    cutout's background level (0). A ZTF stamp clipped at a CCD edge is therefore centred
    as it is, not moved to where the source sits in it. Pixels are not resampled: a Rubin
    stamp (0.2 arcsec pixels) covers a fifth of the sky a ZTF stamp (1 arcsec) does.

    Parameters
    ----------
    alert : Alert
        The alert.
    size : int
        Side of the output planes, pixels (63, the ZTF stamp size, by default).
    normalise : bool
        Apply :func:`normalise_triplet` (the default). ``False`` returns the cutouts as
        shipped on the common grid, with NaN in the padding and in masked pixels.
    clip : float or None
        Passed to :func:`normalise_triplet`; ``None`` does not clip.

    Returns
    -------
    ndarray of float32, shape (3, size, size)
        Planes in the order science, reference, difference.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, not {size!r}")
    size = int(size)
    triplet = np.stack(
        [_fit_to_size(plane, size) for plane in (alert.science, alert.reference, alert.difference)]
    )
    if not normalise:
        return triplet
    return normalise_triplet(triplet, clip=clip)


def normalise_triplet(triplet: ArrayLike, *, clip: float | None = None) -> NDArray[np.float32]:
    """Normalise cutout planes for a classifier: robust z-score of each plane.

    Every 2-D plane (the last two axes) is shifted by the median of its finite pixels and
    divided by their robust standard deviation, ``1.4826 * MAD`` (median absolute
    deviation); where that is zero (more than half the pixels equal) the plain standard
    deviation is used, and where that is zero too (a constant plane) the plane becomes 0.
    Non-finite pixels (NaN masks, padding) are then set to 0, the background level. Pixels
    are in units of the plane's background noise.

    The median and MAD are found by partial sorts (selections, exact in any precision),
    vectorised over the batch, with masked pixels standing in as equal numbers of -inf and
    +inf so that they do not move the middle of the rest; they are computed in float32 when
    the input is float32 (AstrID cutouts and alert stamps), which agrees with the float64
    computation to ~1e-7 relative. Planes with no finite pixel or a zero MAD use NaN-aware
    float64 medians.

    This is the one normalisation for every cutout given to an AstrID classifier, ZTF and
    Rubin alert stamps and AstrID's own candidate cutouts alike. Unlike braai's division by
    the L2 norm, it does not depend on the sky level left in an image (ZTF science and
    reference stamps carry their sky, ~100-200 counts; Rubin's and AstrID's are
    background-subtracted) nor on its flux units, and a bright star or cosmic ray does not
    change the scale of the rest of the plane.

    Parameters
    ----------
    triplet : array_like, shape (..., ny, nx)
        Cutout planes, typically ``(3, ny, nx)`` (science, reference, difference) or a batch
        ``(n, 3, ny, nx)``; each plane is normalised on its own.
    clip : float or None
        If given, limit the result to ``[-clip, clip]`` (noise units). ``None`` does not clip.

    Returns
    -------
    ndarray of float32, same shape
        The normalised planes, all finite.
    """
    source = np.asarray(triplet)
    if source.ndim < 2:
        raise ValueError(f"expected planes of shape (..., ny, nx), got shape {source.shape}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, not {clip!r}")
    shape = source.shape
    # float32 input (every cutout and alert stamp) is worked on in float32: the median and
    # MAD are selections, exact in any precision, and the shift and scale round at the
    # 1e-7 level; anything else is worked on in float64.
    work = np.float32 if source.dtype == np.float32 else np.float64
    flat = np.array(source, dtype=work).reshape(-1, shape[-2] * shape[-1])
    scaled, done = _normalise_rows_fast(flat)
    out = scaled.astype(np.float32, copy=False)
    if not done.all():
        rest = np.flatnonzero(~done)
        original = source.reshape(flat.shape)[rest]
        out[rest] = _normalise_rows_nan_aware(np.array(original, dtype=np.float64))
    if not np.isfinite(out).all():  # float32 overflow of an extreme pixel
        np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if clip is not None:
        np.clip(out, -clip, clip, out=out)
    return out.reshape(shape)


def _normalise_rows_fast(rows: NDArray[Any]) -> tuple[NDArray[np.floating], NDArray[np.bool_]]:
    """Robust z-score of each row by partial sorts, in the rows' own precision.

    The median of a row's ``m`` finite values is found by partitioning the whole batch at
    the same positions for every row: its ``k`` non-finite pixels are replaced, ``k // 2``
    of them by ``-inf`` and the rest by ``+inf``, which puts the finite values' middle
    one(s) at positions ``k // 2 + (m - 1) // 2`` and ``k // 2 + m // 2``, both among the
    row's two middle positions (:func:`_values_at`). The MAD is found the same way.
    Non-finite pixels become 0.

    Returns the scaled rows (``rows`` is overwritten) and which rows were done: a row
    with no finite pixel, or whose MAD is zero, is not (the NaN-aware path does it).
    """
    n = rows.shape[1]
    bad = ~np.isfinite(rows)
    n_bad = bad.sum(axis=1)
    low: NDArray[np.bool_] | None = None
    if n_bad.any():
        rank = np.cumsum(bad, axis=1, dtype=np.int32)
        low = bad & (rank <= (n_bad // 2)[:, None])
        rows[bad] = np.inf
        rows[low] = -np.inf
    n_good = n - n_bad
    first = n_bad // 2 + (n_good - 1) // 2
    second = n_bad // 2 + n_good // 2
    middle = n // 2
    dtype = rows.dtype.type
    with np.errstate(invalid="ignore"):  # all-bad rows, left to the NaN-aware path
        lower, upper = _values_at(rows, middle, first, second)
        # Subtract the lower middle value, then half the gap to the upper one: rounding
        # stays relative to each deviation, not to the plane's offset (a float32 mean of
        # two large values would be off by half an ulp of the offset).
        rows -= lower[:, None]
        rows -= ((upper - lower) * dtype(0.5))[:, None]
        deviation = np.abs(rows)
        if low is not None:
            deviation[low] = -np.inf
        lower, upper = _values_at(deviation, middle, first, second)
        mad = (lower + upper) * dtype(0.5)
    sigma = mad * dtype(_MAD_TO_SIGMA)
    done = (n_good > 0) & np.isfinite(sigma) & (sigma > 0)
    rows /= np.where(done, sigma, dtype(1.0))[:, None]
    if low is not None:
        rows[bad] = 0.0
    return rows, done


def _values_at(
    rows: NDArray[np.floating],
    middle: int,
    first: NDArray[np.intp],
    second: NDArray[np.intp],
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """Per row, the values that sorting would put at ``first`` and ``second``.

    Both positions must be ``middle`` or ``middle - 1``. One partition at ``middle`` (a
    partition at two positions is several times slower) gives the value there; the one
    before it is the largest of the part to its left.
    """
    part = np.partition(rows, middle, axis=1)
    at_middle = part[:, middle]
    if middle == 0 or (np.all(first == middle) and np.all(second == middle)):
        return at_middle, at_middle
    before = part[:, :middle].max(axis=1)
    return (
        np.where(first == middle, at_middle, before),
        np.where(second == middle, at_middle, before),
    )


def _normalise_rows_nan_aware(flat: NDArray[np.float64]) -> NDArray[np.float64]:
    """Robust z-score of float64 rows that may hold non-finite pixels or have MAD 0."""
    flat[~np.isfinite(flat)] = np.nan
    empty = np.all(np.isnan(flat), axis=1)
    flat[empty] = 0.0  # so that the NaN-aware statistics below see no all-NaN row
    median = np.nanmedian(flat, axis=1, keepdims=True)
    deviation = flat - median
    sigma = _MAD_TO_SIGMA * np.nanmedian(np.abs(deviation), axis=1, keepdims=True)
    degenerate = ~(sigma > 0)
    if np.any(degenerate):
        sigma = np.where(degenerate, np.nanstd(flat, axis=1, keepdims=True), sigma)
    sigma = np.where(sigma > 0, sigma, 1.0)
    return np.nan_to_num(deviation / sigma, nan=0.0, posinf=0.0, neginf=0.0)


def _fit_to_size(plane: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    """Centre ``plane`` on a NaN ``size`` x ``size`` grid, padding or cropping each axis."""
    out = np.full((size, size), np.nan, dtype=np.float32)
    source: list[slice] = []
    target: list[slice] = []
    for n in plane.shape:
        shift = size // 2 - n // 2  # output index = input index + shift
        start, stop = max(0, -shift), min(n, size - shift)
        source.append(slice(start, stop))
        target.append(slice(start + shift, stop + shift))
    out[tuple(target)] = plane[tuple(source)]
    return out


def _expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named by ``paths``, folders replaced by their ``*.avro`` and ``*.json`` files."""
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.suffix.lower() in (".avro", ".json")]
            yield from sorted(p for p in found if p.is_file())
        else:
            yield path


def _read_file(path: Path) -> list[Alert]:
    """Every alert of one file; raise AlertFormatError if any part cannot be read."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AlertFormatError(name, "no such file or folder") from None
    except OSError as exc:
        raise AlertFormatError(name, f"cannot read the file: {exc}") from exc
    if raw.startswith(_AVRO_MAGIC):
        records = _avro_records(raw, name)
    elif raw.lstrip()[:1] in (b"{", b"["):
        records = _json_records(raw, name)
    else:
        raise AlertFormatError(
            name, f"neither an Avro container nor JSON (starts with {raw[:8]!r})"
        )
    if not records:
        raise AlertFormatError(name, "holds no alert records")
    return [_to_alert(record, name, index) for index, record in enumerate(records)]


def _avro_records(raw: bytes, name: str) -> list[Any]:
    try:
        return list(fastavro.reader(io.BytesIO(raw)))
    except (ValueError, EOFError, OSError, KeyError, TypeError, IndexError) as exc:
        raise AlertFormatError(
            name, f"corrupt or truncated Avro container: {type(exc).__name__}: {exc}"
        ) from exc


def _json_records(raw: bytes, name: str) -> list[Any]:
    try:
        loaded = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AlertFormatError(name, f"invalid JSON: {exc}") from exc
    return loaded if isinstance(loaded, list) else [loaded]


def _to_alert(record: Any, name: str, index: int) -> Alert:
    """Build an Alert from one decoded packet record (Avro or extended JSON)."""
    where = f"record {index}"
    if not isinstance(record, Mapping):
        raise AlertFormatError(name, f"{where} is a {type(record).__name__}, not an alert record")
    if isinstance(record.get("diaSource"), Mapping):
        return _rubin_alert(record, name, where)
    if isinstance(record.get("candidate"), Mapping) and "candid" in record:
        return _ztf_alert(record, name, where)
    raise AlertFormatError(
        name,
        f"{where} is not a ZTF alert (candid + candidate) nor a Rubin alert "
        f"(diaSourceId + diaSource); its fields are {sorted(record)[:12]}",
    )


def _ztf_alert(record: Mapping[str, Any], name: str, where: str) -> Alert:
    candidate = record["candidate"]
    jd = _number(candidate, "jd", name, where)
    fid = int(_number(candidate, "fid", name, where))
    object_id = _plain(record.get("objectId"))
    return Alert(
        alert_id=_identifier(record, "candid", name, where),
        id_name="candid",
        object_id=None if object_id is None else str(object_id),
        survey="ZTF",
        ra=_number(candidate, "ra", name, where),
        dec=_number(candidate, "dec", name, where),
        mjd=jd - _MJD_OFFSET,
        time_scale="utc",
        band=_ZTF_BANDS.get(fid, f"fid{fid}"),
        scores=_scores(candidate, ("rb", "drb")),
        **_cutouts(record, name, where),
        source=name,
        detection=dict(candidate),
    )


def _rubin_alert(record: Mapping[str, Any], name: str, where: str) -> Alert:
    dia_source = record["diaSource"]
    ids = record if record.get("diaSourceId") is not None else dia_source
    alert_id = _identifier(ids, "diaSourceId", name, where)
    object_id = _plain(dia_source.get("diaObjectId"))
    if object_id is None and isinstance(record.get("diaObject"), Mapping):
        object_id = _plain(record["diaObject"].get("diaObjectId"))
    band = dia_source.get("band")
    return Alert(
        alert_id=alert_id,
        id_name="diaSourceId",
        object_id=None if object_id is None else int(object_id),
        survey="Rubin",
        ra=_number(dia_source, "ra", name, where),
        dec=_number(dia_source, "dec", name, where),
        mjd=_number(dia_source, "midpointMjdTai", name, where),
        time_scale="tai",
        band="" if band is None else str(band),
        scores=_scores(dia_source, ("reliability",)),
        **_cutouts(record, name, where),
        source=name,
        detection=dict(dia_source),
    )


def _plain(value: Any) -> Any:
    """Unwrap MongoDB extended-JSON numbers (``{"$numberLong": "123"}``)."""
    if isinstance(value, Mapping) and len(value) == 1:
        key, inner = next(iter(value.items()))
        if key in ("$numberLong", "$numberInt"):
            return int(inner)
        if key in ("$numberDouble", "$numberDecimal"):
            return float(inner)
    return value


def _identifier(record: Mapping[str, Any], key: str, name: str, where: str) -> int:
    value = _plain(record.get(key))
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AlertFormatError(name, f"{where}: {key} is {value!r}, not an integer id") from None


def _number(record: Mapping[str, Any], key: str, name: str, where: str) -> float:
    value = _plain(record.get(key))
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AlertFormatError(name, f"{where}: {key} is {value!r}, not a number") from None
    return number


def _scores(record: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    scores = {}
    for key in keys:
        value = _plain(record.get(key))
        if value is None:
            continue
        number = float(value)
        if math.isfinite(number):
            scores[key] = number
    return scores


def _cutouts(record: Mapping[str, Any], name: str, where: str) -> dict[str, NDArray[np.float32]]:
    return {
        attribute: _cutout(record.get(key), name, f"{where}: {key}")
        for key, attribute in _CUTOUT_FIELDS
    }


def _cutout(value: Any, name: str, where: str) -> NDArray[np.float32]:
    """Decode one cutout field (ZTF record with stampData, Rubin bytes, or JSON base64)."""
    if isinstance(value, Mapping):
        value = value.get("stampData")
    if isinstance(value, Mapping) and "$binary" in value:
        value = value["$binary"]
        if isinstance(value, Mapping):  # extended JSON v2: {"base64": ..., "subType": ...}
            value = value.get("base64")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AlertFormatError(name, f"{where} is not valid base64: {exc}") from exc
    if value is None:
        raise AlertFormatError(name, f"{where} is missing")
    if not isinstance(value, bytes | bytearray):
        raise AlertFormatError(name, f"{where} is a {type(value).__name__}, not stamp bytes")
    data = bytes(value)
    if not data:
        raise AlertFormatError(name, f"{where} is empty")
    if data.startswith(_GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise AlertFormatError(name, f"{where}: corrupt gzip stamp: {exc}") from exc
    return _fits_image(data, name, where)


def _fits_image(data: bytes, name: str, where: str) -> NDArray[np.float32]:
    """The first 2-D image of an in-memory FITS file, as native float32, read-only."""
    if not data.startswith(b"SIMPLE"):
        raise AlertFormatError(name, f"{where}: stamp is not FITS (starts with {data[:8]!r})")
    try:
        with warnings.catch_warnings():
            # Stamps written by survey pipelines often have slightly non-standard cards;
            # a stamp shorter than its header says is corrupt, not a warning.
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            warnings.filterwarnings("error", message=".*truncated", category=Warning)
            with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False) as hdus:
                images = [hdu.data for hdu in hdus if hdu.is_image and hdu.data is not None]
    except (OSError, ValueError, TypeError, IndexError, KeyError, Warning) as exc:
        raise AlertFormatError(name, f"{where}: corrupt FITS stamp: {exc}") from exc
    planes = [image for image in images if image.ndim == 2 and min(image.shape) > 0]
    if not planes:
        shapes = [tuple(image.shape) for image in images]
        raise AlertFormatError(name, f"{where}: FITS stamp holds no 2-D image (shapes {shapes})")
    plane = np.array(planes[0], dtype=np.float32)
    plane.setflags(write=False)
    return plane
