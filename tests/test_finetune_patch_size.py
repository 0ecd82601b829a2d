"""finetune.patch_size: fine-tuning and probing an encoder at another patch size than it was pretrained with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multimae.build import build_encoder, build_pretraining
from utils.checkpoint import encoder_entry
from utils.config import ConfigError, load_config
from utils.finetune import FineTuneModel, build_backbone, build_head

TINY = ["model.preset={dim: 32, depth: 2, heads: 2}", "model.class_embed_dim=8"]
DOMAINS = ["s2_rgb", "dynamic_world"]  # dynamic_world: a class map, label_downsample 4


def jepa_checkpoint(*extra: str) -> dict:
    """A tiny JEPA pretraining checkpoint entry (base patch 8 px, 32 px tiles, pretrained at 4, 8 and 16 px)."""
    cfg = load_config(None, [*TINY, "objective=jepa", "data.input_size=32", f"in_domains={DOMAINS}", *extra])
    torch.manual_seed(0)
    return {"encoder": encoder_entry(build_pretraining(cfg).encoder), "config": cfg}


def finetune_cfg(*extra: str) -> dict:
    return load_config(None, [*TINY, "data.input_size=32", *extra])


def batch(size: int = 32, b: int = 2) -> dict:
    """Random S2 RGB and a land-cover map constant on 16 x 16 px blocks (learnable at every patch size)."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 9, (b, size // 16, size // 16), generator=g)
    return {"s2_rgb": torch.randn(b, 3, size, size, generator=g),
            "dynamic_world": blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)}


