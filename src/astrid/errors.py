"""Typed errors raised by AstrID.

Every error carries the numbers that explain it, so that a failed observation can be
recorded with a precise reason and a user can see what to fix. All errors derive from
:class:`AstridError`, which callers can catch to separate data problems from bugs.
"""

from __future__ import annotations

__all__ = [
    "AstridError",
    "BadImageShape",
    "CorruptFitsFile",
    "EmptyImage",
    "InsufficientOverlap",
    "MissingHeaderKeywords",
    "NoCelestialWcs",
    "ShapeMismatch",
    "StarMatchFailed",
    "TooFewStarsForPsf",
]


class AstridError(Exception):
    """Base class of every error AstrID raises on purpose."""


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
