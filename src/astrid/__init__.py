"""AstrID, the Astronomical Identification System: find what changed in the sky."""

__version__ = "0.1.0"

__all__ = ["__version__"]
