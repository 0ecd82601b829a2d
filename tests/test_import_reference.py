"""tools/import_reference_checkpoint.py: conversion of a reference checkpoint, --check exit codes, bad input, and
the converted checkpoint in use (parity from the file, continued pretraining, fine-tuning, timm export).

The reference weights are those of the parity fixture (``../shared/reference/parity/multimae_eo_tiny.pt``,
computed by the reference implementation itself), saved the way the reference's ``save_model`` writes a
checkpoint; tests skip when the fixture is absent.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import run_finetuning
import run_pretraining
from multimae.build import build_pretraining
from multimae.interop import export_timm_state_dict, timm_vit_kwargs
from multimae.reference import REFERENCE_DOMAINS
from tests.test_reference import FIXTURE, TOL
from tools.import_reference_checkpoint import config_path, main
from utils.checkpoint import load_checkpoint, load_state_checked, read_checkpoint
from utils.config import load_config
from utils.finetune import build_backbone

REPO = Path(__file__).resolve().parents[1]
RUN = ["num_workers=0", "data.pin_memory=false", "wandb.mode=disabled", "vis.every_epochs=0", "vis.num_samples=1"]


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"reference parity fixture {FIXTURE} absent")
    return torch.load(FIXTURE, weights_only=True)


def _save_model_file(path, state_dict, **args):
    """A checkpoint as the reference's utils/checkpoint.save_model writes it (args: an argparse.Namespace)."""
    namespace = argparse.Namespace(
        model="pretrain_multimae_tiny", in_domains="rgb-depth-semseg-ired-sired-ebands",
        out_domains="rgb-depth-semseg-ired-sired-ebands", extra_norm_pix_loss=True, input_size=56, patch_size=8,
        decoder_dim=32, decoder_depth=1, decoder_num_heads=8, num_encoded_tokens=49, alphas=1.0,
        standardize_depth=True, task_balancer="none", blr=1e-4, epochs=1000, output_dir="output/pretrain/")
    vars(namespace).update(args)
    torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": []}, "epoch": 999,
                "scaler": {"scale": 65536.0}, "args": namespace, "loss_balancer": {}}, path)
    return path


@pytest.fixture(scope="module")
def converted(fixture, mmearth_fileset, tmp_path_factory):
    """The fixture's weights converted by the command line; returns (checkpoint path, printed report)."""
    folder = tmp_path_factory.mktemp("import")
    src = _save_model_file(folder / "checkpoint-999.pth", fixture["state_dict"])
    out = folder / "eo_tiny.pth"
    stats = mmearth_fileset / f"{mmearth_fileset.name}_band_stats.json"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([str(src), str(out), "--num-heads", "4", "--band-stats", str(stats)]) == 0
    return out, buf.getvalue()


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # user_errors: one error line, status 2
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------------------------------ --check
def test_check_reproduces_the_fixture_and_prints_every_difference(fixture, capsys):
    rc, out, _ = _run(["--check", str(FIXTURE)], capsys)
    assert rc == 0, out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    expected = ["encoder_tokens", "visible_index", "encoder_tokens_masked",
                *[f"preds.{k}" for k in fixture["preds"]], *[f"preds_unmasked.{k}" for k in fixture["preds_unmasked"]],
                *[f"losses.{k}" for k in fixture["losses"]]]
    for name in expected:
        assert name in lines and lines[name].endswith(" ok"), name
        assert re.search(r" \d\.\d{3}e[-+]\d\d ", lines[name]), lines[name]  # the max abs difference
    assert f"all {len(expected)} quantities within tolerance" in out
    assert "copied: 311 tensors" in out and "fixed sin-cos tables, grid 28x28" in out


