"""BigEarthNet v1.0 reader on the six real example patches (../shared/data/bigearthnet_examples)."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import rasterio
import torch

from utils.data.bigearthnet import BIGEARTHNET_CLASSES, BigEarthNetDataset, find_patches

PATCH = "S2A_MSIL2A_20170613T101031_87_48"


@pytest.fixture(scope="module")
def ben_root(shared_data_dir):
    root = shared_data_dir / "bigearthnet_examples"
    if not any(root.glob("*.tar.bz2")):
        pytest.skip(f"BigEarthNet example archives absent from {root}")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ben_cache")


def test_archives_extract_into_cache_and_split(ben_root, cache):
    s2, s1 = find_patches(ben_root, cache)
    assert len(s2) == 6 and set(s1) == set(s2)
    assert all(str(p).startswith(str(cache)) for p in s2.values())
    sizes = {s: len(BigEarthNetDataset(ben_root, s, ["s2_rgb"], cache_dir=cache)) for s in ("train", "val", "test")}
    assert sizes == {"train": 4, "val": 1, "test": 1}
    with pytest.raises(FileNotFoundError, match="cache_dir"):
        find_patches(ben_root, None)


def test_band_order_resampling_and_labels(ben_root, cache):
    ds = BigEarthNetDataset(ben_root, "train", ["s2_rgb", "s2_swir", "s2_atmos", "s1"], cache_dir=cache)
    i = ds.samples.index(PATCH)
    s = ds[i]
    assert s["inputs"]["s2_rgb"].shape == (3, 120, 120) and s["inputs"]["s2_swir"].shape == (2, 120, 120)
    assert s["inputs"]["s2_atmos"].shape == (2, 120, 120) and s["inputs"]["s1"].shape == (2, 120, 120)
    folder = ds.s2[PATCH]
    # channel 0 of s2_rgb is B04 (red), read from its own file, un-normalised here
    with rasterio.open(folder / f"{PATCH}_B04.tif") as src:
        b04 = src.read(1).astype(np.float32)
    red = s["inputs"]["s2_rgb"][0].numpy() * ds.std["s2_rgb"][0] + ds.mean["s2_rgb"][0]
    np.testing.assert_allclose(red, b04, rtol=1e-4, atol=0.5)
    # B11 (60 x 60 at 20 m) resampled bilinearly to 120 px keeps its block means
    with rasterio.open(folder / f"{PATCH}_B11.tif") as src:
        assert src.shape == (60, 60)
        b11 = src.read(1).astype(np.float32)
    swir = s["inputs"]["s2_swir"][0].numpy() * ds.std["s2_swir"][0] + ds.mean["s2_swir"][0]
    assert abs(swir.mean() - b11.mean()) < 0.01 * b11.mean()
    # s1 = VV, VH of the matching S1 patch, in dB
    vv = s["inputs"]["s1"][0].numpy() * ds.std["s1"][0] + ds.mean["s1"][0]
    assert -40 < vv.mean() < 10
    label = s["label"]
    assert label.shape == (43,) and label.dtype == torch.float32
    names = {BIGEARTHNET_CLASSES[j] for j in label.nonzero().flatten().tolist()}
    assert names == {"Non-irrigated arable land",
                     "Land principally occupied by agriculture, with significant areas of natural vegetation"}
    stats = json.loads((cache / "bigearthnet_band_stats.json").read_text())
    assert stats["B04"]["num_patches"] == 4


def test_bad_inputs(ben_root, cache, tmp_path):
    assert BigEarthNetDataset(ben_root, "val", ["s2"], cache_dir=cache)[0]["inputs"]["s2"].shape == (12, 120, 120)
    with pytest.raises(ValueError, match="no input domain 's1_desc'"):
        BigEarthNetDataset(ben_root, "train", ["s1_desc"], cache_dir=cache)
    with pytest.raises(ValueError, match="no input domain 'elevation'"):
        BigEarthNetDataset(ben_root, "train", ["elevation"], cache_dir=cache)
    s2, _ = find_patches(ben_root, cache)
    shutil.copytree(s2[PATCH], tmp_path / PATCH)
    meta = tmp_path / PATCH / f"{PATCH}_labels_metadata.json"
    meta.write_text(json.dumps({"labels": ["Lunar regolith"]}))
    ds = BigEarthNetDataset(tmp_path, "train", ["s2_rgb"])
    with pytest.raises(ValueError, match="Lunar regolith.*43 BigEarthNet classes"):
        ds[0]
    with pytest.raises(ValueError, match="needs Sentinel-1 patches"):
        BigEarthNetDataset(tmp_path, "train", ["s1"])


def _archive(path, members):
    with tarfile.open(path, "w:bz2") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_archives_with_path_traversal_or_damage_are_one_error(tmp_path):
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    _archive(root / "evil.tar.bz2", [("p/p_labels_metadata.json", b"{}"), ("../../escaped.txt", b"x")])
    with pytest.raises(ValueError, match=r"BigEarthNet archive .*evil.tar.bz2: refusing member '../../escaped.txt'"):
        find_patches(root, cache)
    assert not (tmp_path / "escaped.txt").exists() and not (cache / "evil").exists()  # partial extraction removed
    (root / "evil.tar.bz2").unlink()
    _archive(root / "cut.tar.bz2", [("p/p_B02.tif", bytes(range(256)) * 400)])
    (root / "cut.tar.bz2").write_bytes((root / "cut.tar.bz2").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"BigEarthNet archive .*cut.tar.bz2 is damaged or truncated"):
        find_patches(root, cache)


def test_invalid_json_names_the_file(ben_root, cache, tmp_path):
    s2, _ = find_patches(ben_root, cache)
    shutil.copytree(s2[PATCH], tmp_path / PATCH)
    meta = tmp_path / PATCH / f"{PATCH}_labels_metadata.json"
    meta.write_text('{"labels": [\n')
    ds = BigEarthNetDataset(tmp_path, "train", ["s2_rgb"])
    with pytest.raises(ValueError, match=rf"{PATCH}_labels_metadata.json: not valid JSON"):
        ds.label(PATCH)
    stats = tmp_path / "cache" / "bigearthnet_band_stats.json"
    stats.parent.mkdir()
    stats.write_text(json.dumps({b: {"mean": 1.0, "std": 0.0} for b in ("B02", "B03", "B04")}))
    with pytest.raises(ValueError, match=r"bigearthnet_band_stats.json: band B02 has mean 1.0, std 0.0"):
        BigEarthNetDataset(tmp_path, "train", ["s2_rgb"], cache_dir=tmp_path / "cache")
