"""Segmentation of a categorical MMEarth modality (e.g. Dynamic World land cover) from chosen input domains.

Wraps :class:`utils.data.mmearth.MMEarthDataset`: the target domain is loaded with the inputs (same crop and
flip), then moved out of ``inputs`` into ``label``: a full-resolution int64 (H, W) class map with
``IGNORE_INDEX`` (-1) where the stored value is no-data. The model never sees the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import h5py
from torch.utils.data import Dataset

from multimae.domains import get_domain
from utils.data.mmearth import MMEarthDataset
from utils.data.mmearth_files import resolve_fileset

__all__ = ["MMEarthSegDataset"]


class MMEarthSegDataset(Dataset):
    """One split of an MMEarth file set as a segmentation dataset.

    Sample: the batch contract of ``docs/DESIGN.md`` for ``in_domains`` plus ``"label"``: int64 (H, W),
    class ids 0..K-1 of the ``target`` domain, -1 for no-data.

    Args:
        data_path: The ``<stem>.h5`` file or its folder.
        in_domains: Input domains (any registered pixel domains the file holds).
        target: Categorical pixel domain to segment (``dynamic_world``, ``worldcover``).
        split: Split of ``<stem>_splits.json``.
        **kwargs: Passed to :class:`MMEarthDataset` (``input_size``, ``augment``, ``hflip``, ``resize``,
            ``elevation_norm``, ``seed``, ``indices``, ``metadata``: samples then hold ``"metadata"``).

    Raises:
        ValueError: ``target`` is not a categorical pixel domain or is also an input; an input domain whose
            modality the file lacks (the message names the domain, the modality and the file).
    """

    task = "segmentation"

    def __init__(self, data_path, in_domains: Sequence[str], target: str, split: str, **kwargs) -> None:
        dom = get_domain(target)
        if dom.kind != "categorical" or dom.level != "pixel":
            raise ValueError(f"finetune.target {target!r} is not a categorical pixel domain (e.g. dynamic_world)")
        if target in in_domains:
            raise ValueError(f"finetune.target {target!r} cannot also be an input domain (in_domains)")
        files = resolve_fileset(data_path)
        with h5py.File(files.h5, "r") as h5:
            for name in [*in_domains, target]:
                mod = get_domain(name).modality
                if mod not in h5:
                    raise ValueError(
                        f"domain {name!r} needs modality {mod!r}, which {files.h5} does not hold "
                        f"(it has {', '.join(sorted(h5))})"
                    )
        self.in_domains, self.target = list(in_domains), target
        self.num_classes = dom.num_classes
        self.class_names = list(dom.class_names)
        self.base = MMEarthDataset(data_path, [*in_domains, target], split, **kwargs)

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.base.set_epoch(epoch)

    def __getitems__(self, positions) -> list[dict]:
        """A batch of samples (vectorised read of the wrapped dataset)."""
        out = self.base.__getitems__(positions)
        for sample in out:
            sample["label"] = sample["inputs"].pop(self.target)
            sample["valid"].pop(self.target)
        return out

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]
