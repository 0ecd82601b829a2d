"""Fine-tuning an encoder with metadata tokens (model.metadata, MoE-MAE): metadata reaches the encoder, heads read
the grid tokens only, pooling is defined."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multimae.build import build_pretraining
from multimae.heads import LinearHead
from utils.checkpoint import encoder_entry
from utils.config import load_config
from utils.finetune import FineTuneModel, build_backbone, build_head

DOMAINS = ["s2_rgb", "s1"]
FIELDS = ["lat", "week", "hour"]
TINY = ["model.preset={dim: 32, depth: 2, heads: 4}", "data.input_size=16"]
DECODER = ["moe_mae.decoder.dim=16", "moe_mae.decoder.heads=2", "moe_mae.decoder.kv_groups=1",
           "moe_mae.decoder.ffn_options={hidden: [8, 8]}"]


def moe_mae_checkpoint(*extra: str) -> dict:
    """A tiny MoE-MAE pretraining checkpoint entry: MoE feed-forwards, grouped-query attention, 3 metadata tokens."""
    cfg = load_config(None, [*TINY, *DECODER, "objective=moe_mae", f"in_domains={DOMAINS}", "model.ffn=moe",
                             "model.ffn_options={experts: [2], hidden: [16, 16]}", "model.kv_groups=2",
                             f"model.metadata={FIELDS}", *extra])
    torch.manual_seed(0)
    return {"encoder": encoder_entry(build_pretraining(cfg).encoder), "config": cfg}


def encoder(in_domains=DOMAINS):
    enc, _ = build_backbone(load_config(None, TINY), moe_mae_checkpoint(), list(in_domains))
    return enc.eval()


def pair(degrees: list[float], period: float) -> torch.Tensor:
    """(B, 2) (sin, cos) of 2 pi value / period, the batch contract's metadata entry."""
    angle = torch.tensor(degrees, dtype=torch.float64) * 2 * math.pi / period
    return torch.stack([angle.sin(), angle.cos()], dim=1).float()


def batch(b: int = 2) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(3)
    inputs = {"s2_rgb": torch.randn(b, 3, 16, 16, generator=g), "s1": torch.randn(b, 2, 16, 16, generator=g)}
    valid = {d: torch.ones(b, 16, 16, dtype=torch.bool) for d in DOMAINS}
    meta = {"lat": pair([45.0, -12.0][:b], 360), "week": pair([10.0, 40.0][:b], 52), "hour": pair([10.5, 22.0][:b], 24)}
    return inputs, valid, meta


