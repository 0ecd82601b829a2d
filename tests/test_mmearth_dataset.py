"""Tests of utils/data/mmearth.py on format-faithful fixtures written by tests/mmearth_fixture.py."""

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from multimae.domains import IGNORE_INDEX, get_domain
from tests.mmearth_fixture import write_mmearth_fileset
from utils.data.mmearth import MMEarthDataset, standardize_per_tile

DEFAULT = ["s2_rgb", "s2_rededge", "s2_nir", "s2_swir", "elevation", "worldcover", "s2_rgb_normpix"]


def _fresh(tmp_path: Path, name="fs", **kw) -> Path:
    return write_mmearth_fileset(tmp_path / name, num_tiles=kw.pop("num_tiles", 6), tile_size=16, **kw)


def _stats(folder: Path) -> dict:
    return json.loads((folder / f"{folder.name}_band_stats.json").read_text())


def _expected_s2(folder: Path, row: int, bands) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: z-score of ``bands`` of a full tile with the tile's product stats."""
    with h5py.File(folder / f"{folder.name}.h5") as h5:
        raw = h5["sentinel2"][row].astype(np.float64)
        product = h5["metadata"][row][1].decode()
    st = _stats(folder)[f"sentinel2_{product}"]
    names = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B08", "B09", "B10", "B11", "B12"]
    idx = [names.index(b) for b in bands]
    x = (raw[idx] - np.array(st["mean"])[idx, None, None]) / np.array(st["std"])[idx, None, None]
    valid = (raw[idx] != 0).all(0)
    return np.where(valid, x, 0), valid


def test_shapes_dtypes_masks(mmearth_fileset):
    ds = MMEarthDataset(mmearth_fileset, DEFAULT, "train", input_size=56, augment=True)
    assert ds.tile_size == 64 and ds.split_names == ["train", "val", "test"]
    sample = ds[0]
    assert set(sample["inputs"]) == set(DEFAULT) - {"s2_rgb_normpix"}  # output-only: derived by the model
    assert sample["index"] == int(ds.rows[0])
    for name, x in sample["inputs"].items():
        d, v = get_domain(name), sample["valid"][name]
        assert v.dtype == torch.bool and v.shape == (56, 56)
        if d.kind == "categorical":
            assert x.dtype == torch.int64 and x.shape == (56, 56)
            assert x.min() >= IGNORE_INDEX and x.max() < d.num_classes
            assert torch.equal(v, x != IGNORE_INDEX)
        else:
            assert x.dtype == torch.float32 and x.shape == (d.num_channels, 56, 56)
            assert torch.isfinite(x).all() and (x[:, ~v] == 0).all()
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["inputs"]["s2_rgb"].shape == (4, 3, 56, 56) and batch["index"].shape == (4,)
    assert json.loads(json.dumps(ds.domain_info()))["s2_rgb_normpix"]["source"] == "s2_rgb"


def test_band_order_and_per_product_stats(mmearth_fileset):
    ds = MMEarthDataset(mmearth_fileset, ["s2_nir", "s2_rgb"], "train")  # full tile, no augmentation
    info = ds.domain_info()["s2_nir"]
    assert info["bands"] == ["B8A", "B08"] and set(info["stats"]) == {"sentinel2_l1c", "sentinel2_l2a"}
    products = set()
    with h5py.File(mmearth_fileset / "mmearth_tiny.h5") as h5:
        for pos, row in enumerate(ds.rows):
            products.add(h5["metadata"][row][1])
            sample = ds[pos]
            for name, bands in (("s2_nir", ["B8A", "B08"]), ("s2_rgb", ["B04", "B03", "B02"])):
                exp, valid = _expected_s2(mmearth_fileset, row, bands)
                np.testing.assert_array_equal(sample["valid"][name].numpy(), valid)
                np.testing.assert_allclose(sample["inputs"][name].numpy(), exp, rtol=1e-4, atol=1e-4)
    assert products == {b"l1c", b"l2a"}  # both products exercised
    # Swapping to the other product's stats would change the values: the stats really differ.
    st = _stats(mmearth_fileset)
    assert abs(st["sentinel2_l1c"]["mean"][7] - st["sentinel2_l2a"]["mean"][7]) > 10


