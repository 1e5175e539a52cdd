"""Persistence: the database models, migrations, sessions and artifact storage.

The store layer sits below the services and the pipeline and above nothing but
SQLAlchemy, Alembic and the object-store clients. Nothing here is built at import time:
callers create an engine (:func:`astrid.store.db.create_engine`), migrate it
(:func:`astrid.store.migrate.upgrade`) and an artifact store
(:func:`astrid.store.artifacts.artifact_store_from_url`) at start-up and pass them on.

Modules
-------
models
    SQLAlchemy 2 typed models of every table (observations, differences, candidates,
    objects, scores, vetting, catalog, users, audit log, ...).
db
    Engine and session factory from a database URL (SQLite file or PostgreSQL).
migrate
    Alembic migrations run from Python: ``upgrade``, ``downgrade``, ``current``,
    ``compare``, ``revision``.
healpix
    The HEALPix index stored with every sky position, and the index ranges of a cone.
cone
    Cone search over any model with ``ra``, ``dec`` and ``healpix`` columns.
artifacts
    Content-addressed (SHA-256) file storage on a local folder or an S3-compatible
    object store.
"""

from __future__ import annotations

__all__: list[str] = []
