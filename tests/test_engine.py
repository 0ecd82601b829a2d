"""The generic optimisation step (utils/engine.py): accumulation, finite guard, clipping, evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.engine import Engine, NonFiniteLossError, evaluate, resolve_precision


def _setup(clip=None, max_nonfinite=3):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(model, opt, device=torch.device("cpu"), clip_grad=clip, max_nonfinite_steps=max_nonfinite)

    def step_fn(batch):
        err = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2
        return {"loss": err.mean(), "loss_first": err[0]}

    return model, engine, step_fn


def _batch(n=4, seed=0, bad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    if bad:
        x[0, 0] = float("nan")
    return {"x": x, "y": torch.randn(n, generator=g)}


def test_accumulation_equals_one_big_batch():
    big = _batch(8)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    model_a, engine_a, fn_a = _setup()
    out_a = engine_a.train_step(fn_a, [big])
    model_b, engine_b, fn_b = _setup()
    out_b = engine_b.train_step(fn_b, halves)
    torch.testing.assert_close(model_a.weight, model_b.weight)
    assert out_a.values["loss"] == pytest.approx(out_b.values["loss"], rel=1e-6)
    assert out_a.grad_norm == pytest.approx(out_b.grad_norm, rel=1e-5) and not out_a.skipped


def test_nonfinite_loss_skips_step_and_stops_after_limit():
    model, engine, fn = _setup(max_nonfinite=2)
    before = model.weight.detach().clone()
    out = engine.train_step(fn, [_batch(bad=True)])
    assert out.skipped and engine.nonfinite_total == 1
    assert torch.equal(model.weight, before) and model.weight.grad is None
    engine.train_step(fn, [_batch()])  # a good step resets the run of bad ones
    assert engine.nonfinite_in_row == 0 and not torch.equal(model.weight, before)
    engine.train_step(fn, [_batch(bad=True)])
    with pytest.raises(NonFiniteLossError, match="2 consecutive.*max_nonfinite_steps"):
        engine.train_step(fn, [_batch(bad=True)])
    assert engine.state_dict()["nonfinite_total"] == 3


def test_clipping_bounds_the_update():
    model, engine, fn = _setup(clip=1e-3)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    out = engine.train_step(fn, [{"x": _batch()["x"] * 100, "y": _batch()["y"]}])
    assert out.grad_norm > 1.0  # reported before clipping
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)  # SGD: lr * clipped norm


def test_evaluate_weights_by_batch_size_and_precision_rules():
    model, engine, fn = _setup()
    batches = [_batch(4, 1), _batch(2, 2)]
    got = evaluate(engine, fn, batches)
    with torch.no_grad():
        sq = torch.cat([(model(b["x"]).squeeze(-1) - b["y"]) ** 2 for b in batches])
    assert got["loss"] == pytest.approx(sq.mean().item(), rel=1e-6) and model.training
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))