def test_nodata_becomes_mask_or_ignore(tmp_path):
    folder = _fresh(tmp_path)
    with h5py.File(folder / "fs.h5", "r+") as h5:
        s1 = h5["sentinel1"][...]
        s1[1, 0, 2, 3], s1[1, 1, 4, 4] = np.nan, np.inf
        h5["sentinel1"][...] = s1
        wc = h5["esa_worldcover"][...]
        wc[:, 0, 0, :4] = [0, 255, 10, 100]
        h5["esa_worldcover"][...] = wc
        dw = h5["dynamic_world"][...]
        dw[:, 0, 0, :3] = [0, 1, 9]
        h5["dynamic_world"][...] = dw
        s2 = h5["sentinel2"][...]
        s2[:, 3, 5, 5] = 0  # B04 missing at (5, 5): s2_rgb invalid there, s2_nir still valid
        h5["sentinel2"][...] = s2
        canopy = h5["canopy_height_eth"][...]
        canopy[0, 0, 6, 6:9] = [-5, 0, 7]  # any negative height is no-data (int8 cannot hold the writer's 255)
        h5["canopy_height_eth"][...] = canopy
    ds = MMEarthDataset(folder, ["s2_rgb", "s2_nir", "s1", "s1_desc", "worldcover", "dynamic_world", "canopy_height"],
                        indices=[0, 1])
    b0, b1 = ds[0], ds[1]
    assert b0["inputs"]["worldcover"][0, :4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 0, 10]
    assert b0["inputs"]["dynamic_world"][0, :3].tolist() == [IGNORE_INDEX, 0, 8]
    assert not b0["valid"]["s2_rgb"][5, 5] and (b0["inputs"]["s2_rgb"][:, 5, 5] == 0).all()
    assert b0["valid"]["s2_nir"][5, 5]
    assert b0["valid"]["canopy_height"][6, 6:9].tolist() == [False, True, True]
    assert not b1["valid"]["s1"][2, 3] and not b1["valid"]["s1"][4, 4]
    assert not b0["valid"]["s1_desc"].any()  # the fixture drops the descending orbit on row 0
    for s in (b0, b1):
        for x in s["inputs"].values():
            assert torch.isfinite(x.float()).all()


def test_all_nodata_tile(tmp_path):
    folder = _fresh(tmp_path)
    with h5py.File(folder / "fs.h5", "r+") as h5:
        h5["sentinel2"][2] = 0
        h5["aster"][2] = -32768
        h5["esa_worldcover"][2] = 255
        h5["sentinel1"][2] = -np.inf
    for norm in ("per_tile", "band_stats"):
        s = MMEarthDataset(folder, DEFAULT + ["s1"], indices=[2], input_size=12, augment=True,
                           elevation_norm=norm)[0]
        for name, x in s["inputs"].items():
            assert not s["valid"][name].any(), name
            assert torch.isfinite(x.float()).all()
            assert (x == (IGNORE_INDEX if x.dtype == torch.int64 else 0)).all()


def test_same_crop_and_flip_on_all_domains(mmearth_fileset):
    ds = MMEarthDataset(mmearth_fileset, ["s2_rgb", "worldcover"], input_size=40, augment=True, hflip=0.5)
    with h5py.File(mmearth_fileset / "mmearth_tiny.h5") as h5:
        flips = set()
        for pos, row in enumerate(ds.rows):
            full, _ = _expected_s2(mmearth_fileset, row, ["B04", "B03", "B02"])
            out = ds[pos]
            got = out["inputs"]["s2_rgb"].numpy()
            # Find the window (y0, x0, flip) of the S2 output by brute force ...
            hits = [(y, x, f) for y in range(25) for x in range(25) for f in (False, True)
                    if np.allclose((full[:, y:y + 40, x:x + 40][..., ::-1] if f else full[:, y:y + 40, x:x + 40]),
                                   got, atol=1e-4)]
            assert len(hits) == 1
            y, x, f = hits[0]
            flips.add(f)
            # ... and check the land-cover map was cut with the same window.
            wc = h5["esa_worldcover"][row, 0, y:y + 40, x:x + 40]
            wc = wc[:, ::-1] if f else wc
            codes = {c: i for i, c in enumerate(get_domain("worldcover")._modality.class_values)}
            exp = np.vectorize(lambda c: codes.get(int(c), IGNORE_INDEX))(wc)
            np.testing.assert_array_equal(out["inputs"]["worldcover"].numpy(), exp)
    assert flips == {False, True}


