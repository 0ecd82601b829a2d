"""utils/finetune.py and multimae/heads.py: checkpoint surgery, heads, layer decay, kNN, label fractions."""

from __future__ import annotations

import pytest
import torch

from multimae.build import build_multimae
from multimae.heads import ConvNeXtSegHead, LinearHead, LinearSegHead
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.config import load_config
from utils.finetune import (FineTuneModel, build_head, finetune_config, knn_scores, label_fraction_indices,
                            load_backbone, read_pretraining_checkpoint)
from utils.optim import param_groups

TINY = ["data.input_size=16", "model.preset={dim: 32, depth: 2, heads: 2}", "model.decoder_dim=32",
        "model.decoder_depth=1", "model.decoder_heads=2", "model.class_embed_dim=8", "masking.num_encoded_tokens=4"]
PRE_IN = ["s2_rgb", "s1", "dynamic_world"]


def pretrain_cfg():
    return load_config(None, [*TINY, f"in_domains={PRE_IN}", "out_domains=[s2_rgb, s1, dynamic_world]"])


def write_pretraining_checkpoint(path, **changes):
    """A tiny pretraining checkpoint in the docs/DESIGN.md layout (only the keys fine-tuning reads)."""
    cfg = pretrain_cfg()
    model = build_multimae(cfg)
    state = {"model": model.state_dict(), "config": cfg, "kind": "multimae_pretraining", "step": 0}
    state.update(changes)
    save_checkpoint(state, path)
    return model


def backbone(in_domains, input_size=16):
    cfg = load_config(None, [*TINY, f"data.input_size={input_size}"])
    return build_multimae(finetune_config(cfg, {"config": pretrain_cfg()}, in_domains), in_domains=in_domains,
                          out_domains=[])


def test_surgery_loads_encoder_and_asserts_exact_keys(tmp_path):
    pre = write_pretraining_checkpoint(tmp_path / "pre.pth")
    ckpt = read_pretraining_checkpoint(tmp_path / "pre.pth")
    model = backbone(["s2_rgb", "elevation"], input_size=32)  # another image size: pos embeds are rebuilt
    report = load_backbone(model, ckpt["model"], ["s2_rgb", "elevation"])
    assert report.new_domains == ["elevation"] and report.loaded_domains == ["s2_rgb"]
    assert report.missing == sorted(k for k in model.state_dict() if k.startswith("input_adapters.elevation."))
    assert any(k.startswith("output_adapters.") for k in report.dropped)
    assert any(k.startswith("input_adapters.s1.") for k in report.dropped)
    for key in ("encoder.1.attn.qkv.weight", "global_tokens", "input_adapters.s2_rgb.proj.weight"):
        torch.testing.assert_close(model.state_dict()[key], pre.state_dict()[key])
    out = model.encode({"s2_rgb": torch.randn(2, 3, 32, 32), "elevation": torch.randn(2, 1, 32, 32)})
    assert out.shape == (2, 2 * 16 + 1, 32)


