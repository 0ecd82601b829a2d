"""Mid-epoch resumable DistributedSampler (utils/sampler.py)."""

from __future__ import annotations

import pytest

from utils.sampler import ResumableDistributedSampler


def test_start_skips_consumed_samples_and_ranks_partition():
    data = list(range(20))
    full = ResumableDistributedSampler(data, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableDistributedSampler(data, seed=3)
    resumed.load_state_dict({"epoch": 2, "start": 7, "seed": 3, "num_replicas": 1})
    assert list(resumed) == order[7:] and len(resumed) == 13
    full.set_epoch(3)
    assert list(full) != order  # a new order each epoch
    ranks = [ResumableDistributedSampler(data, num_replicas=2, rank=r, seed=3, drop_last=True) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(0)
    assert sorted(list(ranks[0]) + list(ranks[1])) == data


def test_bad_state_is_refused():
    s = ResumableDistributedSampler(list(range(10)), seed=0)
    with pytest.raises(ValueError, match="outside"):
        s.set_epoch(0, start=11)
    with pytest.raises(ValueError, match="cannot resume"):
        s.load_state_dict({"epoch": 0, "start": 0, "seed": 1, "num_replicas": 1})
