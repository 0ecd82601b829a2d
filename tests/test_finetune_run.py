"""End-to-end run_finetuning.main on tiny data: MMEarth segmentation + grid, GEO-Bench probes, BigEarthNet examples.

Tiny encoder (dim 32, depth 2, 16 px input, 4 tokens per domain); a pretraining checkpoint is written directly
(tests/test_finetune.py) instead of being trained.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import pytest

import run_finetuning
from tests.geobench_fixture import write_geobench_task
from tests.test_finetune import write_pretraining_checkpoint
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["num_workers=0", "batch_size=4", "data.input_size=16", "data.pin_memory=false", "optim.blr=0.05",
        "optim.warmup_epochs=0.0", "model.preset={dim: 32, depth: 2, heads: 2}"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pre") / "checkpoint-last.pth"
    write_pretraining_checkpoint(path)  # in_domains s2_rgb, s1, dynamic_world
    return path


def test_segmentation_smoke_writes_results_and_resumes(mmearth_fileset, pretrained, tmp_path, capsys):
    out = tmp_path / "seg"
    args = [f"data_path={mmearth_fileset}", f"output_dir={out}", *TINY, "epochs=2", "max_steps=2",
            f"finetune.checkpoint={pretrained}", "in_domains=[s2_rgb, elevation]", "finetune.head=convnext"]
    res = run_finetuning.main(load_config(None, args))
    assert set(res["metrics"]) == {"val", "test"} and res["new_domains"] == ["elevation"]
    test = res["metrics"]["test"]
    assert 0.0 <= test["miou"] <= 1.0 and len(test["per_class_iou"]) == 9
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["test"]["miou"] == pytest.approx(test["miou"])
    best = load_checkpoint(out / "checkpoint-best.pth")
    assert best["kind"] == "finetuning" and best["format_version"] == 2 and best["task"] == "segmentation"
    assert best["encoder"]["spec"]["in_domains"] == ["s2_rgb", "elevation"] and "classifier.weight" in best["head"]["state_dict"]
    assert "miou" in capsys.readouterr().out  # the printed table
    again = run_finetuning.main(load_config(None, args))  # complete: resumes, evaluates the same best model
    assert again["metrics"]["test"]["miou"] == pytest.approx(test["miou"])


def test_grid_table_and_majority_baseline(mmearth_fileset, pretrained, tmp_path, capsys):
    out = tmp_path / "grid"
    args = [f"data_path={mmearth_fileset}", f"output_dir={out}", *TINY, "epochs=1", "finetune.protocol=linear_probe",
            f"finetune.checkpoint={pretrained}", "finetune.grid=[[s2_rgb, s1], [s1]]"]
    res = run_finetuning.main(load_config(None, args))
    saved = json.loads((out / "results.json").read_text())
    assert [r["inputs"] for r in saved["grid"]] == [["s2_rgb", "s1"], ["s1"]]
    assert all(0.0 <= r["miou"] <= 1.0 for r in saved["grid"]) and 0.0 <= saved["majority_baseline_miou"] <= 1.0
    assert (out / "grid" / "1_s1" / "results.json").is_file() and res["metric"] == "miou"
    assert "majority class" in capsys.readouterr().out


def test_bad_config_and_data(mmearth_fileset, tmp_path):
    base = [f"data_path={mmearth_fileset}", *TINY, "epochs=1"]
    with pytest.raises(CheckpointError, match="finetune.checkpoint: .*ft.pth is a 'finetuning' checkpoint, not 'pretraining'"):
        write_pretraining_checkpoint(tmp_path / "ft.pth", kind="finetuning")
        run_finetuning.main(load_config(None, [*base, f"output_dir={tmp_path / 'a'}",
                                               f"finetune.checkpoint={tmp_path / 'ft.pth'}"]))
    with pytest.raises(ValueError, match="finetune.target 'worldcover' cannot also be an input domain"):
        run_finetuning.main(load_config(None, [*base, f"output_dir={tmp_path / 'b'}", "in_domains=[worldcover]",
                                               "finetune.target=worldcover"]))
    lacking = tmp_path / "no_s1"
    shutil.copytree(mmearth_fileset, lacking)
    with h5py.File(next(lacking.glob("*.h5")), "a") as h5:
        del h5["sentinel1"]
    with pytest.raises(ValueError, match="domain 's1' needs modality 'sentinel1', which .*no_s1.* does not hold"):
        run_finetuning.main(load_config(None, [*base, f"data_path={lacking}", f"output_dir={tmp_path / 'd'}",
                                               "in_domains=[s2_rgb, s1]"]))
    with pytest.raises(ValueError, match="finetune.task is 'classification'"):
        run_finetuning.main(load_config(None, [*base, f"output_dir={tmp_path / 'c'}", "in_domains=[s2_rgb]",
                                               "finetune.task=classification"]))


@pytest.mark.parametrize("protocol", ["knn", "linear_probe"])
def test_geobench_classification_probes(tmp_path, pretrained, protocol):
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=18)
    out = tmp_path / protocol
    cfg = load_config([REPO / "cfgs/finetune/geobench.yaml", REPO / "cfgs/finetune/geobench/m-eurosat.yaml"], [
        f"data_path={tmp_path / 'gb'}", f"output_dir={out}", *TINY, "epochs=2", f"finetune.protocol={protocol}",
        f"finetune.checkpoint={pretrained}", "in_domains=[s2_rgb, s2_nir]", "data.input_size=16"])
    res = run_finetuning.main(cfg)
    assert 0.0 <= res["metrics"]["test"]["accuracy"] <= 1.0 and res["metric"] == "accuracy"
    assert res["new_domains"] == ["s2_nir"]


def test_bigearthnet_examples_write_finite_micro_f1_and_map(shared_data_dir, tmp_path):
    root = shared_data_dir / "bigearthnet_examples"
    if not any(root.glob("*.tar.bz2")):
        pytest.skip(f"BigEarthNet example archives absent from {root}")
    cfg = load_config(REPO / "cfgs/finetune/bigearthnet_examples.yaml", [
        f"data_path={root}", f"output_dir={tmp_path / 'ben'}", "epochs=1", "data.input_size=32",
        "in_domains=[s2_rgb, s1]", "model.preset={dim: 32, depth: 1, heads: 2}"])
    run_finetuning.main(cfg)
    metrics = json.loads((tmp_path / "ben" / "results.json").read_text())["metrics"]
    for split in ("val", "test"):
        assert math.isfinite(metrics[split]["micro_f1"]) and math.isfinite(metrics[split]["map"])
    assert (tmp_path / "ben" / "cache" / "bigearthnet_band_stats.json").is_file()
