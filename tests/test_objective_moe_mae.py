"""The MoE-MAE objective (multimae/objectives/moe_mae.py): the S recipe's size and layout, random masking with
always-visible metadata, the loss against an independent computation, no-data pixels, pictures, exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import run_pretraining
from multimae.build import build_pretraining, random_inputs, random_metadata
from tests.multimae_fixture import DEFAULTS
from tests.terramesh_fixture import convert_terramesh
from multimae.heads import LinearHead
from utils.config import load_config
from utils.finetune import FineTuneModel, build_backbone, read_pretraining_checkpoint
from utils.logger import read_log
from utils.visualize import save_pictures

REPO = Path(__file__).resolve().parents[1]


def _cfg(**model) -> dict:
    """A tiny MoE-MAE: 16 px, patch 4 -> 16 patch tokens of s2_rgb + s2_nir (4 visible each sample in total
    of 32), width 32, 3 blocks of 2 / 3 experts, grouped-query attention, three metadata tokens."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(objective="moe_mae", in_domains=["s2_rgb", "s2_nir"])
    cfg["data"]["input_size"] = 16
    cfg["model"].update(preset={"dim": 32, "depth": 3, "heads": 4}, patch_size=4, kv_groups=2, ffn="moe",
                        ffn_options={"experts": [2, 3], "hidden": [16, 8]}, metadata=["lat", "lon", "week"], **model)
    cfg["moe_mae"]["decoder"].update(dim=24, heads=4, kv_groups=2, ffn_options={"experts": [3], "hidden": [12, 12]})
    return cfg