def test_check_exits_1_beyond_the_tolerances(fixture, tmp_path, capsys):
    bad = dict(fixture, preds=dict(fixture["preds"]), losses=dict(fixture["losses"]))
    bad["preds"]["semseg"] = bad["preds"]["semseg"].clone()
    bad["preds"]["semseg"][0, 3, 5, 7] += 1e-3  # one logit of one pixel
    bad["losses"]["depth"] = bad["losses"]["depth"] * (1 + 1e-4)
    torch.save(bad, tmp_path / "bad.pt")
    rc, out, _ = _run(["--check", str(tmp_path / "bad.pt")], capsys)
    assert rc == 1
    failed = [line.split()[0] for line in out.splitlines() if line.endswith("FAIL")]
    assert failed == ["preds.semseg", "losses.depth"]
    assert "2 of 25 beyond tolerance: preds.semseg (worldcover12), losses.depth (elevation)" in out
    line = next(line for line in out.splitlines() if line.startswith("preds.semseg"))
    assert float(line.split()[2]) == pytest.approx(1e-3, rel=1e-2)


def test_check_refuses_what_is_not_a_fixture(tmp_path, capsys):
    torch.save({"state_dict": {}, "inputs": {}}, tmp_path / "half.pt")
    rc, _, err = _run(["--check", str(tmp_path / "half.pt")], capsys)
    assert rc == 2 and err.startswith("error: ") and "half.pt: not a parity fixture: missing entries config, " in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    rc, _, err = _run(["--check", str(tmp_path / "absent.pt")], capsys)
    assert rc == 2 and "no fixture file" in err


# ------------------------------------------------------------------------------------------ import
def test_converted_checkpoint_is_a_v2_pretraining_checkpoint(fixture, converted, mmearth_fileset):
    out, report = converted
    state = read_checkpoint(out, kind="pretraining")  # weights_only load, v2, pretraining
    assert state["format_version"] == 2 and (state["step"], state["epoch"]) == (0, 0) and "optimizer" not in state
    spec = state["encoder"]["spec"]
    assert spec["in_domains"] == ["s2_rgb", "s2_rededge", "s2_nir", "s2_swir", "elevation", "worldcover12"]
    assert (spec["dim"], spec["depth"], spec["num_heads"], spec["pos_embed_grid"], spec["input_size"]) == (96, 2, 4, 28, 56)
    cfg = state["config"]
    assert cfg["multimae"]["decoder"] == {"dim": 32, "depth": 1, "heads": 8, "xattn_residual": False}
    assert cfg["optim"]["decay_everything"] and cfg["data"]["resize"] and cfg["data"]["elevation_norm"] == "per_tile"
    assert yaml.safe_load(config_path(out).read_text()) == cfg  # the written config is the checkpoint's
    sd = fixture["state_dict"]
    assert torch.equal(state["encoder"]["state_dict"]["blocks.1.mlp.fc1.weight"], sd["encoder.1.mlp.fc1.weight"])
    assert torch.equal(state["objective"]["state_dict"]["decoders.s2_rgb_normpix.head.bias"],
                       sd["output_adapters.norm_rgb.out_proj.bias"])
    assert state["objective"]["name"] == "multimae"
    # the statistics the reference used: MMEarth L2A stats for Sentinel-2, per-tile elevation, class ids
    stats = json.loads((mmearth_fileset / f"{mmearth_fileset.name}_band_stats.json").read_text())
    domains = state["encoder"]["domains"]
    assert domains["s2_nir"]["bands"] == ["B8A", "B08"] and list(domains["s2_nir"]["stats"]) == ["sentinel2_l2a"]
    assert domains["s2_nir"]["stats"]["sentinel2_l2a"]["mean"] == [stats["sentinel2_l2a"]["mean"][i] for i in (7, 8)]
    assert domains["s2_rgb"]["stats"]["sentinel2_l2a"]["std"] == [stats["sentinel2_l2a"]["std"][i] for i in (3, 2, 1)]
    assert domains["elevation"]["normalization"] == "per_tile" and domains["elevation"]["stats"] == {}
    assert len(domains["worldcover12"]["class_names"]) == 12 and domains["worldcover12"]["normalization"] == "class ids"
    assert domains["s2_rgb_normpix"]["source"] == "s2_rgb"
    # every source entry consumed or reported
    imported = state["imported_from"]
    assert imported["epoch"] == 999 and imported["not_converted"] == ["optimizer", "scaler", "loss_balancer"]
    assert "not converted: optimizer, scaler, loss_balancer" in report
    assert "args not used (schedule, paths, run time: the recipe's values apply): blr, epochs, output_dir" in report


