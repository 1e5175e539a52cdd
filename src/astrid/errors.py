"""Typed errors raised by AstrID.

Every error carries the numbers that explain it, so that a failed observation can be
recorded with a precise reason and a user can see what to fix. All errors derive from
:class:`AstridError`, which callers can catch to separate data problems from bugs.
"""

from __future__ import annotations

__all__ = [
    "AlertFormatError",
    "AstridError",
    "BackendUnavailable",
    "BadImageShape",
    "CorruptFitsFile",
    "EmptyImage",
    "InsufficientOverlap",
    "InvalidPsf",
    "InvalidSection",
    "MissingHeaderKeywords",
    "ModelNotAvailable",
    "NoCelestialWcs",
    "ShapeMismatch",
    "StarMatchFailed",
    "TooFewFrames",
    "TooFewStamps",
    "TooFewStarsForPsf",
]


class AstridError(Exception):
    """Base class of every error AstrID raises on purpose.

    Errors pickle with their attributes (so a worker process can raise one to its
    parent), whatever their constructor's parameters.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_restore_error, (type(self), self.args, dict(self.__dict__)))


def _restore_error(
    cls: type[AstridError], args: tuple[object, ...], state: dict[str, object]
) -> AstridError:
    """Rebuild a pickled error without calling its constructor."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class CorruptFitsFile(AstridError):
    """A file could not be read as FITS (truncated, not FITS, or no image data).

    Parameters
    ----------
    path : str
        The file that failed.
    reason : str
        What the FITS reader reported.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read {path!r} as a FITS image: {reason}")


class MissingHeaderKeywords(AstridError):
    """Metadata needed by a step is absent from the header.

    Parameters
    ----------
    missing : dict of str to tuple of str
        For each missing quantity (``"gain"``), the header keywords that were tried.
    context : str
        What needed them (``"calibration"``).
    """

    def __init__(self, missing: dict[str, tuple[str, ...]], context: str = "") -> None:
        self.missing = dict(missing)
        self.context = context
        parts = [f"{name} (tried {', '.join(keys)})" for name, keys in self.missing.items()]
        where = f" for {context}" if context else ""
        super().__init__(f"header lacks{where}: " + "; ".join(parts))


class NoCelestialWcs(AstridError):
    """An exposure has no usable celestial WCS where one is required.

    Parameters
    ----------
    what : str
        Which exposure or file lacks it.
    detail : str
        Why (no CTYPE keywords, a non-celestial WCS, an unparsable header).
    """

    def __init__(self, what: str, detail: str = "no celestial CTYPE keywords") -> None:
        self.what = what
        self.detail = detail
        super().__init__(f"{what} has no celestial WCS: {detail}")


class BadImageShape(AstridError):
    """Image data is not a 2-D array of at least the minimal size.

    Parameters
    ----------
    shape : tuple of int
        The shape that was given.
    expected : str
        What was expected.
    """

    def __init__(self, shape: tuple[int, ...], expected: str = "a 2-D image") -> None:
        self.shape = tuple(shape)
        self.expected = expected
        super().__init__(f"image has shape {self.shape}; expected {expected}")


class ShapeMismatch(AstridError):
    """Planes that must share a shape do not.

    Parameters
    ----------
    shapes : dict of str to tuple of int
        The shape of each plane by name.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        desc = ", ".join(f"{k} {v}" for k, v in self.shapes.items())
        super().__init__(f"shapes do not match: {desc}")


class EmptyImage(AstridError):
    """An image has too few finite, unmasked pixels to be used.

    Parameters
    ----------
    n_good : int
        Finite, unmasked pixels found.
    n_total : int
        Pixels in the image.
    """

    def __init__(self, n_good: int, n_total: int) -> None:
        self.n_good = int(n_good)
        self.n_total = int(n_total)
        super().__init__(
            f"image has {self.n_good} usable pixels out of {self.n_total} "
            "(all NaN, masked or non-finite)"
        )


class TooFewStarsForPsf(AstridError):
    """Not enough isolated, unsaturated stars to model the PSF.

    Parameters
    ----------
    n_found : int
        Stars that passed the selection.
    n_required : int
        Stars the model needs.
    """

    def __init__(self, n_found: int, n_required: int) -> None:
        self.n_found = int(n_found)
        self.n_required = int(n_required)
        super().__init__(
            f"too few stars for a PSF model: found {self.n_found}, need {self.n_required}"
        )


