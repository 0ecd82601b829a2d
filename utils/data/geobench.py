"""GEO-Bench v1.0 reader (Lacoste et al., NeurIPS 2023 Datasets and Benchmarks), without the geobench package.

On-disk format (GEO-Bench v1.0 as its converters write it)::

    <root>/{classification_v1.0 | segmentation_v1.0}/<task>/
        <partition>_partition.json    {"train": [sample, ...], "valid": [...], "test": [...]}
        band_stats.json               {band name: {"mean", "std", ...}}
        <sample>.hdf5                 one 2-D dataset per band (named by the band, "_YYYY-MM-DD" if dated),
                                      a "label" dataset (segmentation), attribute "pickle" = str(pickle bytes)
                                      of a dict with "bands_order", per-band info and (classification) "label"

The ``pickle`` attribute is decoded with :class:`RestrictedUnpickler`: geobench, rasterio and affine classes
become inert stand-ins, numpy arrays and dates are rebuilt, anything else is refused (pickles can run
code). Bands are matched to the model's domains by name: ``"04 - Red"`` is Sentinel-2 ``B04``; m-eurosat's
shifted names are corrected (section 2.6: its ``08A`` holds B09, ``09`` B10, ``10`` B11, ``11`` B12, ``12``
B8A). Data is z-scored with the task's own ``band_stats.json`` (MMEarth-train does the same; for m-so2sat,
whose stats are x 10000 while its data is reflectance 0-1, the stats are divided by 10000 as MMEarth-train
does). Class names come from the task's ``task_specs.pkl`` (its ``label_type``, decoded by the same restricted
unpickler) where it names them, else from the converters' label lists (:attr:`GeoBenchTask.class_names`).
The reader runs with numpy 1.x and 2.x and decodes pickles written by either.
"""

from __future__ import annotations

import ast
import datetime
import io
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from multimae.domains import get_domain
from utils.data.bigearthnet import BIGEARTHNET_CLASSES
from utils.data.mmearth_files import read_json_object
from utils.data.transforms import spatial_transform

__all__ = [
    "GeoBenchTask",
    "GEOBENCH_TASKS",
    "RefusedPickleError",
    "RestrictedUnpickler",
    "StandIn",
    "decode_sample_pickle",
    "s2_band_names",
    "task_class_names",
    "GeoBenchDataset",
    "check_partition",
]


@dataclass(frozen=True)
class GeoBenchTask:
    """One GEO-Bench task as MMEarth evaluates it.

    Attributes:
        name: Task folder name (``m-eurosat``).
        benchmark: Parent folder (``classification_v1.0`` / ``segmentation_v1.0``).
        task: ``classification``, ``multilabel`` or ``segmentation``.
        num_classes: K.
        size: Native image side in px.
        metric: Metric MMEarth-train reports (``accuracy``, ``micro_f1``, ``miou``).
        eurosat_shift: Correct m-eurosat's positional band names.
        stats_scale: Multiplier on the band-stats mean / std (m-so2sat: 1e-4).
        class_names: Names of the class ids 0..K-1 as the GEO-Bench converters assign them, used when the
            folder's ``task_specs.pkl`` names none (segmentation tasks) or is absent. m-bigearthnet: the 43
            BigEarthNet names (:data:`utils.data.bigearthnet.BIGEARTHNET_CLASSES`).
    """

    name: str
    benchmark: str
    task: str
    num_classes: int
    size: int
    metric: str
    eurosat_shift: bool = False
    stats_scale: float = 1.0
    class_names: tuple[str, ...] = ()


# Label lists of the GEO-Bench v1 converters (make_benchmark/dataset_converters): EuroSAT's class folders in the
# label-index order torchgeo assigns; So2Sat's local climate zones 1-10, A-G; the cashew and South-African
# crop-type label tuples of their converters.
_EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                    "PermanentCrop", "Residential", "River", "SeaLake")
_SO2SAT_CLASSES = ("Compact high rise", "Compact mid rise", "Compact low rise", "Open high rise", "Open mid rise",
                   "Open low rise", "Lightweight low rise", "Large low rise", "Sparsely built", "Heavy industry",
                   "Dense trees", "Scattered trees", "Bush, scrub", "Low plants", "Bare rock or paved",
                   "Bare soil or sand", "Water")
_CASHEW_CLASSES = ("no data", "well-managed plantation", "poorly-managed plantation", "non-plantation", "residential",
                   "background", "uncertain")
_SA_CROP_CLASSES = ("No Data", "Lucerne/Medics", "Planted pastures (perennial)", "Fallow", "Wine grapes", "Weeds",
                    "Small grain grazing", "Wheat", "Canola", "Rooibos")


