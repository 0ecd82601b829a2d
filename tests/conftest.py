"""Shared pytest fixtures: a tiny format-faithful MMEarth file set and the real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mmearth_fixture import write_mmearth_fileset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mmearth_fileset(tmp_path_factory) -> Path:
    """Folder holding ``mmearth_tiny.h5`` (12 tiles of 64 px) and its JSON side files. Read-only: copy it
    (or call ``write_mmearth_fileset`` into ``tmp_path``) before modifying."""
    return write_mmearth_fileset(tmp_path_factory.mktemp("mmearth") / "mmearth_tiny")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Real-data folder: env var MMEARTH_SHARED_DATA, default ``<repo>/../shared/data``; skips when absent."""
    path = Path(os.environ.get("MMEARTH_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real-data folder {path} absent (set MMEARTH_SHARED_DATA)")
    return path