class StarMatchFailed(AstridError):
    """Stars of two exposures could not be matched (alignment or photometric tie).

    Parameters
    ----------
    n_matched : int
        Pairs matched.
    n_required : int
        Pairs needed.
    detail : str
        What was tried.
    """

    def __init__(self, n_matched: int, n_required: int, detail: str = "") -> None:
        self.n_matched = int(n_matched)
        self.n_required = int(n_required)
        self.detail = detail
        extra = f" ({detail})" if detail else ""
        super().__init__(f"matched {self.n_matched} stars, need {self.n_required}{extra}")


class InsufficientOverlap(AstridError):
    """Two exposures share too little sky.

    Parameters
    ----------
    overlap_fraction : float
        Fraction of the target grid covered by the other exposure.
    required : float
        Minimum fraction accepted.
    """

    def __init__(self, overlap_fraction: float, required: float) -> None:
        self.overlap_fraction = float(overlap_fraction)
        self.required = float(required)
        super().__init__(
            f"exposures overlap on {self.overlap_fraction:.1%} of the target grid; "
            f"need at least {self.required:.1%}"
        )


class InvalidSection(AstridError):
    """A FITS image section (``BIASSEC``, ``TRIMSEC``) is malformed or outside the image.

    Parameters
    ----------
    section : str
        The section string as given (FITS 1-based, inclusive, ``[x1:x2,y1:y2]``).
    shape : tuple of int
        Shape ``(ny, nx)`` of the image it should apply to.
    reason : str
        What is wrong with it.
    """

    def __init__(self, section: str, shape: tuple[int, ...], reason: str) -> None:
        self.section = section
        self.shape = tuple(shape)
        self.reason = reason
        super().__init__(f"image section {section!r} for shape {self.shape}: {reason}")


class TooFewFrames(AstridError):
    """Too few frames to combine into a master calibration frame.

    Parameters
    ----------
    n_given : int
        Frames supplied.
    n_required : int
        Frames the combination needs.
    """

    def __init__(self, n_given: int, n_required: int) -> None:
        self.n_given = int(n_given)
        self.n_required = int(n_required)
        super().__init__(f"got {self.n_given} frames to combine, need at least {self.n_required}")


class TooFewStamps(AstridError):
    """Too few usable star stamps to fit an image-subtraction matching kernel.

    Parameters
    ----------
    n_found : int
        Stamps that were usable (inside the image, unmasked, not rejected by clipping).
    n_required : int
        Stamps the kernel fit needs.
    """

    def __init__(self, n_found: int, n_required: int) -> None:
        self.n_found = int(n_found)
        self.n_required = int(n_required)
        super().__init__(
            f"too few stamps for a matching kernel: found {self.n_found}, need {self.n_required}"
        )


class InvalidPsf(AstridError):
    """A PSF stamp cannot be used (not square, even-sized, non-finite or not summing to > 0).

    Parameters
    ----------
    which : str
        Which PSF (``"psf_science"``).
    shape : tuple of int
        Shape of the stamp that was given.
    reason : str
        What is wrong with it.
    n_non_finite : int
        Non-finite (NaN or infinite) pixels in the stamp.
    total : float
        Sum of the finite pixels of the stamp.
    """

    def __init__(
        self,
        which: str,
        shape: tuple[int, ...],
        reason: str,
        *,
        n_non_finite: int = 0,
        total: float = float("nan"),
    ) -> None:
        self.which = which
        self.shape = tuple(int(s) for s in shape)
        self.reason = reason
        self.n_non_finite = int(n_non_finite)
        self.total = float(total)
        super().__init__(f"{which} of shape {self.shape} cannot be used: {reason}")


class BackendUnavailable(AstridError):
    """A compute backend was requested explicitly but cannot be used here.

    Parameters
    ----------
    backend : str
        The backend requested (``"cupy"``, ``"torch"``).
    reason : str
        Why it cannot be used (package not installed, no GPU).
    """

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"backend {backend!r} is not available: {reason}")


class AlertFormatError(AstridError):
    """A file is not a readable ZTF or Rubin alert packet.

    Raised for a file that is neither Avro nor a JSON alert export, a truncated or
    corrupt Avro container, a record without the alert identifiers, a missing cutout,
    or a cutout stamp that is not valid (gzipped) FITS image data.

    Parameters
    ----------
    path : str
        The file that failed.
    reason : str
        What is wrong with it (which record and which field, where known).
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read {path!r} as an alert packet: {reason}")


class ModelNotAvailable(AstridError):
    """A trained model cannot be loaded; nothing falls back to an untrained one.

    Parameters
    ----------
    name : str
        The model asked for (a registered name, a packaged model's name or a path).
    reason : str
        Why it cannot be used (weights file missing, checksum mismatch, no version with
        that alias).
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"model {name!r} is not available: {reason}")
