"""Mixture-of-experts feed-forward and grouped-query attention (multimae/moe.py): routing, the load-balance loss
against hand-computed values, the experts against a per-expert computation, the layout over depth, bad options,
and MoE blocks under the MultiMAE-EO objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multimae.build import build_encoder, build_pretraining
from multimae.moe import GroupedQueryAttention, MoEFeedForward, expert_usage, moe_block_sizes
from tests.multimae_fixture import random_batch, tiny_cfg


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _cv(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / (mean + 1e-6)


def _hand_layer() -> MoEFeedForward:
    """3 experts, top 2; clean logits x W_g + b = (x0, x1, 0.5); noise std softplus(log(e - 1)) = 1."""
    moe = MoEFeedForward(2, 3, 3, top_k=2, dropout=0.0).eval()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        moe.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
        moe.noise.weight.zero_()
        moe.noise.bias.fill_(math.log(math.e - 1))
    return moe


def test_load_balance_loss_matches_a_hand_computation_and_reaches_the_gate():
    moe = _hand_layer()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # logits (1, 0, 0.5) and (0, 2, 0.5)
    gates, chosen, loss = moe.route(x)
    a, b = math.exp(0.5) / (math.exp(0.5) + 1), math.exp(1.5) / (math.exp(1.5) + 1)  # softmax over the top 2
    torch.testing.assert_close(gates, torch.tensor([[a, 0.0, 1 - a], [0.0, b, 1 - b]]))
    assert chosen.tolist() == [[0, 2], [1, 2]]
    importance = [a, b, (1 - a) + (1 - b)]
    # P(expert in the top 2): threshold = 3rd largest (0) for chosen experts, 2nd largest (0.5) for the other.
    load = [_phi(1.0) + _phi(-0.5), _phi(-0.5) + _phi(2.0), 2 * _phi(0.5)]
    assert loss.item() == pytest.approx(0.01 * _cv(importance) + 0.01 * _cv(load), rel=1e-5)
    moe.train()
    _, _, noisy_loss = moe.route(torch.randn(64, 2))
    noisy_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0 and moe.noise.weight.grad.abs().sum() > 0


def test_gating_picks_k_experts_per_token_and_the_output_is_their_weighted_swiglu():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 12, 5, top_k=2, dropout=0.0)
    x = torch.randn(4, 7, 16)
    for mode in (moe.train, moe.eval):
        mode()
        torch.manual_seed(1)
        y = moe(x)
        torch.manual_seed(1)
        gates, chosen, loss = moe.route(x.reshape(-1, 16))
        assert ((gates > 0).sum(dim=1) == 2).all() and torch.allclose(gates.sum(dim=1), torch.ones(28))
        assert (chosen[:, 0] != chosen[:, 1]).all()
        torch.testing.assert_close(moe.aux_loss, loss)
        usage = torch.bincount(chosen.flatten(), minlength=5).float() / 28
        torch.testing.assert_close(moe.usage, usage)
        assert moe.usage.sum().item() == pytest.approx(2.0)  # each token counts for k experts
        flat = x.reshape(-1, 16)
        want = torch.zeros_like(flat)
        for e in range(5):  # each expert as its own SwiGLU, W2 (silu(W_e x) * V x) + b2, gate-weighted
            expert = moe.w2(F.silu(moe.w[e](flat)) * moe.v(flat))
            want = want + gates[:, e:e + 1] * expert
        torch.testing.assert_close(y.reshape(-1, 16), want, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert all(w.weight.grad is not None for w in moe.w)  # every expert is in the graph (DDP needs no flag)


def test_an_expert_without_tokens_still_gets_a_zero_gradient():
    moe = MoEFeedForward(4, 3, 3, top_k=1, dropout=0.0).eval()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([5.0, 0.0, -5.0]))  # every token goes to expert 0
    y = moe(torch.randn(6, 4))
    (y.sum() + moe.aux_loss).backward()
    assert moe.usage.tolist() == [1.0, 0.0, 0.0]
    assert moe.w[2].weight.grad is not None and moe.w[2].weight.grad.abs().sum() == 0  # DDP sees every parameter


def test_expert_sizes_follow_the_source_over_depth():
    sizes = moe_block_sizes({"hidden": [144, 72]}, 15, 144)
    assert [e for e, _ in sizes] == [3] * 5 + [4] * 5 + [5] * 5
    assert [h for _, h in sizes] == [144, 138, 133, 128, 123, 118, 113, 108, 102, 97, 92, 87, 82, 77, 72]
    assert [h for _, h in moe_block_sizes({}, 3, 64)] == [64, 48, 32]  # default [dim, dim / 2]
    assert moe_block_sizes({"experts": [3]}, 1, 54) == [(3, 54)]


@pytest.mark.parametrize(("options", "match"), [
    ({"experts": [3, 0, 5]}, r"model\.ffn_options\.experts: an expert count must be at least 1"),
    ({"top_k": 4}, r"model\.ffn_options\.top_k is 4, but a block has only 3 experts"),
    ({"top_k": 2, "experts": [1, 4]}, r"model\.ffn_options\.top_k is 2, but a block has only 1 experts"),
    ({"hidden": [16]}, r"model\.ffn_options\.hidden"),
    ({"gates": 2}, r"model\.ffn_options: unknown option"),
])
def test_bad_moe_options_name_the_key(options, match):
    cfg = tiny_cfg()
    cfg["model"].update(ffn="moe", ffn_options=options)
    with pytest.raises(ValueError, match=match):
        build_encoder(cfg)


def test_grouped_query_attention_shares_each_key_value_head_among_query_heads():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(16, 4, kv_groups=2)
    x = torch.randn(2, 5, 16)
    q = attn.q(x).view(2, 5, 4, 4).transpose(1, 2)  # (B, 4 heads, N, 4)
    k, v = attn.kv(x).view(2, 5, 2, 2, 4).permute(2, 0, 3, 1, 4)  # (B, 2 groups, N, 4)
    heads = []
    for h in range(4):  # query heads 0, 1 use group 0; 2, 3 use group 1
        w = (q[:, h] @ k[:, h // 2].transpose(-1, -2) / 2.0).softmax(dim=-1)
        heads.append(w @ v[:, h // 2])
    want = attn.proj(torch.stack(heads, dim=1).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)
    assert attn.kv.weight.shape == (2 * 2 * 4, 16)
    with pytest.raises(ValueError, match="kv_groups 3"):
        GroupedQueryAttention(16, 4, kv_groups=3)
    cfg = tiny_cfg()
    cfg["model"]["kv_groups"] = 3
    with pytest.raises(ValueError, match=r"model\.kv_groups 3 must be a positive divisor of the 2"):
        build_encoder(cfg)


def test_moe_blocks_and_grouped_query_attention_under_the_multimae_objective():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg["model"].update(ffn="moe", ffn_options={"experts": [2, 3], "top_k": 2}, kv_groups=1,
                        preset={"dim": 32, "depth": 2, "heads": 2})
    model = build_pretraining(cfg)
    assert [b.mlp.num_experts for b in model.encoder.blocks] == [2, 3]
    assert [b.mlp.hidden for b in model.encoder.blocks] == [32, 16]
    assert all(isinstance(b.attn, GroupedQueryAttention) for b in model.encoder.blocks)
    inputs, valid = random_batch(cfg)
    out = model({"inputs": inputs, "valid": valid}, generator=torch.Generator().manual_seed(0))
    aux = out["aux"]
    assert aux.item() > 0 and model.encoder.pop_aux_loss() is None
    model.eval()
    preds, masks = model.predict(inputs, valid=valid, generator=torch.Generator().manual_seed(0))
    layers = [b.mlp.aux_loss for b in model.encoder.blocks]
    eval_aux = model.encoder.pop_aux_loss()
    torch.testing.assert_close(eval_aux, layers[0] + layers[1])  # summed over layers
    model.train()
    out["loss"].backward()
    for block in model.encoder.blocks:
        assert block.mlp.gate.weight.grad.abs().sum() > 0 and block.attn.kv.weight.grad is not None
    usage = expert_usage(model.encoder.blocks, "encoder.blocks.")
    assert list(usage) == ["encoder.blocks.0.mlp", "encoder.blocks.1.mlp"] and usage["encoder.blocks.1.mlp"].numel() == 3
    pictures = model.pictures({"inputs": inputs, "valid": valid}, torch.Generator().manual_seed(0))
    assert set(pictures["expert_usage"]) == set(usage)