GEOBENCH_TASKS: dict[str, GeoBenchTask] = {
    t.name: t
    for t in (
        GeoBenchTask("m-eurosat", "classification_v1.0", "classification", 10, 64, "accuracy", eurosat_shift=True,
                     class_names=_EUROSAT_CLASSES),
        GeoBenchTask("m-bigearthnet", "classification_v1.0", "multilabel", 43, 120, "micro_f1"),
        GeoBenchTask("m-so2sat", "classification_v1.0", "classification", 17, 32, "accuracy", stats_scale=1e-4,
                     class_names=_SO2SAT_CLASSES),
        GeoBenchTask("m-brick-kiln", "classification_v1.0", "classification", 2, 64, "accuracy",
                     class_names=("not brick kiln", "brick kiln")),
        GeoBenchTask("m-cashew-plant", "segmentation_v1.0", "segmentation", 7, 256, "miou",
                     class_names=_CASHEW_CLASSES),
        GeoBenchTask("m-SA-crop-type", "segmentation_v1.0", "segmentation", 10, 256, "miou",
                     class_names=_SA_CROP_CLASSES),
    )
}

# ---------------------------------------------------------------- restricted unpickling


class StandIn:
    """Inert replacement for a pickled geobench / rasterio / affine object: records its class and state.

    Attributes:
        module, qualname: Where the original class lived (set on the generated subclass).
        args: Positional arguments the pickle passed to ``__new__`` (e.g. Affine's six numbers).
        state: What the pickle's BUILD passed (a dict of attributes, or CRS's WKT string).
    """

    module = ""
    qualname = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state) -> None:
        self.state = state

    def get(self, key: str, default=None):
        """Attribute ``key`` of a dict state (``band_info.get("name")``), else ``default``."""
        return self.state.get(key, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"StandIn({self.module}.{self.qualname})"


_STANDIN_MODULES = re.compile(r"^(geobench|ccb)(\.[A-Za-z_]\w*)*$")
_STANDIN_CLASSES = {("rasterio.crs", "CRS"), ("affine", "Affine")}
# numpy's own unpickling functions, taken from what this numpy version pickles with (numpy 1.x names the module
# numpy.core.multiarray, numpy 2.x numpy._core.multiarray): pickles written under either version decode.
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
_REAL_CLASSES = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
    ("datetime", "date"): datetime.date,
    ("datetime", "datetime"): datetime.datetime,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
}
_standin_cache: dict[tuple[str, str], type] = {}


class RefusedPickleError(pickle.UnpicklingError, ValueError):
    """A sample's pickle names a global outside the GEO-Bench data types (it could run code); refused."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for GEO-Bench v1 sample pickles that can only build data, never run code.

    Allowed: classes of ``geobench.*`` / ``ccb.*`` (old module paths), ``rasterio.crs.CRS`` and
    ``affine.Affine`` (all become :class:`StandIn` subclasses); numpy array / dtype / scalar reconstruction;
    ``datetime.date`` / ``datetime.datetime``; ``collections.OrderedDict``.

    Raises:
        RefusedPickleError: the pickle names any other global (e.g. ``os.system``, ``builtins.eval``); a
            ``pickle.UnpicklingError`` and a ``ValueError``.
    """

    def find_class(self, module: str, name: str):
        """Allow only the known geobench / rasterio / affine / numpy classes; refuse everything else."""
        if (module, name) in _REAL_CLASSES:
            return _REAL_CLASSES[(module, name)]
        if ((module, name) in _STANDIN_CLASSES or _STANDIN_MODULES.match(module)) and name.isidentifier():
            key = (module, name)
            if key not in _standin_cache:
                _standin_cache[key] = type(name, (StandIn,), {"module": module, "qualname": name})
            return _standin_cache[key]
        raise RefusedPickleError(f"refusing to unpickle global {module}.{name} (not a GEO-Bench data type)")


