"""A DistributedSampler that can resume in the middle of an epoch.

``torch.utils.data.DistributedSampler`` shuffles with a generator seeded by ``seed + epoch``, so
an epoch's order is reproducible; what it lacks is a way to skip the samples a rank already
consumed before an interruption. ``ResumableDistributedSampler.set_epoch(epoch, start=k)`` drops
the first ``k`` indices of this rank's order for that epoch only. ``make_loader`` builds the
DataLoader both run scripts use over it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.dist import DistInfo

__all__ = ["ResumableDistributedSampler", "make_loader"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` with a mid-epoch start position and a ``state_dict``.

    Works in a world of one too (``num_replicas=1, rank=0``), so single-process and torchrun
    runs share one data path.

    Args:
        dataset: The dataset to index.
        num_replicas: Number of processes (world size).
        rank: This process's rank.
        shuffle: Shuffle with a generator seeded by ``seed + epoch``.
        seed: Shuffle seed; must be the same on every rank.
        drop_last: Drop the tail so every rank gets the same number of samples (otherwise pad
            by repeating samples, as ``DistributedSampler`` does).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip this rank's first ``start`` samples of it.

        Raises:
            ValueError: ``start`` is negative or beyond this rank's share of the epoch.
        """
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"sampler start {start} outside 0..{self.num_samples} samples per rank")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        """``{"epoch", "start", "seed", "num_replicas"}`` as plain ints."""
        return {"epoch": int(self.epoch), "start": int(self.start), "seed": int(self.seed),
                "num_replicas": int(self.num_replicas)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``epoch`` and ``start`` saved by ``state_dict``.

        Raises:
            ValueError: the state was saved with another seed or world size (the order would differ).
        """
        if state["seed"] != self.seed or state["num_replicas"] != self.num_replicas:
            raise ValueError(
                f"sampler state from seed {state['seed']} / {state['num_replicas']} processes cannot resume "
                f"with seed {self.seed} / {self.num_replicas} processes"
            )
        self.set_epoch(state["epoch"], state["start"])


def make_loader(dataset, cfg: dict, info: DistInfo, *, train: bool) -> tuple[DataLoader, torch.Generator]:
    """DataLoader over a resumable sampler, with its own generator: creating an iterator draws the
    worker base seed from that generator instead of the global torch RNG, which the masks use."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=train,
                                          seed=cfg["seed"], drop_last=train)
    generator = torch.Generator().manual_seed(cfg["seed"])
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=cfg["data"]["pin_memory"] and info.device.type == "cuda", drop_last=train,
                        generator=generator, persistent_workers=False)
    return loader, generator
