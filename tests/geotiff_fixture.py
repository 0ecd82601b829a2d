"""Tiny labelled GeoTIFF folders for the GeoTIFF fine-tuning dataset and prediction tests.

Scenes hold Sentinel-2 L2A B02, B03, B04, B08 (uint16, reflectance x 10000, 0 = no-data), Sentinel-1 VV, VH
(float32 dB, NaN = no-data) and a land / water label raster (uint8: 1 land, 2 water, 0 no-data). Water is
where B08 is low (about 500 against 3000 on land) and VV is low, so a model can learn it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import yaml
from rasterio.transform import from_origin

TRANSFORM = from_origin(500_000, 6_000_000, 10, 10)
CRS = "EPSG:32632"
SPEC = {
    "sources": {
        "S2": {"modality": "sentinel2", "s2_type": "l2a", "bands": ["B02", "B03", "B04", "B08"], "nodata": 0},
        "S1": {"modality": "sentinel1", "bands": ["asc_VV", "asc_VH"]},
    },
    "label": {"folder": "MASK", "classes": {0: None, 1: "land", 2: "water"},
              "colors": {"water": "#0000ff"}},
}


def write_tif(path: Path, data: np.ndarray, transform=TRANSFORM) -> None:
    """Write (C, H, W) ``data`` as a GeoTIFF on the fixture grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=CRS, transform=transform) as ds:
        ds.write(data)


def water_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """bool (H, W): a few random rectangles of water."""
    water = np.zeros((h, w), bool)
    for _ in range(3):
        r, c = rng.integers(0, h - 4), rng.integers(0, w - 4)
        water[r:r + rng.integers(4, max(5, h // 2)), c:c + rng.integers(4, max(5, w // 2))] = True
    return water


def write_scene(src: Path, name: str, h: int, w: int, seed: int = 0, s1: bool = True,
                label: bool = True) -> np.ndarray:
    """One scene's rasters under ``src``; returns its water mask."""
    rng = np.random.default_rng(seed)
    water = water_mask(h, w, rng)
    s2 = rng.integers(800, 1500, (4, h, w)).astype(np.uint16)
    s2[3] = np.where(water, rng.integers(300, 700, (h, w)), rng.integers(2500, 3500, (h, w)))
    write_tif(src / "S2" / f"{name}.tif", s2)
    if s1:
        vv = np.where(water, rng.normal(-22, 1, (h, w)), rng.normal(-9, 1, (h, w)))
        write_tif(src / "S1" / f"{name}.tif", np.stack([vv, vv - 6]).astype(np.float32))
    if label:
        write_tif(src / "MASK" / f"{name}.tif", np.where(water, 2, 1).astype(np.uint8)[None])
    return water


def write_spec(path: Path, spec: dict | None = None) -> Path:
    """Write a spec (default :data:`SPEC`) as YAML."""
    path.write_text(yaml.safe_dump(spec or SPEC, sort_keys=False))
    return path


def write_folder(root: Path, scenes: dict[str, tuple[int, int]], spec: dict | None = None) -> tuple[Path, Path]:
    """A segmentation folder of ``scenes`` (name -> (H, W)) and its spec; returns (src, spec path)."""
    src = root / "src"
    for i, (name, (h, w)) in enumerate(scenes.items()):
        write_scene(src, name, h, w, seed=i)
    return src, write_spec(root / "spec.yaml", spec)
