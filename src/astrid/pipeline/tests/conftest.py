"""Fixtures of the pipeline tests: PostgreSQL databases as the store tests make them."""

from __future__ import annotations

from astrid.store.tests.conftest import postgres_database

__all__ = ["postgres_database"]
