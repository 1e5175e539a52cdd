"""Shared pytest fixtures.

Real observational data lives outside the repository, in ``shared/data`` beside the
project checkout (``<checkout>/../shared/data``); ``ASTRID_SHARED_DATA`` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """Folder of the shared real data sets."""
    env = os.environ.get("ASTRID_SHARED_DATA")
    return Path(env) if env else _REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real data; tests needing it are skipped when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared real data not found at {path} (set ASTRID_SHARED_DATA)")
    return path