def decode_sample_pickle(text: str | bytes, source: str = "sample") -> dict:
    """Decode a GEO-Bench sample's ``pickle`` attribute (``str`` of the pickle bytes) into a dict.

    Raises:
        ValueError: the attribute is not a bytes literal or not a dict, or cannot be unpickled;
            :class:`RefusedPickleError` for a forbidden global (the message names ``source``).
    """
    if isinstance(text, bytes):
        text = text.decode()
    try:
        raw = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"{source}: attribute 'pickle' is not a bytes literal ({err})") from None
    if not isinstance(raw, bytes):
        raise ValueError(f"{source}: attribute 'pickle' holds {type(raw).__name__}, expected bytes")
    try:
        out = RestrictedUnpickler(io.BytesIO(raw)).load()
    except RefusedPickleError as err:
        raise RefusedPickleError(f"{source}: {err}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as err:
        raise ValueError(f"{source}: attribute 'pickle' cannot be decoded ({type(err).__name__}: {err})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{source}: attribute 'pickle' decodes to {type(out).__name__}, expected a dict")
    return out


def task_class_names(folder: Path, spec: GeoBenchTask) -> tuple[str, ...]:
    """Class names of a GEO-Bench task folder: its ``task_specs.pkl`` ``label_type`` names when it holds K of
    them, else the converter's list (:attr:`GeoBenchTask.class_names`); empty when neither is known.

    ``task_specs.pkl`` is decoded with :class:`RestrictedUnpickler`; one that does not decode (or names no
    classes, as the segmentation tasks' ``SegmentationClasses``) falls back to the converter's list.
    """
    path = Path(folder) / "task_specs.pkl"
    if path.is_file():
        try:
            with path.open("rb") as f:
                specs = RestrictedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
            specs = None
        label_type = specs.get("label_type") if isinstance(specs, StandIn) else None
        if isinstance(label_type, StandIn):
            # geobench.label.Classification keeps "_class_names", MultiLabelClassification "class_name"
            names = label_type.get("_class_names") or label_type.get("class_name")
            if isinstance(names, (list, tuple)) and len(names) == spec.num_classes:
                return tuple(str(n) for n in names)
    if spec.name == "m-bigearthnet":
        return tuple(BIGEARTHNET_CLASSES)
    return spec.class_names


# ---------------------------------------------------------------- band names

_DATE_SUFFIX = re.compile(r"_\d{4}-\d{2}-\d{2}$")
_S2_NUMBER = re.compile(r"^(\d{1,2}A?)\s*-\s*(.*)$", re.IGNORECASE)
_S2_VALID = {"B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"}
# m-eurosat: the converter named EuroSAT's file-order channels (.., B08, B09, B10, B11, B12, B8A) positionally.
_EUROSAT_SHIFT = {"B8A": "B09", "B09": "B10", "B10": "B11", "B11": "B12", "B12": "B8A"}
_RGB_ONLY = {"red": "B04", "green": "B03", "blue": "B02"}


def _band_class(info: dict, band: str) -> str:
    entry = info.get(band) if isinstance(info, dict) else None
    band_info = entry.get("band_info") if isinstance(entry, dict) else None
    return type(band_info).__name__ if isinstance(band_info, StandIn) else ""


def s2_band_names(datasets: list[str], info: dict | None = None, eurosat_shift: bool = False) -> dict[str, str]:
    """Map Sentinel-2 band names (``B04``) to the HDF5 dataset names of a sample (``04 - Red_2020-09-05``).

    A dataset is a Sentinel-2 band when its name starts with a band number (``04 -``, ``08A -``) or is
    ``Red`` / ``Green`` / ``Blue``; Sentinel-1 bands (``VV`` / ``VH`` in the name, or a ``Sentinel1`` band
    class in the pickle) and cloud-probability bands are skipped. With several dates the earliest is used.

    Args:
        datasets: The sample's dataset names (``label`` is ignored).
        info: The decoded ``pickle`` dict (per-band ``band_info`` classes), if any.
        eurosat_shift: Apply the m-eurosat correction.
    """
    out: dict[str, str] = {}
    for name in sorted(datasets):
        base = _DATE_SUFFIX.sub("", name)
        cls = _band_class(info or {}, name).lower()
        if name == "label" or "sentinel1" in cls or "cloud" in cls or re.search(r"\bV[VH]\b", base):
            continue
        m = _S2_NUMBER.match(base)
        if m and "cloud" not in m.group(2).lower():
            num = m.group(1).upper()
            band = "B8A" if num in ("8A", "08A") else f"B{int(num):02d}"
        elif base.strip().lower() in _RGB_ONLY:
            band = _RGB_ONLY[base.strip().lower()]
        else:
            continue
        if band not in _S2_VALID:
            continue
        band = _EUROSAT_SHIFT.get(band, band) if eurosat_shift else band
        out.setdefault(band, name)
    return out


# ---------------------------------------------------------------- spatial transform


# ---------------------------------------------------------------- dataset

_SPLIT_KEYS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"GEO-Bench: missing file {path}")
    return read_json_object(path)


def _open_sample(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"GEO-Bench sample {path} cannot be read as HDF5 ({' '.join(str(err).split())})") from None