def test_deterministic_per_seed_epoch_index(mmearth_fileset):
    kw = dict(input_size=48, augment=True)
    a = MMEarthDataset(mmearth_fileset, ["s2_rgb"], seed=3, **kw)
    b = MMEarthDataset(mmearth_fileset, ["s2_rgb"], seed=3, **kw)
    order = list(range(len(a)))[::-1]
    one = [a[i]["inputs"]["s2_rgb"] for i in range(len(a))]
    batched = b.__getitems__(order)  # other order, other batch composition
    for i, s in zip(order, batched):
        assert torch.equal(one[i], s["inputs"]["s2_rgb"])
    a.set_epoch(1)
    assert a.epoch == 1
    assert any(not torch.equal(one[i], a[i]["inputs"]["s2_rgb"]) for i in range(len(a)))
    c = MMEarthDataset(mmearth_fileset, ["s2_rgb"], seed=4, **kw)
    assert any(not torch.equal(one[i], c[i]["inputs"]["s2_rgb"]) for i in range(len(a)))
    centre = MMEarthDataset(mmearth_fileset, ["s2_rgb"], input_size=48)  # evaluation: centre crop, no flip
    exp, _ = _expected_s2(mmearth_fileset, centre.rows[0], ["B04", "B03", "B02"])
    np.testing.assert_allclose(centre[0]["inputs"]["s2_rgb"].numpy(), exp[:, 8:56, 8:56], atol=1e-4)


def test_distributed_sampler_with_workers(mmearth_fileset):
    ds = MMEarthDataset(mmearth_fileset, DEFAULT, input_size=56, augment=True)
    ds.set_epoch(2)
    expected = {ds.rows[i]: ds[i] for i in range(len(ds))}
    ds[0]  # the parent holds an open handle now; workers must reopen their own
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(2)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, persistent_workers=False)
        for batch in loader:
            for j, row in enumerate(batch["index"].tolist()):
                seen.append(row)
                for name in expected[row]["inputs"]:
                    assert torch.equal(batch["inputs"][name][j], expected[row]["inputs"][name])
                    assert torch.equal(batch["valid"][name][j], expected[row]["valid"][name])
    assert sorted(set(seen)) == sorted(ds.rows.tolist())
    pickle.loads(pickle.dumps(ds))[0]  # picklable (spawn) after use


def test_per_tile_elevation_and_resize(mmearth_fileset):
    ds = MMEarthDataset(mmearth_fileset, ["elevation", "worldcover", "s2_rgb"], input_size=56, resize=True)
    s = ds[0]
    assert s["inputs"]["elevation"].shape == (1, 56, 56) and s["inputs"]["worldcover"].shape == (56, 56)
    with h5py.File(mmearth_fileset / "mmearth_tiny.h5") as h5:
        wc_codes = set(np.unique(h5["esa_worldcover"][ds.rows[0]]).tolist())
    codes = get_domain("worldcover")._modality.class_values
    got = {codes[c] for c in s["inputs"]["worldcover"].unique().tolist() if c >= 0}
    assert got <= wc_codes  # nearest neighbour: no invented classes
    x = np.arange(100, dtype=np.float32).reshape(1, 1, 10, 10)
    valid = np.ones((1, 10, 10), bool)
    kept = np.arange(10, 90, dtype=np.float64)
    exp = (x - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)
    np.testing.assert_allclose(standardize_per_tile(x, valid), exp, rtol=1e-5)
    valid[0, 0] = False  # invalid pixels do not enter the statistics
    kept = np.sort(x.ravel()[10:])[9:81].astype(np.float64)
    np.testing.assert_allclose(standardize_per_tile(x, valid), (x - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6),
                               rtol=1e-5)
    # a flat tile (trimmed std 0) with a few metres of relief at its edges is divided by the 1 m floor, not by 1e-3
    flat = np.full((1, 1, 10, 10), 250.0, np.float32)
    flat[0, 0, 0, :5] = 254.0
    out = standardize_per_tile(flat, np.ones((1, 10, 10), bool))
    np.testing.assert_allclose(out.max(), 4.0, rtol=1e-5)
    np.testing.assert_allclose(out.min(), 0.0, atol=1e-6)


# ---------------------------------------------------------------------------- bad input


def _rewrite(folder: Path, key: str, data: np.ndarray) -> None:
    with h5py.File(folder / f"{folder.name}.h5", "r+") as h5:
        del h5[key]
        h5.create_dataset(key, data=data, chunks=(1, *data.shape[1:]), compression="gzip")