def _batch(cfg, b=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs, valid = random_inputs(cfg, b, generator=gen)
    return {"inputs": inputs, "valid": valid, "metadata": random_metadata(cfg, b, generator=gen)}


def test_the_s_recipe_has_about_2_5m_parameters_and_metadata_tokens(capsys):
    run_pretraining.cli(["--config", str(REPO / "cfgs/pretrain/moe_mae.yaml"), "--summary"])
    text = capsys.readouterr().out
    params = int(next(line for line in text.splitlines() if line.startswith("trainable_params:")).split()[1])
    assert 2_000_000 <= params <= 3_000_000
    assert "token_layout: 100 patch tokens + 3 metadata (always visible) + 1 global" in text
    for field in ("week", "lat", "lon"):
        assert f"  {field}: 1 tokens, image-level" in text
    assert "(4 key/value groups), feed-forward moe" in text


def test_random_masking_keeps_the_same_number_visible_and_never_masks_metadata():
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_pretraining(cfg).eval()
    batch = _batch(cfg)
    preds, masks = model.predict(batch["inputs"], valid=batch["valid"], metadata=batch["metadata"],
                                 generator=torch.Generator().manual_seed(0))
    assert set(masks) == {"s2_rgb", "s2_nir"} and masks["s2_rgb"].shape == (3, 16)
    visible = (1 - masks["s2_rgb"]).sum(1) + (1 - masks["s2_nir"]).sum(1)
    assert visible.tolist() == [8.0] * 3  # int(32 * 0.25), metadata not counted
    assert preds["s2_nir"].shape == (3, 2, 16, 16)
    _, masks2 = model.predict(batch["inputs"], valid=batch["valid"], metadata=batch["metadata"],
                              generator=torch.Generator().manual_seed(1))
    assert not torch.equal(masks["s2_rgb"], masks2["s2_rgb"])  # a random mask per draw
    with pytest.raises(ValueError, match=r"moe_mae\.mask_ratio 1\.0 keeps 0 of the 32"):
        bad = _cfg()
        bad["moe_mae"]["mask_ratio"] = 1.0
        build_pretraining(bad)
    with pytest.raises(ValueError, match="'worldcover' is a class map"):
        build_pretraining({**_cfg(), "in_domains": ["s2_rgb", "worldcover"]})


def test_loss_is_masked_plus_weighted_visible_and_balance_on_valid_pixels_only():
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_pretraining(cfg).eval()  # eval: no gate noise, no dropout, so two passes agree
    batch = _batch(cfg)
    batch["valid"]["s2_rgb"][0, :4, :4] = False  # patch 0 of sample 0: no data at all
    batch["valid"]["s2_rgb"][1, 5, 5:7] = False  # two pixels of patch 5 of sample 1
    out = model(batch, generator=torch.Generator().manual_seed(0))
    preds, masks = model.predict(batch["inputs"], valid=batch["valid"], metadata=batch["metadata"],
                                 generator=torch.Generator().manual_seed(0))
    balance = model.encoder.pop_aux_loss()
    preds = {d: p.detach() for d, p in preds.items()}
    sums, counts = {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for d in ("s2_rgb", "s2_nir"):
        for b in range(3):
            for t in range(16):
                r, c = divmod(t, 4)
                rows, cols = slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4)
                ok = batch["valid"][d][b, rows, cols]
                if not ok.any():
                    continue
                err = (preds[d][b, :, rows, cols] - batch["inputs"][d][b, :, rows, cols]) ** 2
                masked = bool(masks[d][b, t] > 0.5)
                sums[masked] += float((err * ok).sum())
                counts[masked] += 1
    assert counts[True] + counts[False] == 3 * 32 - 1
    assert out["masked"].item() == pytest.approx(sums[True] / counts[True], rel=1e-5)
    assert out["visible"].item() == pytest.approx(sums[False] / counts[False], rel=1e-5)
    assert out["balance"].item() == pytest.approx(balance.item(), rel=1e-6) and balance.item() > 0
    total = out["masked"] + 0.1 * out["visible"] + 0.5 * out["balance"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    # Values at invalid pixels never change the loss.
    batch["inputs"]["s2_rgb"][0, :, :4, :4] = 1e6
    again = model(batch, generator=torch.Generator().manual_seed(0))
    assert again["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_gradients_reach_every_parameter_and_the_decoder_balance_counts_on_request():
    torch.manual_seed(0)
    cfg = _cfg()
    cfg["moe_mae"]["loss"]["decoder_balance"] = True
    model = build_pretraining(cfg)
    out = model(_batch(cfg, b=4))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert model.decoder_blocks[0].mlp.gate.weight.grad.abs().sum() > 0
    assert "mask_token" in model.no_weight_decay() and "decoder_pos_embed" in model.no_weight_decay()


def test_pictures_hold_reconstructions_and_the_expert_usage(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_pretraining(cfg).eval()
    data = model.pictures(_batch(cfg), generator=torch.Generator().manual_seed(0))
    usage = data["expert_usage"]
    assert list(usage) == ["encoder.blocks.0.mlp", "encoder.blocks.1.mlp", "encoder.blocks.2.mlp",
                           "decoder_blocks.0.mlp", "decoder_blocks.1.mlp"]
    assert [u.numel() for u in usage.values()] == [2, 3, 3, 3, 3]  # 3 blocks in 2 stages: the last takes 2
    for u in usage.values():
        assert u.sum().item() == pytest.approx(2.0)  # top 2: every token counts for two experts
    paths = save_pictures(tmp_path, "step000001", data)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert names == ["expert_usage/expert_usage_step000001.png", "reconstructions/sample0_step000001.png",
                     "reconstructions/sample1_step000001.png", "reconstructions/sample2_step000001.png"]


TINY = ["epochs=3", "batch_size=4", "num_workers=0", "log_every_steps=1", "save_every_steps=1000",
        "objective=moe_mae", "in_domains=[s2_rgb, s2_nir]", "data.input_size=16", "model.patch_size=4",
        "model.preset={dim: 32, depth: 3, heads: 4}", "model.kv_groups=2", "model.ffn=moe",
        "model.ffn_options={experts: [2, 3], hidden: [16, 8]}", "model.metadata=[lat, week, hour]",
        "moe_mae.decoder.dim=24", "moe_mae.decoder.heads=4", "moe_mae.decoder.kv_groups=2",
        "moe_mae.decoder.ffn_options.hidden=[12, 12]", "optim.blr=1e-2", "optim.warmup_epochs=0.5",
        "optim.clip_grad=1.0", "vis.every_epochs=0", "vis.num_samples=2"]


@pytest.mark.filterwarnings("ignore:metadata field 'hour'")  # the fixture's dates carry no time of day
def test_pretraining_run_resumes_exactly(mmearth_fileset, tmp_path):
    def run(out, steps):
        cfg = load_config(None, [f"data_path={mmearth_fileset}", f"output_dir={out}", *TINY, f"max_steps={steps}"])
        return run_pretraining.main(cfg)

    full, split = tmp_path / "full", tmp_path / "split"
    run(full, 5)
    run(split, 3)  # stops mid-epoch 2
    run(split, 5)
    a = {r["step"]: r for r in read_log(full / "log.jsonl") if "loss" in r}
    b = {r["step"]: r for r in read_log(split / "log.jsonl") if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        for key in ("loss", "loss_masked", "loss_visible", "loss_balance"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert len({r["loss"] for r in a.values()}) == 5 and all(r["loss_balance"] > 0 for r in a.values())
    assert (full / "expert_usage").is_dir() and any((full / "reconstructions").iterdir())
    # Fine-tuning data without metadata (and with fewer domains): the missing embeddings stand in.
    pretrained = read_pretraining_checkpoint(full / "checkpoint-last.pth")
    assert pretrained["encoder"]["spec"]["metadata"] == ["lat", "week", "hour"]
    ft_cfg = load_config(None, ["data.input_size=16", "finetune.protocol=linear_probe"])
    encoder, report = build_backbone(ft_cfg, pretrained, ["s2_rgb"])
    assert report.new_domains == [] and not any(k.startswith("metadata_adapter") for k in report.missing)
    net = FineTuneModel(encoder, LinearHead(dim=32, num_classes=5), freeze_encoder=True).eval()
    inputs, valid = random_inputs(load_config(None, ["in_domains=[s2_rgb]", "data.input_size=16"]), 2)
    with pytest.warns(UserWarning, match="not in the batch"):
        logits = net(inputs, valid)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:metadata field")
def test_demo_on_real_terramesh_learns_and_its_encoder_probes(shared_data_dir, tmp_path):
    import run_finetuning

    data = convert_terramesh(shared_data_dir, tmp_path / "terramesh64")
    out = tmp_path / "pretrain"
    run_pretraining.main(load_config(REPO / "cfgs/pretrain/moe_mae_demo.yaml",
                                     [f"data_path={data}", f"output_dir={out}", "epochs=10"]))
    records = [r for r in read_log(out / "log.jsonl") if "loss" in r]
    first, last = records[:4], records[-4:]
    assert sum(r["loss"] for r in last) < 0.5 * sum(r["loss"] for r in first)
    val = [r["val_loss"] for r in read_log(out / "log.jsonl") if "val_loss" in r]
    assert val[-1] < val[0]
    ckpt = out / "checkpoint-last.pth"
    lp = run_finetuning.main(load_config(REPO / "cfgs/finetune/moe_mae_demo.yaml",
                                         [f"data_path={data}", f"output_dir={tmp_path / 'lp'}",
                                          f"finetune.checkpoint={ckpt}", "epochs=2"]))
    assert lp["protocol"] == "linear_probe" and 0 < lp["metrics"]["val"]["miou"] <= 1
    ben = shared_data_dir / "bigearthnet_examples"
    if ben.is_dir():
        knn = run_finetuning.main(load_config(REPO / "cfgs/finetune/bigearthnet_examples.yaml",
                                              [f"data_path={ben}", f"output_dir={tmp_path / 'knn'}",
                                               f"finetune.checkpoint={ckpt}", "finetune.protocol=knn",
                                               "in_domains=[s2]", "data.input_size=40"]))
        assert knn["protocol"] == "knn" and 0 <= knn["metrics"]["test"]["map"] <= 1
