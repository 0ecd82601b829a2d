"""GEO-Bench v1.0 reader on format-faithful fixtures (tests/geobench_fixture.py)."""

import json
import pickle

import h5py
import numpy as np
import pytest
import torch

from tests.geobench_fixture import BAND_VALUE, write_geobench_task, write_malicious_sample
from utils.data.geobench import GeoBenchDataset, StandIn, decode_sample_pickle, s2_band_names


@pytest.fixture(scope="module")
def gb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("geobench")
    for task in ("m-eurosat", "m-bigearthnet", "m-cashew-plant"):
        write_geobench_task(root, task)
    return root


def _raw_value(ds, sample, domain, channel):
    """Undo the z-score of one channel's mean."""
    names, mean, std = ds._plan[domain]
    x = sample["inputs"][domain][channel]
    return float(x.mean() * std[channel, 0, 0] + mean[channel, 0, 0])


def test_pickle_attribute_decodes_to_standins(gb_root):
    path = gb_root / "classification_v1.0" / "m-eurosat" / "s000.hdf5"
    with h5py.File(path) as h5:
        info = decode_sample_pickle(h5.attrs["pickle"], str(path))
    entry = info["04 - Red"]
    assert isinstance(entry["band_info"], StandIn) and type(entry["band_info"]).__name__ == "Sentinel2"
    assert entry["band_info"].get("name") == "04 - Red"
    assert entry["transform"].qualname == "Affine" and entry["transform"].args[0] == 10.0
    assert "EPSG" in str(entry["crs"].state)
    assert info["label"] == 0 and len(info["bands_order"]) == 13


def test_malicious_pickle_is_refused(tmp_path):
    folder = write_geobench_task(tmp_path, "m-eurosat")
    path = write_malicious_sample(folder, "s000")
    with h5py.File(path) as h5:
        text = h5.attrs["pickle"]
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        decode_sample_pickle(text, str(path))
    with pytest.raises(pickle.UnpicklingError, match="s000.hdf5"):
        GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])[0]
    with pytest.raises(ValueError, match="s000.hdf5: refusing"):  # a ValueError too: one error line in the CLIs
        GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])[0]


def test_eurosat_band_shift_is_corrected(gb_root):
    ds = GeoBenchDataset(gb_root, "m-eurosat", "train", ["s2_rgb", "s2_nir", "s2_swir"])
    # s2_nir = (B8A, B08): B8A is stored under the positional name "12 - SWIR"
    assert ds._plan["s2_nir"][0] == ["12 - SWIR", "08 - NIR"]
    assert ds._plan["s2_swir"][0] == ["10 - SWIR - Cirrus", "11 - SWIR"]
    s = ds[0]  # class 0: no offset
    assert s["label"].dtype == torch.int64 and int(s["label"]) == 0
    assert _raw_value(ds, s, "s2_nir", 0) == pytest.approx(BAND_VALUE["B8A"], abs=10)
    assert _raw_value(ds, s, "s2_swir", 1) == pytest.approx(BAND_VALUE["B12"], abs=10)
    assert _raw_value(ds, s, "s2_rgb", 0) == pytest.approx(BAND_VALUE["B04"], abs=10)
    assert s["inputs"]["s2_rgb"].shape == (3, 16, 16) and s["valid"]["s2_rgb"].all()


def test_band_names_without_shift_and_s1_skipped():
    names = ["04 - Red", "08A - Vegetation Red Edge", "01 - VH.Real", "13 - CLOUD_PROBABILITY", "Blue", "label"]
    out = s2_band_names(names)
    assert out == {"B04": "04 - Red", "B8A": "08A - Vegetation Red Edge", "B02": "Blue"}


def test_multilabel_and_partition(gb_root):
    ds = GeoBenchDataset(gb_root, "m-bigearthnet", "val", ["s2_rgb"])
    assert len(ds) == 2 and ds.task == "multilabel"
    s = ds[0]
    assert s["label"].shape == (43,) and s["label"].dtype == torch.float32
    assert set(s["label"].unique().tolist()) <= {0.0, 1.0}
    half = GeoBenchDataset(gb_root, "m-bigearthnet", "train", ["s2_rgb"], partition="0.50x_train")
    assert len(half) == 3