def test_bad_paths_and_side_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MMEarthDataset(tmp_path / "nope", ["s2_rgb"])
    folder = _fresh(tmp_path)
    (folder / "fs_splits.json").unlink()
    with pytest.raises(FileNotFoundError, match="fs_splits.json is missing"):
        MMEarthDataset(folder / "fs.h5", ["s2_rgb"])
    folder = _fresh(tmp_path, "fs2")
    with pytest.raises(KeyError, match=r"fs2_splits.json: unknown split 'training'; valid splits: train, val, test"):
        MMEarthDataset(folder, ["s2_rgb"], "training")
    (folder / "fs2_splits.json").write_text(json.dumps({"train": [0, 99]}))
    with pytest.raises(ValueError, match=r"fs2_splits.json: split 'train' holds row 99"):
        MMEarthDataset(folder, ["s2_rgb"])
    (folder / "fs2_splits.json").write_text("{\"train\": [0,")
    with pytest.raises(ValueError, match=r"fs2_splits.json: not valid JSON"):
        MMEarthDataset(folder, ["s2_rgb"])
    with pytest.raises(KeyError, match=r"unknown domain 'depth'; valid domains: .*elevation"):
        MMEarthDataset(folder, ["depth"])
    with pytest.raises(ValueError, match=r"input_size 32 must be in \[1, tile size 16\]"):
        MMEarthDataset(_fresh(tmp_path, "fs3"), ["s2_rgb"], input_size=32)


def test_bad_band_stats(tmp_path):
    folder = _fresh(tmp_path)
    path = folder / "fs_band_stats.json"
    good = json.loads(path.read_text())
    bad = dict(good)
    del bad["sentinel2_l1c"]
    path.write_text(json.dumps(bad))
    with pytest.raises(KeyError, match=r"fs_band_stats.json: band stats for 'sentinel2_l1c' missing"):
        MMEarthDataset(folder, ["s2_rgb"])
    bad = dict(good)
    del bad["aster"]
    path.write_text(json.dumps(bad))
    MMEarthDataset(folder, ["elevation", "worldcover"])  # per-tile elevation needs no stats
    with pytest.raises(KeyError, match=r"band stats for 'aster' missing; keys present: .*sentinel1"):
        MMEarthDataset(folder, ["elevation"], elevation_norm="band_stats")
    bad = json.loads(json.dumps(good))
    bad["sentinel1"]["std"] = bad["sentinel1"]["std"][:4]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"sentinel1.std has 4 values, modality 'sentinel1' has 8 bands"):
        MMEarthDataset(folder, ["s1"])
    bad = json.loads(json.dumps(good))
    bad["sentinel2_l2a"]["std"][3] = 0.0
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"sentinel2_l2a band B04 has mean .* std 0.0"):
        MMEarthDataset(folder, ["s2_rgb"])
    MMEarthDataset(folder, ["s2_nir"])  # B04 unused: its std does not matter


def test_bad_hdf5_datasets(tmp_path):
    folder = _fresh(tmp_path)
    with h5py.File(folder / "fs.h5", "r+") as h5:
        del h5["aster"]
    with pytest.raises(KeyError, match=r"fs.h5: dataset 'aster' missing; datasets present: .*sentinel2"):
        MMEarthDataset(folder, ["s2_rgb", "elevation"])
    MMEarthDataset(folder, ["s2_rgb", "worldcover"])  # only the datasets needed are required
    with h5py.File(folder / "fs.h5") as h5:
        s2 = h5["sentinel2"][...]
    _rewrite(folder, "sentinel2", s2.astype(np.float32))
    with pytest.raises(ValueError, match=r"fs.h5: dataset 'sentinel2' has dtype float32, MMEarth stores uint16"):
        MMEarthDataset(folder, ["s2_rgb"])
    _rewrite(folder, "sentinel2", s2[:, :12])
    with pytest.raises(ValueError, match=r"dataset 'sentinel2' has shape \(6, 12, 16, 16\), expected \(N, 13, S, S\)"):
        MMEarthDataset(folder, ["s2_rgb"])
    _rewrite(folder, "sentinel2", s2)
    meta = np.array([(b"t", b"L1C"), (b"t", b"l3x")] * 3, dtype=[("meta_id", "S100"), ("S2_type", "S10")])
    _rewrite(folder, "metadata", meta)  # other field names are fine (read by position), case too
    with pytest.raises(ValueError, match=r"metadata row 1 has S2_type 'l3x'; expected one of"):
        MMEarthDataset(folder, ["s2_rgb"], indices=[0, 1])
    MMEarthDataset(folder, ["s2_rgb"], indices=[0, 2])


