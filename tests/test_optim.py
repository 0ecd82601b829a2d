"""Parameter groups and the warm-up + cosine schedule (utils/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.optim import (build_optimizer, build_probe_optimizer, cosine_lr, describe_param_groups, multimae_layer_id,
                         no_decay_names, param_groups, set_lr)


class _ToyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.global_tokens = nn.Parameter(torch.zeros(1, 1, 8))
        self.input_adapters = nn.ModuleDict({"s2_rgb": nn.Linear(4, 8), "worldcover": nn.Embedding(11, 8)})
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))


class _Toy(nn.Module):
    """Named like an objective / fine-tuning model: encoder.{global_tokens, input_adapters, blocks}, head."""

    def __init__(self):
        super().__init__()
        self.encoder = _ToyEncoder()
        self.head = nn.Linear(8, 2)
        self.pos_scale = nn.Parameter(torch.ones(4, 4))

    def no_weight_decay(self):
        return {"pos_scale"}


def test_no_decay_on_norms_biases_embeddings_tokens():
    names = no_decay_names(_Toy())
    assert names == {"encoder.global_tokens", "encoder.input_adapters.s2_rgb.bias",
                     "encoder.input_adapters.worldcover.weight", "encoder.blocks.0.bias", "encoder.blocks.1.weight",
                     "encoder.blocks.1.bias", "encoder.blocks.2.bias", "head.bias", "pos_scale"}
    groups = param_groups(_Toy(), 0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert decayed == {"encoder.input_adapters.s2_rgb.weight", "encoder.blocks.0.weight", "encoder.blocks.2.weight",
                       "head.weight"}


def test_decay_everything_reproduces_reference():
    groups = param_groups(_Toy(), 0.05, decay_everything=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    assert len(groups[0]["params"]) == len(list(_Toy().parameters()))


def test_layer_decay_scales():
    assert multimae_layer_id("encoder.input_adapters.s2_rgb.proj.weight", 12) == 0
    assert multimae_layer_id("module.encoder.global_tokens", 12) == 0
    assert multimae_layer_id("encoder.blocks.3.attn.qkv.weight", 12) == 4
    assert multimae_layer_id("decoders.s2_rgb.blocks.0.attn.qkv.weight", 12) == 13
    assert multimae_layer_id("head.fc.weight", 12) == 13
    groups = param_groups(_Toy(), 0.05, layer_decay=0.5, num_layers=2)
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scales["encoder.input_adapters.s2_rgb.weight"] == pytest.approx(0.125)  # 0.5 ** (2 + 1 - 0)
    assert scales["encoder.blocks.1.weight"] == pytest.approx(0.5)  # block 1 -> layer 2 -> 0.5 ** (3 - 2)
    assert scales["head.weight"] == 1.0
    opt = build_optimizer(groups, {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05}, lr=1e-3)
    set_lr(opt, 2e-3)
    assert sorted(g["lr"] for g in opt.param_groups)[0] == pytest.approx(2e-3 * 0.125)


def test_cosine_schedule_values():
    kw = dict(total_steps=110, warmup_steps=10, base_lr=1e-3, min_lr=1e-5)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(5e-4)
    assert cosine_lr(10, **kw) == pytest.approx(1e-3)
    assert cosine_lr(60, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert cosine_lr(110, **kw) == pytest.approx(1e-5)
    assert cosine_lr(500, **kw) == pytest.approx(1e-5)
    lrs = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert cosine_lr(35, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_full_rate_prefixes_join_the_head_and_groups_describe_themselves():
    groups = param_groups(_Toy(), 0.05, layer_decay=0.5, num_layers=2, full_rate=["encoder.input_adapters.s2_rgb."])
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scales["encoder.input_adapters.s2_rgb.weight"] == 1.0 and scales["encoder.input_adapters.s2_rgb.bias"] == 1.0
    assert scales["encoder.input_adapters.worldcover.weight"] == pytest.approx(0.125)  # not named: layer 0
    info = describe_param_groups(groups, lr=2e-3)
    by_name = {n: g for g in info for n in g["names"]}
    assert by_name["encoder.input_adapters.s2_rgb.weight"]["peak_lr"] == pytest.approx(2e-3)
    assert by_name["encoder.blocks.0.weight"]["peak_lr"] == pytest.approx(2e-3 * 0.25)
    sizes = {n: p.numel() for n, p in _Toy().named_parameters()}
    assert by_name["head.weight"]["num_params"] == sum(sizes[n] for n in by_name["head.weight"]["names"])
    assert by_name["head.bias"]["weight_decay"] == 0.0 and by_name["head.weight"]["weight_decay"] == 0.05
    # without weight decay, exempt parameters still form their own groups (LARS leaves them unadapted)
    plain = param_groups(_Toy(), 0.0)
    assert len(plain) == 2 and {len(g["names"]) for g in plain} == {4, 9}


def test_probe_optimizers_sgd_and_lars_steps_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    groups = param_groups(lin, 0.0)
    sgd = build_probe_optimizer(groups, lr=0.1, name="sgd", momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    lars = build_probe_optimizer(param_groups(lin, 0.0), lr=0.1, name="lars", momentum=0.9)
    lin(torch.ones(2, 4)).pow(2).sum().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    lars.step()
    # first LARS step (empty momentum buffer): weight moves by lr * 0.001 * |w| / |g| * g, the bias by lr * g
    trust = 0.001 * w0.norm() / (gw.norm() + 1e-8)
    torch.testing.assert_close(lin.weight.detach(), w0 - 0.1 * trust * gw)
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.1 * gb)
    with pytest.raises(ValueError, match="finetune.probe_optimizer"):
        build_probe_optimizer(param_groups(lin, 0.0), lr=0.1, name="adam")
