"""utils/predict.py and run_finetuning.py --predict: tiles and their shares, seamless stitching, no-data, the
written GeoTIFF's grid, previews and the evaluation table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

import run_finetuning
from tests.geotiff_fixture import write_folder, write_scene
from tests.test_geotiff_dataset import _cfg
from tests.test_finetune_run import TINY
from utils.checkpoint import CheckpointError
from utils.config import load_config
from utils.data.geotiff_spec import find_scenes, open_scene
from utils.predict import _pad, load_predictor, predict_scene, tile_shares, tile_starts


@pytest.mark.parametrize("size,tile,overlap", [(40, 16, 4), (16, 16, 4), (10, 16, 4), (100, 16, 0), (37, 16, 15)])
def test_tile_starts_and_shares_cover_the_axis(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    shares = tile_shares(starts, tile, size)
    assert starts[0] == 0 and (size <= tile or starts[-1] + tile == size)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap px
    assert shares[0][0] == 0 and shares[-1][1] == size and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert all(s <= lo < hi <= s + tile for s, (lo, hi) in zip(starts, shares))  # each share inside its tile


def test_tile_starts_refuses_a_bad_overlap():
    with pytest.raises(ValueError, match="--overlap must lie in"):
        tile_starts(40, 16, 16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A binary land / water segmentation fine-tuned for a few steps on 16 px chips; returns (root, checkpoint)."""
    root = tmp_path_factory.mktemp("predict")
    src, spec = write_folder(root, {"a": (32, 32), "b": (32, 32), "c": (32, 32)})
    out = root / "run"
    run_finetuning.main(_cfg(src, spec, f"output_dir={out}", "epochs=2", "finetune.head=convnext"))
    return root, out / "checkpoint-best.pth"


def test_stitched_prediction_equals_each_tiles_own_prediction(trained, tmp_path):
    _, ckpt = trained
    src = tmp_path / "big"
    write_scene(src, "big", 45, 38, seed=7, label=False)
    pred = load_predictor(ckpt)
    ref = find_scenes(pred.reader.spec.scenes, src)[0]
    scene = open_scene(pred.reader.spec.scenes, ref)
    try:
        probs, observed = predict_scene(pred, scene, overlap=6, batch_size=5)
        assert probs.shape == (2, 45, 38) and observed.all()
        rows, cols = tile_starts(45, 16, 6), tile_starts(38, 16, 6)
        assert len(rows) > 2 and len(cols) > 2
        for r, (r0, r1) in zip(rows, tile_shares(rows, 16, 45)):
            for c, (c0, c1) in zip(cols, tile_shares(cols, 16, 38)):
                x, v = pred.reader.read(scene, Window(c, r, 16, 16))  # this tile alone, batch of one
                alone = pred.probabilities({d: a[None] for d, a in x.items()}, {d: a[None] for d, a in v.items()})[0]
                np.testing.assert_allclose(probs[:, r0:r1, c0:c1], alone[:, r0 - r:r1 - r, c0 - c:c1 - c],
                                           atol=1e-5)
        # tiles overlap, so neighbours disagree somewhere in their shared band: the shares are what counts
        x, v = pred.reader.read(scene, Window(cols[1], rows[0], 16, 16))
        second = pred.probabilities({d: a[None] for d, a in x.items()}, {d: a[None] for d, a in v.items()})[0]
        assert not np.allclose(probs[:, :16, cols[1]:cols[1] + 16], second, atol=1e-7)
    finally:
        scene.close()


