"""benchmarks/compare_objectives.py on tiny configs: results, table, plots, resumability, a failed recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import compare_objectives  # noqa: E402
from tests.test_run_pretraining import TINY  # noqa: E402
from utils.config import ConfigError  # noqa: E402


def _config(tmp_path, fileset):
    pre = [t for t in TINY if not t.startswith(("epochs", "log_every"))] + ["epochs=1", "log_every_steps=1"]
    cfg = {
        "output_dir": str(tmp_path / "compare"), "seeds": [0], "isolation": "inline", "baseline_recipe": "small",
        "filesets": {"tiny": {"path": str(fileset)}},
        "pretrain": {"data": "tiny", "overrides": pre},
        "recipes": [
            {"name": "small", "overrides": []},
            {"name": "wider_budget", "overrides": ["multimae.masking.num_encoded_tokens=3"]},
            {"name": "broken", "overrides": ["multimae.masking.num_encoded_tokens=999"]},  # more than all tokens
        ],
        "tasks": [{"name": "landcover", "data": "tiny", "protocols": ["linear_probe"], "subsets": [["s2_rgb"]],
                   "overrides": ["epochs=1", "batch_size=4", "num_workers=0", "data.input_size=16",
                                 "data.pin_memory=false", "optim.warmup_epochs=0"]}],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_comparison_records_every_cell_resumes_and_reports_a_failed_recipe(tmp_path, mmearth_fileset, monkeypatch):
    path = _config(tmp_path, mmearth_fileset)
    results = compare_objectives.run_comparison(path)
    out = tmp_path / "compare"
    assert (out / "results.json").is_file() and (out / "metrics.png").is_file() and (out / "cost.png").is_file()
    row = results["summary"]["rows"][0]
    assert row["metric"] == "miou" and row["inputs"] == ["s2_rgb"]
    for name in ("small", "wider_budget"):
        assert 0.0 <= row["cells"][name]["mean"] <= 1.0 and row["cells"][name]["n"] == 1
    assert row["cells"]["broken"]["n"] == 0
    cost = results["summary"]["cost"]
    assert cost["broken"]["status"] == "failed" and "num_encoded_tokens" in cost["broken"]["errors"][0]
    assert cost["small"]["step_cost_vs_baseline"] == pytest.approx(1.0)
    assert cost["small"]["trainable_params"] > 0 and cost["small"]["samples_per_s"] > 0
    assert cost["small"]["peak_mem_mb"] > 0 and cost["small"]["seconds"] > 0
    table = (out / "results.md").read_text()
    assert "| landcover | linear_probe | s2_rgb | miou |" in table and "failed" in table
    assert "broken: " in table and "one seed: no spread" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["pretraining"]["small/seed0"]["config"]["seed"] == 0 and saved["code_commit"]

    import run_finetuning
    import run_pretraining

    def refuse(*args, **kwargs):
        raise AssertionError("a finished pretraining or evaluation was run again")

    monkeypatch.setattr(run_finetuning, "main", refuse)
    monkeypatch.setattr(run_pretraining, "main", lambda cfg: (_ for _ in ()).throw(RuntimeError("still broken")))
    again = compare_objectives.run_comparison(path)  # only the failed recipe is retried
    assert again["summary"]["rows"][0]["cells"]["small"]["mean"] == row["cells"]["small"]["mean"]
    assert "still broken" in again["summary"]["cost"]["broken"]["errors"][0]

    # A changed budget for one recipe: its recorded run is not reused, and the message names the key.
    cfg = yaml.safe_load(path.read_text())
    cfg["recipes"][1]["overrides"].append("optim.blr=0.5")
    path.write_text(yaml.safe_dump(cfg))
    changed = compare_objectives.run_comparison(path)
    error = changed["summary"]["cost"]["wider_budget"]["errors"][0]
    assert "optim.blr differs" in error and "wider_budget" in error
    assert changed["summary"]["rows"][0]["cells"]["small"]["mean"] == row["cells"]["small"]["mean"]
    # A changed task: every evaluation of it is reported, not reused.
    cfg["recipes"][1]["overrides"].pop()
    cfg["tasks"][0]["overrides"].append("finetune.probe_blr=0.5")
    path.write_text(yaml.safe_dump(cfg))
    evals = compare_objectives.run_comparison(path)["evaluations"]
    assert {e["status"] for e in evals if e["recipe"] != "broken"} == {"failed"}
    assert all("finetune.probe_blr differs" in e["error"] for e in evals if e["recipe"] != "broken")


def test_spread_over_seeds_and_ties(tmp_path):
    cfg = {"recipes": [{"name": "a"}, {"name": "b"}], "baseline_recipe": "a", "seeds": [0, 1]}
    evals = [{"recipe": r, "seed": s, "task": "t", "protocol": "knn", "inputs": ["s2_rgb"], "status": "ok",
              "metric": "accuracy", "value": v}
             for r, s, v in (("a", 0, 0.80), ("a", 1, 0.90), ("b", 0, 0.82), ("b", 1, 0.84))]
    pre = {(r, s): {"status": "ok", "seconds": 1.0, "samples_per_s": 10.0, "peak_mem_mb": 1.0, "trainable_params": 5,
                    "seconds_per_step": sp, "final_loss": 1.0} for r, s, sp in (("a", 0, 1.0), ("a", 1, 1.0),
                                                                                ("b", 0, 2.0), ("b", 1, 2.0))}
    summary = compare_objectives.summarise(cfg, pre, evals)
    row = summary["rows"][0]
    assert row["cells"]["a"]["mean"] == pytest.approx(0.85) and row["cells"]["a"]["spread"] == pytest.approx(0.0707, abs=1e-4)
    assert row["best"] == ["a"] and row["within_spread_of_best"] == ["b"]  # 0.85 - 0.83 < 0.0707
    assert summary["cost"]["b"]["step_cost_vs_baseline"] == pytest.approx(2.0)
    assert "within spread of the best: b" in compare_objectives.markdown_table(cfg, summary)


def test_bad_comparison_configs_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "x", "pretrain": {}, "recipes": [{"name": "a"}], "tasks": [],
                                    "budget": 3}))
    with pytest.raises(ConfigError, match="unknown key.*budget"):
        compare_objectives.load_compare_config(path)
    path.write_text(yaml.safe_dump({"output_dir": "x", "pretrain": {}, "recipes": [{"name": "a"}],
                                    "tasks": [{"name": "t", "protocols": ["svm"]}]}))
    with pytest.raises(ConfigError, match=r"tasks.t.protocols must be a non-empty list of knn"):
        compare_objectives.load_compare_config(path)
    assert compare_objectives.main(["--config", str(tmp_path / "absent.yaml")]) == 2


@pytest.mark.parametrize("name", ["demo", "mmearth64_geobench"])
def test_shipped_comparison_configs_resolve_for_every_recipe_and_task(name):
    from multimae.build import build_pretraining
    from utils.config import load_config

    cfg = yaml.safe_load((REPO / "cfgs" / "compare" / f"{name}.yaml").read_text())
    objectives = set()
    for recipe in cfg["recipes"]:
        items = [*cfg["pretrain"]["overrides"], *recipe.get("overrides", []), "data_path=unused", "output_dir=unused"]
        run_cfg = load_config([str(REPO / c) for c in recipe["config"]], items)
        objectives.add(run_cfg["objective"])
        assert run_cfg["in_domains"] == ["s2_rgb", "s2_rededge", "s2_nir", "s2_swir", "s1"]
        assert run_cfg["model"]["patch_size"] == 8 and run_cfg["data"]["input_size"] == 56
        if name == "demo":  # small enough to build here: catches settings only the objective checks
            assert sum(p.numel() for p in build_pretraining(run_cfg).parameters()) > 0
    assert objectives == {"multimae", "latent_mim", "jepa", "moe_mae"}
    for task in cfg["tasks"]:
        for protocol in task["protocols"]:
            for subset in task["subsets"]:
                items = [*task.get("overrides", []), f"finetune.protocol={protocol}", "finetune.checkpoint=unused",
                         "data_path=unused", f"in_domains=[{', '.join(subset)}]"]
                assert load_config([str(REPO / c) for c in task["config"]], items)["in_domains"] == subset


def test_equal_best_means_are_all_marked():
    cfg = {"recipes": [{"name": "a"}, {"name": "b"}, {"name": "c"}], "baseline_recipe": "a", "seeds": [0]}
    evals = [{"recipe": r, "seed": 0, "task": "t", "protocol": "knn", "inputs": ["s2_rgb"], "status": "ok",
              "metric": "micro_f1", "value": v} for r, v in (("a", 0.4), ("b", 0.4), ("c", 0.25))]
    pre = {(r, 0): {"status": "ok", "seconds": 1.0, "samples_per_s": 1.0, "peak_mem_mb": 1.0, "trainable_params": 1,
                    "seconds_per_step": 1.0, "final_loss": 1.0} for r in "abc"}
    summary = compare_objectives.summarise(cfg, pre, evals)
    assert summary["rows"][0]["best"] == ["a", "b"]
    assert "| **0.400** | **0.400** | 0.250 |" in compare_objectives.markdown_table(cfg, summary)


def test_first_difference_names_the_key_and_ignores_keys_newer_code_added():
    recorded = {"optim": {"blr": 1e-3, "betas": [0.9, 0.95]}, "epochs": 2}
    assert compare_objectives._first_difference(recorded, {**recorded, "finetune": {"patch_size": None}}) is None
    assert compare_objectives._first_difference(recorded, {**recorded, "optim": {"blr": 1e-3, "betas": [0.9, 0.99]}}) \
        == "optim.betas"
    assert compare_objectives._first_difference(recorded, {"optim": recorded["optim"]}) == "epochs"
