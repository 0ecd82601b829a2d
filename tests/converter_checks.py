"""Conformance checks of converted MMEarth file sets, shared by every converter test.

They do not import converter code: dataset names, dtypes, shapes and no-data values are restated from the
MMEarth format description (MMEarth-data ``convert_to_h5.py``, section 1 of the project's data-format
notes), and pixels are compared with independent rasterio / numpy reads of the source rasters.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

# MMEarth: name -> (dtype, channels, pixel-level)
MMEARTH = {
    "sentinel2": ("uint16", 13, True), "sentinel2_cloudmask": ("uint16", 1, True),
    "sentinel2_cloudprod": ("uint16", 1, True), "sentinel2_scl": ("uint8", 1, True),
    "sentinel1": ("float32", 8, True), "aster": ("int16", 2, True), "era5": ("float32", 12, False),
    "dynamic_world": ("uint8", 1, True), "canopy_height_eth": ("int8", 2, True),
    "esa_worldcover": ("uint8", 1, True), "lat": ("float32", 2, False), "lon": ("float32", 2, False),
    "month": ("float32", 2, False), "biome": ("uint8", 14, False), "eco_region": ("uint16", 846, False),
}
# MMEarth's stored Sentinel-2 order: B8A before B08.
S2_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B08", "B09", "B10", "B11", "B12"]
S1_ORDER = ["asc_VV", "asc_VH", "asc_HH", "asc_HV", "desc_VV", "desc_VH", "desc_HH", "desc_HV"]
# what a missing modality holds, as MMEarth-data writes it
MISSING = {
    "sentinel2": lambda x: (x == 0).all(), "sentinel2_cloudmask": lambda x: (x == 65535).all(),
    "sentinel2_cloudprod": lambda x: (x == 65535).all(), "sentinel2_scl": lambda x: (x == 255).all(),
    "sentinel1": lambda x: np.isneginf(x).all(), "aster": lambda x: (x == -32768).all(),
    "dynamic_world": lambda x: (x == 0).all(), "canopy_height_eth": lambda x: (x == -128).all(),
    "esa_worldcover": lambda x: (x == 255).all(), "era5": lambda x: np.isnan(x).all(),
    "biome": lambda x: not x.any(), "eco_region": lambda x: not x.any(),
}


def side(out: Path, key: str):
    """A JSON side file of the file set in ``out``."""
    return json.loads((out / f"{out.name}_{key}.json").read_text())


def h5(out: Path) -> h5py.File:
    """The file set's HDF5 file, read-only."""
    return h5py.File(out / f"{out.name}.h5", "r")


def check_layout(out: Path, n: int, size: int, supplied: set[str]) -> None:
    """Every MMEarth dataset with its dtype, shape, gzip and one chunk per tile; the modalities not in
    ``supplied`` hold their no-data value."""
    with h5(out) as f:
        assert set(f) == set(MMEARTH) | {"metadata"}
        for name, (dtype, c, pixel) in MMEARTH.items():
            ds = f[name]
            shape = (n, c, size, size) if pixel else (n, c)
            assert (ds.dtype, ds.shape, ds.chunks, ds.compression) == (np.dtype(dtype), shape, (1, *shape[1:]), "gzip")
            if name not in supplied and name in MISSING:
                assert MISSING[name](ds[:]), name
        assert f["metadata"].dtype == np.dtype([("tile_id", "S100"), ("S2_type", "S10")])
        assert f["metadata"].chunks == (1,) and f["metadata"].compression == "gzip"


def check_splits(out: Path, empty: set[int] = frozenset()) -> dict[str, list[int]]:
    """Splits are disjoint, cover every row with a valid pixel, are non-empty, and keep the L1C and L2A
    tiles of one window together."""
    splits, info = side(out, "splits"), side(out, "tile_info")
    with h5(out) as f:
        ids = [m[0].decode() for m in f["metadata"][:]]
    rows = [splits[k] for k in ("train", "val", "test")]
    assert all(rows)
    assert sorted(sum(rows, [])) == sorted(set(range(len(ids))) - set(empty))
    where = {r: k for k, rs in splits.items() for r in rs}
    by_location: dict = {}
    for r, t in enumerate(ids):
        if r in where:
            key = (info[t]["scene"], info[t]["window"]["row"], info[t]["window"]["col"])
            by_location.setdefault(key, set()).add(where[r])
    assert all(len(v) == 1 for v in by_location.values())
    return splits


