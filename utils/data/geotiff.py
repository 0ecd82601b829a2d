"""Fine-tuning on labelled GeoTIFF folders, read directly with rasterio (no MMEarth conversion).

The data is described by a spec: the converter's (:mod:`utils.data.geotiff_spec`: ``sources`` with their
modality, layout, bands by name, ``scale`` / ``offset`` / ``offset_rules``, ``remap``; ``scenes``; ``grid``)
for the inputs, plus a ``label`` section::

    label:                       # segmentation: one class raster per scene, found like a multi-band source
      folder: LULC               # <data_path>/LULC/<scene>.tif (or a ``path`` pattern with the sources' fields)
      classes:                   # raster value -> class name; null = no-data. Class ids 0..K-1 follow the order
        0: null                  # of first appearance; several values may share a name (merged classes)
        1: water
        2: trees
      nodata: 255                # optional raw no-data value (default: the raster's own)
      resampling: none           # none (on the scene grid, the default), nearest or mode
      colors: {water: "#419bdf"} # optional preview colours by class name

    label:                       # classification / multi-label: one sample per scene
      file: labels.csv           # relative to data_path: CSV with a header (scene, label) or JSON {scene: label}
      task: classification       # or multilabel (CSV: names separated by ';', JSON: a list)
      classes: [AnnualCrop, Pasture, SeaLake]   # a list names the values 0..K-1 or the names themselves

**Samples** follow the batch contract of ``docs/DESIGN.md`` plus ``label``: continuous domains float32
(C, H, W) in the units MMEarth stores (reflectance x 10000, dB, metres; the converter's value rules, so the data
equals what a conversion would hold), z-scored with statistics of the **training split** (no-data excluded; a
band whose valid values are all equal gets std 1); categorical domains int64 (H, W) class ids; ``valid`` bool
(H, W). ``label``: int64 (H, W) class ids with ``IGNORE_INDEX`` (-1) where the label is no-data or where no
input domain holds a valid pixel (never trained on); int64 () for classification; float32 (K,) multi-hot.

**Chips**: segmentation scenes are cut into non-overlapping ``tile_size`` windows from the top-left (the
remainder at the right and bottom is left out; a scene smaller than one tile is skipped with a warning),
read with windowed reads. Chip ids are ``<scene>_r<i>_c<j>``; a classification chip is the scene itself.
Chips without a single valid label pixel are left out of every split (reported once).

**Splits**: a JSON file ``{"train": [...], "val": [...], "test": [...]}`` of scene names (all their chips) or
chip ids, or fractions drawn with a seed, keeping the chips of one tile or one scene together
(:func:`utils.data.mmearth_writer.make_splits`). A split that comes out empty although it was asked for is an
error naming the split and the option. An input domain without a valid pixel in the whole data set is reported
once when the data is surveyed; its pixels are all invalid (zero inputs, no valid token).
"""

from __future__ import annotations

import csv
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import yaml
from rasterio.windows import Window
from torch.utils.data import Dataset
from tqdm import tqdm

from multimae.domains import IGNORE_INDEX, MODALITIES, Domain, Modality, band_indices, get_domain
from utils.data.geotiff_spec import (
    ConversionError, ConversionSpec, PathPattern, Scene, SceneRef, SourceSpec, find_scenes, open_scene, parse_spec,
    read_spec_yaml, to_stored,
)
from utils.data.mmearth import standardize_per_tile
from utils.data.mmearth_files import read_json_object
from utils.data.mmearth_writer import BandStats, make_splits
from utils.data.transforms import spatial_transform

__all__ = [
    "LabelSpec", "FinetuneSpec", "load_finetune_spec", "ChipReader", "GeoTiffCatalogue", "catalogue",
    "GeoTiffDataset", "SPLITS", "LABEL_SOURCE",
]

#: Split names of the data set.
SPLITS = ("train", "val", "test")
#: Name of the label raster's source in the parsed spec (no input source may use it).
LABEL_SOURCE = "label"
_LABEL_KEYS = {"folder", "path", "nodata", "resampling", "file", "task", "classes", "colors"}
_TASKS = ("segmentation", "classification", "multilabel")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
            "#dbdb8d", "#9edae5")


def _fail(path, key: str, msg: str) -> ConversionError:
    return ConversionError(f"spec {path}: {key}: {msg}")


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class LabelSpec:
    """The ``label`` section of a fine-tuning spec.

    Attributes:
        task: ``segmentation``, ``classification`` or ``multilabel``.
        class_names: Class names, class id i = position i.
        class_colors: RGB hex colour per class (the spec's ``colors``, else a fixed palette).
        values: Label value -> class id, or None for no-data. Raster labels: the raw value (float);
            tables: the value as written (str), class names included.
        source: The label raster's source (segmentation), scene-paired with the inputs.
        table: The CSV / JSON file (classification, multi-label), relative to ``data_path`` unless absolute.
    """

    task: str
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    values: dict
    source: SourceSpec | None = None
    table: str | None = None

    @property
    def num_classes(self) -> int:
        """K."""
        return len(self.class_names)

    def class_values(self, cid: int) -> list:
        """The label values that map to class ``cid``."""
        return [v for v, c in self.values.items() if c == cid]