def test_small_scene_is_padded_with_no_data(trained, tmp_path):
    _, ckpt = trained
    pred = load_predictor(ckpt)
    src = tmp_path / "small"
    write_scene(src, "small", 12, 9, seed=3, label=False)
    scene = open_scene(pred.reader.spec.scenes, find_scenes(pred.reader.spec.scenes, src)[0])
    try:
        probs, observed = predict_scene(pred, scene, overlap=4)
        x, v = _pad(*pred.reader.read(scene, Window(0, 0, 9, 12)), 16)
    finally:
        scene.close()
    assert probs.shape == (2, 12, 9) and observed.all() and not v["s2_rgb"][12:].any() and not v["s1"][:, 9:].any()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_predict_cli_writes_geotiffs_on_the_input_grid(trained, tmp_path, capsys):
    root, ckpt = trained
    src = tmp_path / "scenes"
    write_scene(src, "big", 45, 38, seed=7)
    with rasterio.open(src / "S2" / "big.tif", "r+") as ds:
        x = ds.read()
        x[:, 5:9, 5:9] = 0  # no-data in every input
        ds.write(x)
    with rasterio.open(src / "S1" / "big.tif", "r+") as ds:
        x = ds.read()
        x[:, 5:9, 5:9] = np.nan
        ds.write(x)
    out = tmp_path / "maps"
    run_finetuning.cli(["--predict", "--checkpoint", str(ckpt), "--src", str(src), "--out", str(out),
                        "--probabilities", "--overlap", "4"])
    with rasterio.open(src / "S2" / "big.tif") as a, rasterio.open(out / "big.tif") as b:
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        classes = b.read(1)
        assert b.nodata == 255 and json.loads(b.tags()["CLASS_NAMES"]) == ["land", "water"]
        assert b.colormap(1)[1] == (0, 0, 255, 255)  # the spec's colour for water
    assert (classes[5:9, 5:9] == 255).all() and set(np.unique(classes[9:])) <= {0, 1}
    with rasterio.open(out / "big_probabilities.tif") as p:
        probs = p.read()
        assert p.descriptions == ("land", "water") and np.isnan(probs[:, 5:9, 5:9]).all()
    np.testing.assert_array_equal(np.nanargmax(np.nan_to_num(probs, nan=-1), 0)[9:], classes[9:])
    assert (out / "big.png").stat().st_size > 0
    summary = json.loads((out / "predictions.json").read_text())
    assert set(summary["scenes"]["big"]["class_fraction"]) == {"land", "water"}
    # the label raster is there: IoU per class name on pixels of no checkpoint chip ('none')
    printed = capsys.readouterr().out
    assert "land" in printed and "water" in printed and "majority (" in printed
    ev = summary["evaluation"]["none"]
    assert set(ev["per_class_iou"]) == {"land", "water"} and ev["pixels"] == 45 * 38 - 16
    assert ev["miou"] > ev["majority_miou"]


def test_predict_refuses_a_checkpoint_without_geotiff_label(tmp_path, mmearth_fileset):
    out = tmp_path / "mm"
    run_finetuning.main(load_config(None, [f"data_path={mmearth_fileset}", f"output_dir={out}", *TINY, "epochs=1",
                                           "in_domains=[s2_rgb]"]))
    with pytest.raises(CheckpointError, match="holds no label description .* finetune.dataset=geotiff"):
        load_predictor(out / "checkpoint-last.pth")


def test_classification_model_paints_each_tiles_class_over_its_share(tmp_path):
    from tests.test_geotiff_dataset import _classification

    labels = ["dry", "wet", "wet", "dry", "dry", "wet"]
    src, spec = _classification(tmp_path, [f"chip{i},{c}" for i, c in enumerate(labels)])
    out = tmp_path / "run"
    run_finetuning.main(_cfg(src, spec, "geotiff.splits={train: 0.5, val: 0.5, test: 0.0}", "epochs=1",
                             "batch_size=3", f"output_dir={out}"))
    pred = load_predictor(out / "checkpoint-last.pth")
    big = tmp_path / "big"
    write_scene(big, "big", 40, 40, seed=9, label=False)
    scene = open_scene(pred.reader.spec.scenes, find_scenes(pred.reader.spec.scenes, big)[0])
    try:
        probs, observed = predict_scene(pred, scene, overlap=4)
        starts = tile_starts(40, 16, 4)
        for r, (r0, r1) in zip(starts, tile_shares(starts, 16, 40)):
            for c, (c0, c1) in zip(starts, tile_shares(starts, 16, 40)):
                x, v = pred.reader.read(scene, Window(c, r, 16, 16))
                alone = pred.probabilities({d: a[None] for d, a in x.items()}, {d: a[None] for d, a in v.items()})[0]
                share = probs[:, r0:r1, c0:c1]
                np.testing.assert_allclose(share, np.broadcast_to(alone[:, :1, :1], share.shape), atol=1e-5)
    finally:
        scene.close()
    assert pred.task == "classification" and observed.all()


@pytest.mark.slow
def test_terramesh_worked_example_end_to_end(shared_data_dir, tmp_path, capsys):
    """The README's worked example, shortened to 4 epochs: GeoTIFFs -> fine-tuned model -> GeoTIFF maps."""
    data = shared_data_dir / "terramesh_examples"
    if not data.is_dir():
        pytest.skip(f"{data} absent")
    out = tmp_path / "ft"
    res = run_finetuning.main(load_config("cfgs/finetune/terramesh_lulc.yaml",
                                          [f"data_path={data}", f"output_dir={out}", "epochs=4"]))
    maps = tmp_path / "maps"
    run_finetuning.cli(["--predict", "--checkpoint", str(out / "checkpoint-best.pth"), "--src", str(data),
                        "--out", str(maps)])
    summary = json.loads((maps / "predictions.json").read_text())
    assert len(summary["scenes"]) == 5
    for scene in summary["scenes"]:
        with rasterio.open(data / "S2L2A" / f"{scene}.tif") as a, rasterio.open(maps / f"{scene}.tif") as b:
            assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
    test = summary["evaluation"]["test"]
    assert test["miou"] > test["majority_miou"] and res["metrics"]["test"]["miou"] > test["majority_miou"]
    assert "rangeland" in capsys.readouterr().out
