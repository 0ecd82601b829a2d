"""Fine-tuning dataset kinds (config key ``finetune.dataset``): one entry per kind, no if / elif in the scripts.

Each :class:`DatasetKind` builds one split of its data for a list of input domains from the resolved config,
and names the validation and test splits. Every dataset it builds follows the batch contract of
``docs/DESIGN.md`` plus ``label``, and has the attributes ``task`` (``classification``, ``multilabel`` or
``segmentation``: what ``finetune.task`` is derived from), ``num_classes`` and ``class_names`` when known. A new
kind is its dataset file, a builder function and one line in :data:`FINETUNE_DATASETS`. ``model.metadata`` of the
config a builder gets names the encoder's metadata fields: ``mmearth`` delivers them (``batch["metadata"]``); the
other kinds have no metadata (the encoder then uses its learned missing embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from utils.data.bigearthnet import BigEarthNetDataset
from utils.data.geobench import GEOBENCH_TASKS, GeoBenchDataset
from utils.data.geotiff import GeoTiffDataset, catalogue
from utils.data.mmearth_seg import MMEarthSegDataset

__all__ = ["DatasetKind", "FINETUNE_DATASETS", "get_dataset_kind"]


@dataclass(frozen=True)
class DatasetKind:
    """How to build one kind of fine-tuning dataset.

    Attributes:
        name: The ``finetune.dataset`` value.
        build: ``(cfg, in_domains, split, train) -> Dataset or None`` (None: the data has no such split;
            only for evaluation splits).
        eval_splits: ``cfg -> {"val": split name, "test": split name}`` ('' = none).
    """

    name: str
    build: Callable[[dict, list[str], str, bool], Dataset | None]
    eval_splits: Callable[[dict], dict[str, str]]


def _augmentation(cfg: dict, train: bool) -> dict:
    data = cfg["data"]
    return dict(augment=train, resize=data["resize"], hflip=data["hflip"], seed=cfg["seed"])


def _split_option(cfg: dict, split: str, train: bool) -> str:
    """The config key that chose ``split`` (for the empty-split error)."""
    if train:
        return f"data.train_split={split}"
    return f"data.val_split={split}" if split == cfg["data"]["val_split"] else f"finetune.test_split={split}"


def _nonempty(ds: Dataset, cfg: dict, split: str, train: bool, where: str) -> Dataset:
    """``ds``, or an error naming the split and the option when it holds no sample (an empty evaluation split
    would report NaN metrics, an empty training split train nothing)."""
    if len(ds) == 0:
        off = "" if train else f"; set {_split_option(cfg, split, train).split('=')[0]}='' to run without it"
        raise ValueError(f"split {split!r} ({_split_option(cfg, split, train)}) of {where} holds no sample{off}")
    return ds


def _mmearth(cfg: dict, in_domains: list[str], split: str, train: bool) -> Dataset | None:
    data = cfg["data"]
    try:
        ds = MMEarthSegDataset(cfg["data_path"], in_domains, cfg["finetune"]["target"], split,
                               input_size=data["input_size"], elevation_norm=data["elevation_norm"],
                               max_bad_rows=data["max_bad_rows"], metadata=cfg["model"]["metadata"],
                               **_augmentation(cfg, train))
    except KeyError as err:
        if "unknown split" in str(err) and not train:
            return None
        raise
    return _nonempty(ds, cfg, split, train, f"{ds.base.files.splits}")


def _geobench(cfg: dict, in_domains: list[str], split: str, train: bool) -> Dataset:
    ft = cfg["finetune"]
    if ft["geobench_task"] not in GEOBENCH_TASKS:
        raise ValueError(f"finetune.geobench_task must be one of {', '.join(GEOBENCH_TASKS)}, got {ft['geobench_task']!r}")
    return GeoBenchDataset(cfg["data_path"], ft["geobench_task"], split, in_domains, partition=ft["partition"],
                           input_size=cfg["data"]["input_size"], **_augmentation(cfg, train))


def _bigearthnet(cfg: dict, in_domains: list[str], split: str, train: bool) -> Dataset:
    ds = BigEarthNetDataset(cfg["data_path"], split, in_domains, cache_dir=Path(cfg["output_dir"]) / "cache",
                            input_size=cfg["data"]["input_size"], **_augmentation(cfg, train))
    return _nonempty(ds, cfg, split, train, f"BigEarthNet data {cfg['data_path']}")


def _geotiff(cfg: dict, in_domains: list[str], split: str, train: bool) -> Dataset | None:
    cat = catalogue(cfg, in_domains)
    if split not in ("train", "val", "test"):
        raise ValueError(f"{_split_option(cfg, split, train)}: GeoTIFF data has the splits train, val and test")
    if split not in cat.splits:
        if train:
            raise ValueError(f"{_split_option(cfg, split, train)}: geotiff.split_file lists no such split")
        return None  # fraction 0, or not in the split file: deliberately absent
    return GeoTiffDataset(cat, split, input_size=cfg["data"]["input_size"], **_augmentation(cfg, train))


def _fixed_splits(cfg: dict) -> dict[str, str]:
    return {"val": "val", "test": "test"}


#: ``finetune.dataset`` -> how to build it.
FINETUNE_DATASETS: dict[str, DatasetKind] = {
    "mmearth": DatasetKind("mmearth", _mmearth,
                           lambda cfg: {"val": cfg["data"]["val_split"], "test": cfg["finetune"]["test_split"]}),
    "geobench": DatasetKind("geobench", _geobench, _fixed_splits),
    "bigearthnet": DatasetKind("bigearthnet", _bigearthnet, _fixed_splits),
    "geotiff": DatasetKind("geotiff", _geotiff, _fixed_splits),
}


def get_dataset_kind(name: str) -> DatasetKind:
    """The registry entry of ``finetune.dataset``.

    Raises:
        ValueError: an unknown kind; the message lists the registered ones.
    """
    if name not in FINETUNE_DATASETS:
        raise ValueError(f"finetune.dataset must be one of {', '.join(FINETUNE_DATASETS)}, got {name!r}")
    return FINETUNE_DATASETS[name]