@dataclass(frozen=True)
class FinetuneSpec:
    """A parsed fine-tuning spec: the input sources (and the label raster) as a converter spec, and the label.

    Attributes:
        path: The spec file.
        text: Its YAML text (stored in fine-tuning checkpoints, so prediction needs no file).
        scenes: The sources; the label raster, if any, is its last source (:data:`LABEL_SOURCE`).
        label: The label section, or None (prediction reads only the inputs).
    """

    path: str
    text: str
    scenes: ConversionSpec
    label: LabelSpec | None

    @property
    def inputs(self) -> tuple[SourceSpec, ...]:
        """The input sources (every source but the label raster)."""
        return tuple(s for s in self.scenes.sources if s.name != LABEL_SOURCE)


def _parse_classes(path, raw, numeric: bool) -> tuple[tuple[str, ...], dict]:
    """``classes`` -> (names in id order, value -> class id or None)."""
    if isinstance(raw, list) and raw:
        if any(not isinstance(n, str) or not n for n in raw) or len(set(raw)) != len(raw):
            raise _fail(path, "label.classes", "a list must hold distinct class names (value i = class i)")
        names = tuple(raw)
        values = {(float(i) if numeric else str(i)): i for i in range(len(names))}
        if not numeric:
            values.update({n: i for i, n in enumerate(names)})
        return names, values
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "label.classes", "must map label values to class names (null = no-data), or list the "
                    "class names of values 0..K-1")
    names: list[str] = []
    values: dict = {}
    for value, name in raw.items():
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _fail(path, f"label.classes.{value}", "raster label values must be numbers")
        if name is not None and (not isinstance(name, str) or not name):
            raise _fail(path, f"label.classes.{value}", f"class names must be strings (or null), got {name!r}")
        if name is not None and name not in names:
            names.append(name)
        values[float(value) if numeric else str(value)] = None if name is None else names.index(name)
    if not names:
        raise _fail(path, "label.classes", "names no class (every value is null)")
    if not numeric:
        values.update({n: i for i, n in enumerate(names) if n not in values})
    return tuple(names), values


