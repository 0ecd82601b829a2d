"""Writes a tiny, format-faithful MMEarth file set for tests and benchmarks.

The generator, not a binary, is the source of truth (torchgeo's ``tests/data`` habit). It follows
``../shared/reference/data_formats.md`` section 1: every HDF5 dataset of section 1.2 with MMEarth's
exact name, dtype and shape, gzip compression and one chunk per sample (``chunks=(1, ...)``); the
``metadata`` compound dtype (``tile_id`` S100, ``S2_type`` S10); and the three side files
``<stem>_band_stats.json`` (per-channel mean/std/min/max with no-data excluded, ``sentinel2_l1c``
and ``sentinel2_l2a`` keys, no plain ``sentinel2``), ``<stem>_splits.json`` (row indices) and
``<stem>_tile_info.json`` (keyed by tile id).

All pixel values are synthetic but plausible and spatially smooth (so gzip behaves roughly like on
real tiles): Sentinel-2 reflectance x 10000, Sentinel-1 dB, ASTER metres / degrees. Documented
no-data is planted on purpose:

- ``sentinel2``: a few zero pixels per tile; B10 is 0 on every L2A tile.
- ``sentinel1``: HH/HV channels are -inf everywhere; every third tile misses the descending orbit.
- ``sentinel2_cloudprod`` / ``sentinel2_scl``: 65535 / 255 on L1C tiles.
- ``esa_worldcover``: codes 10..100 plus some 0 and 255 pixels; ``dynamic_world``: 0..9 (0 = no data).
- ``canopy_height_eth``: some -1 pixels (int8 cannot hold the writer's 255).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

__all__ = ["write_mmearth_fileset", "S2_MEAN_L1C", "S2_MEAN_L2A"]

# Plausible per-band reflectance x 10000 (MMEarth order B1..B7, B8A, B8, B9, B10, B11, B12).
S2_MEAN_L1C = (1400, 1200, 1100, 1000, 1300, 1900, 2200, 2400, 2300, 800, 40, 1900, 1200)
S2_MEAN_L2A = (500, 600, 800, 800, 1100, 1800, 2100, 2400, 2300, 2500, 0, 1900, 1200)
_WC_CODES = np.array([10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100, 0, 255], dtype=np.uint8)
_ERA5_MEAN = np.array([285.0, 280.0, 290.0, 0.08] * 3, dtype=np.float32)


def _smooth(rng: np.random.Generator, n: int, c: int, s: int, cell: int = 8) -> np.ndarray:
    """Spatially smooth noise in [0, 1): (n, c, s, s) float32, blocky at ``cell`` px plus jitter."""
    k = max(1, -(-s // cell))
    coarse = rng.random((n, c, k, k), dtype=np.float32)
    up = np.repeat(np.repeat(coarse, cell, axis=2), cell, axis=3)[:, :, :s, :s]
    return np.clip(up + rng.normal(0, 0.03, up.shape).astype(np.float32), 0, 0.999)


def _sentinel2(rng, n, s, is_l2a):
    base = np.where(is_l2a[:, None], np.array(S2_MEAN_L2A), np.array(S2_MEAN_L1C)).astype(np.float32)
    x = base[:, :, None, None] * (0.5 + _smooth(rng, n, 13, s))
    x = np.clip(np.rint(x), 1, 65534).astype(np.uint16)
    x[is_l2a, 10] = 0  # B10 is not in the L2A collection
    holes = rng.random((n, s, s)) < 0.01  # no-data pixels, all bands
    x[np.broadcast_to(holes[:, None], x.shape)] = 0
    return x


def _sentinel1(rng, n, s):
    x = (-25.0 + 20.0 * _smooth(rng, n, 8, s)).astype(np.float32)
    x[:, [2, 3, 6, 7]] = -np.inf  # HH / HV mostly missing
    x[::3, 4:8] = -np.inf  # descending orbit missing on every third tile
    return x


def _categorical(rng, n, s, codes: np.ndarray, cell: int = 8) -> np.ndarray:
    idx = (_smooth(rng, n, 1, s, cell) * len(codes)).astype(np.int64)
    return codes[idx].astype(np.uint8)


def _write(h5: h5py.File, name: str, data: np.ndarray) -> None:
    h5.create_dataset(name, data=data, chunks=(1, *data.shape[1:]), compression="gzip", compression_opts=4)


def _stats(x: np.ndarray, invalid: np.ndarray) -> dict:
    """Per-channel mean/std/min/max of (N, C, ...) ``x`` with ``invalid`` pixels excluded."""
    out = {"mean": [], "std": [], "min": [], "max": []}
    for c in range(x.shape[1]):
        v = x[:, c][~invalid[:, c]].astype(np.float64)
        if v.size == 0:
            v = np.zeros(1)
        out["mean"].append(float(v.mean()))
        out["std"].append(float(v.std()))
        out["min"].append(float(v.min()))
        out["max"].append(float(v.max()))
    return out


def write_mmearth_fileset(
    folder: Path, *, num_tiles: int = 12, tile_size: int = 64, seed: int = 0, stem: str | None = None
) -> Path:
    """Write ``folder/<stem>.h5`` and its three JSON side files.

    Args:
        folder: Output folder (created if needed).
        num_tiles: Number of tiles N (rows of every dataset); at least 3 so every split is non-empty.
        tile_size: Tile side S in pixels (64 for MMEarth64, 128 for MMEarth).
        seed: Seed of the synthetic values.
        stem: File stem; defaults to the folder name (as in MMEarth's ``data_1M_v001_64/``).

    Returns:
        ``folder``.

    Raises:
        ValueError: ``num_tiles`` < 3.
    """
    if num_tiles < 3:
        raise ValueError(f"num_tiles must be >= 3 (one tile per split), got {num_tiles}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or folder.name
    rng = np.random.default_rng(seed)
    n, s = num_tiles, tile_size
    is_l2a = np.arange(n) % 2 == 1  # alternating l1c / l2a
    tile_ids = [f"tile{seed}x{i:05d}_{i}" for i in range(n)]

    s2 = _sentinel2(rng, n, s, is_l2a)
    s1 = _sentinel1(rng, n, s)
    aster = np.stack([3000 * _smooth(rng, n, 1, s)[:, 0], 60 * _smooth(rng, n, 1, s)[:, 0]], 1).astype(np.int16)
    canopy = np.rint(30 * _smooth(rng, n, 2, s)).astype(np.int8)
    canopy[rng.random(canopy.shape) < 0.02] = -1
    wc = _categorical(rng, n, s, _WC_CODES)
    dw = _categorical(rng, n, s, np.arange(10, dtype=np.uint8))
    qa60 = rng.choice(np.array([0, 1024, 2048], np.uint16), size=(n, 1, s, s), p=[0.9, 0.05, 0.05])
    cloudprod = np.rint(100 * _smooth(rng, n, 1, s)).astype(np.uint16)
    cloudprod[~is_l2a] = 65535
    scl = _categorical(rng, n, s, np.arange(1, 12, dtype=np.uint8))
    scl[~is_l2a] = 255
    era5 = (_ERA5_MEAN * (1 + 0.05 * rng.standard_normal((n, 12)))).astype(np.float32)
    lat_deg, lon_deg = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    months = rng.integers(1, 13, n)
    sincos = lambda a: np.stack([np.sin(a), np.cos(a)], 1).astype(np.float32)  # noqa: E731
    biome_idx, eco_idx = rng.integers(0, 14, n), rng.integers(0, 846, n)
    biome = np.zeros((n, 14), np.uint8)
    biome[np.arange(n), biome_idx] = 1
    eco = np.zeros((n, 846), np.uint16)
    eco[np.arange(n), eco_idx] = 1

    meta_dtype = np.dtype([("tile_id", "S100"), ("S2_type", "S10")])
    meta = np.array([(t.encode(), b"l2a" if l2 else b"l1c") for t, l2 in zip(tile_ids, is_l2a)], dtype=meta_dtype)

    with h5py.File(folder / f"{stem}.h5", "w") as h5:
        for name, data in (
            ("sentinel2", s2), ("sentinel2_cloudmask", qa60), ("sentinel2_cloudprod", cloudprod),
            ("sentinel2_scl", scl), ("sentinel1", s1), ("aster", aster), ("era5", era5),
            ("dynamic_world", dw), ("canopy_height_eth", canopy), ("esa_worldcover", wc),
            ("lat", sincos(np.radians(lat_deg))), ("lon", sincos(np.radians(lon_deg))),
            ("month", sincos(2 * np.pi * months / 12)), ("biome", biome), ("eco_region", eco),
            ("metadata", meta),
        ):
            _write(h5, name, data)
        lat, lon, month = h5["lat"][:], h5["lon"][:], h5["month"][:]

    s2_invalid = s2 == 0
    stats = {
        "sentinel2_l1c": _stats(s2[~is_l2a], s2_invalid[~is_l2a]),
        "sentinel2_l2a": _stats(s2[is_l2a], s2_invalid[is_l2a]),
        "sentinel1": _stats(s1, ~np.isfinite(s1)),
        "aster": _stats(aster, np.zeros(aster.shape, bool)),
        "canopy_height_eth": _stats(canopy, canopy < 0),
        "era5": _stats(era5, ~np.isfinite(era5)),
        "lat": _stats(lat, np.zeros(lat.shape, bool)),
        "lon": _stats(lon, np.zeros(lon.shape, bool)),
        "month": _stats(month, np.zeros(month.shape, bool)),
    }
    (folder / f"{stem}_band_stats.json").write_text(json.dumps(stats, indent=1))

    order = rng.permutation(n).tolist()
    n_val = n_test = max(1, n // 6)
    splits = {"train": sorted(order[n_val + n_test:]), "val": sorted(order[:n_val]),
              "test": sorted(order[n_val:n_val + n_test])}
    (folder / f"{stem}_splits.json").write_text(json.dumps(splits))

    s2_bands = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12"]
    tile_info = {}
    for i, tid in enumerate(tile_ids):
        l2 = bool(is_l2a[i])
        bands = [b for b in s2_bands if not (l2 and b == "B10")] + (["MSK_CLDPRB", "SCL"] if l2 else []) + ["QA60"]
        tile_info[tid] = {
            "S2_DATE": f"2019-{int(months[i]):02d}-15", "S2_type": "l2a" if l2 else "l1c", "CRS": "EPSG:32632",
            "lat": float(lat_deg[i]), "lon": float(lon_deg[i]), "biome": int(biome_idx[i]),
            "eco_region": int(eco_idx[i]), "NO_DATA": False,
            "BANDS": {"sentinel2": bands, "sentinel1_asc": ["VV", "VH"],
                      "sentinel1_desc": None if i % 3 == 0 else ["VV", "VH"], "aster": ["b1", "slope"],
                      "dynamic_world": ["label"], "canopy_height_eth": ["height", "std"], "esa_worldcover": ["Map"]},
        }
    (folder / f"{stem}_tile_info.json").write_text(json.dumps(tile_info))
    return folder
