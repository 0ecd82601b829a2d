"""BigEarthNet v1.0 reader (Sumbul et al., IGARSS 2019): Sentinel-2 L2A (+ Sentinel-1) patches, 43-class multi-label.

Folder format (``../shared/reference/data_formats.md`` section 3)::

    <S2 patch>/<S2 patch>_B01.tif ... _B12.tif    one GeoTIFF per band at native resolution, uint16 reflectance
                                                  x 10000: 120 px (B02-B04, B08), 60 px (B05-B07, B8A, B11, B12),
                                                  20 px (B01, B09); no B10 (L2A)
    <S2 patch>/<S2 patch>_labels_metadata.json    {"labels": [CORINE class names], ...}
    <S1 patch>/<S1 patch>_VV.tif, _VH.tif          float32 backscatter in dB, 120 px; its labels JSON names
                                                  the matching S2 patch ("corresponding_s2_patch")

``root`` may hold the patch folders, the ``.tar.bz2`` archives (extracted once into ``cache_dir``, never into
the repository), or both. Bands are read by name and resampled to 120 px with rasterio (bilinear for the
20 m and 60 m bands). Splits come from ``bigearthnet-{train,val,test}.csv`` (first column: S2 patch name) when
``root`` holds them; otherwise the patches, sorted by name, are split deterministically: the last
``max(1, round(0.2 n))`` go to test, the ``max(1, round(0.2 n))`` before them to val, the rest to train
(the six shipped examples: 4 / 1 / 1). Normalisation: per-band mean / std computed over (at most 1000 seeded)
training patches and cached as ``<cache_dir>/bigearthnet_band_stats.json``; BigEarthNet publishes no stats
file of its own.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from torch.utils.data import Dataset

from multimae.domains import get_domain
from utils.data.mmearth_files import read_json_object
from utils.data.transforms import spatial_transform

__all__ = ["BIGEARTHNET_CLASSES", "BigEarthNetDataset", "find_patches"]

#: The 43-class CORINE Land Cover nomenclature of BigEarthNet v1.0, in its conventional index order.
BIGEARTHNET_CLASSES = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
    "Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
    "Fruit trees and berry plantations", "Olive groves", "Pastures", "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland",
    "Moors and heathland", "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands",
    "Bare rock", "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes", "Salines",
    "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean",
)
_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
_S1_BANDS = {"asc_VV": "VV", "asc_VH": "VH"}
_SIZE = 120
_MAX_STATS_PATCHES = 1000


def _extract(archive: Path, cache_dir: Path) -> Path:
    """Extract ``archive`` into ``cache_dir/<name>`` once (a ``.done`` marker records completion).

    Members are extracted with tarfile's ``data`` filter: absolute paths, ``..`` components, links out
    of the destination and device files are refused.

    Raises:
        ValueError: the archive is damaged, truncated or holds a refused member (names the archive);
            the partial extraction is removed.
    """
    dest = cache_dir / archive.name.split(".")[0]
    marker = dest / ".done"
    if not marker.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(dest, filter="data")
        except tarfile.FilterError as err:
            shutil.rmtree(dest, ignore_errors=True)
            raise ValueError(f"BigEarthNet archive {archive}: refusing member {err.tarinfo.name!r} ({err})") from None
        except (tarfile.TarError, EOFError, OSError) as err:
            shutil.rmtree(dest, ignore_errors=True)
            raise ValueError(f"BigEarthNet archive {archive} is damaged or truncated ({type(err).__name__}: "
                             f"{err})") from None
        marker.write_text(str(archive))
    return dest


def find_patches(root, cache_dir=None) -> tuple[dict[str, Path], dict[str, Path]]:
    """Locate S2 and S1 patch folders under ``root`` (extracting ``*.tar.bz2`` archives into ``cache_dir``).

    Returns:
        ({S2 patch name: folder}, {S2 patch name: matching S1 folder}).

    Raises:
        FileNotFoundError: ``root`` is missing or holds no S2 patch; archives without ``cache_dir``.
        ValueError: a damaged archive or one with a refused member (path traversal), invalid JSON.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"BigEarthNet data_path {root} does not exist")
    archives = [root] if root.is_file() else sorted(root.glob("*.tar.bz2"))
    roots = [] if root.is_file() else [root]
    if archives:
        if cache_dir is None:
            raise FileNotFoundError(f"{root} holds .tar.bz2 archives: a cache_dir to extract them into is needed")
        roots += [_extract(a, Path(cache_dir)) for a in archives]
    s2, s1 = {}, {}
    for base in roots:
        for meta in sorted(base.rglob("*_labels_metadata.json")):
            folder, name = meta.parent, meta.name[: -len("_labels_metadata.json")]
            if (folder / f"{name}_B02.tif").is_file():
                s2[name] = folder
            elif (folder / f"{name}_VV.tif").is_file():
                partner = read_json_object(meta).get("corresponding_s2_patch")
                if partner:
                    s1[partner] = folder
    if not s2:
        raise FileNotFoundError(f"no BigEarthNet S2 patch (<patch>/<patch>_B02.tif + _labels_metadata.json) "
                                f"under {root}")
    return s2, s1