def _parse_colors(path, raw, names: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return tuple(_PALETTE[i % len(_PALETTE)] for i in range(len(names)))
    if not isinstance(raw, dict) or set(raw) - set(names):
        raise _fail(path, "label.colors", f"must map class names among {list(names)} to '#rrggbb' colours")
    out = []
    for i, n in enumerate(names):
        c = str(raw.get(n, _PALETTE[i % len(_PALETTE)]))
        if len(c) != 7 or c[0] != "#" or any(ch not in "0123456789abcdefABCDEF" for ch in c[1:]):
            raise _fail(path, f"label.colors.{n}", f"{c!r} is not a '#rrggbb' colour")
        out.append(c)
    return tuple(out)


def _parse_label(path, raw, source_names: list[str]) -> LabelSpec:
    if not isinstance(raw, dict):
        raise _fail(path, "label", "must be a mapping: folder (a class raster per scene) or file (a CSV / JSON "
                    "table), and classes")
    unknown = set(raw) - _LABEL_KEYS
    if unknown:
        raise _fail(path, "label", f"unknown keys {sorted(unknown)}; valid keys: {sorted(_LABEL_KEYS)}")
    raster, table = "folder" in raw or "path" in raw, "file" in raw
    if raster == table:
        raise _fail(path, "label", "give either folder (and path) for a class raster per scene, or file for a "
                    "CSV / JSON table of scene -> class")
    task = str(raw.get("task", "segmentation" if raster else "classification"))
    if task not in _TASKS or (raster and task != "segmentation") or (table and task == "segmentation"):
        allowed = "segmentation" if raster else "classification or multilabel"
        raise _fail(path, "label.task", f"a {'raster' if raster else 'table'} label is {allowed}, got {task!r}")
    if "classes" not in raw:
        raise _fail(path, "label.classes", "missing: map label values to class names (null = no-data)")
    names, values = _parse_classes(path, raw["classes"], numeric=raster)
    colors = _parse_colors(path, raw.get("colors"), names)
    if table:
        extra = set(raw) - {"file", "task", "classes", "colors"}
        if extra:
            raise _fail(path, "label", f"keys {sorted(extra)} only apply to a raster label (folder)")
        return LabelSpec(task, names, colors, values, table=str(raw["file"]))
    if LABEL_SOURCE in source_names:
        raise _fail(path, f"sources.{LABEL_SOURCE}", f"the source name {LABEL_SOURCE!r} is reserved for the label")
    resampling = str(raw.get("resampling", "none"))
    if resampling not in ("none", "nearest", "mode"):
        raise _fail(path, "label.resampling", f"class rasters take none, nearest or mode, not {resampling!r}")
    try:
        nodata = None if raw.get("nodata") is None else float(raw["nodata"])
    except (TypeError, ValueError):
        raise _fail(path, "label.nodata", f"must be a number, got {raw['nodata']!r}") from None
    pattern = None if raw.get("path") is None else PathPattern.compile(raw["path"], f"spec {path}: label.path")
    source = SourceSpec(name=LABEL_SOURCE, folder=str(raw.get("folder", LABEL_SOURCE)), modality="label",
                        bands=("label",), channels=(None,), nodata=nodata, path=pattern, resampling=resampling)
    return LabelSpec(task, names, colors, values, source=source)


def load_finetune_spec(path, text: str | None = None, *, keep_sources: list[str] | None = None,
                       with_label: bool = True) -> FinetuneSpec:
    """Read a fine-tuning spec (the module docstring).

    Args:
        path: The spec file (read unless ``text`` is given; then only named in messages).
        text: The spec's YAML text (a checkpoint's copy).
        keep_sources: Only these input sources (prediction reads what its input domains need); ``grid`` and
            ``month_from`` entries naming other sources are dropped.
        with_label: Parse the ``label`` section (required then) and pair its rasters with the scenes.

    Raises:
        ConversionError: any spec error of :func:`utils.data.geotiff_spec.load_spec`, a missing or bad
            ``label`` section (the message names the key).
    """
    if text is None:
        raw = read_spec_yaml(path)
        text = Path(path).read_text()
    else:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConversionError(f"spec {path}: not valid YAML ({err})") from None
    raw = dict(raw)
    label_raw = raw.pop("label", None)
    if keep_sources is not None:
        raw["sources"] = {k: v for k, v in raw["sources"].items() if k in keep_sources}
        if raw.get("grid") not in raw["sources"]:
            raw.pop("grid", None)
        month = [m for m in raw.get("month_from", []) if m in raw["sources"]]
        raw.pop("month_from", None)
        if month:
            raw["month_from"] = month
    label = None
    if with_label:
        if label_raw is None:
            raise _fail(path, "label", "missing: a fine-tuning spec names its label (folder or file, and classes)")
        label = _parse_label(path, label_raw, [str(k) for k in raw.get("sources") or {}])
    extra = (label.source,) if label is not None and label.source is not None else ()
    scenes = parse_spec(raw, path, extra_keys=("label",), extra_sources=extra)
    return FinetuneSpec(str(path), text, scenes, label)


# ----------------------------------------------------------------------------- reading chips


@dataclass(frozen=True)
class _Plan:
    """How one input domain is read: which stored channels of which sources."""

    domain: Domain
    modality: Modality
    channels: tuple[int, ...]       # stored channel of each band of the domain
    sources: tuple[str, ...]        # the spec sources providing them
    stats_key: str | None           # continuous: key of the statistics (``sentinel2_l2a``, ``sentinel1``, ...)
    per_tile: bool                  # elevation standardised per chip (data.elevation_norm per_tile)


def _provides(s: SourceSpec) -> set[int]:
    if s.orbit_field is not None:
        return {c for orbit in ("asc", "desc") for c in s.channels_for(orbit)}
    return {c for c in s.channels if c is not None}


def _plans(spec: FinetuneSpec, in_domains: list[str], elevation_norm: str) -> list[_Plan]:
    plans = []
    for name in in_domains:
        dom = get_domain(name)
        mod = MODALITIES[dom.modality]
        if dom.is_output_only or dom.level != "pixel" or mod.kind not in ("continuous", "categorical"):
            raise ValueError(f"in_domains: {name!r} cannot be read from GeoTIFF data (only pixel-level continuous "
                             f"or class-map input domains)")
        channels = tuple(band_indices(mod.name, dom.bands))
        srcs = [s for s in spec.inputs if s.modality == mod.name and _provides(s) & set(channels)]
        for band, ch in zip(dom.bands, channels):
            have = [s.name for s in srcs if ch in _provides(s)]
            if not have:
                offered = "; ".join(f"sources.{s.name}: {', '.join(b for b in s.bands if b)}" for s in spec.inputs
                                    if s.modality == mod.name) or f"no {mod.name} source"
                raise ValueError(f"in_domains: domain {name!r} needs {mod.name} band {band}, which spec {spec.path} "
                                 f"does not provide ({offered})")
            if len(have) > 1:
                raise ValueError(f"in_domains: {mod.name} band {band} of domain {name!r} comes from several sources "
                                 f"of spec {spec.path} ({', '.join(have)}); a fine-tuning spec lists one product each")
        if band_indices("aster", ["slope"])[0] in channels and mod.name == "aster" and any(s.slope for s in srcs):
            raise ValueError(f"in_domains: domain {name!r}: the derived slope of spec {spec.path} is written only by "
                             f"tools/geotiff_to_mmearth.py; give a slope band or leave the domain out")
        key = None
        if mod.kind == "continuous":
            key = f"sentinel2_{srcs[0].s2_type}" if mod.stats_key == "sentinel2" else mod.stats_key
        per_tile = elevation_norm == "per_tile" and mod.name == "aster" and tuple(dom.bands) == ("elevation",)
        plans.append(_Plan(dom, mod, channels, tuple(s.name for s in srcs), key, per_tile))
    return plans


class ChipReader:
    """Reads input domains (and the label) of any window of an opened scene; shared by training and prediction.

    Args:
        spec: The fine-tuning spec.
        in_domains: Input domains, in token order.
        stats: Domain -> ``{"mean": [...], "std": [...]}`` per band (continuous domains normalised with band
            statistics); None reads raw values only (:meth:`values`).
        elevation_norm: ``per_tile`` (elevation standardised per window, :func:`standardize_per_tile`) or
            ``band_stats``.

    Raises:
        ValueError: a domain the spec cannot provide (names the band and the sources), or one provided twice.
    """

    def __init__(self, spec: FinetuneSpec, in_domains: list[str], stats: dict | None = None,
                 elevation_norm: str = "per_tile") -> None:
        self.spec, self.in_domains = spec, list(in_domains)
        self.plans = _plans(spec, self.in_domains, elevation_norm)
        self.stats = stats
        self._sources = {s.name: s for s in spec.scenes.sources}
        self._needed = sorted({s for p in self.plans for s in p.sources}, key=list(self._sources).index)

    @property
    def sources(self) -> list[str]:
        """The input sources the domains read."""
        return list(self._needed)

    def values(self, scene: Scene, window: Window) -> dict[str, np.ndarray]:
        """Per domain, the stored values of a window: continuous float64 (C, h, w) with NaN = no-data;
        categorical int64 (h, w) class ids with ``IGNORE_INDEX``.

        Raises:
            ConversionError: an unreadable raster, or a class id absent from a source's ``remap``.
        """
        stored: dict[tuple[str, int], np.ndarray] = {}
        for name in self._needed:
            src = self._sources[name]
            for band, ch in zip(scene.read(name, window), scene.channels[name]):
                if band is not None and ch is not None:
                    x, nodata, label = band
                    stored[(src.modality, ch)] = to_stored(x, src, nodata, scene.offsets[name], label, {})
        h, w = int(window.height), int(window.width)
        out = {}
        for p in self.plans:
            x = np.stack([stored.get((p.modality.name, c), np.full((h, w), np.nan)) for c in p.channels])
            if p.modality.kind == "categorical":
                ids = np.full((h, w), IGNORE_INDEX, np.int64)
                for cid, code in enumerate(p.domain.class_values):
                    ids[x[0] == code] = cid
                out[p.domain.name] = ids
            else:
                out[p.domain.name] = x
        return out

    def normalise(self, values: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Stored values (:meth:`values`) -> model inputs: float32 (C, h, w) z-scored (0 where invalid) or
        int64 (h, w) class ids, and bool (h, w) validity (every band of the domain valid)."""
        inputs, valid = {}, {}
        for p in self.plans:
            x = values[p.domain.name]
            if p.modality.kind == "categorical":
                inputs[p.domain.name], valid[p.domain.name] = x, x != IGNORE_INDEX
                continue
            ok = np.isfinite(x).all(0)
            if p.per_tile:
                z = standardize_per_tile(np.nan_to_num(x).astype(np.float32)[None], ok[None])[0]
            else:
                st = self.stats[p.domain.name]
                mean = np.asarray(st["mean"], np.float64)[:, None, None]
                std = np.asarray(st["std"], np.float64)[:, None, None]
                z = ((x - mean) / std).astype(np.float32)
            inputs[p.domain.name] = np.where(ok[None], z, 0.0).astype(np.float32)
            valid[p.domain.name] = ok
        return inputs, valid

    def read(self, scene: Scene, window: Window) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Model inputs and validity of a window (:meth:`values` then :meth:`normalise`)."""
        return self.normalise(self.values(scene, window))

    def label(self, scene: Scene, window: Window) -> np.ndarray:
        """The label raster of a window as int64 (h, w) class ids, ``IGNORE_INDEX`` for no-data.

        Raises:
            ConversionError: a raster value absent from ``label.classes`` (names the file).
        """
        lab = self.spec.label
        x, nodata, where = scene.read(LABEL_SOURCE, window)[0]
        bad = ~np.isfinite(x) | (x == nodata if nodata is not None else False)
        codes = np.unique(x[~bad])
        unknown = [c for c in codes.tolist() if c not in lab.values]
        if unknown:
            shown = ", ".join(f"{c:g}" for c in unknown[:10])
            raise ConversionError(f"{where}: label values {shown} are not in spec {self.spec.path} label.classes; "
                                  f"add them (null = no-data)")
        out = np.full(x.shape, IGNORE_INDEX, np.int64)
        for code in codes.tolist():
            cid = lab.values[code]
            if cid is not None:
                out[(x == code) & ~bad] = cid
        return out


class _Scenes:
    """Opened scenes of this process, least recently used closed first (rasterio handles do not survive fork)."""

    def __init__(self, spec: ConversionSpec, refs: dict[str, SceneRef], capacity: int = 32) -> None:
        self.spec, self.refs, self.capacity = spec, refs, capacity
        self._open: OrderedDict[str, Scene] = OrderedDict()
        self._pid = os.getpid()

    def get(self, name: str) -> Scene:
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()  # a forked worker: the parent's handles are not ours
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        scene = open_scene(self.spec, self.refs[name])
        self._open[name] = scene
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return scene

    def close(self) -> None:
        for scene in self._open.values():
            scene.close()
        self._open.clear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}


# ----------------------------------------------------------------------------- the catalogue of chips


@dataclass(frozen=True)
class Chip:
    """One sample: a window of a scene.

    Attributes:
        id: ``<scene>_r<i>_c<j>`` (segmentation) or the scene name (classification).
        scene: Scene name.
        window: (row, col, height, width) on the scene grid, pixels.
    """

    id: str
    scene: str
    window: tuple[int, int, int, int]

    @property
    def rasterio_window(self) -> Window:
        """The window as a ``rasterio.windows.Window``."""
        r, c, h, w = self.window
        return Window(c, r, w, h)


@dataclass
class GeoTiffCatalogue:
    """Every chip of a data set, its label summary, the splits and the training statistics.

    Built once per process and configuration (:func:`catalogue`); the datasets of every split share it.

    Attributes:
        spec: The fine-tuning spec.
        root: ``data_path``.
        in_domains: Input domains.
        tile_size: Chip side (segmentation).
        chips: Every chip with a valid label pixel, in scene order.
        splits: Split name -> positions in ``chips`` (absent: a split with fraction 0 / not in the file).
        class_counts: Split name -> int64 (K,) labelled pixels (segmentation) or samples per class.
        stats: Domain -> ``{"mean", "std", "count"}`` lists over the training split (continuous domains).
        labels: Classification / multi-label: chip id -> class id or multi-hot list.
        refs: Scene name -> its entries on disk.
        messages: What the survey reported (left-out chips, domains without a valid pixel).
    """

    spec: FinetuneSpec
    root: Path
    in_domains: list[str]
    tile_size: int
    elevation_norm: str
    chips: list[Chip] = field(default_factory=list)
    splits: dict[str, list[int]] = field(default_factory=dict)
    class_counts: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    labels: dict[str, object] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    refs: dict[str, SceneRef] = field(default_factory=dict)
    per_chip: list[np.ndarray] = field(default_factory=list, repr=False)  # class counts of each chip

    @property
    def task(self) -> str:
        """``segmentation``, ``classification`` or ``multilabel``."""
        return self.spec.label.task

    def reader(self) -> ChipReader:
        """A reader normalising with the training statistics."""
        return ChipReader(self.spec, self.in_domains, self.stats, self.elevation_norm)


def _read_table(spec: FinetuneSpec, root: Path) -> dict[str, list[str]]:
    """Scene -> label values as written, from the label CSV / JSON."""
    lab = spec.label
    path = Path(lab.table) if Path(lab.table).is_absolute() else root / lab.table
    if not path.is_file():
        raise FileNotFoundError(f"spec {spec.path}: label.file: {path} does not exist")
    multi = lab.task == "multilabel"
    out: dict[str, list[str]] = {}
    if path.suffix.lower() == ".json":
        data = read_json_object(path)
        for scene, value in data.items():
            items = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not multi:
                raise ConversionError(f"{path}: scene {scene!r} has a list of classes; set label.task: multilabel "
                                      f"in spec {spec.path}")
            out[str(scene)] = [str(v) for v in items]
        return out
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ConversionError(f"{path}: needs a header row and one row per scene: scene, label [spec label.file]")
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise ConversionError(f"{path} line {line}: expected scene, label; got {row}")
        scene, value = row[0].strip(), row[1].strip()
        if scene in out:
            raise ConversionError(f"{path} line {line}: scene {scene!r} is listed twice")
        out[scene] = [v.strip() for v in value.split(";")] if multi else [value]
    return out


def _table_labels(spec: FinetuneSpec, root: Path, scenes: list[str]) -> dict[str, object]:
    lab = spec.label
    table = _read_table(spec, root)
    where = f"label.file {lab.table}"
    extra = sorted(set(table) - set(scenes))
    if extra:
        raise ConversionError(f"{where} names scene(s) {extra[:5]} that no source of spec {spec.path} holds "
                              f"(scenes found: {scenes[:5]}{' ...' if len(scenes) > 5 else ''})")
    missing = [s for s in scenes if s not in table]
    if missing:
        raise ConversionError(f"{where} has no label for scene(s) {missing[:5]} (every scene found needs one)")
    out: dict[str, object] = {}
    for scene in scenes:
        ids = []
        for value in table[scene]:
            if value not in lab.values:
                raise ConversionError(f"{where}: scene {scene!r} has class {value!r}, which is not in spec "
                                      f"{spec.path} label.classes ({', '.join(lab.class_names)})")
            if lab.values[value] is not None:
                ids.append(lab.values[value])
        if lab.task == "multilabel":
            hot = [0.0] * lab.num_classes
            for i in ids:
                hot[i] = 1.0
            out[scene] = hot
        elif ids:
            out[scene] = ids[0]
    return out


def _chips(spec: FinetuneSpec, refs: list[SceneRef], tile: int) -> list[Chip]:
    chips = []
    for ref in tqdm(refs, desc="opening scenes", unit="scene", disable=len(refs) < 20):
        scene = open_scene(spec.scenes, ref)
        scene.close()
        h, w = scene.height, scene.width
        if spec.label.task != "segmentation":
            chips.append(Chip(ref.name, ref.name, (0, 0, h, w)))
            continue
        if h < tile or w < tile:
            print(f"warning: scene {ref.name} ({h} x {w} px) is smaller than one {tile}-px tile (geotiff.tile_size); "
                  f"skipped", file=sys.stderr)
            continue
        chips += [Chip(f"{ref.name}_r{i}_c{j}", ref.name, (i * tile, j * tile, tile, tile))
                  for i in range(h // tile) for j in range(w // tile)]
    return chips


def _split_error(name: str, why: str) -> ValueError:
    return ValueError(f"split {name!r} is empty: {why}")


def _assign(cfg_split: dict, chips: list[Chip], keep: list[int], seed: int) -> dict[str, list[int]]:
    """Split name -> chip positions, from the split file or drawn fractions (see the module docstring)."""
    if cfg_split["split_file"]:
        path = Path(cfg_split["split_file"])
        if not path.is_file():
            raise FileNotFoundError(f"geotiff.split_file: no file {path}")
        data = read_json_object(path)
        if set(data) - set(SPLITS) or "train" not in data or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"geotiff.split_file {path}: must be a JSON object with lists 'train' and optionally "
                             f"'val', 'test' of scene names or chip ids")
        by_id = {c.id: i for i, c in enumerate(chips)}
        by_scene: dict[str, list[int]] = {}
        for i, c in enumerate(chips):
            by_scene.setdefault(c.scene, []).append(i)
        kept, owner, out = set(keep), {}, {}
        for name, items in data.items():
            rows = []
            for item in items:
                item = str(item)
                if item not in by_id and item not in by_scene:
                    raise ValueError(f"geotiff.split_file {path}: split {name!r} lists {item!r}, neither a scene nor "
                                     f"a chip id of the data (e.g. {chips[0].id if chips else 'none'})")
                for i in ([by_id[item]] if item in by_id else by_scene[item]):
                    if owner.setdefault(i, name) != name:
                        raise ValueError(f"geotiff.split_file {path}: chip {chips[i].id} is in splits "
                                         f"{owner[i]!r} and {name!r}")
                    if i in kept:
                        rows.append(i)
            if not rows:
                raise _split_error(name, f"geotiff.split_file {path} lists {len(items)} item(s) for it, none with a "
                                   f"valid label pixel")
            out[name] = sorted(set(rows))
        return out
    fractions = {k: float(v) for k, v in cfg_split["splits"].items()}
    if set(fractions) == set(SPLITS):
        fractions = {k: fractions[k] for k in SPLITS}
    if set(fractions) != set(SPLITS) or any(f < 0 for f in fractions.values()) \
            or abs(sum(fractions.values()) - 1) > 1e-6 or fractions["train"] <= 0:
        raise ValueError(f"geotiff.splits: fractions of train, val, test must be >= 0 (train > 0) and sum to 1, "
                         f"got {fractions}")
    if cfg_split["split_by"] not in ("tile", "scene"):
        raise ValueError(f"geotiff.split_by must be tile or scene, got {cfg_split['split_by']!r}")
    by_scene = cfg_split["split_by"] == "scene"
    groups = [c.scene if by_scene else c.id for c in chips]
    drawn = make_splits(groups, fractions, seed, exclude=set(range(len(chips))) - set(keep))
    n = len({groups[i] for i in keep})
    for name, rows in drawn.items():
        if not rows and fractions[name] > 0:
            unit = "scene" if by_scene else "chip"
            positive = [k for k, f in fractions.items() if f > 0]
            hint = ("use geotiff.split_by=tile, add scenes" if by_scene else "add scenes or lower geotiff.tile_size")
            raise _split_error(name, f"geotiff.split_by={cfg_split['split_by']} gives {n} {unit}(s) with a valid label "
                               f"pixel for the {len(positive)} splits with a positive fraction in geotiff.splits "
                               f"({', '.join(positive)}); {hint}, or set geotiff.splits.{name}=0 (and give its "
                               f"fraction to another split)")
    return {k: v for k, v in drawn.items() if fractions[k] > 0}


def _survey(cat: GeoTiffCatalogue, scenes: _Scenes) -> list[int]:
    """Read every chip once: label class counts, chips without a valid label pixel, domains without a valid
    pixel. Returns the positions of the chips to keep."""
    reader = ChipReader(cat.spec, cat.in_domains, None, cat.elevation_norm)
    seg = cat.task == "segmentation"
    k = cat.spec.label.num_classes
    keep, dropped, seen = [], 0, {d: 0 for d in cat.in_domains}
    cat.class_counts = {"all": np.zeros(k, np.int64)}
    per_chip: list[np.ndarray] = []
    for i, chip in enumerate(tqdm(cat.chips, desc="reading labels", unit="chip", disable=len(cat.chips) < 200)):
        scene = scenes.get(chip.scene)
        values = reader.values(scene, chip.rasterio_window)
        valid_any = np.zeros(chip.window[2:], bool)
        for d, x in values.items():
            ok = (x != IGNORE_INDEX) if x.ndim == 2 else np.isfinite(x).all(0)
            seen[d] += int(ok.sum())
            valid_any |= ok
        if seg:
            lab = reader.label(scene, chip.rasterio_window)
            lab[~valid_any] = IGNORE_INDEX
            counts = np.bincount(lab[lab >= 0], minlength=k)
        else:
            lab = cat.labels.get(chip.id)
            counts = np.zeros(k, np.int64)
            if lab is not None and valid_any.any():
                counts = np.asarray(lab, np.int64) if cat.task == "multilabel" else np.eye(k, dtype=np.int64)[lab]
        per_chip.append(counts)
        usable = counts.sum() > 0 or (cat.task == "multilabel" and lab is not None and valid_any.any())
        if usable:
            keep.append(i)
        else:
            dropped += 1
    cat.class_counts["all"] = np.sum(per_chip, 0) if per_chip else np.zeros(k, np.int64)
    cat.per_chip = per_chip
    if dropped:
        what = "a valid label pixel under a valid input pixel" if seg else "a label and a valid input pixel"
        cat.messages.append(f"{dropped} of {len(cat.chips)} chips without {what} are left out of the splits")
    for d, n in seen.items():
        if n == 0:
            srcs = ", ".join(f"sources.{s}" for p in reader.plans if p.domain.name == d for s in p.sources)
            cat.messages.append(f"warning: input domain {d!r} ({srcs}) has no valid pixel in the whole data set "
                                f"under {cat.root}; it is all no-data (zero inputs, no valid token) and gives the "
                                f"model nothing to learn from")
    return keep


def _training_stats(cat: GeoTiffCatalogue, scenes: _Scenes) -> dict[str, dict]:
    reader = ChipReader(cat.spec, cat.in_domains, None, cat.elevation_norm)
    plans = [p for p in reader.plans if p.modality.kind == "continuous" and not p.per_tile]
    acc = {p.domain.name: BandStats(len(p.channels)) for p in plans}
    if not plans:
        return {}
    rows = cat.splits["train"]
    for i in tqdm(rows, desc="band statistics (train)", unit="chip", disable=len(rows) < 200):
        chip = cat.chips[i]
        values = reader.values(scenes.get(chip.scene), chip.rasterio_window)
        for p in plans:
            x = values[p.domain.name][None]
            acc[p.domain.name].update(x, ~np.isfinite(x))
    out = {}
    for name, st in acc.items():
        js = st.to_json()
        std = [s if s > 0 else 1.0 for s in js["std"]]
        out[name] = {"mean": js["mean"], "std": std, "count": js["count"]}
    return out


@lru_cache(maxsize=8)
def _catalogue(spec_path: str, spec_text: str, root: str, in_domains: tuple[str, ...], tile: int, split_file,
               fractions: tuple, split_by: str, seed: int, elevation_norm: str) -> GeoTiffCatalogue:
    spec = load_finetune_spec(spec_path, spec_text)
    root_path = Path(root)
    refs = find_scenes(spec.scenes, root_path)
    cat = GeoTiffCatalogue(spec, root_path, list(in_domains), tile, elevation_norm,
                           refs={r.name: r for r in refs})
    ChipReader(spec, cat.in_domains)  # domain errors before any raster is read
    if spec.label.task != "segmentation":
        cat.labels = _table_labels(spec, root_path, [r.name for r in refs])
    cat.chips = _chips(spec, refs, tile)
    if not cat.chips:
        raise ValueError(f"no scene under {root} holds one {tile} x {tile} chip (geotiff.tile_size {tile})")
    scenes = _Scenes(spec.scenes, cat.refs)
    try:
        keep = _survey(cat, scenes)
        if not keep:
            raise _split_error("train", f"none of the {len(cat.chips)} chips under {root} has a valid label pixel "
                               f"(spec {spec.path} label)")
        split_cfg = {"split_file": split_file, "splits": dict(fractions), "split_by": split_by}
        cat.splits = _assign(split_cfg, cat.chips, keep, seed)
        for name, rows in cat.splits.items():
            cat.class_counts[name] = np.sum([cat.per_chip[i] for i in rows], 0)
        cat.stats = _training_stats(cat, scenes)
    finally:
        scenes.close()
    for message in cat.messages:
        print(message, file=sys.stderr)
    return cat


def catalogue(cfg: dict, in_domains: list[str]) -> GeoTiffCatalogue:
    """The chip catalogue of a resolved config (``data_path``, ``geotiff.*``, ``seed``, ``data.input_size``),
    built once per process and configuration.

    Raises:
        ValueError: ``geotiff.spec`` unset, spec errors (:class:`ConversionError`), a missing folder or scene,
            an unknown class, bad split settings or a split that comes out empty (names the split and the
            option).
        FileNotFoundError: a missing label table or split file.
    """
    g = cfg["geotiff"]
    if not g["spec"]:
        raise ValueError("geotiff.spec is not set (the YAML spec of the sources and the label; see utils/data/"
                         "geotiff.py)")
    spec_path = Path(g["spec"])
    try:
        text = spec_path.read_text()
    except OSError as err:
        raise FileNotFoundError(f"geotiff.spec: cannot read {spec_path} ({err.strerror})") from None
    tile = int(g["tile_size"] or cfg["data"]["input_size"])
    if tile < cfg["data"]["input_size"] and not cfg["data"]["resize"]:
        raise ValueError(f"geotiff.tile_size {tile} is smaller than data.input_size {cfg['data']['input_size']}: "
                         f"chips are cropped to the input size; raise geotiff.tile_size or set data.resize=true")
    return _catalogue(str(spec_path), text, str(Path(cfg["data_path"]).resolve()), tuple(in_domains), tile,
                      g["split_file"], tuple(sorted(g["splits"].items())), g["split_by"], int(cfg["seed"]),
                      cfg["data"]["elevation_norm"])


# ----------------------------------------------------------------------------- the dataset


class GeoTiffDataset(Dataset):
    """One split of labelled GeoTIFF folders, in the batch contract of ``docs/DESIGN.md`` plus ``label``.

    Args:
        cat: The catalogue (:func:`catalogue`).
        split: ``train``, ``val`` or ``test``.
        input_size: Model input side in px (a crop of the chip, or the chip resized).
        augment: Random crop and horizontal flip (training); else a centre crop.
        resize: Resize the chip to ``input_size`` instead of cropping (continuous bilinear, labels nearest).
        hflip: Flip probability with ``augment``.
        seed: Base seed: crop and flip depend only on (seed, epoch, position).

    Attributes:
        task, num_classes, class_names, class_colors: The label's.

    Raises:
        KeyError: ``split`` is not a split of the catalogue.
    """

    def __init__(self, cat: GeoTiffCatalogue, split: str, *, input_size: int, augment: bool = False,
                 resize: bool = False, hflip: float = 0.5, seed: int = 0) -> None:
        if split not in cat.splits:
            raise KeyError(f"unknown split {split!r}; this data has {', '.join(cat.splits)}")
        self.cat, self.split, self.rows = cat, split, list(cat.splits[split])
        self.input_size, self.augment, self.resize, self.hflip = int(input_size), augment, resize, hflip
        self.seed, self.epoch = int(seed), 0
        lab = cat.spec.label
        self.task, self.num_classes = lab.task, lab.num_classes
        self.class_names, self.class_colors = list(lab.class_names), list(lab.class_colors)
        self.in_domains = list(cat.in_domains)
        self._reader = cat.reader()
        self._scenes = _Scenes(cat.spec.scenes, cat.refs)

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    @property
    def chip_ids(self) -> list[str]:
        """Chip id of each position."""
        return [self.cat.chips[i].id for i in self.rows]

    def class_counts(self) -> list[int]:
        """Labelled pixels (segmentation) or samples per class in this split."""
        return self.cat.class_counts[self.split].tolist()

    def domain_info(self) -> dict:
        """JSON-serialisable description of the input domains and the label, for checkpoints.

        Returns:
            ``{domain: {"modality", "bands", "kind", "level", "units", "source", "normalization", "stats",
            "class_names", "class_values", "nodata", "spec_sources"}, "label": {"task", "class_names",
            "class_colors", "class_values", "train_class_counts", "spec", "spec_path", "tile_size",
            "splits"}}``; ``stats`` (band statistics of the training split, no-data excluded) have the form
            of :meth:`utils.data.mmearth.MMEarthDataset.domain_info`.
        """
        info = {}
        for p in self._reader.plans:
            d, mod = p.domain, p.modality
            cat_kind = mod.kind == "categorical"
            info[d.name] = {
                "modality": mod.name, "bands": list(d.bands), "kind": d.kind, "level": d.level, "units": mod.units,
                "source": None, "normalization": "class ids" if cat_kind else ("per_tile" if p.per_tile else "band_stats"),
                "stats": {} if cat_kind or p.per_tile else {p.stats_key: {k: list(v) for k, v in
                                                                        self.cat.stats[d.name].items()}},
                "class_names": list(d.class_names) if cat_kind else [],
                "class_values": list(d.class_values) if cat_kind else [],
                "nodata": [str(v) for v in mod.nodata], "spec_sources": list(p.sources),
            }
        lab = self.cat.spec.label
        info["label"] = {
            "task": lab.task, "class_names": list(lab.class_names), "class_colors": list(lab.class_colors),
            "class_values": [lab.class_values(i) for i in range(lab.num_classes)],
            "train_class_counts": self.cat.class_counts["train"].tolist(), "spec": self.cat.spec.text,
            "spec_path": self.cat.spec.path, "tile_size": self.cat.tile_size,
            "splits": {k: [self.cat.chips[i].id for i in v] for k, v in self.cat.splits.items()},
        }
        return info

    def __getitem__(self, index: int) -> dict:
        chip = self.cat.chips[self.rows[index]]
        scene = self._scenes.get(chip.scene)
        inputs, valid = self._reader.read(scene, chip.rasterio_window)
        seg = self.task == "segmentation"
        if seg:
            label = self._reader.label(scene, chip.rasterio_window)
            label[~np.any(np.stack(list(valid.values())), 0)] = IGNORE_INDEX
        names = list(inputs)
        cont = [n for n in names if inputs[n].ndim == 3]
        maps = [torch.from_numpy(inputs[n]) for n in names if inputs[n].ndim == 2]
        masks = [torch.from_numpy(valid[n]) for n in names]
        extra = [torch.from_numpy(label)] if seg else []
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
        images, others = spatial_transform([torch.from_numpy(inputs[n]) for n in cont], maps + masks + extra,
                                           self.input_size, augment=self.augment, resize=self.resize,
                                           hflip=self.hflip, generator=gen)
        out_inputs = dict(zip(cont, images))
        cat_names = [n for n in names if inputs[n].ndim == 2]
        out_inputs.update(zip(cat_names, others[:len(cat_names)]))
        out_valid = dict(zip(names, others[len(cat_names):len(cat_names) + len(names)]))
        if seg:
            target = others[-1]
        elif self.task == "multilabel":
            target = torch.tensor(self.cat.labels[chip.id], dtype=torch.float32)
        else:
            target = torch.tensor(int(self.cat.labels[chip.id]), dtype=torch.int64)
        for n in cont:  # invalid pixels stay 0 after a bilinear resize
            out_inputs[n] = out_inputs[n] * out_valid[n]
        return {"inputs": {n: out_inputs[n] for n in names}, "valid": out_valid, "index": index, "label": target}