def test_fileset_from_h5_path_and_folder(tmp_path, mmearth_fileset):
    folder = shutil.copytree(mmearth_fileset, tmp_path / "other_name")
    ds = MMEarthDataset(folder / "mmearth_tiny.h5", ["s2_rgb"], "val")
    assert len(ds) == len(MMEarthDataset(folder, ["s2_rgb"], "val")) > 0  # single .h5 in a folder


def test_real_terramesh_tiles(tmp_path, shared_data_dir):
    """Real pixels: a converter-built file set (TerraMesh examples) read by the dataset, B8A/B08 checked
    against the source GeoTIFF (S2L1C stores B08 before B8A) with rasterio, independently of the converter."""
    rasterio = pytest.importorskip("rasterio")
    src = shared_data_dir / "terramesh_examples"
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    from tools.geotiff_to_mmearth import convert

    out = tmp_path / "terramesh64"
    convert(Path(__file__).resolve().parents[1] / "cfgs/data/terramesh_examples.yaml", src, out, tile_size=64,
            progress=False)
    ds = MMEarthDataset(out, DEFAULT + ["s1", "dynamic_world"], "train", input_size=56, augment=True)
    batch = next(iter(DataLoader(ds, batch_size=8, num_workers=0)))
    assert batch["inputs"]["s2_rgb"].shape == (8, 3, 56, 56) and batch["inputs"]["worldcover"].dtype == torch.int64
    for name, x in batch["inputs"].items():
        assert torch.isfinite(x.float()).all(), name
    assert batch["valid"]["s2_rgb"].float().mean() > 0.9  # real S2 tiles are mostly valid
    assert not batch["valid"]["worldcover"].any()  # no WorldCover source: all no-data -> ignored
    # Band order by name on real pixels: find an L1C tile and compare with the GeoTIFF.
    full = MMEarthDataset(out, ["s2_nir"], indices=range(ds.num_rows))
    with h5py.File(out / "terramesh64.h5") as h5:
        meta = h5["metadata"][:]
    row = next(i for i, m in enumerate(meta) if m[1] == b"l1c")
    scene = bytes(meta[row][0]).decode()
    tif = next(p for p in (src / "S2L1C").glob("*.tif") if scene.startswith(p.stem))
    with rasterio.open(tif) as f:
        b08, b8a = f.read(8).astype(np.float64), f.read(9).astype(np.float64)  # file order: ..., B08, B8A, ...
    got = full[row]["inputs"]["s2_nir"].numpy()
    st = _stats(out)["sentinel2_l1c"]
    found = False
    for y in range(0, b08.shape[0] - 63):
        for x in range(0, b08.shape[1] - 63):
            exp = (b8a[y:y + 64, x:x + 64] - st["mean"][7]) / st["std"][7]
            if np.allclose(got[0], exp, atol=1e-3):
                exp8 = (b08[y:y + 64, x:x + 64] - st["mean"][8]) / st["std"][8]
                np.testing.assert_allclose(got[1], exp8, atol=1e-3)
                found = True
                break
        if found:
            break
    assert found, f"s2_nir channel 0 of row {row} is not B8A of {tif.name}"


def test_image_level_domains(mmearth_fileset, monkeypatch):
    from multimae.domains import DOMAINS, Domain

    monkeypatch.setitem(DOMAINS, "latitude", Domain("latitude", "lat", ("sin_lat", "cos_lat")))
    monkeypatch.setitem(DOMAINS, "biome", Domain("biome", "biome", tuple(f"biome_{i}" for i in range(14)), "ce"))
    ds = MMEarthDataset(mmearth_fileset, ["latitude", "biome", "s2_rgb"], input_size=32, augment=True)
    s = ds[0]
    with h5py.File(mmearth_fileset / "mmearth_tiny.h5") as h5:
        lat, biome = h5["lat"][ds.rows[0]], h5["biome"][ds.rows[0]]
    st = _stats(mmearth_fileset)["lat"]
    assert s["inputs"]["latitude"].shape == (2,) and s["valid"]["latitude"].shape == ()
    np.testing.assert_allclose(s["inputs"]["latitude"].numpy(), (lat - st["mean"]) / st["std"], rtol=1e-5)
    assert s["inputs"]["biome"].item() == int(np.argmax(biome)) and s["valid"]["biome"].item()