def test_surgery_refuses_incomplete_or_foreign_checkpoints(tmp_path):
    model = write_pretraining_checkpoint(tmp_path / "pre.pth")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.1.")}
    with pytest.raises(CheckpointError, match=r"missing in checkpoint: encoder\.1\."):
        load_backbone(backbone(["s2_rgb"]), state, ["s2_rgb"])
    state = dict(model.state_dict(), **{"encoder.0.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"not in model: encoder\.0\.extra"):
        load_backbone(backbone(["s2_rgb"]), state, ["s2_rgb"])
    bigger = build_multimae(load_config(None, [*TINY, "model.preset={dim: 48, depth: 2, heads: 2}",
                                               "in_domains=[s2_rgb]", "out_domains=[s2_rgb]"]))
    with pytest.raises(CheckpointError, match="shape differs"):
        load_backbone(backbone(["s2_rgb"]), bigger.state_dict(), ["s2_rgb"])
    save_checkpoint({"model": model.state_dict(), "config": {}, "kind": "multimae_finetuning"}, tmp_path / "ft.pth")
    with pytest.raises(ValueError, match="ft.pth is not a MultiMAE pretraining checkpoint.*'multimae_finetuning'"):
        read_pretraining_checkpoint(tmp_path / "ft.pth")
    save_checkpoint({"kind": "multimae_pretraining", "config": {}}, tmp_path / "nomodel.pth")
    with pytest.raises(ValueError, match="key 'model' is missing"):
        read_pretraining_checkpoint(tmp_path / "nomodel.pth")
    with pytest.raises(FileNotFoundError, match="finetune.checkpoint"):
        read_pretraining_checkpoint(tmp_path / "absent.pth")


def test_heads_shapes_and_segmentation_grid_split():
    tokens = torch.randn(2, 2 * 16 + 1, 32)  # 2 domains x 4x4 grid + 1 global token
    assert LinearHead(dim=32, num_classes=5)(tokens).shape == (2, 5)
    glob = LinearHead(dim=32, num_classes=5, pool="global")
    torch.testing.assert_close(glob.pool_tokens(tokens), tokens[:, -1])
    grids = [tokens[:, :16], tokens[:, 16:32]]
    seg = ConvNeXtSegHead(dim=32, num_classes=9, num_domains=2, patch_size=8, hidden_dim=16)
    assert seg(grids, (4, 4)).shape == (2, 9, 32, 32)
    assert LinearSegHead(dim=32, num_classes=9, num_domains=2, patch_size=8)(grids, (4, 4)).shape == (2, 9, 32, 32)
    with pytest.raises(ValueError, match="built for 2 input domains"):
        seg(grids[:1], (4, 4))
    with pytest.raises(ValueError, match="finetune.pool"):
        LinearHead(dim=32, num_classes=5, pool="max")
    with pytest.raises(ValueError, match="finetune.head"):
        build_head("classification", "convnext", dim=32, num_classes=3, in_domains=["s2_rgb"], patch_size=8)


def test_finetune_model_every_parameter_gets_a_gradient_and_probe_freezes():
    model = backbone(["s2_rgb", "s1"])
    head = build_head("segmentation", "convnext", dim=32, num_classes=9, in_domains=["s2_rgb", "s1"], patch_size=8)
    net = FineTuneModel(model, head, ["s2_rgb", "s1"], patch_size=8)
    inputs = {"s2_rgb": torch.randn(2, 3, 16, 16), "s1": torch.randn(2, 2, 16, 16)}
    logits = net(inputs)
    assert logits.shape == (2, 9, 16, 16)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    probe = FineTuneModel(backbone(["s2_rgb"]), LinearHead(dim=32, num_classes=3), ["s2_rgb"], patch_size=8,
                          freeze_encoder=True)
    probe.train()
    assert not probe.model.training and probe.head.training
    assert all(not p.requires_grad for p in probe.model.parameters())
    probe(inputs).sum().backward()
    assert probe.head.fc.weight.grad is not None


def test_layer_decay_groups_and_no_weight_decay():
    model = backbone(["s2_rgb"])  # depth 2 -> layer ids 0 (adapters, tokens), 1, 2 (blocks), 3 (head)
    net = FineTuneModel(model, LinearHead(dim=32, num_classes=3), ["s2_rgb"], patch_size=8)
    groups = param_groups(net, 0.05, layer_decay=0.65, num_layers=model.depth)
    scale = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert scale["model.input_adapters.s2_rgb.proj.weight"] == (pytest.approx(0.65 ** 3), 0.05)
    assert scale["model.global_tokens"] == (pytest.approx(0.65 ** 3), 0.0)
    assert scale["model.encoder.0.attn.qkv.weight"] == (pytest.approx(0.65 ** 2), 0.05)
    assert scale["model.encoder.1.mlp.fc1.weight"] == (pytest.approx(0.65), 0.05)
    assert scale["model.encoder.1.norm1.weight"] == (pytest.approx(0.65), 0.0)
    assert scale["head.fc.weight"] == (1.0, 0.05) and scale["head.fc.bias"] == (1.0, 0.0)
    assert scale["head.norm.weight"] == (1.0, 0.0)


def test_knn_on_a_separable_toy_set():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    train_lab = torch.arange(3).repeat_interleave(30)
    train = centres[train_lab] + 0.3 * torch.randn(90, 8, generator=g)
    query_lab = torch.tensor([0, 1, 2, 2, 1, 0])
    query = centres[query_lab] + 0.3 * torch.randn(6, 8, generator=g)
    scores = knn_scores(train, train_lab, query, num_classes=3, k=20, chunk=4)
    assert torch.equal(scores.argmax(1), query_lab)
    torch.testing.assert_close(scores.sum(1), torch.ones(6))
    multi = knn_scores(train, torch.nn.functional.one_hot(train_lab, 3), query, num_classes=3, k=20)
    torch.testing.assert_close(multi, scores)
    # vote weights: exp(cos / T); two neighbours with cos 1 and 0 -> weights e^(1/T), e^0
    one = knn_scores(torch.tensor([[1.0, 0], [0, 1.0]]), torch.tensor([0, 1]), torch.tensor([[1.0, 0]]),
                     num_classes=2, k=2, temperature=0.5)
    w = torch.tensor([torch.e ** 2, 1.0])
    torch.testing.assert_close(one[0], w / w.sum())


def test_label_fractions_are_seeded_and_nested():
    a = label_fraction_indices(200, 0.05, seed=3)
    assert len(a) == 10 and a == sorted(a) and a == label_fraction_indices(200, 0.05, seed=3)
    assert set(a) <= set(label_fraction_indices(200, 0.5, seed=3))
    assert a != label_fraction_indices(200, 0.05, seed=4)
    assert label_fraction_indices(50, 0.01, seed=0).__len__() == 1
    assert label_fraction_indices(7, 1.0, seed=0) == list(range(7))
    with pytest.raises(ValueError, match="finetune.label_fraction"):
        label_fraction_indices(10, 0.0, seed=0)