def _split_names(root: Path, names: list[str], split: str) -> list[str]:
    csv_path = root / f"bigearthnet-{split}.csv" if root.is_dir() else None
    if csv_path is not None and csv_path.is_file():
        with csv_path.open() as f:
            wanted = [row[0] for row in csv.reader(f) if row]
        return [n for n in wanted if n in names]
    n = len(names)
    k = max(1, round(0.2 * n)) if n >= 3 else 0
    parts = {"train": names[: n - 2 * k] or names, "val": names[n - 2 * k: n - k] or names,
             "test": names[n - k:] or names}
    return parts[split]


def _read_band(path: Path) -> np.ndarray:
    """One band resampled to 120 x 120 px, float32 (bilinear for the 20 m / 60 m bands)."""
    if not path.is_file():
        raise FileNotFoundError(f"BigEarthNet band file {path} is missing")
    with rasterio.open(path) as src:
        return src.read(1, out_shape=(_SIZE, _SIZE), resampling=Resampling.bilinear).astype(np.float32)


class BigEarthNetDataset(Dataset):
    """BigEarthNet v1.0 patches in the batch contract of ``docs/DESIGN.md`` plus ``label`` (43-class multi-hot).

    Sample: ``{"inputs": {domain: float32 (C, 120, 120) z-scored}, "valid": {domain: bool (H, W)}, "index": int,
    "label": float32 (43,)}``. Sentinel-2 domains take bands by name (B10 does not exist in L2A); ``s1`` takes
    VV, VH (dB) of the matching S1 patch, whatever its orbit direction.

    Args:
        root: Folder of patch folders and / or the ``.tar.bz2`` archives, or one archive.
        split: ``train``, ``val`` or ``test``.
        in_domains: Domain names (``s2_rgb``, ``s2_rededge``, ``s2_nir``, ``s2_swir``, ``s2_atmos``, ``s2``, ``s1``).
        cache_dir: Where archives are extracted and band stats cached (e.g. ``<output_dir>/cache``).
        input_size: Output side in px (None = 120).
        augment, resize, hflip, seed: As :class:`utils.data.geobench.GeoBenchDataset`.

    Raises:
        FileNotFoundError: no patches, a missing band file. ValueError: a domain BigEarthNet lacks, a band
            absent from it (named), an S1 domain without S1 patches, a label outside the 43 classes.
    """

    task = "multilabel"
    num_classes = len(BIGEARTHNET_CLASSES)
    class_names = list(BIGEARTHNET_CLASSES)

    def __init__(self, root, split: str, in_domains: list[str], *, cache_dir=None, input_size: int | None = None,
                 augment: bool = False, resize: bool = False, hflip: float = 0.5, seed: int = 0) -> None:
        if split not in ("train", "val", "test"):
            raise KeyError(f"unknown split {split!r}; use train, val or test")
        self.s2, self.s1 = find_patches(root, cache_dir)
        names = sorted(self.s2)
        self.samples = _split_names(Path(root), names, split)
        self.in_domains, self.cache_dir = list(in_domains), cache_dir
        self.input_size, self.augment, self.resize, self.hflip, self.seed = input_size, augment, resize, hflip, seed
        self.epoch = 0
        self.bands = {d: self._domain_bands(d) for d in self.in_domains}
        stats = self._band_stats(_split_names(Path(root), names, "train"))
        self.mean = {d: np.asarray([stats[b]["mean"] for b in bs], np.float32)[:, None, None] for d, bs in self.bands.items()}
        self.std = {d: np.asarray([stats[b]["std"] for b in bs], np.float32)[:, None, None]
                    for d, bs in self.bands.items()}

    def _domain_bands(self, domain: str) -> list[str]:
        dom = get_domain(domain)
        if dom.modality == "sentinel2":
            for b in dom.bands:
                if b not in _S2_BANDS:
                    raise ValueError(f"band {b} (domain {domain!r}) is absent from BigEarthNet (L2A bands: {', '.join(_S2_BANDS)})")
            return list(dom.bands)
        if dom.modality == "sentinel1" and all(b in _S1_BANDS for b in dom.bands):
            missing = [n for n in self.samples if n not in self.s1]
            if missing:
                raise ValueError(f"domain {domain!r} needs Sentinel-1 patches; none matches S2 patch {missing[0]}")
            return [_S1_BANDS[b] for b in dom.bands]
        raise ValueError(f"BigEarthNet has no input domain {domain!r} (Sentinel-2 L2A bands and Sentinel-1 VV/VH only)")

    def _path(self, name: str, band: str) -> Path:
        folder = self.s1[name] if band in ("VV", "VH") else self.s2[name]
        return folder / f"{folder.name}_{band}.tif"

    def _band_stats(self, train_names: list[str]) -> dict:
        """Per-band ``{"mean", "std", "num_patches"}``, from the cache or computed (then cached).

        Raises:
            ValueError: a needed band's mean or std is not finite, or its std is 0 (names the cache file).
        """
        needed = sorted({b for bs in self.bands.values() for b in bs})
        path = Path(self.cache_dir) / "bigearthnet_band_stats.json" if self.cache_dir else None
        cached = read_json_object(path) if path is not None and path.is_file() else {}
        missing = [b for b in needed if b not in cached]
        if missing:
            rng = np.random.default_rng(self.seed)
            names = list(train_names)
            if len(names) > _MAX_STATS_PATCHES:
                names = [names[i] for i in sorted(rng.choice(len(names), _MAX_STATS_PATCHES, replace=False))]
            for b in missing:
                vals = np.stack([_read_band(self._path(n, b)) for n in names if b not in ("VV", "VH") or n in self.s1])
                cached[b] = {"mean": float(vals.mean()), "std": float(vals.std()), "num_patches": len(vals)}
        where = path if path is not None else "BigEarthNet band statistics of the training patches"
        for b in needed:
            entry = cached[b] if isinstance(cached[b], dict) else {}
            m, sd = entry.get("mean"), entry.get("std")
            if not (isinstance(m, (int, float)) and isinstance(sd, (int, float)) and math.isfinite(m)
                    and math.isfinite(sd) and sd > 0):
                raise ValueError(f"{where}: band {b} has mean {m!r}, std {sd!r}; need finite values and std > 0")
        if missing and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1))
        return cached

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, name: str) -> torch.Tensor:
        """(43,) float32 multi-hot label of S2 patch ``name``.

        Raises:
            ValueError: a label name outside the 43-class nomenclature (the message names the JSON file).
        """
        meta = self.s2[name] / f"{name}_labels_metadata.json"
        out = torch.zeros(self.num_classes)
        for lab in read_json_object(meta).get("labels", []):
            if lab not in BIGEARTHNET_CLASSES:
                raise ValueError(f"{meta}: label {lab!r} is not one of the 43 BigEarthNet classes")
            out[BIGEARTHNET_CLASSES.index(lab)] = 1.0
        return out

    def __getitem__(self, index: int) -> dict:
        name = self.samples[index]
        images = []
        for d, bands in self.bands.items():
            raw = np.stack([_read_band(self._path(name, b)) for b in bands])  # (C, 120, 120)
            images.append(torch.from_numpy((raw - self.mean[d]) / self.std[d]))
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
        images, _ = spatial_transform(images, [], self.input_size or _SIZE, augment=self.augment, resize=self.resize,
                                      hflip=self.hflip, generator=gen)
        inputs, valid = {}, {}
        for d, x in zip(self.bands, images):
            ok = torch.isfinite(x).all(0)
            inputs[d], valid[d] = torch.where(ok, x, 0.0).float(), ok
        return {"inputs": inputs, "valid": valid, "index": index, "label": self.label(name)}
