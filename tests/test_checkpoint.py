"""Atomic checkpoints, weights_only loading, RNG round trips and checked loads (utils/checkpoint.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from utils import checkpoint as ckpt


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")  # half a file on disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]


def test_corrupt_or_missing_checkpoint_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(bad)
    assert ckpt.resume_path("auto", tmp_path) is None
    assert ckpt.resume_path("never", tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="resume"):
        ckpt.resume_path(str(tmp_path / "x.pth"), tmp_path)


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # move off the seeds, cache a gaussian
    path = ckpt.save_checkpoint({"rng": [ckpt.rng_state({"loader": gen})]}, tmp_path / "c.pth")
    expected = (random.random(), np.random.normal(), torch.rand(2), torch.rand(1, generator=gen))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"][0], {"loader": gen})
    got = (random.random(), np.random.normal(), torch.rand(2), torch.rand(1, generator=gen))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_load_state_checked_names_differing_keys():
    small, wide = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 16))
    with pytest.raises(ckpt.CheckpointError, match=r"missing in checkpoint: 1\.weight.*\n.*shape differs: 0\.weight"):
        ckpt.load_state_checked(small, wide.state_dict())
    target = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    ckpt.load_state_checked(target, {k: v for k, v in small.state_dict().items() if k.startswith("0.")},
                            ignore_missing=["1."])
    assert torch.equal(target[0].weight, small[0].weight)


def test_optimizer_state_is_matched_by_parameter_names():
    from utils.optim import build_optimizer, param_groups

    class Net(nn.Module):
        def __init__(self, order):
            super().__init__()
            for name in order:  # the same parameters, registered in another order
                setattr(self, name, nn.Parameter(torch.full((2,), float(ord(name)))))

    optim_cfg = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    src = Net("abc")
    opt = build_optimizer(param_groups(src, 0.0), optim_cfg, lr=0.1)
    for p in src.parameters():
        p.grad = p.detach().clone()
    opt.step()
    saved = opt.state_dict()
    dst = Net("cab")
    opt2 = build_optimizer(param_groups(dst, 0.0), optim_cfg, lr=0.1)
    ckpt.load_optimizer_state(opt2, saved)
    for name in "abc":
        torch.testing.assert_close(opt2.state[getattr(dst, name)]["exp_avg"], opt.state[getattr(src, name)]["exp_avg"])
    other = Net("abd")
    with pytest.raises(ckpt.CheckpointError, match="optimizer state does not match.*missing d"):
        ckpt.load_optimizer_state(build_optimizer(param_groups(other, 0.0), optim_cfg, lr=0.1), saved)


def test_read_checkpoint_checks_version_and_kind(tmp_path):
    ckpt.save_checkpoint({"format_version": 2, "kind": "pretraining"}, tmp_path / "a.pth")
    assert ckpt.read_checkpoint(tmp_path / "a.pth", kind="pretraining")["kind"] == "pretraining"
    with pytest.raises(ckpt.CheckpointError, match=r"a.pth is a 'pretraining' checkpoint, not 'finetuning'"):
        ckpt.read_checkpoint(tmp_path / "a.pth", kind="finetuning")
    ckpt.save_checkpoint({"format_version": 3, "kind": "pretraining"}, tmp_path / "b.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"b.pth: checkpoint format_version 3 is not one this code reads \(1, 2\)"):
        ckpt.read_checkpoint(tmp_path / "b.pth")
    ckpt.save_checkpoint({"weights": torch.ones(1)}, tmp_path / "c.pth")
    with pytest.raises(ckpt.CheckpointError, match="format_version None"):
        ckpt.read_checkpoint(tmp_path / "c.pth")
