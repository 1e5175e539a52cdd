"""Reading and writing files (FITS)."""
