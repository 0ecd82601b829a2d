"""utils/finetune.py and multimae/heads.py: checkpoint surgery, heads, layer decay, kNN, label fractions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimae.build import build_encoder, build_pretraining
from multimae.heads import ConvNeXtSegHead, LinearHead, LinearSegHead
from utils.checkpoint import CheckpointError, encoder_entry, save_checkpoint
from utils.config import load_config
from utils.finetune import (FineTuneModel, build_backbone, build_head, fit_logistic, knn_scores,
                            label_fraction_indices, load_backbone, read_pretraining_checkpoint)
from utils.optim import param_groups

TINY = ["data.input_size=16", "model.preset={dim: 32, depth: 2, heads: 2}", "multimae.decoder.dim=32",
        "multimae.decoder.depth=1", "multimae.decoder.heads=2", "model.class_embed_dim=8",
        "multimae.masking.num_encoded_tokens=4"]
PRE_IN = ["s2_rgb", "s1", "dynamic_world"]


def pretrain_cfg(*extra):
    return load_config(None, [*TINY, f"in_domains={PRE_IN}", "multimae.out_domains=[s2_rgb, s1, dynamic_world]",
                              *extra])


def write_pretraining_checkpoint(path, *extra, **changes):
    """A tiny pretraining checkpoint in the docs/DESIGN.md v2 layout (only the keys fine-tuning reads)."""
    cfg = pretrain_cfg(*extra)
    model = build_pretraining(cfg)
    state = {"format_version": 2, "kind": "pretraining", "encoder": encoder_entry(model.encoder),
             "objective": model.objective_state(), "config": cfg, "step": 0}
    state.update(changes)
    save_checkpoint(state, path)
    return model


def backbone(in_domains, input_size=16):
    """A fine-tuning encoder with the architecture of :func:`pretrain_cfg`, not loaded."""
    cfg = load_config(None, [*TINY, f"data.input_size={input_size}"])
    pre = {"encoder": encoder_entry(build_encoder(pretrain_cfg()))}
    return build_backbone({**cfg, "finetune": {**cfg["finetune"], "from_scratch": True}}, pre, in_domains)[0]


def test_surgery_loads_encoder_and_asserts_exact_keys(tmp_path):
    pre = write_pretraining_checkpoint(tmp_path / "pre.pth").encoder
    ckpt = read_pretraining_checkpoint(tmp_path / "pre.pth")
    model = backbone(["s2_rgb", "elevation"], input_size=32)  # another image size: pos embeds are rebuilt
    report = load_backbone(model, ckpt["encoder"]["state_dict"], ["s2_rgb", "elevation"])
    assert report.new_domains == ["elevation"] and report.loaded_domains == ["s2_rgb"]
    assert report.missing == sorted(k for k in model.state_dict() if k.startswith("input_adapters.elevation."))
    assert any(k.startswith("input_adapters.s1.") for k in report.dropped)
    for key in ("blocks.1.attn.qkv.weight", "global_tokens", "input_adapters.s2_rgb.proj.weight"):
        torch.testing.assert_close(model.state_dict()[key], pre.state_dict()[key])
    out = model.encode({"s2_rgb": torch.randn(2, 3, 32, 32), "elevation": torch.randn(2, 1, 32, 32)})
    assert out.shape == (2, 2 * 16 + 1, 32)


def test_backbone_architecture_comes_from_the_checkpoint(tmp_path):
    write_pretraining_checkpoint(tmp_path / "pre.pth", "model.preset={dim: 48, depth: 3, heads: 4}",
                                 "model.patch_sizes={s1: 16}")
    ckpt = read_pretraining_checkpoint(tmp_path / "pre.pth")
    cfg = load_config(None, ["data.input_size=32", f"finetune.checkpoint={tmp_path / 'pre.pth'}",  # preset base
                             "finetune.pos_embed=recompute"])  # two patch sizes: no single grid to resize from
    encoder, report = build_backbone(cfg, ckpt, ["s2_rgb", "s1"])
    assert (encoder.dim, encoder.depth, encoder.num_heads, encoder.patch_sizes) == (48, 3, 4, {"s2_rgb": 8, "s1": 16})
    assert report.loaded_domains == ["s1", "s2_rgb"]
    torch.testing.assert_close(encoder.state_dict()["blocks.2.mlp.fc2.weight"],
                               ckpt["encoder"]["state_dict"]["blocks.2.mlp.fc2.weight"])
    scratch_cfg = {**cfg, "finetune": {**cfg["finetune"], "from_scratch": True}}
    scratch, none = build_backbone(scratch_cfg, ckpt, ["s2_rgb", "s1"])  # the same architecture, not its weights
    assert none is None and scratch.spec == encoder.spec
    assert not torch.equal(scratch.state_dict()["blocks.2.mlp.fc2.weight"],
                           ckpt["encoder"]["state_dict"]["blocks.2.mlp.fc2.weight"])
    plain = load_config(None, ["finetune.from_scratch=true"])
    with pytest.raises(ValueError, match="finetune.from_scratch copies the architecture of finetune.checkpoint"):
        build_backbone(plain, None, ["s2_rgb"])


def test_surgery_refuses_incomplete_or_foreign_checkpoints(tmp_path):
    model = write_pretraining_checkpoint(tmp_path / "pre.pth").encoder
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"missing in checkpoint: blocks\.1\."):
        load_backbone(backbone(["s2_rgb"]), state, ["s2_rgb"])
    state = dict(model.state_dict(), **{"blocks.0.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"not in model: blocks\.0\.extra"):
        load_backbone(backbone(["s2_rgb"]), state, ["s2_rgb"])
    bigger = build_encoder(load_config(None, [*TINY, "model.preset={dim: 48, depth: 2, heads: 2}", "in_domains=[s2_rgb]"]))
    with pytest.raises(CheckpointError, match="shape differs"):
        load_backbone(backbone(["s2_rgb"]), bigger.state_dict(), ["s2_rgb"])
    save_checkpoint({"format_version": 2, "kind": "finetuning", "config": {}}, tmp_path / "ft.pth")
    with pytest.raises(CheckpointError, match=r"ft.pth is a 'finetuning' checkpoint, not 'pretraining'"):
        read_pretraining_checkpoint(tmp_path / "ft.pth")
    save_checkpoint({"format_version": 7, "kind": "pretraining"}, tmp_path / "future.pth")
    with pytest.raises(CheckpointError, match=r"future.pth: checkpoint format_version 7 is not one this code reads"):
        read_pretraining_checkpoint(tmp_path / "future.pth")
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
        build_head("classification", "convnext", encoder=backbone(["s2_rgb"]), num_classes=3)


def test_finetune_model_every_parameter_gets_a_gradient_and_probe_freezes():
    model = backbone(["s2_rgb", "s1"])
    head = build_head("segmentation", "convnext", encoder=model, num_classes=9)
    net = FineTuneModel(model, head)
    inputs = {"s2_rgb": torch.randn(2, 3, 16, 16), "s1": torch.randn(2, 2, 16, 16)}
    logits = net(inputs)
    assert logits.shape == (2, 9, 16, 16)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    probe = FineTuneModel(backbone(["s2_rgb"]), LinearHead(dim=32, num_classes=3), freeze_encoder=True)
    probe.train()
    assert not probe.encoder.training and probe.head.training
    assert all(not p.requires_grad for p in probe.encoder.parameters())
    probe(inputs).sum().backward()
    assert probe.head.fc.weight.grad is not None


def test_segmentation_with_domains_of_other_patch_sizes():
    cfg = load_config(None, [*TINY, "data.input_size=32", "model.patch_sizes={s1: 16}", "in_domains=[s2_rgb, s1]"])
    encoder = build_encoder(cfg)
    net = FineTuneModel(encoder, build_head("segmentation", "linear", encoder=encoder, num_classes=4))
    inputs = {"s2_rgb": torch.randn(2, 3, 32, 32), "s1": torch.randn(2, 2, 32, 32)}
    tokens = net.tokens(inputs)
    assert tokens.shape == (2, 16 + 4 + 1, 32)
    grids, size = net.grids(tokens, inputs)
    assert size == (4, 4) and [g.shape for g in grids] == [(2, 16, 32), (2, 16, 32)]
    coarse = tokens[:, 16:20].reshape(2, 2, 2, 32)  # s1: 2 x 2 tokens of 16 px, each covering 2 x 2 fine tokens
    torch.testing.assert_close(grids[1].reshape(2, 4, 4, 32)[:, 2:, :2], coarse[:, 1:, :1].expand(-1, 2, 2, -1))
    assert net(inputs).shape == (2, 4, 32, 32)


def test_layer_decay_groups_and_no_weight_decay():
    model = backbone(["s2_rgb"])  # depth 2 -> layer ids 0 (adapters, tokens), 1, 2 (blocks), 3 (head)
    net = FineTuneModel(model, LinearHead(dim=32, num_classes=3))
    groups = param_groups(net, 0.05, layer_decay=0.65, num_layers=model.depth)
    scale = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert scale["encoder.input_adapters.s2_rgb.proj.weight"] == (pytest.approx(0.65 ** 3), 0.05)
    assert scale["encoder.global_tokens"] == (pytest.approx(0.65 ** 3), 0.0)
    assert scale["encoder.blocks.0.attn.qkv.weight"] == (pytest.approx(0.65 ** 2), 0.05)
    assert scale["encoder.blocks.1.mlp.fc1.weight"] == (pytest.approx(0.65), 0.05)
    assert scale["encoder.blocks.1.norm1.weight"] == (pytest.approx(0.65), 0.0)
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


def test_linear_probe_heads_are_linear_and_the_segmentation_probe_is_1x1_upsampled():
    encoder = backbone(["s2_rgb", "s1"])
    seg = build_head("segmentation", "convnext", encoder=encoder, num_classes=5, probe=True)  # the probe ignores convnext
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    linear = {f"{m}.{n}" for m, mod in seg.named_modules() if isinstance(mod, torch.nn.Linear)
              for n, _ in mod.named_parameters()}
    assert trainable == linear == {"fc.weight", "fc.bias"} and seg.fc.weight.shape == (5, 2 * 32)
    grids = [torch.randn(3, 16, 32), torch.randn(3, 16, 32)]
    seg.eval()  # BatchNorm with its running statistics: a fixed affine map per channel
    out = seg(grids, (4, 4))
    assert out.shape == (3, 5, 32, 32)
    # independent computation: normalise, the same Linear on every token, reshape to the grid, bilinear upsampling
    x = torch.cat(grids, -1)
    bn = seg.norm
    z = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    logits = (z @ seg.fc.weight.T + seg.fc.bias).reshape(3, 4, 4, 5).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)
    cls = build_head("classification", "linear", encoder=encoder, num_classes=4, probe=True)
    assert isinstance(cls.norm, torch.nn.BatchNorm1d) and not cls.norm.affine
    assert {n for n, p in cls.named_parameters()} == {"fc.weight", "fc.bias"}
    tuned = build_head("classification", "linear", encoder=encoder, num_classes=4)
    assert isinstance(tuned.norm, torch.nn.LayerNorm) and float(tuned.fc.weight.detach().abs().max()) < 1e-3


def test_embeddings_follow_the_configured_pooling():
    encoder = backbone(["s2_rgb"])
    inputs = {"s2_rgb": torch.randn(2, 3, 16, 16)}
    tokens = encoder.encode(inputs)
    torch.testing.assert_close(FineTuneModel(encoder, None, pool="mean").embed(inputs), tokens.mean(1))
    torch.testing.assert_close(FineTuneModel(encoder, None, pool="global").embed(inputs), tokens[:, -1])
    with pytest.raises(RuntimeError, match="no head"):
        FineTuneModel(encoder, None)(inputs)


def test_logistic_probe_on_a_separable_toy_set():
    pytest.importorskip("sklearn", reason="scikit-learn (requirements.txt) is not installed")
    rng = np.random.default_rng(0)
    centres = np.eye(3, 6) * 4

    def draw(n):
        y = np.arange(n) % 3
        return centres[y] + 0.5 * rng.normal(size=(n, 6)), y

    (x, y), (vx, vy), (tx, ty) = draw(60), draw(30), draw(30)
    accuracy = lambda p, t: float((p.argmax(1) == t).mean())  # noqa: E731
    probe = fit_logistic(x, y, num_classes=3, cs=[1e-4, 1.0], score=accuracy, val_x=vx, val_y=vy)
    assert probe.c == 1.0 and probe.val_scores[1.0] == 1.0 and probe.val_scores[1e-4] <= 1.0
    proba = probe.predict_proba(tx)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(1), 1) and (proba.argmax(1) == ty).all()
    # a class the training labels lack gets probability 0 (4 classes, only 3 seen)
    assert (fit_logistic(x, y, num_classes=4, cs=[1.0]).predict_proba(tx)[:, 3] == 0).all()
    # multi-label: one binary fit per label column (one-vs-rest); label 2 is "class 0 or 1"
    multi = np.stack([y == 0, y == 1, y < 2], 1).astype(np.int64)
    vmulti = np.stack([ty == 0, ty == 1, ty < 2], 1).astype(np.int64)
    ml = fit_logistic(x, multi, num_classes=3, cs=[1.0])
    assert ((ml.predict_proba(tx) > 0.5) == vmulti.astype(bool)).all()
    with pytest.raises(ValueError, match="finetune.logistic_c holds several values but there is no validation split"):
        fit_logistic(x, y, num_classes=3, cs=[0.1, 1.0])
    with pytest.raises(ValueError, match="finetune.logistic_c must be a non-empty list of positive numbers"):
        fit_logistic(x, y, num_classes=3, cs=["1.0e4"])