@pytest.mark.parametrize("patch_size, side", [(4, 8), (8, 4), (16, 2)])
def test_probe_at_each_jepa_patch_size_gives_its_grid_and_a_working_segmentation_head(patch_size, side):
    pre = jepa_checkpoint()
    encoder, report = build_backbone(finetune_cfg(f"finetune.patch_size={patch_size}"), pre, DOMAINS)
    assert report.loaded_domains == sorted(DOMAINS)
    head = build_head("segmentation", "linear", encoder=encoder, num_classes=9, probe=True, patch_size=patch_size)
    assert head.patch_size == patch_size
    net = FineTuneModel(encoder, head, freeze_encoder=True, patch_size=patch_size).train()
    x = batch()
    tokens = net.tokens(x)
    n = side * side
    assert tokens.shape == (2, 2 * n + 1, 32)  # two grids of (32 / P)^2 tokens, then the global token
    torch.testing.assert_close(tokens, encoder.encode(x, patch_size=patch_size))  # the patch size reaches the encoder
    grids, size = net.grids(tokens, x)
    assert size == (side, side)
    torch.testing.assert_close(grids[0], tokens[:, :n])
    torch.testing.assert_close(grids[1], tokens[:, n:2 * n])
    # The linear probe's logits: BatchNorm (batch statistics) + Linear on every token, upsampled by P.
    logits = net(x)
    feats = torch.cat(grids, dim=-1).reshape(2 * n, 64)
    feats = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + 1e-6)
    want = F.interpolate((feats @ head.fc.weight.T + head.fc.bias).reshape(2, side, side, 9).permute(0, 3, 1, 2),
                         size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    # It learns: a few SGD steps on one batch lower its loss (the map is an input: its tokens say the class).
    label = x["dynamic_world"]
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(net(x), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    pooled = net.embed(x)
    torch.testing.assert_close(pooled, encoder.encode(x, patch_size=patch_size).mean(dim=1))


def test_finer_patches_than_pretrained_with_the_convnext_head():
    pre = jepa_checkpoint()
    cfg = finetune_cfg("finetune.patch_size=4")
    encoder, _ = build_backbone(cfg, pre, DOMAINS)
    head = build_head("segmentation", "convnext", encoder=encoder, num_classes=9, patch_size=4)
    assert (head.patch_size, head.upsample) == (4, 4)  # one feature per pixel of the 8 x 8 token grid
    net = FineTuneModel(encoder, head, patch_size=4)
    logits = net(batch())
    assert logits.shape == (2, 9, 32, 32)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    default = FineTuneModel(encoder, build_head("segmentation", "convnext", encoder=encoder, num_classes=9))
    assert default.tokens(batch()).shape == (2, 2 * 16 + 1, 32)  # null: the checkpoint's 8 px patches


@pytest.mark.parametrize("value, message", [
    (6, "finetune.patch_size 6 does not divide data.input_size 32"),
    (2, "finetune.patch_size 2 is not a multiple of the label_downsample 4 of class-map domain 'dynamic_world'"),
    (4.5, r"finetune.patch_size must be a positive whole number of pixels \(or null\), got 4.5"),
    ("8", r"finetune.patch_size must be a positive whole number of pixels \(or null\), got '8'"),
])
def test_bad_patch_sizes_are_refused_naming_the_key(value, message):
    cfg = finetune_cfg()
    cfg["finetune"]["patch_size"] = value  # as a config file may hold it (the key's default is null: any type)
    with pytest.raises(ValueError, match=message):
        build_backbone(cfg, jepa_checkpoint(), DOMAINS)
    with pytest.raises(ValueError, match=message):  # the same check without a checkpoint (model.* of this config)
        build_backbone({**cfg, "in_domains": DOMAINS}, None, DOMAINS)


def test_zero_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"key 'finetune.patch_size' must be >= 1 \(or null\), got 0"):
        finetune_cfg("finetune.patch_size=0")


def test_per_domain_patch_sizes_and_resized_position_tables_are_refused():
    cfg = finetune_cfg("finetune.patch_size=8")
    pre = {"encoder": encoder_entry(build_encoder(load_config(None, [
        *TINY, "data.input_size=32", "in_domains=[s2_rgb, s1]", "model.patch_sizes={s1: 16}"])))}
    with pytest.raises(ValueError, match=r"finetune.patch_size 8: the encoder gives s1 patch 16 px besides the base "
                                         r"patch 8 px \(model.patch_sizes\), so there is no single patch grid"):
        build_backbone({**cfg, "finetune": {**cfg["finetune"], "pos_embed": "recompute"}}, pre, ["s2_rgb", "s1"])
    encoder, _ = build_backbone(cfg, pre, ["s2_rgb"])  # the fine-tuned domains share one grid: allowed
    assert encoder.patch_sizes == {"s2_rgb": 8}
    # resize at another image size: the pretraining grid's table resized, which has one patch size
    other = finetune_cfg("data.input_size=64", "finetune.patch_size=4")
    with pytest.raises(ValueError, match=r"finetune.patch_size 4 \(the encoder's patch is 8 px\) needs position "
                                         r"embeddings of the patch centres.*set finetune.pos_embed=recompute"):
        build_backbone(other, jepa_checkpoint(), DOMAINS)
    other["finetune"]["pos_embed"] = "recompute"
    encoder, _ = build_backbone(other, jepa_checkpoint(), DOMAINS)
    assert FineTuneModel(encoder, None, patch_size=4).tokens(batch(64)).shape == (2, 2 * 256 + 1, 32)


def test_run_finetuning_probes_at_the_configured_patch_size(mmearth_fileset, tmp_path, monkeypatch):
    import run_finetuning
    from multimae.encoder import MultiModalEncoder
    from tests.test_finetune import write_pretraining_checkpoint

    write_pretraining_checkpoint(tmp_path / "pre.pth")  # 16 px, base patch 8
    seen = []
    encode = MultiModalEncoder.encode

    def spy(self, inputs, **kwargs):
        out = encode(self, inputs, **kwargs)
        seen.append((kwargs.get("patch_size"), out.shape[1]))
        return out

    monkeypatch.setattr(MultiModalEncoder, "encode", spy)
    args = [f"data_path={mmearth_fileset}", f"output_dir={tmp_path / 'out'}", "num_workers=0", "batch_size=4",
            "data.input_size=16", "data.pin_memory=false", "epochs=1", "max_steps=1", "in_domains=[s2_rgb]",
            "model.preset={dim: 32, depth: 2, heads: 2}", f"finetune.checkpoint={tmp_path / 'pre.pth'}",
            "finetune.protocol=linear_probe", "finetune.patch_size=4"]
    res = run_finetuning.main(load_config(None, args))
    assert 0.0 <= res["metrics"]["test"]["miou"] <= 1.0
    assert seen and set(seen) == {(4, 16 + 1)}  # training and evaluation: a 4 x 4 grid of 4 px patches