def test_a_domain_class_table_keeps_modality_nodata_out(mmearth_fileset):
    # worldcover12 (the reference's table) lists code 255 as class 11; 255 is WorldCover no-data, so it stays
    # IGNORE_INDEX and the same pixels carry the same class ids as the 11-class domain.
    ds11 = MMEarthDataset(mmearth_fileset, ["worldcover"], "train")
    ds12 = MMEarthDataset(mmearth_fileset, ["worldcover12"], "train")
    a = torch.stack([ds11[i]["inputs"]["worldcover"] for i in range(len(ds11))])
    b = torch.stack([ds12[i]["inputs"]["worldcover12"] for i in range(len(ds12))])
    assert torch.equal(a, b) and (a == IGNORE_INDEX).any() and not (b == 11).any()
    assert ds12.domain_info()["worldcover12"]["class_names"][11] == "no data (code 255)"
# ---------------------------------------------------------------- damaged rows and files


def _corrupt_chunk(folder: Path, dataset: str, row: int) -> None:
    """Flip 16 bytes in the middle of ``row``'s gzip chunk (offsets from h5py's chunk index)."""
    path = folder / f"{folder.name}.h5"
    with h5py.File(path) as h5:
        dset = h5[dataset]
        info = dset.id.get_chunk_info_by_coord((row,) + (0,) * (dset.ndim - 1))
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        data = f.read(16)
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes(b ^ 0xA5 for b in data))


def _epoch(ds, workers: int) -> dict:
    """One epoch of ``ds`` in order: {"index": (N,), domain: (N, C, h, w)}."""
    batches = list(DataLoader(ds, batch_size=4, num_workers=workers))
    return {"index": torch.cat([b["index"] for b in batches]),
            **{d: torch.cat([b["inputs"][d] for b in batches]) for d in batches[0]["inputs"]}}


def test_corrupt_chunk_is_skipped_counted_and_substituted_alike_for_any_worker_count(tmp_path, capfd):
    folder = _fresh(tmp_path, num_tiles=12)
    train = json.loads((folder / "fs_splits.json").read_text())["train"]
    bad = train[3]
    _corrupt_chunk(folder, "sentinel2", bad)
    with h5py.File(folder / "fs.h5") as h5, pytest.raises(OSError):
        h5["sentinel2"][bad]  # the chunk really is unreadable
    runs = {}
    for workers in (0, 2):
        ds = MMEarthDataset(folder, ["s2_rgb", "elevation"], "train", input_size=12, augment=True, seed=3,
                            max_bad_rows=2)
        ds.set_epoch(1)
        runs[workers] = _epoch(ds, workers)  # the whole epoch finishes
        assert ds.skipped_rows == 1 and ds.bad_rows == [bad]  # the workers' finding, seen by this process
        err = capfd.readouterr().err
        assert f"fs.h5: skipped row {bad} (dataset 'sentinel2': zlib.error" in err
    assert torch.equal(runs[0]["index"], runs[2]["index"]) and torch.equal(runs[0]["s2_rgb"], runs[2]["s2_rgb"])
    pos = train.index(bad)
    sub = int(runs[0]["index"][pos])
    assert sub != bad and sub in train
    assert runs[0]["index"][[i for i in range(len(train)) if i != pos]].tolist() == [r for r in train if r != bad]
    # the substitute is the substitute row's own sample (its crop and flip are a function of its row)
    own = train.index(sub)
    assert torch.equal(runs[0]["s2_rgb"][pos], runs[0]["s2_rgb"][own])
    # a new process (a resumed run) draws the same substitute for the same (seed, epoch, row)
    ds = MMEarthDataset(folder, ["s2_rgb", "elevation"], "train", input_size=12, augment=True, seed=3, max_bad_rows=2)
    ds.set_epoch(1)
    assert int(ds[pos]["index"]) == sub