def test_segmentation_dated_bands_and_crop(gb_root):
    ds = GeoBenchDataset(gb_root, "m-cashew-plant", "train", ["s2_rgb", "s2_rededge"], input_size=8, augment=True)
    s = ds[1]
    assert s["inputs"]["s2_rgb"].shape == (3, 8, 8) and s["label"].shape == (8, 8)
    assert s["label"].dtype == torch.int64 and 0 <= int(s["label"].min()) and int(s["label"].max()) < 7
    # the class offset (150 per class id) is planted in every band: labels and pixels stay aligned after crop/flip
    _, mean, std = ds._plan["s2_rgb"]
    raw_red = s["inputs"]["s2_rgb"][0] * float(std[0, 0, 0]) + float(mean[0, 0, 0])
    est = torch.round((raw_red - BAND_VALUE["B04"]) / 150).long()
    assert (est == s["label"]).float().mean() > 0.95
    big = GeoBenchDataset(gb_root, "m-cashew-plant", "test", ["s2_rgb"], input_size=32, resize=True)
    assert big[0]["inputs"]["s2_rgb"].shape == (3, 32, 32) and big[0]["label"].shape == (32, 32)


def test_bad_inputs(gb_root, tmp_path):
    with pytest.raises(ValueError, match="no input domain 's1'"):
        GeoBenchDataset(gb_root, "m-eurosat", "train", ["s1"])
    with pytest.raises(KeyError, match="unknown GEO-Bench task"):
        GeoBenchDataset(gb_root, "m-nope", "train", ["s2_rgb"])
    folder = write_geobench_task(tmp_path, "m-eurosat")
    (folder / "default_partition.json").unlink()
    with pytest.raises(FileNotFoundError, match="default_partition.json"):
        GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])
    # a task whose samples lack band 05: s2_rededge asks for B05
    folder = write_geobench_task(tmp_path / "b", "m-bigearthnet")
    for p in folder.glob("*.hdf5"):
        with h5py.File(p, "a") as h5:
            del h5["05 - Vegetation Red Edge"]
    with pytest.raises(ValueError, match="band B05 .* absent from GEO-Bench task m-bigearthnet"):
        GeoBenchDataset(tmp_path / "b", "m-bigearthnet", "train", ["s2_rededge"])
    # a label outside the class list
    folder = write_geobench_task(tmp_path / "c", "m-cashew-plant")
    with h5py.File(folder / "s000.hdf5", "a") as h5:
        h5["label"][0, 0] = 9
    ds = GeoBenchDataset(tmp_path / "c", "m-cashew-plant", "train", ["s2_rgb"])
    with pytest.raises(ValueError, match=r"s000.hdf5: label ids .* outside the 7 classes"):
        ds[0]
    stats = json.loads((folder / "band_stats.json").read_text())
    del stats["04 - Red"]
    (folder / "band_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="band_stats.json: no mean/std for band '04 - Red'"):
        GeoBenchDataset(tmp_path / "c", "m-cashew-plant", "train", ["s2_rgb"])
    assert np.isfinite(stats["03 - Green"]["mean"])


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy_pickles_of_either_major_version_decode(module):
    # protocol 3 names globals as text ("c<module>\n<name>\n"): rewrite the module to what numpy 1.x (numpy.core)
    # or 2.x (numpy._core) writes; the reader must rebuild both with whichever numpy it runs on
    raw = pickle.dumps({"label": np.array([0, 1, 1], dtype=np.int64), "n": np.int64(7)}, protocol=3)
    for name in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        raw = raw.replace(b"c" + name + b"\n", b"c" + module.encode() + b"\n")
    assert module.encode() in raw
    out = decode_sample_pickle(str(raw))
    np.testing.assert_array_equal(out["label"], [0, 1, 1])
    assert out["n"] == 7 and isinstance(out["n"], np.int64)


def test_class_names_from_task_specs_or_the_converters(tmp_path, gb_root):
    names = [f"class name {i}" for i in range(10)]
    write_geobench_task(tmp_path / "named", "m-eurosat", class_names=names)
    assert GeoBenchDataset(tmp_path / "named", "m-eurosat", "train", ["s2_rgb"]).class_names == names
    ds = GeoBenchDataset(gb_root, "m-eurosat", "train", ["s2_rgb"])  # no task_specs.pkl: the converter's labels
    assert ds.class_names[0] == "AnnualCrop" and ds.class_names[9] == "SeaLake" and len(ds.class_names) == 10
    ben = GeoBenchDataset(gb_root, "m-bigearthnet", "train", ["s2_rgb"])
    assert len(ben.class_names) == 43 and ben.class_names[0] == "Continuous urban fabric"
    assert GeoBenchDataset(gb_root, "m-cashew-plant", "train", ["s2_rgb"]).class_names[1] == "well-managed plantation"
    # a task_specs.pkl that is not data falls back to the converter's labels, without running it
    folder = tmp_path / "named" / "classification_v1.0" / "m-eurosat"
    (folder / "task_specs.pkl").write_bytes(pickle.dumps({"label_type": __import__("os").system}, protocol=4))
    assert GeoBenchDataset(tmp_path / "named", "m-eurosat", "train", ["s2_rgb"]).class_names[0] == "AnnualCrop"
    ml_names = [f"label {i}" for i in range(43)]
    write_geobench_task(tmp_path / "ml", "m-bigearthnet", class_names=ml_names)  # MultiLabelClassification
    assert GeoBenchDataset(tmp_path / "ml", "m-bigearthnet", "train", ["s2_rgb"]).class_names == ml_names


def test_planted_signal_only_in_the_chosen_bands(tmp_path):
    write_geobench_task(tmp_path, "m-eurosat", num_samples=18, signal_bands=("B8A", "B11"))
    ds = GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb", "s2_nir", "s2_swir"])
    s = ds[3]  # class 3: offset 450 on B8A and B11 only
    assert _raw_value(ds, s, "s2_nir", 0) == pytest.approx(BAND_VALUE["B8A"] + 450, abs=10)
    assert _raw_value(ds, s, "s2_swir", 0) == pytest.approx(BAND_VALUE["B11"] + 450, abs=10)
    assert _raw_value(ds, s, "s2_nir", 1) == pytest.approx(BAND_VALUE["B08"], abs=10)
    assert _raw_value(ds, s, "s2_rgb", 0) == pytest.approx(BAND_VALUE["B04"], abs=10)  # s2_rgb = (B04, B03, B02)
def test_partition_samples_unique_and_splits_disjoint(tmp_path):
    folder = write_geobench_task(tmp_path, "m-eurosat")
    path = folder / "default_partition.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "test": good["test"] + good["valid"][:1]}))
    with pytest.raises(ValueError, match=rf"default_partition.json: splits 'valid' and 'test' share 1 samples "
                                         rf"\(e.g. '{good['valid'][0]}'\); splits must be disjoint"):
        GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])
    path.write_text(json.dumps({**good, "train": [good["train"][0]] * 5}))
    with pytest.raises(ValueError, match=rf"default_partition.json: split 'train' lists sample '{good['train'][0]}' "
                                         r"more than once \(4 repeats\)"):
        GeoBenchDataset(tmp_path, "m-eurosat", "test", ["s2_rgb"])
    path.write_text('{"train": [\n')
    with pytest.raises(ValueError, match=r"default_partition.json: not valid JSON \(Expecting value: line 2"):
        GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])


