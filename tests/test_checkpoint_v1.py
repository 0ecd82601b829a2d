"""Checkpoints of format v1 (written before objectives were plug-ins) load, compute the same, resume and fine-tune.

The fixture in tests/fixtures/v1_pretraining was written by that code (its README says how); the expected
tensors and losses are what that code computed from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import run_finetuning
import run_pretraining
from multimae.build import build_pretraining
from tests.mmearth_fixture import write_mmearth_fileset
from utils.checkpoint import load_state_checked, read_checkpoint
from utils.config import load_config, migrate_config
from utils.logger import read_log

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v1_pretraining"


@pytest.fixture(scope="module")
def v1():
    state = read_checkpoint(FIXTURE / "checkpoint-last.pth", kind="pretraining")
    return state, torch.load(FIXTURE / "expected.pt", weights_only=True)


def _objective(state):
    model = build_pretraining(state["config"]).eval()
    weights = {**{f"encoder.{k}": v for k, v in state["encoder"]["state_dict"].items()},
               **state["objective"]["state_dict"]}
    load_state_checked(model, weights)
    return model


def test_v1_checkpoint_is_converted_on_read(v1):
    state, _ = v1
    assert state["format_version"] == 2 and state["kind"] == "pretraining" and state["step"] == 2
    assert state["config"]["objective"] == "multimae" and "out_domains" not in state["config"]
    assert state["config"]["multimae"]["out_domains"] == ["s2_rgb", "elevation", "worldcover", "s2_rgb_normpix"]
    assert state["config"]["multimae"]["decoder"]["dim"] == 16
    assert state["config"]["multimae"]["masking"]["num_encoded_tokens"] == 4
    spec = state["encoder"]["spec"]
    assert (spec["dim"], spec["depth"], spec["in_domains"]) == (16, 2, ["s2_rgb", "elevation", "worldcover"])
    assert "blocks.1.mlp.fc2.weight" in state["encoder"]["state_dict"]
    assert state["encoder"]["domains"]["s2_rgb"]["bands"] == ["B04", "B03", "B02"]
    names = [n for g in state["optimizer"]["param_groups"] for n in g["names"]]
    assert "encoder.blocks.0.attn.qkv.weight" in names and "decoders.s2_rgb.mask_token" in names


def test_converted_v1_model_computes_what_v1_computed(v1):
    state, expected = v1
    model = _objective(state)
    with torch.no_grad():
        tokens = model.encoder.encode(expected["inputs"], valid=expected["valid"])
        preds, _ = model.predict(expected["inputs"], valid=expected["valid"], masks=expected["masks"])
    torch.testing.assert_close(tokens, expected["encoder_tokens"], rtol=1e-5, atol=1e-6)
    for name, pred in expected["preds"].items():  # includes the decoders' domain embeddings, renamed on read
        torch.testing.assert_close(preds[name], pred, rtol=1e-5, atol=1e-6, msg=name)


def _copy_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-last.pth", "log.jsonl"):
        shutil.copy(FIXTURE / name, run / name)
    data = write_mmearth_fileset(tmp_path / "data" / "mmearth_tiny")  # the fixture's data (seed 0)
    old = {**yaml.safe_load((FIXTURE / "config.yaml").read_text()), "data_path": str(data), "output_dir": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))  # the v1 run, as if its data were here
    return run, data, migrate_config(old)


def test_v1_run_resumes_on_the_same_trajectory(tmp_path, v1):
    _, expected = v1
    run, _, cfg = _copy_run(tmp_path)
    run_pretraining.main({**cfg, "max_steps": 4})  # the migrated config of the same run: no resume_anyway needed
    losses = {r["step"]: r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r}
    for step, loss in expected["losses_after_resume"].items():
        assert losses[step] == pytest.approx(float(loss), rel=1e-5), step
    assert read_checkpoint(run / "checkpoint-last.pth")["format_version"] == 2


def test_v1_checkpoint_fine_tunes(tmp_path):
    _, data, _ = _copy_run(tmp_path)
    cfg = load_config(None, [f"data_path={data}", f"output_dir={tmp_path / 'ft'}", "epochs=1", "batch_size=4",
                             "num_workers=0", "data.input_size=16", "data.pin_memory=false", "optim.warmup_epochs=0",
                             f"finetune.checkpoint={FIXTURE / 'checkpoint-last.pth'}", "in_domains=[s2_rgb, s1]"])
    res = run_finetuning.main(cfg)
    assert res["new_domains"] == ["s1"] and 0.0 <= res["metrics"]["test"]["miou"] <= 1.0