def test_damaged_rows_past_the_limit_are_one_error(tmp_path, capsys):
    from utils.config import user_errors
    from utils.data.mmearth_files import DataFileError

    folder = _fresh(tmp_path, num_tiles=12)
    train = json.loads((folder / "fs_splits.json").read_text())["train"]
    for row in train[:2]:
        _corrupt_chunk(folder, "aster", row)
    ds = MMEarthDataset(folder, ["s2_rgb", "elevation"], "train", max_bad_rows=0)
    with pytest.raises(DataFileError, match=rf"fs.h5: 1 damaged rows, more than data.max_bad_rows=0: rows {train[0]};"
                                            rf" .*row {train[0]} \(aster: zlib.error"):
        ds[0]
    ds = MMEarthDataset(folder, ["s2_rgb", "elevation"], "train", max_bad_rows=1)
    with pytest.raises(SystemExit), user_errors():  # raised in a worker: still one line, the worker's message
        _epoch(ds, 2)
    err = capsys.readouterr().err.splitlines()
    line = next(x for x in err if x.startswith("error: "))
    assert f"fs.h5: 2 damaged rows, more than data.max_bad_rows=1: rows {train[0]}, {train[1]}" in line
    assert "Traceback" not in "\n".join(err)


def test_physically_impossible_values_skip_the_row_but_nodata_does_not(tmp_path):
    folder = _fresh(tmp_path, num_tiles=12)
    train = json.loads((folder / "fs_splits.json").read_text())["train"]
    with h5py.File(folder / "fs.h5", "r+") as h5:
        s1 = h5["sentinel1"][:]
        assert np.isneginf(s1[:, 2]).all()  # HH: no-data everywhere, never a damaged row
        s1[train[1], 0, 2:4, 2:4] = 1e6  # asc_VV at 1e6 dB
        s1[train[2], 5, 0, 0] = -1e6  # desc_VH: not a band of domain s1, so not checked
        aster = h5["aster"][:]
        aster[train[4], 0, 0, 0] = 30000  # 30 km elevation
    _rewrite(folder, "sentinel1", s1)
    _rewrite(folder, "aster", aster)
    ds = MMEarthDataset(folder, ["s1", "elevation"], "train", max_bad_rows=5)
    out = _epoch(ds, 0)
    assert ds.bad_rows == sorted([train[1], train[4]])
    assert train[1] not in out["index"].tolist() and train[2] in out["index"].tolist()
    with pytest.raises(ValueError, match=r"more than data.max_bad_rows=0: .*band asc_VV holds 1e\+06, outside the "
                                         r"physical range \[-100, 60\] \(backscatter \(dB\)\)"):
        MMEarthDataset(folder, ["s1"], "train", max_bad_rows=0)[1]


def test_unreadable_hdf5_file_is_one_error_naming_it(tmp_path):
    from utils.data.mmearth_files import DataFileError

    folder = _fresh(tmp_path)
    path = folder / "fs.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(DataFileError, match=rf"{path}: cannot read the HDF5 file \(.*truncated file"):
        MMEarthDataset(folder, ["s2_rgb"])
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(DataFileError, match=rf"{path}: cannot read the HDF5 file \(.*signature"):
        MMEarthDataset(folder, ["s2_rgb"])
    folder = _fresh(tmp_path, "fs2")
    _corrupt_chunk(folder, "metadata", 0)  # read at construction: a file-level fault
    with pytest.raises(DataFileError, match="fs2.h5: cannot read the HDF5 file"):
        MMEarthDataset(folder, ["s2_rgb"], indices=[0, 1])


def test_split_rows_must_be_unique_and_disjoint(tmp_path):
    folder = _fresh(tmp_path, num_tiles=12)
    path = folder / "fs_splits.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "train": [good["train"][0]] * 8}))
    with pytest.raises(ValueError, match=rf"fs_splits.json: split 'train' lists 7 rows more than once "
                                         rf"\(row {good['train'][0]} 8 times\)"):
        MMEarthDataset(folder, ["s2_rgb"])
    path.write_text(json.dumps({**good, "val": good["val"] + good["train"][:1]}))
    with pytest.raises(ValueError, match=rf"fs_splits.json: splits 'train' and 'val' share 1 rows \(e.g. row "
                                         rf"{good['train'][0]}\); splits must be disjoint"):
        MMEarthDataset(folder, ["s2_rgb"], "test")  # whichever split is used: the file is wrong
    path.write_text(json.dumps(good))
    a = MMEarthDataset(folder, ["s2_rgb"]).rows_digest
    assert a == MMEarthDataset(folder, ["s2_rgb"]).rows_digest
    assert a != MMEarthDataset(folder, ["s2_rgb"], "val").rows_digest
