"""Tests of tools/geotiff_to_mmearth.py: real TerraMesh pixels checked with plain h5py + rasterio, and bad input.

The conformance checks (:mod:`tests.converter_checks`) do not import converter code: dataset names,
dtypes, shapes, band orders and the LULC mapping are restated from the MMEarth format and the TerraMesh
sample's description, and compared with the source GeoTIFF pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

from tests.converter_checks import check_band_stats, check_layout, check_splits, check_tile_info
from tools.geotiff_to_mmearth import convert, main
from utils.data.geotiff_spec import ConversionError
from utils.data.mmearth_writer import make_splits

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "cfgs" / "data" / "terramesh_examples.yaml"

# MMEarth channel index maps: source band (0-based) of each MMEarth sentinel2 channel; None = absent (B10 in L2A).
S2_FROM_L1C = [0, 1, 2, 3, 4, 5, 6, 8, 7, 9, 10, 11, 12]
S2_FROM_L2A = [0, 1, 2, 3, 4, 5, 6, 8, 7, 9, None, 10, 11]
# TerraMesh LULC id -> Dynamic World stored code (0 = no-data); rangeland (9) -> grass (3).
DW_FROM_LULC = np.array([0, 1, 2, 4, 5, 7, 8, 9, 0, 3], np.uint8)
# data README: scene -> (centre lat, centre lon, S1 month)
SCENES = {
    "282D_485L_3_3": (-25.32, -48.11, 7), "38D_378R_2_3": (-3.40, 34.07, 6), "433D_629L_3_1": (-38.83, -72.48, 4),
    "609U_541L_3_0": (54.78, -83.95, 1), "637U_59R_1_3": (57.23, 9.85, 10),
}


@pytest.fixture(scope="module", params=[64, 128])
def terramesh(request, shared_data_dir, tmp_path_factory):
    """(tile size, folder of the converted TerraMesh examples, source folder)."""
    src = shared_data_dir / "terramesh_examples"
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    out = tmp_path_factory.mktemp("conv") / f"terramesh_{request.param}"
    convert(SPEC, src, out, tile_size=request.param, progress=False)
    return request.param, out, src


def _side(out: Path, key: str):
    return json.loads((out / f"{out.name}_{key}.json").read_text())


def test_layout_dtypes_compression(terramesh):
    size, out, _ = terramesh
    n = 5 * (224 // size) ** 2 * 2
    # modalities TerraMesh lacks hold their no-data value
    check_layout(out, n, size, supplied={"sentinel2", "sentinel1", "aster", "dynamic_world"})


def test_pixels_match_source_geotiffs(terramesh):
    size, out, src = terramesh
    info = _side(out, "tile_info")
    with h5py.File(out / f"{out.name}.h5", "r") as f:
        meta = f["metadata"][:]
        for row, (tile_id, s2_type) in enumerate(meta):
            t = info[tile_id.decode()]
            assert t["S2_type"] == s2_type.decode()
            w = rasterio.windows.Window(t["window"]["col"], t["window"]["row"], size, size)
            read = lambda folder: rasterio.open(src / folder / f"{t['scene']}.tif").read(window=w)  # noqa: E731
            s2 = f["sentinel2"][row]
            product = read("S2L1C" if s2_type == b"l1c" else "S2L2A")
            order = S2_FROM_L1C if s2_type == b"l1c" else S2_FROM_L2A
            for ch, band in enumerate(order):
                if band is None:
                    assert (s2[ch] == 0).all()  # L2A has no B10
                else:
                    np.testing.assert_array_equal(s2[ch], product[band])
            s1 = f["sentinel1"][row]
            np.testing.assert_array_equal(s1[:2], read("S1RTC").astype(np.float32))
            assert np.isneginf(s1[2:]).all()
            dem = read("DEM")[0]
            aster = f["aster"][row]
            np.testing.assert_array_equal(aster[0], dem)
            assert 0 <= aster[1].min() and aster[1].max() <= 90
            # independent central-difference slope (10 m pixels) from the whole scene, so that tile edges
            # are checked against their real neighbours; the scene's own border is left out
            z = rasterio.open(src / "DEM" / f"{t['scene']}.tif").read(1).astype(float)
            expected = np.full(z.shape, np.nan)
            gx, gy = (z[1:-1, 2:] - z[1:-1, :-2]) / 20.0, (z[2:, 1:-1] - z[:-2, 1:-1]) / 20.0
            expected[1:-1, 1:-1] = np.degrees(np.arctan(np.hypot(gx, gy)))
            r0, c0 = t["window"]["row"], t["window"]["col"]
            diff = np.abs(aster[1] - expected[r0:r0 + size, c0:c0 + size])
            assert np.nanmax(diff) <= 0.5 + 1e-9 and np.isfinite(diff).sum() >= (size - 2) ** 2
            np.testing.assert_array_equal(f["dynamic_world"][row, 0], DW_FROM_LULC[read("LULC")[0]])


def test_geolocation_month_and_tile_info(terramesh):
    size, out, _ = terramesh
    info = check_tile_info(out)
    with h5py.File(out / f"{out.name}.h5", "r") as f:
        ids = [m[0].decode() for m in f["metadata"][:]]
        lat = np.degrees(np.arctan2(f["lat"][:, 0], f["lat"][:, 1]))
        lon = np.degrees(np.arctan2(f["lon"][:, 0], f["lon"][:, 1]))
        month = f["month"][:]
    assert sorted(info) == sorted(ids)
    for scene, (c_lat, c_lon, s1_month) in SCENES.items():
        rows = [i for i, t in enumerate(ids) if info[t]["scene"] == scene]
        assert len(rows) == 2 * (224 // size) ** 2
        assert abs(lat[rows].mean() - c_lat) < 0.02 and abs(lon[rows].mean() - c_lon) < 0.02
        angle = 2 * np.pi * s1_month / 12
        np.testing.assert_allclose(month[rows], np.tile([np.sin(angle), np.cos(angle)], (len(rows), 1)), atol=1e-6)
        for i in rows:
            t = info[ids[i]]
            assert abs(t["lat"] - lat[i]) < 1e-4 and abs(t["lon"] - lon[i]) < 1e-4
            assert t["CRS"].startswith("EPSG:32") and t["NO_DATA"] is False
            b10 = "B10" in t["BANDS"]["sentinel2"]
            assert b10 == (t["S2_type"] == "l1c")
            assert t["BANDS"]["sentinel1_asc"] == ["VV", "VH"] and t["BANDS"]["sentinel1_desc"] is None


def test_splits_and_band_stats(terramesh):
    _, out, _ = terramesh
    check_splits(out)  # the L1C and L2A tiles of one window stay in one split
    check_band_stats(out)
    stats = _side(out, "band_stats")
    with h5py.File(out / f"{out.name}.h5", "r") as f:
        aster = f["aster"][:]
    assert stats["sentinel2_l2a"]["count"][10] == 0  # L2A has no B10
    assert stats["sentinel1"]["count"][2:] == [0] * 6
    np.testing.assert_allclose(stats["aster"]["max"], aster.max(axis=(0, 2, 3)))


# ------------------------------------------------------------------ bad input, tiny GeoTIFFs


def _tif(path: Path, data: np.ndarray, crs="EPSG:32632", origin=(500_000.0, 6_000_000.0), res=10.0, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = data.shape
    desc, tags = kw.pop("descriptions", None), kw.pop("tags", {})
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype, crs=crs,
                       transform=from_origin(*origin, res, res), **kw) as ds:
        ds.write(data)
        ds.update_tags(**tags)
        for i, d in enumerate(desc or []):
            ds.set_band_description(i + 1, d)


def _spec(tmp_path: Path, sources: dict, **top) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, **top}))
    return path


S2_SPEC = {"modality": "sentinel2", "s2_type": "l2a", "bands": ["B04", "B08", "B8A"]}
S1_SPEC = {"modality": "sentinel1", "bands": ["asc_VV", "asc_VH"]}


@pytest.fixture
def tiny(tmp_path):
    """Two 128 x 128 scenes: S2 (B04, B08, B8A) and S1 (VV, VH); returns (src folder, spec path)."""
    rng = np.random.default_rng(0)
    for scene in ("a", "b"):
        _tif(tmp_path / "src" / "S2" / f"{scene}.tif", rng.integers(100, 5000, (3, 128, 128)).astype(np.uint16))
        _tif(tmp_path / "src" / "S1" / f"{scene}.tif", rng.normal(-15, 3, (2, 128, 128)),
             tags={"datetime": "2020-03-05T10:00:00"})
    return tmp_path / "src", _spec(tmp_path, {"S2": S2_SPEC, "S1": S1_SPEC})


def test_tiny_conversion_reorders_by_name_and_splits(tiny, tmp_path):
    src, spec = tiny
    summary = convert(spec, src, tmp_path / "out" / "tiny_64", progress=False)
    assert summary["num_tiles"] == 8 and all(summary["split_sizes"].values())
    with h5py.File(tmp_path / "out" / "tiny_64" / "tiny_64.h5", "r") as f:
        raw = rasterio.open(src / "S2" / "a.tif").read()
        np.testing.assert_array_equal(f["sentinel2"][0, 3], raw[0, :64, :64])  # B04
        np.testing.assert_array_equal(f["sentinel2"][0, 7], raw[2, :64, :64])  # B8A is channel 7
        np.testing.assert_array_equal(f["sentinel2"][0, 8], raw[1, :64, :64])  # B08 is channel 8
        assert (f["sentinel2"][0, [0, 1, 2, 4, 5, 6, 9, 10, 11, 12]] == 0).all()
        np.testing.assert_allclose(f["month"][0], [np.sin(np.pi / 2), np.cos(np.pi / 2)], atol=1e-6)


@pytest.mark.parametrize("what, kwargs, match", [
    ("size", {"data": np.ones((2, 96, 128))}, r"size .* differs"),
    ("crs", {"crs": "EPSG:32633"}, r"CRS .* differs"),
    ("transform", {"origin": (500_005.0, 6_000_000.0)}, r"transform .* differs"),
])
def test_mismatched_rasters(tiny, tmp_path, what, kwargs, match):
    src, spec = tiny
    data = kwargs.pop("data", np.ones((2, 128, 128)))
    _tif(src / "S1" / "b.tif", data, **kwargs)
    with pytest.raises(ConversionError, match=match) as err:
        convert(spec, src, tmp_path / "out", progress=False)
    assert "S1/b.tif" in str(err.value) and "sources.S1" in str(err.value)
    assert ".resampling (e.g. bilinear)" in str(err.value)  # the message names the way out


@pytest.mark.parametrize("sources, match", [
    ({"S2": S2_SPEC, "S1": {**S1_SPEC, "folder": "nope"}}, r"sources\.S1: folder .*nope does not exist"),
    ({"S2": {**S2_SPEC, "bands": ["B04", "B08", "B13"]}}, r"sources\.S2\.bands: unknown band 'B13' .* B8A"),
    ({"S2": {**S2_SPEC, "bands": ["B04", "B08"]}}, r"S2/a\.tif: has 3 bands, .*sources\.S2\.bands lists 2"),
    ({"S2": {**S2_SPEC, "modality": "sentinel3"}}, r"sources\.S2\.modality: unknown modality .* sentinel1"),
    ({"S2": {**S2_SPEC, "s2_type": None}}, r"sources\.S2\.s2_type"),
    ({"S2": {**S2_SPEC, "bnds": []}}, r"sources\.S2: unknown keys \['bnds'\]"),
    ({"S2": S2_SPEC, "S1": S1_SPEC, "S1b": {**S1_SPEC, "folder": "S1"}}, r"'asc_VV' also comes from sources\.S1"),
])
def test_bad_spec(tiny, tmp_path, sources, match):
    src, _ = tiny
    with pytest.raises(ConversionError, match=match):
        convert(_spec(tmp_path, sources), src, tmp_path / "out", progress=False)


def test_missing_scene_and_cli_error(tiny, tmp_path, capsys):
    src, spec = tiny
    (src / "S1" / "b.tif").unlink()
    with pytest.raises(ConversionError, match=r"sources\.S1: scene\(s\) \['b'\] missing: expected .*S1/b\.tif"):
        convert(spec, src, tmp_path / "out", progress=False)
    assert main(["--spec", str(spec), "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: sources.S1: scene(s) ['b'] missing")


def test_scene_name_that_cannot_be_a_tile_id(tiny, tmp_path):
    src, spec = tiny
    for folder in ("S2", "S1"):
        (src / folder / "b.tif").rename(src / folder / "São_Paulo.tif")
    with pytest.raises(ConversionError, match=r"scene 'São_Paulo' \(.*S1/São_Paulo\.tif, .*S2/São_Paulo\.tif\) "
                                              r"gives tile ids such "
                                              r"as 'São_Paulo_l1c_r1_c1', which MMEarth's metadata"):
        convert(spec, src, tmp_path / "out", progress=False)


def test_band_descriptions_contradicting_spec(tiny, tmp_path):
    src, spec = tiny
    _tif(src / "S2" / "a.tif", np.ones((3, 128, 128), np.uint16), descriptions=["B04", "B8A", "B08"])
    with pytest.raises(ConversionError, match=r"S2/a\.tif: band 2 is described as 'B8A' .*bands\[1\] says 'B08'"):
        convert(spec, src, tmp_path / "out", progress=False)


def test_nan_inf_out_of_range_and_all_no_data_tiles(tiny, tmp_path):
    src, spec = tiny
    s2 = rasterio.open(src / "S2" / "a.tif").read().astype(np.int32)
    s2[:, :64, :64] = 0  # top-left tile: no S2 ...
    s2[0, 80, 80] = -5  # ... and a negative reflectance elsewhere (does not fit uint16)
    _tif(src / "S2" / "a.tif", s2.astype(np.int16))
    s1 = rasterio.open(src / "S1" / "a.tif").read()
    s1[:, :64, :64] = np.nan  # ... and no S1
    s1[1, 120, 120] = np.inf
    _tif(src / "S1" / "a.tif", s1)
    out = tmp_path / "out" / "holes"
    summary = convert(spec, src, out, progress=False)
    assert summary["empty_tiles"] == [0]
    assert summary["invalid_pixels"]["S1"]["NaN / inf or no source pixel"] == 2 * 64 * 64 + 1
    assert summary["invalid_pixels"]["S2"]["out of dtype range"] == 1
    info, splits = _side(out, "tile_info"), _side(out, "splits")
    with h5py.File(out / "holes.h5", "r") as f:
        assert np.isneginf(f["sentinel1"][0]).all() and (f["sentinel2"][0] == 0).all()
        assert f["sentinel2"][3, 3, 16, 16] == 0 and np.isneginf(f["sentinel1"][3, 1, 56, 56])
        ids = [m[0].decode() for m in f["metadata"][:]]
    assert info[ids[0]]["ALL_NO_DATA"] and info[ids[0]]["NO_DATA"]
    assert info[ids[3]]["NO_DATA"] and not info[ids[3]]["ALL_NO_DATA"] and not info[ids[1]]["NO_DATA"]
    assert 0 not in sum(splits.values(), []) and len(sum(splits.values(), [])) == 7
    assert np.isfinite(json.loads((out / "holes_band_stats.json").read_text())["sentinel1"]["mean"]).all()


def test_unknown_class_id_and_existing_output(tmp_path):
    lulc = np.full((1, 64, 64), 1, np.uint8)
    lulc[0, 3, 3] = 42
    _tif(tmp_path / "src" / "LULC" / "x.tif", lulc)
    spec = _spec(tmp_path, {"LULC": {"modality": "dynamic_world", "bands": ["label"], "remap": {1: 1}}})
    with pytest.raises(ConversionError, match=r"LULC/x\.tif band 1: class ids \[42\.0\] are not in spec sources"):
        convert(spec, tmp_path / "src", tmp_path / "out", progress=False, fractions={"train": 1.0})
    spec = _spec(tmp_path, {"LULC": {"modality": "dynamic_world", "bands": ["label"], "remap": {1: 1, 42: None}}})
    convert(spec, tmp_path / "src", tmp_path / "out", progress=False, fractions={"train": 1.0})
    with h5py.File(tmp_path / "out" / "out.h5", "r") as f:
        assert f["dynamic_world"][0, 0, 3, 3] == 0 and f["dynamic_world"][0, 0, 0, 0] == 1
        assert f["metadata"][0][1] == b"l1c" and (f["sentinel2"][0] == 0).all()
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        convert(spec, tmp_path / "src", tmp_path / "out", progress=False, fractions={"train": 1.0})


def test_make_splits_deterministic_nonempty_grouped():
    groups = ["a", "a", "b", "b", "c", "c"]
    s = make_splits(groups, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert s == make_splits(groups, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert all(len(v) == 2 for v in s.values()) and sorted(sum(s.values(), [])) == list(range(6))
    assert make_splits(["a"], {"train": 0.8, "val": 0.1, "test": 0.1}) == {"train": [0], "val": [], "test": []}
    big = make_splits(list(range(100)), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert [len(v) for v in big.values()] == [80, 10, 10]
