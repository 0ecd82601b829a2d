"""utils/data/geotiff.py: labelled GeoTIFF folders as fine-tuning data (segmentation, classification from a CSV),
spec errors, empty-split errors (also for MMEarth file sets) and all-no-data inputs."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import rasterio
import torch

import run_finetuning
from tests.geotiff_fixture import SPEC, write_folder, write_scene, write_spec, write_tif
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.data.geotiff import catalogue
from utils.data.geotiff_spec import ConversionError
from utils.data.registry import get_dataset_kind

TINY = ["num_workers=0", "batch_size=4", "data.input_size=16", "data.pin_memory=false", "optim.blr=0.05",
        "optim.warmup_epochs=0.0", "model.preset={dim: 32, depth: 2, heads: 2}", "finetune.dataset=geotiff",
        "data.elevation_norm=band_stats"]
IN = ["s2_rgb", "s1"]


def _cfg(src, spec, *extra):
    return load_config(None, [*TINY, f"data_path={src}", f"geotiff.spec={spec}", f"in_domains={IN}", *extra])


def _build(cfg, split, train=False, domains=IN):
    return get_dataset_kind("geotiff").build(cfg, list(domains), split, train)


def test_binary_segmentation_chips_labels_masks_and_stats(tmp_path):
    src, spec = write_folder(tmp_path, {"a": (40, 36), "b": (32, 32)})
    # a no-data corner in every input of scene a (label stays valid there) and a no-data label block in b
    with rasterio.open(src / "S2" / "a.tif", "r+") as ds:
        x = ds.read()
        x[:, :3, :3] = 0
        ds.write(x)
    with rasterio.open(src / "S1" / "a.tif", "r+") as ds:
        x = ds.read()
        x[:, :3, :3] = np.nan
        ds.write(x)
    with rasterio.open(src / "MASK" / "b.tif", "r+") as ds:
        x = ds.read()
        x[:, 20:24, 20:24] = 0
        ds.write(x)
    cfg = _cfg(src, spec, "geotiff.splits={train: 0.5, val: 0.25, test: 0.25}")
    train, val, test = _build(cfg, "train", True), _build(cfg, "val"), _build(cfg, "test")
    assert train.task == "segmentation" and train.num_classes == 2 and train.class_names == ["land", "water"]
    ids = sorted(train.chip_ids + val.chip_ids + test.chip_ids)
    # 40 x 36 -> 2 x 2 chips of 16 px (remainder dropped), 32 x 32 -> 2 x 2
    assert ids == sorted([f"{s}_r{i}_c{j}" for s in "ab" for i in range(2) for j in range(2)])
    assert (len(train), len(val), len(test)) == (4, 2, 2)

    pos = val.chip_ids.index("a_r0_c0") if "a_r0_c0" in val.chip_ids else None
    ds = val if pos is not None else (test if "a_r0_c0" in test.chip_ids else train)
    pos = ds.chip_ids.index("a_r0_c0")
    ds.augment = False
    sample = ds[pos]
    with rasterio.open(src / "MASK" / "a.tif") as f:
        truth = f.read(1)[:16, :16].astype(np.int64) - 1  # 1 land -> 0, 2 water -> 1
    truth[:3, :3] = -1  # no input holds a valid pixel there: never trained on
    assert torch.equal(sample["label"], torch.from_numpy(truth))
    assert not sample["valid"]["s2_rgb"][:3, :3].any() and sample["valid"]["s2_rgb"][3:, 3:].all()
    assert (sample["inputs"]["s2_rgb"][:, :3, :3] == 0).all() and (sample["inputs"]["s1"][:, :3, :3] == 0).all()
    assert set(sample) == {"inputs", "valid", "index", "label"} and sample["inputs"]["s2_rgb"].shape == (3, 16, 16)
    b = next(d for d in (train, val, test) if "b_r1_c1" in d.chip_ids)
    b.augment = False
    assert (b[b.chip_ids.index("b_r1_c1")]["label"][4:8, 4:8] == -1).all()  # label 0 = no-data

    # statistics: the training chips only, no-data excluded, computed here independently with numpy
    values = {"B04": [], "VV": []}
    for chip in train.chip_ids:
        scene, rest = chip.split("_r")
        i, j = (int(v) for v in rest.split("_c"))
        with rasterio.open(src / "S2" / f"{scene}.tif") as f:
            b04 = f.read(3)[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].astype(float)
        with rasterio.open(src / "S1" / f"{scene}.tif") as f:
            vv = f.read(1)[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].astype(float)
        values["B04"].append(b04[b04 != 0])
        values["VV"].append(vv[np.isfinite(vv)])
    info = train.domain_info()
    s2 = info["s2_rgb"]["stats"]["sentinel2_l2a"]
    b04 = np.concatenate(values["B04"])
    assert s2["mean"][0] == pytest.approx(b04.mean()) and s2["std"][0] == pytest.approx(b04.std())
    vv = np.concatenate(values["VV"])
    assert info["s1"]["stats"]["sentinel1"]["mean"][0] == pytest.approx(vv.mean(), rel=1e-6)
    assert info["label"]["class_names"] == ["land", "water"] and info["label"]["class_values"] == [[1.0], [2.0]]
    assert sorted(info["label"]["splits"]["train"]) == sorted(train.chip_ids)
    assert info["label"]["train_class_counts"] == train.class_counts()
    assert json.loads(json.dumps(info)) == info  # plain types for the checkpoint
    # val / test are normalised with the training statistics
    x = val[0]["inputs"]["s2_rgb"][0]
    assert val.domain_info()["s2_rgb"]["stats"] == info["s2_rgb"]["stats"] and x.abs().max() < 10


def test_binary_segmentation_trains_and_checkpoint_describes_the_data(tmp_path, capsys):
    src, spec = write_folder(tmp_path, {"a": (32, 32), "b": (32, 32), "c": (32, 32)})
    out = tmp_path / "run"
    res = run_finetuning.main(_cfg(src, spec, f"output_dir={out}", "epochs=2", "finetune.head=linear"))
    assert res["task"] == "segmentation" and set(res["metrics"]) == {"val", "test"}
    assert 0.0 <= res["metrics"]["test"]["miou"] <= 1.0 and len(res["metrics"]["test"]["per_class_iou"]) == 2
    best = load_checkpoint(out / "checkpoint-best.pth")
    label = best["encoder"]["domains"]["label"]
    assert label["class_names"] == ["land", "water"] and "MASK" in label["spec"]
    assert best["encoder"]["domains"]["s2_rgb"]["normalization"] == "band_stats"
    assert "miou" in capsys.readouterr().out


def _classification(tmp_path, rows: list[str], n: int = 6):
    src = tmp_path / "src"
    for i in range(n):
        write_scene(src, f"chip{i}", 16, 16, seed=i, label=False)
    (src / "labels.csv").write_text("\n".join(["scene,label", *rows]) + "\n")
    spec = copy.deepcopy(SPEC)
    spec["label"] = {"file": "labels.csv", "classes": ["dry", "wet"]}
    return src, write_spec(tmp_path / "spec.yaml", spec)


def test_classification_from_csv(tmp_path):
    labels = ["dry", "wet", "wet", "dry", "dry", "wet"]
    src, spec = _classification(tmp_path, [f"chip{i},{c}" for i, c in enumerate(labels)])
    cfg = _cfg(src, spec, "geotiff.splits={train: 0.5, val: 0.5, test: 0.0}")
    train, val = _build(cfg, "train", True), _build(cfg, "val")
    assert _build(cfg, "test") is None  # fraction 0: no test split, deliberately
    assert train.task == "classification" and train.class_names == ["dry", "wet"] and len(train) + len(val) == 6
    for ds in (train, val):
        for pos, chip in enumerate(ds.chip_ids):
            sample = ds[pos]
            assert sample["label"].dtype == torch.int64 and sample["label"].shape == ()
            assert int(sample["label"]) == ["dry", "wet"].index(labels[int(chip[4:])])
            assert sample["inputs"]["s2_rgb"].shape == (3, 16, 16)
    assert sum(train.class_counts()) == len(train)
    for protocol in ("linear_probe", "knn"):
        res = run_finetuning.main(_cfg(src, spec, "geotiff.splits={train: 0.5, val: 0.5, test: 0.0}", "epochs=1",
                                       "batch_size=3",
                                       f"finetune.protocol={protocol}", f"output_dir={tmp_path / protocol}"))
        assert 0.0 <= res["metrics"]["val"]["accuracy"] <= 1.0


def test_multilabel_from_json(tmp_path):
    src, spec = _classification(tmp_path, [], n=4)
    (src / "labels.csv").unlink()
    (src / "labels.json").write_text(json.dumps({"chip0": ["dry"], "chip1": ["dry", "wet"], "chip2": [],
                                                 "chip3": ["wet"]}))
    s = copy.deepcopy(SPEC)
    s["label"] = {"file": "labels.json", "task": "multilabel", "classes": ["dry", "wet"]}
    cfg = _cfg(src, write_spec(spec, s), "geotiff.splits={train: 1.0, val: 0.0, test: 0.0}")
    ds = _build(cfg, "train")
    got = {c: ds[i]["label"].tolist() for i, c in enumerate(ds.chip_ids)}
    assert ds.task == "multilabel" and got == {"chip0": [1, 0], "chip1": [1, 1], "chip2": [0, 0], "chip3": [0, 1]}


def test_spec_errors_name_the_file_and_key(tmp_path):
    src, spec = write_folder(tmp_path, {"a": (32, 32), "b": (32, 32)})
    shutil.rmtree(src / "S1")
    with pytest.raises(ConversionError, match=r"sources\.S1: folder .*S1 does not exist"):
        _build(_cfg(src, spec), "train")

    src, spec = write_folder(tmp_path / "count", {"a": (32, 32)})
    write_tif(src / "S2" / "a.tif", np.ones((3, 32, 32), np.uint16))
    with pytest.raises(ConversionError, match=r"S2/a\.tif: has 3 bands, spec .* sources\.S2\.bands lists 4"):
        _build(_cfg(src, spec), "train")

    src, spec = write_folder(tmp_path / "class", {"a": (32, 32)})
    write_tif(src / "MASK" / "a.tif", np.full((1, 32, 32), 7, np.uint8))
    with pytest.raises(ConversionError, match=r"MASK/a\.tif band 1: label values 7 are not in spec .* label\.classes"):
        _build(_cfg(src, spec), "train")

    src, spec = _classification(tmp_path / "csv", ["chip0,dry", "chip1,Forest"], n=2)
    with pytest.raises(ConversionError, match=r"scene 'chip1' has class 'Forest', which is not in spec .* "
                                              r"label\.classes \(dry, wet\)"):
        _build(_cfg(src, spec), "train")

    src, spec = write_folder(tmp_path / "band", {"a": (32, 32)})
    with pytest.raises(ValueError, match=r"domain 's2_nir' needs sentinel2 band B8A, which spec .* does not provide "
                                         r"\(sources\.S2: B02, B03, B04, B08\)"):
        _build(_cfg(src, spec), "train", domains=["s2_nir"])

    with pytest.raises(ValueError, match=r"geotiff\.tile_size 8 is smaller than data\.input_size 16"):
        _build(_cfg(src, spec, "geotiff.tile_size=8"), "train")

    bad = copy.deepcopy(SPEC)
    del bad["label"]["classes"]
    write_spec(spec, bad)
    with pytest.raises(ConversionError, match=r"label\.classes: missing"):
        _build(_cfg(src, spec), "train")


def test_empty_split_is_an_error_naming_the_split_and_the_option(tmp_path):
    src, spec = write_folder(tmp_path, {"only": (32, 32)})
    with pytest.raises(ValueError, match=r"split 'val' is empty: geotiff\.split_by=scene gives 1 scene\(s\) .* "
                                         r"geotiff\.splits \(train, val, test\).* geotiff\.splits\.val=0"):
        _build(_cfg(src, spec, "geotiff.split_by=scene"), "train")
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"train": ["only_r0_c0", "only_r0_c1"], "val": [], "test": ["only_r1_c1"]}))
    with pytest.raises(ValueError, match=r"split 'val' is empty: geotiff\.split_file .*splits\.json lists 0 item"):
        _build(_cfg(src, spec, f"geotiff.split_file={split_file}"), "train")
    # a split file with a split left out: no such split, no error
    split_file.write_text(json.dumps({"train": ["only"]}))
    cfg = _cfg(src, spec, f"geotiff.split_file={split_file}")
    assert len(_build(cfg, "train")) == 4 and _build(cfg, "val") is None


def test_empty_mmearth_split_is_an_error_not_nan(mmearth_fileset, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(mmearth_fileset, data)
    splits = next(data.glob("*_splits.json"))
    rows = json.loads(splits.read_text())
    rows["val"] = []
    splits.write_text(json.dumps(rows))
    cfg = load_config(None, [*TINY[:-2], f"data_path={data}", f"output_dir={tmp_path / 'run'}", "epochs=1",
                             "in_domains=[s2_rgb]"])
    with pytest.raises(ValueError, match=r"split 'val' \(data\.val_split=val\) of .*_splits\.json holds no sample; "
                                         r"set data\.val_split='' to run without it"):
        run_finetuning.main(cfg)


def test_all_no_data_input_is_reported_once(tmp_path, capsys):
    src, spec = write_folder(tmp_path, {"a": (32, 32), "b": (32, 32)})
    for name in ("a", "b"):
        write_tif(src / "S1" / f"{name}.tif", np.full((2, 32, 32), np.nan, np.float32))
    cfg = _cfg(src, spec)
    ds = _build(cfg, "train", True)
    _build(cfg, "val")
    err = capsys.readouterr().err
    assert err.count("input domain 's1' (sources.S1) has no valid pixel in the whole data set") == 1
    sample = ds[0]
    assert not sample["valid"]["s1"].any() and (sample["inputs"]["s1"] == 0).all()
    assert (sample["label"] >= 0).any()  # S2 is valid: the labels are kept
    assert ds.domain_info()["s1"]["stats"]["sentinel1"]["count"] == [0, 0]


@pytest.fixture()
def terramesh(shared_data_dir):
    path = shared_data_dir / "terramesh_examples"
    if not path.is_dir():
        pytest.skip(f"{path} absent")
    return path


def test_terramesh_land_cover_from_the_geotiffs(terramesh):
    cfg = load_config("cfgs/finetune/terramesh_lulc.yaml", [f"data_path={terramesh}"])
    cat = catalogue(cfg, cfg["in_domains"])
    assert len(cat.chips) == 80 and {k: len(v) for k, v in cat.splits.items()} == {"train": 48, "val": 16, "test": 16}
    assert cat.spec.label.class_names[3] == "crops" and cat.class_counts["all"].sum() == 5 * 224 * 224
    with rasterio.open(terramesh / "LULC" / "433D_629L_3_1.tif") as f:
        lulc = f.read(1)
    ds = _build(cfg, "train", domains=cfg["in_domains"])
    ds.augment = False
    pos = next((i for i, c in enumerate(ds.chip_ids) if c.startswith("433D_629L_3_1")), None)
    if pos is not None:
        i, j = (int(v) for v in ds.chip_ids[pos].rsplit("_r", 1)[1].split("_c"))
        # Esri ids 1..7, 9 -> class ids 0..7 in the spec's order (8 = clouds, 0 = no data are absent here)
        want = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 9: 7}
        truth = np.vectorize(want.get)(lulc[i * 56:(i + 1) * 56, j * 56:(j + 1) * 56])
        assert np.array_equal(ds[pos]["label"].numpy(), truth)
