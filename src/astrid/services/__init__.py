"""Domain services: what the command line, the API and the pipeline do with the database.

Each module owns one domain and works on a SQLAlchemy session (and an artifact store
where files are involved) passed in by the caller; nothing here reads settings or builds
engines.

Modules
-------
observations
    Register FITS files as observations (content-hash dedupe, artifact storage, metadata,
    field assignment), status transitions, and status reports.
candidates
    Store difference images, candidates and their cutouts; read cutout triplets; cone
    searches over candidates as astropy tables.
objects
    Associate candidates across epochs into objects (light curves); cone searches over
    objects.
"""

from __future__ import annotations

__all__: list[str] = []