def test_converted_checkpoint_reproduces_the_fixture(fixture, converted):
    state = load_checkpoint(converted[0])
    model = build_pretraining(state["config"]).eval()
    load_state_checked(model, {**{f"encoder.{k}": v for k, v in state["encoder"]["state_dict"].items()},
                               **state["objective"]["state_dict"]})
    inputs = {REFERENCE_DOMAINS[k]: v for k, v in fixture["inputs"].items()}
    inputs["worldcover12"] = fixture["semseg_fullres"]
    masks = {REFERENCE_DOMAINS[k]: v.float() for k, v in fixture["task_masks"].items()}
    with torch.no_grad():
        preds, _ = model.predict(inputs, masks=masks)
    for name, expected in fixture["preds"].items():
        torch.testing.assert_close(preds[REFERENCE_DOMAINS[name]], expected, **TOL, msg=name)


def test_bad_reference_checkpoints_give_one_error_line(fixture, tmp_path, capsys):
    sd = fixture["state_dict"]
    broken = {k: v for k, v in sd.items() if k != "encoder.1.mlp.fc2.bias"}
    broken["output_adapters.rgb.extra.weight"] = torch.zeros(1)
    src = _save_model_file(tmp_path / "broken.pth", broken)
    rc, _, err = _run([str(src), str(tmp_path / "a.pth"), "--num-heads", "4"], capsys)
    first = err.splitlines()[0]
    assert rc == 2 and first.startswith("error: state dict does not match the MultiMAE-EO reference layout")
    assert "missing keys: encoder.<i>.mlp.fc2.bias" in first and "unexpected keys: output_adapters.rgb.extra.weight" in first
    wide = _save_model_file(tmp_path / "wide.pth", dict(sd, **{"input_adapters.rgb.pos_emb": torch.zeros(1, 64, 28, 28)}))
    rc, _, err = _run([str(wide), str(tmp_path / "b.pth"), "--num-heads", "4"], capsys)
    assert rc == 2 and "input_adapters.rgb.pos_emb has width 64, but the encoder is 96 wide" in err.splitlines()[0]
    keep = ("rgb", "depth", "semseg")  # EPFL's ImageNet MultiMAE: rgb, depth and 133 COCO classes
    epfl = {k: v for k, v in sd.items() if k.split(".")[0] not in ("input_adapters", "output_adapters")
            or (k.split(".")[1] in keep and (".task_embeddings." not in k or k.split(".")[-1] in keep))}
    epfl["input_adapters.semseg.class_emb.weight"] = torch.zeros(133, 64)
    torch.save(epfl, tmp_path / "epfl.pth")  # a bare state dict
    rc, _, err = _run([str(tmp_path / "epfl.pth"), str(tmp_path / "c.pth"), "--num-heads", "4"], capsys)
    first = err.splitlines()[0]
    assert rc == 2 and "it has no input adapter for ired, ebands, sired" in first and "missing keys: " in first
    assert "(133, 64) (expected (12, 64))" in first
    torch.save(sd, tmp_path / "bare.pth")
    rc, _, err = _run([str(tmp_path / "bare.pth"), str(tmp_path / "d.pth")], capsys)  # width 96: heads unknown
    assert rc == 2 and "give the number of heads" in err
    good = _save_model_file(tmp_path / "good.pth", sd)
    rc, _, err = _run([str(good), str(tmp_path / "e.pth"), "--num-heads", "4", "--band-stats", str(tmp_path / "no.json")],
                      capsys)
    assert rc == 2 and "--band-stats: no file" in err and not (tmp_path / "e.pth").exists()
    other = _save_model_file(tmp_path / "other.pth", sd, patch_size=16)
    rc, _, err = _run([str(other), str(tmp_path / "f.pth"), "--num-heads", "4"], capsys)
    assert rc == 2 and "args.patch_size is 16, but the weights have 8" in err
    balanced = _save_model_file(tmp_path / "balanced.pth", sd, task_balancer="uncertainty")
    rc, _, err = _run([str(balanced), str(tmp_path / "g.pth"), "--num-heads", "4"], capsys)
    assert rc == 2 and "loss_balancer weights are not converted" in err