def test_segmentation_head_reads_only_the_grid_tokens_and_metadata_reaches_the_encoder():
    enc = encoder()
    head = build_head("segmentation", "convnext", encoder=enc, num_classes=5)
    net = FineTuneModel(enc, head)
    inputs, valid, meta = batch()
    tokens = net.tokens(inputs, valid, meta)
    assert tokens.shape == (2, 2 * 4 + len(FIELDS) + 1, 32)  # 2 grids of 2 x 2, 3 metadata tokens, 1 global
    grids, size = net.grids(tokens, inputs)
    assert size == (2, 2) and len(grids) == 2
    torch.testing.assert_close(grids[0], tokens[:, 0:4])  # s2_rgb: tokens 0..3
    torch.testing.assert_close(grids[1], tokens[:, 4:8])  # s1: tokens 4..7, not a metadata token
    logits = net(inputs, valid, meta)
    assert logits.shape == (2, 5, 16, 16)
    # The metadata changes the patch tokens through attention, hence the segmentation logits.
    other = {**meta, "lat": pair([-70.0, 80.0], 360)}
    assert not torch.allclose(net(inputs, valid, other), logits)
    net.train()
    label = torch.randint(0, 5, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(net(inputs, valid, meta), label).backward()
    assert head.classifier.weight.grad is not None
    assert enc.metadata_adapter.proj["lat"].weight.grad is not None  # the metadata tokens are trained too


def test_linear_probe_pools_patch_metadata_and_global_tokens():
    enc = encoder()
    probe = build_head("classification", "linear", encoder=enc, num_classes=3, probe=True)
    assert isinstance(probe, LinearHead)
    net = FineTuneModel(enc, probe, freeze_encoder=True).train()
    inputs, valid, meta = batch()
    out = enc.encode(inputs, valid=valid, metadata=meta)  # (B, 8 + 3 + 1, D)
    torch.testing.assert_close(net.embed(inputs, valid, meta), out.mean(dim=1))  # every token, metadata included
    assert not torch.allclose(net.embed(inputs, valid, meta), out[:, :8].mean(dim=1))
    assert net(inputs, valid, meta).shape == (2, 3)
    net(inputs, valid, meta).sum().backward()
    assert probe.fc.weight.grad is not None and enc.metadata_adapter.proj["lat"].weight.grad is None


def test_features_change_with_the_metadata_and_absent_metadata_is_the_missing_embedding():
    net = FineTuneModel(encoder(), None)
    inputs, valid, meta = batch()
    base = net.embed(inputs, valid, meta)
    later = net.embed(inputs, valid, {**meta, "week": pair([30.0, 5.0], 52)})
    assert not torch.allclose(base, later)
    nan = {f: torch.full((2, 2), float("nan")) for f in FIELDS}
    with pytest.warns(UserWarning, match="not in the batch"):
        absent = net.embed(inputs, valid, None)  # a dataset without metadata
    torch.testing.assert_close(absent, net.embed(inputs, valid, nan))  # NaN pairs: the same missing embeddings
    assert not torch.allclose(absent, base)
    # Sample 1 alone: its embedding does not depend on sample 0's metadata (no mixing across the batch).
    one = net.embed({d: x[1:] for d, x in inputs.items()}, {d: v[1:] for d, v in valid.items()},
                    {f: t[1:] for f, t in meta.items()})
    torch.testing.assert_close(one, base[1:], rtol=1e-4, atol=1e-5)


def test_run_finetuning_feeds_the_mmearth_metadata_to_the_encoder(mmearth_fileset, tmp_path, monkeypatch):
    import run_finetuning
    from multimae.encoder import MultiModalEncoder
    from utils.checkpoint import save_checkpoint

    cfg = load_config(None, [*TINY, *DECODER, "objective=moe_mae", f"in_domains={DOMAINS}",
                             "model.metadata=[lat, lon, week]"])
    model = build_pretraining(cfg)
    save_checkpoint({"format_version": 2, "kind": "pretraining", "encoder": encoder_entry(model.encoder),
                     "objective": model.objective_state(), "config": cfg, "step": 0}, tmp_path / "pre.pth")
    seen = []
    encode = MultiModalEncoder.encode

    def spy(self, inputs, **kwargs):
        seen.append(kwargs.get("metadata"))
        return encode(self, inputs, **kwargs)

    monkeypatch.setattr(MultiModalEncoder, "encode", spy)
    args = [f"data_path={mmearth_fileset}", f"output_dir={tmp_path / 'out'}", "num_workers=0", "batch_size=4",
            "data.pin_memory=false", "epochs=1", "max_steps=1", f"in_domains={DOMAINS}", *TINY,
            f"finetune.checkpoint={tmp_path / 'pre.pth'}", "finetune.protocol=linear_probe"]
    res = run_finetuning.main(load_config(None, args))
    assert 0.0 <= res["metrics"]["test"]["miou"] <= 1.0
    assert seen and all(m is not None and set(m) == {"lat", "lon", "week"} for m in seen)
    lat = torch.cat([m["lat"] for m in seen])
    assert torch.isfinite(lat).all() and torch.allclose(lat.pow(2).sum(1), torch.ones(len(lat)))  # (sin, cos) pairs
    assert lat[:, 0].unique().numel() > 1  # per-sample values, not one constant
