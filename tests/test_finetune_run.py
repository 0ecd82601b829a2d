"""End-to-end run_finetuning.main on tiny data: MMEarth segmentation + grid, GEO-Bench probes, BigEarthNet examples.

Tiny encoder (dim 32, depth 2, 16 px input, 4 tokens per domain); a pretraining checkpoint is written directly
(tests/test_finetune.py) instead of being trained.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import run_finetuning
from multimae.domains import get_domain
from tests.geobench_fixture import write_geobench_task
from tests.test_finetune import write_pretraining_checkpoint
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["num_workers=0", "batch_size=4", "data.input_size=16", "data.pin_memory=false", "optim.blr=0.05",
        "optim.warmup_epochs=0.0", "model.preset={dim: 32, depth: 2, heads: 2}", "finetune.embedding_map_samples=0"]
GEOBENCH = [REPO / "cfgs/finetune/geobench.yaml", REPO / "cfgs/finetune/geobench/m-eurosat.yaml"]
EUROSAT_NAMES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
                 "Residential", "River", "SeaLake"]


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
    assert 0.0 <= test["miou"] <= 1.0 and list(test["per_class_iou"]) == list(get_domain("dynamic_world").class_names)
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
    names = get_domain("dynamic_world").class_names
    assert saved["majority_class"] == names[saved["majority_class_id"]]
    printed = capsys.readouterr().out
    assert f"majority class '{saved['majority_class']}' everywhere" in printed
    assert all(n in printed for n in names)  # the per-class tables speak class names


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
    cfg = load_config(GEOBENCH, [
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


def _groups(out: Path) -> dict[str, dict]:
    """param_groups.json by parameter name."""
    info = json.loads((out / "param_groups.json").read_text())
    return {n: {**g, "optimizer": info["optimizer"], "layer_decay": info["layer_decay"]}
            for g in info["groups"] for n in g["names"]}


def test_param_groups_new_adapter_and_head_at_full_rate_pretrained_blocks_decayed(tmp_path, pretrained):
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=18)
    out = tmp_path / "ft"
    res = run_finetuning.main(load_config(GEOBENCH, [
        f"data_path={tmp_path / 'gb'}", f"output_dir={out}", *TINY, "epochs=1", f"finetune.checkpoint={pretrained}",
        "in_domains=[s2_rgb, s2_nir]", "optim.layer_decay=0.5"]))
    assert res["new_domains"] == ["s2_nir"]
    g = _groups(out)
    assert g["head.fc.weight"]["optimizer"] == "adamw" and g["head.fc.weight"]["layer_decay"] == 0.5
    # depth 2: the pretrained adapter sits below block 0 (0.5 ** 3), block i at 0.5 ** (2 - i)
    for name, scale in (("encoder.input_adapters.s2_nir.proj.weight", 1.0), ("encoder.input_adapters.s2_nir.proj.bias", 1.0),
                        ("head.fc.weight", 1.0), ("head.norm.weight", 1.0),
                        ("encoder.input_adapters.s2_rgb.proj.weight", 0.125), ("encoder.global_tokens", 0.125),
                        ("encoder.blocks.0.attn.qkv.weight", 0.25), ("encoder.blocks.1.mlp.fc1.weight", 0.5)):
        assert g[name]["lr_scale"] == pytest.approx(scale), name
    assert g["encoder.input_adapters.s2_nir.proj.weight"]["peak_lr"] == pytest.approx(0.05 * 4 / 256)
    # the optimizer the run stepped holds the same scales
    state = load_checkpoint(out / "checkpoint-last.pth")["optimizer"]
    used = {n: grp["lr_scale"] for grp in state["param_groups"] for n in grp["names"]}
    assert used == {n: v["lr_scale"] for n, v in g.items()}


def test_from_scratch_run_has_no_layer_decay_unless_asked(tmp_path, pretrained):
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=18)
    base = [f"data_path={tmp_path / 'gb'}", *TINY, "epochs=1", f"finetune.checkpoint={pretrained}",
            "in_domains=[s2_rgb, s2_nir]", "finetune.from_scratch=true"]  # the m-eurosat recipe sets layer_decay 0.65
    run_finetuning.main(load_config(GEOBENCH, [*base, f"output_dir={tmp_path / 'a'}"]))
    g = _groups(tmp_path / "a")
    assert g["head.fc.weight"]["layer_decay"] is None and {v["lr_scale"] for v in g.values()} == {1.0}
    run_finetuning.main(load_config(GEOBENCH, [*base, f"output_dir={tmp_path / 'b'}", "finetune.scratch_layer_decay=0.5"]))
    g = _groups(tmp_path / "b")
    assert g["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.25) and g["head.fc.weight"]["lr_scale"] == 1.0


def test_knn_bank_and_num_train_follow_the_label_fraction(tmp_path, pretrained, monkeypatch):
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=36)  # 20 / 8 / 8
    banks = []
    real = run_finetuning.knn_scores

    def recording(train_emb, train_labels, query_emb, **kw):
        banks.append((train_emb.shape[0], train_labels.shape[0]))
        return real(train_emb, train_labels, query_emb, **kw)

    monkeypatch.setattr(run_finetuning, "knn_scores", recording)
    res = run_finetuning.main(load_config(GEOBENCH, [
        f"data_path={tmp_path / 'gb'}", f"output_dir={tmp_path / 'knn'}", *TINY, "finetune.protocol=knn",
        f"finetune.checkpoint={pretrained}", "in_domains=[s2_rgb]", "finetune.label_fraction=0.25"]))
    assert res["num_train"] == 5 and banks == [(5, 5), (5, 5)]  # round(0.25 * 20), for val and test
    with np.load(tmp_path / "knn" / "embeddings.npz") as z:
        assert z["train_x"].shape == (5, 32) and z["test_x"].shape == (8, 32)


def test_warmup_longer_than_the_finetuning_run_is_clipped_with_a_warning(tmp_path, pretrained, capsys):
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=18)  # 10 train: 2 steps of 4 per epoch
    out = tmp_path / "warm"
    run_finetuning.main(load_config(GEOBENCH, [  # the recipe's warmup_epochs 5 against epochs 2
        f"data_path={tmp_path / 'gb'}", f"output_dir={out}", *TINY, "optim.warmup_epochs=5.0", "epochs=2",
        "log_every_steps=1", "optim.min_lr=0.0", f"finetune.checkpoint={pretrained}", "in_domains=[s2_rgb]"]))
    assert ("optim.warmup_epochs=5.0 covers the whole run (epochs=2, 4 steps): warm-up clipped to 1 steps"
            in capsys.readouterr().out)
    lrs = [r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "lr" in r]
    peak = 0.05 * 4 / 256
    # 1 warm-up step from 0, then the cosine from the peak: cos(pi * t) at t = 0, 1/3, 2/3
    assert lrs == pytest.approx([0.0, peak, peak * 0.75, peak * 0.25])


def test_segmentation_linear_probe_trains_only_a_linear_head(mmearth_fileset, pretrained, tmp_path, capsys):
    out = tmp_path / "seg_probe"
    res = run_finetuning.main(load_config(None, [
        f"data_path={mmearth_fileset}", f"output_dir={out}", *TINY, "epochs=2", "finetune.protocol=linear_probe",
        "finetune.head=convnext", f"finetune.checkpoint={pretrained}", "in_domains=[s2_rgb, s1]"]))
    assert "linear_probe: a linear head on the frozen tokens" in capsys.readouterr().out
    g = _groups(out)
    assert set(g) == {"head.fc.weight", "head.fc.bias"} and g["head.fc.weight"]["optimizer"] == "sgd"
    assert g["head.fc.weight"]["peak_lr"] == pytest.approx(0.1 * 4 / 256) and g["head.fc.weight"]["weight_decay"] == 0
    best = load_checkpoint(out / "checkpoint-best.pth")
    assert set(best["head"]["state_dict"]) == {"fc.weight", "fc.bias", "norm.running_mean", "norm.running_var",
                                               "norm.num_batches_tracked"}
    assert best["head"]["state_dict"]["fc.weight"].shape == (9, 2 * 32)
    pre = load_checkpoint(pretrained)["encoder"]["state_dict"]
    for key, value in best["encoder"]["state_dict"].items():  # the frozen encoder did not move
        torch.testing.assert_close(value, pre[key])
    assert set(res["metrics"]["test"]["per_class_iou"]) == set(get_domain("dynamic_world").class_names)


def test_logistic_probe_caches_embeddings_reports_metrics_class_names_and_map(tmp_path, pretrained, monkeypatch):
    pytest.importorskip("sklearn", reason="scikit-learn (requirements.txt) is not installed")
    names = [f"land cover {i}" for i in range(10)]
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=45, class_names=names)  # 25 / 10 / 10
    args = [f"data_path={tmp_path / 'gb'}", f"output_dir={tmp_path / 'lr'}", *TINY, "finetune.protocol=logistic",
            f"finetune.checkpoint={pretrained}", "in_domains=[s2_rgb]", "finetune.logistic_c=[0.01, 1.0]",
            "finetune.embedding_map_samples=100"]
    res = run_finetuning.main(load_config(GEOBENCH, args))
    assert set(res["metrics"]["test"]) == {"accuracy", "micro_f1", "macro_f1", "map", "macro_map"}
    assert res["class_names"] == names and res["num_train"] == 25  # the names of the folder's task_specs.pkl
    assert res["logistic"]["c"] in (0.01, 1.0) and set(res["logistic"]["val_scores"]) == {"0.01", "1.0"}
    with np.load(tmp_path / "lr" / "embeddings.npz") as z:
        assert z["train_x"].shape == (25, 32) and z["val_y"].shape == (10,) and z["test_x"].dtype == np.float32
    assert (tmp_path / "lr" / "embedding_maps" / "tsne_test.png").stat().st_size > 1000

    def no_encoder(*a, **k):
        raise AssertionError("the cached embeddings should have been used")

    monkeypatch.setattr(run_finetuning.FineTuneModel, "embed", no_encoder)
    again = run_finetuning.main(load_config(GEOBENCH, args))
    assert again["metrics"] == res["metrics"]


def test_geobench_class_names_without_task_specs_come_from_the_converters(tmp_path, pretrained):
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=18)
    res = run_finetuning.main(load_config(GEOBENCH, [
        f"data_path={tmp_path / 'gb'}", f"output_dir={tmp_path / 'o'}", *TINY, "epochs=1",
        f"finetune.checkpoint={pretrained}", "in_domains=[s2_rgb]", "finetune.protocol=knn"]))
    assert res["class_names"] == EUROSAT_NAMES


@pytest.mark.slow
def test_linear_probe_of_the_demo_checkpoint_finds_the_planted_signal(tmp_path):
    """The issue's acceptance run: m-eurosat fixture with the class signal in B8A and B11 only, the demo
    pretraining checkpoint, in_domains [s2_nir, s2_swir], the probe's own defaults."""
    ckpt_path = Path(os.environ.get("MMEARTH_DEMO_CHECKPOINT", REPO / "output/demo/pretrain/checkpoint-last.pth"))
    if not ckpt_path.is_file():
        pytest.skip(f"no demo checkpoint {ckpt_path} (`make demo` writes it; or set MMEARTH_DEMO_CHECKPOINT)")
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=450, signal_bands=("B8A", "B11"))  # 250/100/100
    base = [f"data_path={tmp_path / 'gb'}", "num_workers=0", "data.input_size=16", "data.pin_memory=false",
            f"finetune.checkpoint={ckpt_path}", "in_domains=[s2_nir, s2_swir]", "finetune.embedding_map_samples=0"]
    res = run_finetuning.main(load_config(GEOBENCH, [*base, f"output_dir={tmp_path / 'lp'}",
                                                     "finetune.protocol=linear_probe"]))
    assert res["metrics"]["test"]["accuracy"] >= 0.85 and res["new_domains"] == []
    knn = run_finetuning.main(load_config(GEOBENCH, [*base, f"output_dir={tmp_path / 'knn'}", "finetune.protocol=knn",
                                                     "finetune.label_fraction=0.25"]))
    assert knn["num_train"] == round(0.25 * 250)
    with np.load(tmp_path / "knn" / "embeddings.npz") as z:
        assert len(z["train_x"]) == knn["num_train"]