def check_partition(parts: dict, path: Path) -> None:
    """Check a ``<partition>_partition.json``: each split a list of unique sample names, splits disjoint.

    Raises:
        ValueError: a split is not a list of names, lists a sample twice, or shares samples with
            another split (names the file, the splits and a sample).
    """
    for name, samples in parts.items():
        if not isinstance(samples, list) or not all(isinstance(x, str) for x in samples):
            raise ValueError(f"{path}: split {name!r} must be a list of sample names")
        seen: set[str] = set()
        for sample in samples:
            if sample in seen:
                raise ValueError(f"{path}: split {name!r} lists sample {sample!r} more than once "
                                 f"({len(samples) - len(set(samples))} repeats); each sample may appear once")
            seen.add(sample)
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(parts[a]) & set(parts[b]))
            if shared:
                raise ValueError(f"{path}: splits {a!r} and {b!r} share {len(shared)} samples (e.g. {shared[0]!r}); "
                                 "splits must be disjoint")


class GeoBenchDataset(Dataset):
    """One split of a GEO-Bench v1.0 task, in the batch contract of ``docs/DESIGN.md`` plus ``label``.

    Attributes ``task``, ``num_classes`` and ``class_names`` (see :func:`task_class_names`) describe the labels.
    Sample: ``{"inputs": {domain: float32 (C, H, W)}, "valid": {domain: bool (H, W)}, "index": int,
    "label": ...}`` where ``label`` is int64 () (classification), float32 (K,) multi-hot (multi-label) or
    int64 (H, W) class ids (segmentation). Inputs are reflectance x 10000 z-scored with ``band_stats.json``;
    non-finite pixels are marked invalid and set to 0.

    Args:
        root: GEO-Bench root (holding ``classification_v1.0`` / ``segmentation_v1.0``) or the task folder.
        task: Task name of :data:`GEOBENCH_TASKS`.
        split: ``train``, ``val`` (= ``valid``) or ``test``.
        in_domains: Sentinel-2 domains to build (``s2_rgb``, ``s2_rededge``, ``s2_nir``, ``s2_swir``...).
        partition: Partition file prefix (``default``, ``0.01x_train``...).
        input_size: Output side in px (None = the samples' own size).
        augment: Random crop / flip (training).
        resize: Resize to ``input_size`` instead of cropping.
        hflip: Flip probability with ``augment``.
        seed: Base seed of the per-sample augmentation.

    Raises:
        KeyError: unknown task or split. FileNotFoundError: missing task folder, partition file or sample.
        ValueError: a domain the task cannot provide, a band absent from the task or a sample (named),
            missing, non-finite or zero band stats, a partition with repeated or shared samples
            (:func:`check_partition`), invalid JSON, an unreadable sample file, a label outside the
            class list. :class:`RefusedPickleError` (a ``ValueError``): a sample pickle naming a
            forbidden global.
    """

    def __init__(self, root, task: str, split: str, in_domains: list[str], *, partition: str = "default",
                 input_size: int | None = None, augment: bool = False, resize: bool = False, hflip: float = 0.5,
                 seed: int = 0) -> None:
        if task not in GEOBENCH_TASKS:
            raise KeyError(f"unknown GEO-Bench task {task!r} (finetune.geobench_task); "
                           f"known: {', '.join(GEOBENCH_TASKS)}")
        if split not in _SPLIT_KEYS:
            raise KeyError(f"unknown split {split!r}; use train, val or test")
        self.spec = GEOBENCH_TASKS[task]
        root = Path(root)
        self.folder = root if root.name == task else root / self.spec.benchmark / task
        if not self.folder.is_dir():
            raise FileNotFoundError(f"GEO-Bench task folder {self.folder} does not exist (data_path)")
        part_path = self.folder / f"{partition}_partition.json"
        parts = _read_json(part_path)
        check_partition(parts, part_path)
        key = _SPLIT_KEYS[split]
        if key not in parts:
            raise KeyError(f"{part_path}: no split {key!r}; has {', '.join(parts)}")
        self.samples = list(parts[key])
        self.in_domains = list(in_domains)
        self.input_size = input_size
        self.augment, self.resize, self.hflip, self.seed, self.epoch = augment, resize, hflip, seed, 0
        self.num_classes, self.task = self.spec.num_classes, self.spec.task
        self.class_names = list(task_class_names(self.folder, self.spec))
        self._plan = self._plan_bands()

    def _sample_path(self, name: str) -> Path:
        path = self.folder / (name if name.endswith(".hdf5") else f"{name}.hdf5")
        if not path.is_file():
            raise FileNotFoundError(f"GEO-Bench sample {path} listed in the partition file is missing")
        return path

    def _plan_bands(self) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
        """Per domain: the band base names and the (C,) mean / std from band_stats.json."""
        if not self.samples:
            raise ValueError(f"{self.folder}: the split is empty")
        path = self._sample_path(self.samples[0])
        with _open_sample(path) as h5:
            datasets = list(h5.keys())
            info = decode_sample_pickle(h5.attrs["pickle"], str(path)) if "pickle" in h5.attrs else {}
        bands = s2_band_names(datasets, info, self.spec.eurosat_shift)
        stats_path = self.folder / "band_stats.json"
        stats = _read_json(stats_path)
        plan = {}
        for d in self.in_domains:
            dom = get_domain(d)
            if dom.modality != "sentinel2":
                raise ValueError(f"GEO-Bench task {self.spec.name} has no input domain {d!r} (only Sentinel-2 bands)")
            names, mean, std = [], [], []
            for band in dom.bands:
                if band not in bands:
                    raise ValueError(
                        f"band {band} (domain {d!r}) is absent from GEO-Bench task {self.spec.name} "
                        f"({path.name} has {', '.join(sorted(bands)) or 'no Sentinel-2 bands'})"
                    )
                base = _DATE_SUFFIX.sub("", bands[band])
                entry = stats.get(base, stats.get(bands[band]))
                if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
                    raise ValueError(f"{stats_path}: no mean/std for band {base!r}")
                m, sd = entry["mean"], entry["std"]
                if not (isinstance(m, (int, float)) and isinstance(sd, (int, float)) and math.isfinite(m)
                        and math.isfinite(sd) and sd > 0):
                    raise ValueError(f"{stats_path}: band {base!r} has mean {m!r}, std {sd!r}; need finite values "
                                     "and std > 0")
                names.append(base)
                mean.append(m * self.spec.stats_scale)
                std.append(sd * self.spec.stats_scale)
            plan[d] = (names, np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None])
        return plan

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (crop and flip depend on (seed, epoch, index))."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _label(self, h5: h5py.File, info: dict, path: Path):
        k = self.num_classes
        if self.task == "segmentation":
            if "label" not in h5:
                raise KeyError(f"{path}: segmentation sample without a 'label' dataset")
            lab = torch.from_numpy(h5["label"][()].astype(np.int64))
            if lab.numel() and (lab.min() < -1 or lab.max() >= k):
                raise ValueError(f"{path}: label ids {int(lab.min())}..{int(lab.max())} "
                                 f"outside the {k} classes 0..{k - 1}")
            return lab
        if "label" not in info:
            raise KeyError(f"{path}: the 'pickle' attribute has no 'label'")
        lab = np.asarray(info["label"])
        if self.task == "multilabel":
            if lab.shape != (k,) or not np.isin(lab, (0, 1)).all():
                raise ValueError(f"{path}: label must be a 0/1 vector of {k} classes, got shape {lab.shape}")
            return torch.from_numpy(lab.astype(np.float32))
        if lab.ndim != 0 or not 0 <= int(lab) < k:
            raise ValueError(f"{path}: label {lab.tolist()} outside the {k} classes 0..{k - 1}")
        return torch.tensor(int(lab), dtype=torch.int64)

    def __getitem__(self, index: int) -> dict:
        path = self._sample_path(self.samples[index])
        with _open_sample(path) as h5:
            info = decode_sample_pickle(h5.attrs["pickle"], str(path)) if "pickle" in h5.attrs else {}
            by_base = {_DATE_SUFFIX.sub("", n): n for n in sorted(h5.keys(), reverse=True)}  # earliest date wins
            images = []
            for d, (names, mean, std) in self._plan.items():
                missing = [n for n in names if n not in by_base]
                if missing:
                    raise ValueError(f"{path}: band {missing[0]!r} (domain {d!r}) is missing; the task's first "
                                     f"sample has it")
                raw = np.stack([h5[by_base[n]][()] for n in names]).astype(np.float32)  # (C, H, W)
                images.append(torch.from_numpy((raw - mean) / std))
            label = self._label(h5, info, path)
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
        seg = self.task == "segmentation"
        size = self.input_size or images[0].shape[-1]
        images, labels = spatial_transform(images, [label] if seg else [], size, augment=self.augment,
                                           resize=self.resize, hflip=self.hflip, generator=gen)
        inputs, valid = {}, {}
        for d, x in zip(self._plan, images):
            ok = torch.isfinite(x).all(0)
            inputs[d], valid[d] = torch.where(ok, x, 0.0).float(), ok
        return {"inputs": inputs, "valid": valid, "index": index, "label": labels[0] if seg else label}
