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