def test_existing_output_is_kept_without_overwrite(fixture, tmp_path, capsys):
    src = _save_model_file(tmp_path / "checkpoint-999.pth", fixture["state_dict"])
    out = tmp_path / "eo.pth"
    out.write_bytes(b"an earlier file")
    rc, _, err = _run([str(src), str(out), "--num-heads", "4"], capsys)
    assert rc == 2 and "eo.pth exists; pass --overwrite" in err and out.read_bytes() == b"an earlier file"
    rc, printed, _ = _run([str(src), str(out), "--num-heads", "4", "--overwrite"], capsys)
    assert rc == 0 and load_checkpoint(out)["kind"] == "pretraining" and config_path(out).is_file()
    assert "statistics: not recorded (pass --band-stats" in printed


# ----------------------------------------------------------------------------- the converted checkpoint in use
def test_pretraining_continues_from_the_converted_checkpoint(converted, mmearth_fileset, tmp_path, capsys):
    out, _ = converted
    args = [f"data_path={mmearth_fileset}", f"output_dir={tmp_path / 'run'}", "batch_size=2", "log_every_steps=1", *RUN]
    last = run_pretraining.main(load_config(config_path(out), [*args, f"resume={out}", "max_steps=1"]))
    assert last["step"] == 1 and torch.isfinite(torch.tensor(last["loss"]))
    printed = capsys.readouterr().out
    assert f"{out} holds no optimizer or RNG state: the optimizer starts fresh" in printed
    assert f"resumed from {out} at step 0" in printed
    last = run_pretraining.main(load_config(config_path(out), [*args, "max_steps=2"]))  # re-run: continues the run
    assert last["step"] == 2 and "checkpoint-last.pth at step 1" in capsys.readouterr().out
    after = load_checkpoint(tmp_path / "run" / "checkpoint-last.pth")
    before = load_checkpoint(out)
    assert after["step"] == 2 and after["optimizer"]["state"]  # a real optimizer state now
    key = "blocks.0.attn.qkv.weight"  # trained from the imported weights (lr ~1e-7), not from a new init
    moved = (after["encoder"]["state_dict"][key] - before["encoder"]["state_dict"][key]).abs().max()
    assert 0 < moved < 1e-4


def _finetune(converted_ckpt, data_path, out, input_size, batch_size):
    """cfgs/finetune/demo.yaml (Dynamic World segmentation) from the converted checkpoint, one epoch."""
    cfg = load_config(REPO / "cfgs" / "finetune" / "demo.yaml", [
        f"data_path={data_path}", f"output_dir={out}", f"finetune.checkpoint={converted_ckpt}", "finetune.grid=[]",
        "in_domains=[s2_rgb, s2_rededge, s2_nir, s2_swir, elevation]", f"data.input_size={input_size}",
        "data.elevation_norm=per_tile", "epochs=1", f"batch_size={batch_size}", *RUN])
    res = run_finetuning.main(cfg)
    assert res["new_domains"] == [] and 0.0 <= res["metrics"]["val"]["miou"] <= 1.0
    best = load_checkpoint(out / "checkpoint-best.pth")
    assert best["kind"] == "finetuning" and best["encoder"]["spec"]["pos_embed_grid"] == 28  # resized, as pretrained
    assert best["encoder"]["spec"]["input_size"] == input_size
    return res


