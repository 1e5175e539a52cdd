"""Alembic migration scripts of the AstrID database (run them with :mod:`astrid.store.migrate`)."""
