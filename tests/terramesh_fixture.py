"""The real TerraMesh sample converted to an MMEarth file set of 64 px tiles (tests that need real pixels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.geotiff_to_mmearth import convert

REPO = Path(__file__).resolve().parents[1]


def convert_terramesh(shared_data_dir: Path, out: Path) -> Path:
    """Convert ``<shared data>/terramesh_examples`` into ``out`` (90 tiles of 64 px); skips when it is absent."""
    src = shared_data_dir / "terramesh_examples"
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    convert(REPO / "cfgs" / "data" / "terramesh_examples.yaml", src, out, tile_size=64, progress=False)
    return out