def check_band_stats(out: Path) -> None:
    """Band stats per S2 product (no plain ``sentinel2`` key) and for S1 equal a recomputation over the
    stored values with no-data (S2 0, S1 non-finite) excluded."""
    stats = side(out, "band_stats")
    with h5(out) as f:
        kinds = f["metadata"]["S2_type"][:]
        s2, s1 = f["sentinel2"][:], f["sentinel1"][:]
    assert "sentinel2" not in stats
    for key, kind in (("sentinel2_l1c", b"l1c"), ("sentinel2_l2a", b"l2a")):
        x = s2[kinds == kind].astype(float)
        for ch in range(13):
            v = x[:, ch][x[:, ch] != 0] if len(x) else np.zeros(0)
            if v.size == 0:
                assert stats[key]["count"][ch] == 0
                continue
            assert stats[key]["count"][ch] == v.size
            np.testing.assert_allclose(
                [stats[key][s][ch] for s in ("mean", "std", "min", "max")], [v.mean(), v.std(), v.min(), v.max()],
                rtol=1e-9,
            )
    for ch in range(8):
        v = s1[:, ch][np.isfinite(s1[:, ch])].astype(float)
        assert stats["sentinel1"]["count"][ch] == v.size
        if v.size:
            np.testing.assert_allclose([stats["sentinel1"]["mean"][ch], stats["sentinel1"]["std"][ch]],
                                       [v.mean(), v.std()], rtol=1e-6)


def check_tile_info(out: Path) -> dict:
    """tile_info has one entry per row, its S2_type matches ``metadata``, and its lat / lon match the stored
    sin / cos. Returns tile_info."""
    info = side(out, "tile_info")
    with h5(out) as f:
        meta = f["metadata"][:]
        lat = np.degrees(np.arctan2(f["lat"][:, 0], f["lat"][:, 1]))
        lon = np.degrees(np.arctan2(f["lon"][:, 0], f["lon"][:, 1]))
    ids = [m[0].decode() for m in meta]
    assert sorted(info) == sorted(ids) and len(set(ids)) == len(ids)
    for i, (tile_id, s2_type) in enumerate(meta):
        t = info[tile_id.decode()]
        assert t["S2_type"] == s2_type.decode()
        assert abs(t["lat"] - lat[i]) < 1e-4 and abs(t["lon"] - lon[i]) < 1e-4
    return info


def reference_band(path: Path, grid_transform, grid_crs, window: tuple[int, int, int], resampling: str,
                   nodata: float | None = 0) -> np.ndarray:
    """One band file read onto a tile of the scene grid with ``rasterio.warp.reproject``.

    Args:
        path: Single-band raster.
        grid_transform, grid_crs: The scene grid.
        window: (row, col, size) of the tile on the grid.
        resampling: Resampling method name.
        nodata: Source no-data value.

    Returns:
        (size, size) float64, NaN where the warp finds no valid source pixel.
    """
    row, col, size = window
    transform = rasterio.windows.transform(Window(col, row, size, size), grid_transform)
    with rasterio.open(path) as src:
        dst = np.full((size, size), np.nan)
        reproject(src.read(1).astype(np.float64), dst, src_transform=src.transform, src_crs=src.crs,
                  dst_transform=transform, dst_crs=grid_crs, resampling=Resampling[resampling],
                  src_nodata=nodata, dst_nodata=np.nan)
    return dst


def numpy_bilinear(z: np.ndarray, src_transform, grid_transform, window: tuple[int, int, int],
                   nodata: float | None = 0) -> np.ndarray:
    """Hand-written bilinear interpolation of ``z`` (on ``src_transform``) at the pixel centres of a tile of
    an axis-aligned grid in the same CRS; NaN where a needed source pixel lies outside ``z`` or is ``nodata``."""
    row, col, size = window
    rows, cols = np.arange(row, row + size) + 0.5, np.arange(col, col + size) + 0.5
    xs, ys = grid_transform.c + cols * grid_transform.a, grid_transform.f + rows * grid_transform.e
    fc = (xs - src_transform.c) / src_transform.a - 0.5
    fr = (ys - src_transform.f) / src_transform.e - 0.5
    c0, r0 = np.floor(fc).astype(int), np.floor(fr).astype(int)
    wc, wr = fc - c0, fr - r0
    ok_c = (c0 >= 0) & (c0 + 1 < z.shape[1])
    ok_r = (r0 >= 0) & (r0 + 1 < z.shape[0])
    c0, r0 = np.clip(c0, 0, z.shape[1] - 2), np.clip(r0, 0, z.shape[0] - 2)
    corners = [z[np.ix_(r0 + dr, c0 + dc)] for dr in (0, 1) for dc in (0, 1)]
    top = corners[0] * (1 - wc) + corners[1] * wc
    bottom = corners[2] * (1 - wc) + corners[3] * wc
    out = top * (1 - wr)[:, None] + bottom * wr[:, None]
    if nodata is not None:
        out[np.any([c == nodata for c in corners], axis=0)] = np.nan
    out[~ok_r, :] = np.nan
    out[:, ~ok_c] = np.nan
    return out