@pytest.mark.parametrize("std", [0.0, float("nan"), float("inf"), -3.0])
def test_band_stats_std_must_be_finite_and_positive(tmp_path, std):
    folder = write_geobench_task(tmp_path, "m-eurosat")
    stats = json.loads((folder / "band_stats.json").read_text())
    stats["04 - Red"]["std"] = std  # json writes NaN / Infinity, which Python's reader accepts
    (folder / "band_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"band_stats.json: band '04 - Red' has mean .*, std .*; need finite values "
                                         r"and std > 0"):
        GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])
    (folder / "band_stats.json").write_text("{\n\n")
    with pytest.raises(ValueError, match=r"band_stats.json: not valid JSON"):
        GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])


def test_a_sample_without_a_band_of_the_first_is_one_error_naming_it(tmp_path):
    folder = write_geobench_task(tmp_path, "m-eurosat")
    with h5py.File(folder / "s003.hdf5", "a") as h5:
        del h5["04 - Red"]
    ds = GeoBenchDataset(tmp_path, "m-eurosat", "train", ["s2_rgb"])
    ds[0]
    with pytest.raises(ValueError, match=r"s003.hdf5: band '04 - Red' \(domain 's2_rgb'\) is missing"):
        ds[3]
    (folder / "s001.hdf5").write_bytes(b"\0" * 512)
    with pytest.raises(ValueError, match=r"GEO-Bench sample .*s001.hdf5 cannot be read as HDF5"):
        ds[1]