def test_converted_checkpoint_fine_tunes(converted, mmearth_fileset, tmp_path):
    _finetune(converted[0], mmearth_fileset, tmp_path / "ft", 64, 4)  # 8 x 8 tokens from the 28 x 28 tables


@pytest.mark.slow
def test_converted_checkpoint_fine_tunes_on_the_demo_data(converted, shared_data_dir, tmp_path):
    from tools.geotiff_to_mmearth import convert

    data = tmp_path / "terramesh64"
    convert(REPO / "cfgs" / "data" / "terramesh_examples.yaml", shared_data_dir / "terramesh_examples", data, 64,
            progress=False)
    res = _finetune(converted[0], data, tmp_path / "ft", 64, 36)  # 72 training tiles: 2 steps
    assert "test" in res["metrics"]


def test_converted_encoder_exports_to_timm(fixture, converted):
    out, _ = converted
    pretrained = read_checkpoint(out, kind="pretraining")
    cfg = load_config(None, [f"finetune.checkpoint={out}", "data.input_size=56"])
    encoder, report = build_backbone(cfg, pretrained, ["s2_rgb"])
    assert report.loaded_domains == ["s2_rgb"]
    encoder.eval()
    state = export_timm_state_dict(encoder, "s2_rgb")
    # the exported table is the reference's own 28 x 28 table resized bicubically to 7 x 7, as its forward does
    table = F.interpolate(fixture["state_dict"]["input_adapters.rgb.pos_emb"], size=(7, 7), mode="bicubic",
                          align_corners=False)
    torch.testing.assert_close(state["pos_embed"][0, 1:], table.flatten(2)[0].T, **TOL)  # float64 vs float32 resize
    vit = timm.models.vision_transformer.VisionTransformer(**timm_vit_kwargs(encoder, "s2_rgb")).eval()
    vit.load_state_dict(state)  # strict
    x = fixture["inputs"]["rgb"]
    with torch.no_grad():
        ours, theirs = encoder.encode({"s2_rgb": x}), vit.forward_features(x)
    torch.testing.assert_close(theirs[:, 1:], ours[:, :-1], **TOL)
    torch.testing.assert_close(theirs[:, 0], ours[:, -1], **TOL)


def test_a_run_without_depth_standardisation_records_the_aster_statistics(fixture, mmearth_fileset, tmp_path, capsys):
    src = _save_model_file(tmp_path / "checkpoint-999.pth", fixture["state_dict"], standardize_depth=False)
    stats = mmearth_fileset / f"{mmearth_fileset.name}_band_stats.json"
    rc, printed, _ = _run([str(src), str(tmp_path / "eo.pth"), "--num-heads", "4", "--band-stats", str(stats)], capsys)
    assert rc == 0 and "statistics: aster, sentinel2_l2a from" in printed
    state = load_checkpoint(tmp_path / "eo.pth")
    assert state["config"]["data"]["elevation_norm"] == "band_stats"
    elevation = state["encoder"]["domains"]["elevation"]
    assert elevation["normalization"] == "band_stats"
    assert elevation["stats"]["aster"]["mean"] == json.loads(stats.read_text())["aster"]["mean"][:1]


def test_the_reference_recipe_is_the_reference_vit_b():
    from multimae.build import model_summary

    cfg = load_config(REPO / "cfgs" / "pretrain" / "reference.yaml")
    summary = dict(line.split(": ", 1) for line in model_summary(cfg).splitlines() if not line.startswith(" "))
    # the reference reports 90.78M trainable parameters for ViT-B + 7 decoders (its class embedding has one row less)
    assert round(int(summary["trainable_params"]) / 1e6, 2) == 90.78
    assert summary["total_tokens"] == "294" and summary["encoded_tokens"] == "49"
