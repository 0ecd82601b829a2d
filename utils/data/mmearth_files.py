"""Locating and validating an MMEarth file set (``<stem>.h5`` and its JSON side files).

Format: ``../shared/reference/data_formats.md`` section 1. Every check raises an error that names the
file and the key, so a bad file set fails at dataset construction, not deep inside a worker.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from multimae.domains import Modality

__all__ = ["MMEarthFiles", "DataFileError", "resolve_fileset", "load_splits", "load_band_stats", "read_s2_products",
           "check_modality_dataset", "invalid_mask", "physical_range_violation", "read_json_object", "S2_PRODUCTS"]

#: Sentinel-2 product levels, in the order of the product codes used by the dataset (0 = l1c, 1 = l2a).
S2_PRODUCTS = ("l1c", "l2a")


def invalid_mask(modality: Modality, x: np.ndarray) -> np.ndarray:
    """True where ``x`` (stored values) holds one of ``modality``'s no-data values, lies below its
    ``valid_min``, or is NaN / inf.

    The one no-data test of the code base: the dataset's validity masks, the writer's band stats and
    the converter's valid fractions all use it.
    """
    bad = np.zeros(x.shape, bool) if x.dtype.kind in "iu" else ~np.isfinite(x)
    for value in modality.nodata:
        if np.isfinite(value):
            bad |= x == value
    if modality.valid_min is not None:
        bad |= x < modality.valid_min
    return bad


class DataFileError(ValueError):
    """A data file is unreadable or damaged (truncated HDF5, corrupt chunks, too many bad rows).

    The message names the file and, for row faults, the dataset and rows.
    """


def physical_range_violation(modality: Modality, x: np.ndarray, bands) -> str | None:
    """Describe the first value of ``x`` that the sensor cannot have produced, or return None.

    Args:
        modality: Registry entry; its ``physical_range`` gives the (low, high) of each band.
        x: Stored values of one row, (C_mod, ...) in the modality's band order.
        bands: Band indices to check (those the caller uses).

    Returns:
        None when every value of the checked bands is no-data (:func:`invalid_mask`) or inside its band's
        range; otherwise one line naming the band, the value and the range.
    """
    if not modality.physical_range:
        return None
    for i in bands:
        lo, hi = modality.physical_range[i]
        v = x[i]
        if v.min() >= lo and v.max() <= hi:  # NaN / inf fail this test and take the masked path
            continue
        bad = ((v < lo) | (v > hi)) & ~invalid_mask(modality, v)
        if bad.any():
            return (f"band {modality.bands[i]} holds {float(v[bad].flat[0]):g}, outside the physical range "
                    f"[{lo:g}, {hi:g}] ({modality.units})")
    return None


@dataclass(frozen=True)
class MMEarthFiles:
    """Paths of one MMEarth file set. ``tile_info`` is None when the optional file is absent."""

    h5: Path
    band_stats: Path
    splits: Path
    tile_info: Path | None

    @property
    def stem(self) -> str:
        """File stem shared by the HDF5 and its side files."""
        return self.h5.stem


def resolve_fileset(data_path: str | Path) -> MMEarthFiles:
    """Find ``<stem>.h5``, ``<stem>_band_stats.json``, ``<stem>_splits.json`` (and ``<stem>_tile_info.json``).

    Args:
        data_path: The ``.h5`` file itself, or the folder holding ``<stem>.h5`` where ``stem`` is the
            folder name (MMEarth's ``data_1M_v001_64/data_1M_v001_64.h5`` layout). A folder holding
            exactly one ``.h5`` file is accepted too.

    Raises:
        FileNotFoundError: the path, the HDF5 file or a required side file does not exist (the
            message names the missing path).
    """
    path = Path(data_path).expanduser()
    if path.is_dir():
        h5 = path / f"{path.name}.h5"
        if not h5.is_file():
            found = sorted(path.glob("*.h5"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"MMEarth folder {path} has no {h5.name} (found {[p.name for p in found] or 'no .h5 file'})"
                )
            h5 = found[0]
    elif path.is_file():
        h5 = path
    else:
        raise FileNotFoundError(f"MMEarth data_path {path} does not exist")
    side = {k: h5.with_name(f"{h5.stem}_{k}.json") for k in ("band_stats", "splits", "tile_info")}
    for key in ("band_stats", "splits"):
        if not side[key].is_file():
            raise FileNotFoundError(f"MMEarth file set {h5}: side file {side[key]} is missing")
    return MMEarthFiles(h5, side["band_stats"], side["splits"], side["tile_info"] if side["tile_info"].is_file() else None)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object.

    Raises:
        ValueError: not valid JSON, or not an object at the top level (names the file).
    """
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def load_splits(path: Path, num_rows: int) -> dict[str, np.ndarray]:
    """Read ``<stem>_splits.json``: split name -> int64 array of HDF5 row indices.

    Every split must list each row at most once, every row must lie in ``[0, num_rows)``, and no row may
    belong to two splits (a validation row inside the training split would make validation lie).

    Raises:
        ValueError: a split is not a list of integers, holds a row outside the file or twice, or shares
            rows with another split (the message names the file, the splits and a row).
    """
    out = {}
    for name, rows in read_json_object(path).items():
        arr = np.asarray(rows)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{path}: split {name!r} must be a list of integer HDF5 row indices")
        arr = arr.astype(np.int64)
        bad = arr[(arr < 0) | (arr >= num_rows)]
        if bad.size:
            raise ValueError(f"{path}: split {name!r} holds row {int(bad[0])}, outside [0, {num_rows})")
        uniq, counts = np.unique(arr, return_counts=True)
        if uniq.size != arr.size:
            dup = uniq[counts > 1]
            raise ValueError(f"{path}: split {name!r} lists {arr.size - uniq.size} rows more than once "
                             f"(row {int(dup[0])} {int(counts[counts > 1][0])} times); each row may appear once")
        out[name] = arr
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = np.intersect1d(out[a], out[b], assume_unique=True)
            if shared.size:
                raise ValueError(f"{path}: splits {a!r} and {b!r} share {shared.size} rows (e.g. row "
                                 f"{int(shared[0])}); splits must be disjoint")
    return out


def load_band_stats(path: Path, needed: dict[str, Modality], used_bands: dict[str, list[int]]) -> dict:
    """Read ``<stem>_band_stats.json`` and check the keys the dataset needs.

    Args:
        path: The JSON file.
        needed: Stats key (``sentinel2_l1c``, ``aster``, ...) -> modality whose bands it describes.
        used_bands: Stats key -> band indices actually normalised (their std must be > 0).

    Returns:
        Stats key -> ``{"mean": float64 (C,), "std": float64 (C,)}``, plus ``"count"`` int64 (C,) (valid pixels
        per band) when the file records it (the converter's files do, MMEarth's do not).

    Raises:
        KeyError: a needed key, or its ``mean`` / ``std`` entry, is missing (lists the keys present).
        ValueError: wrong number of values, non-finite values, or a zero std on a used band.
    """
    data = read_json_object(path)
    out = {}
    for key, mod in needed.items():
        if key not in data:
            raise KeyError(f"{path}: band stats for {key!r} missing; keys present: {', '.join(sorted(data))}")
        entry = {}
        for field in ("mean", "std"):
            if not isinstance(data[key], dict) or field not in data[key]:
                raise KeyError(f"{path}: key {key!r} has no {field!r} list")
            vals = np.asarray(data[key][field], dtype=np.float64)
            if vals.shape != (len(mod.bands),):
                raise ValueError(
                    f"{path}: {key}.{field} has {vals.size} values, modality {mod.name!r} has "
                    f"{len(mod.bands)} bands ({', '.join(mod.bands)})"
                )
            entry[field] = vals
        count = data[key].get("count")
        if isinstance(count, list) and len(count) == len(mod.bands):
            entry["count"] = np.asarray(count, dtype=np.int64)
        for i in used_bands.get(key, ()):
            m, s = entry["mean"][i], entry["std"][i]
            if not (math.isfinite(m) and math.isfinite(s) and s > 0):
                raise ValueError(f"{path}: {key} band {mod.bands[i]} has mean {m}, std {s}; need finite, std > 0")
        out[key] = entry
    return out


def read_s2_products(h5: h5py.File, path: Path, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    """Sentinel-2 product code per HDF5 row from ``metadata`` field 1 (``S2_type``): 0 = l1c, 1 = l2a.

    Fields are read by position, as field names differ between files (``data_formats.md`` 1.9).

    Returns:
        uint8 array (N,) of product codes; rows outside ``rows`` are 255 (not checked).

    Raises:
        KeyError: no ``metadata`` dataset. ValueError: not a compound with >= 2 fields, or a row in
        ``rows`` holds an S2_type other than l1c / l2a (names the row and value).
    """
    if "metadata" not in h5:
        raise KeyError(f"{path}: dataset 'metadata' (tile_id, S2_type) missing; needed to pick Sentinel-2 stats")
    dset = h5["metadata"]
    names = dset.dtype.names
    if names is None or len(names) < 2 or dset.ndim != 1:
        raise ValueError(f"{path}: 'metadata' must be a 1-D compound (tile_id, S2_type), got {dset.dtype} {dset.shape}")
    field = dset.fields(names[1])
    codes = np.full(dset.shape[0], 255, dtype=np.uint8)
    lookup = {p.encode(): i for i, p in enumerate(S2_PRODUCTS)}
    for start in range(0, dset.shape[0], block):
        vals = field[start:start + block]
        uniq, inv = np.unique(vals, return_inverse=True)
        mapped = np.array([lookup.get(bytes(u).strip().lower(), 255) for u in uniq], dtype=np.uint8)
        codes[start:start + block] = mapped[inv]
    bad = rows[codes[rows] == 255]
    if bad.size:
        val = bytes(field[int(bad[0])]).decode(errors="replace")
        raise ValueError(f"{path}: metadata row {int(bad[0])} has S2_type {val!r}; expected one of {S2_PRODUCTS}")
    return codes


def check_modality_dataset(h5: h5py.File, path: Path, mod: Modality, num_rows: int, tile_size: int | None) -> int | None:
    """Check that dataset ``mod.name`` exists with MMEarth's dtype and shape; return its tile size (pixel level).

    Raises:
        KeyError: the dataset is missing (lists the datasets present).
        ValueError: wrong dtype, rank, channel count, row count, non-square tiles or a tile size
            different from the other modalities'.
    """
    if mod.name not in h5:
        raise KeyError(f"{path}: dataset {mod.name!r} missing; datasets present: {', '.join(sorted(h5.keys()))}")
    dset = h5[mod.name]
    if not isinstance(dset, h5py.Dataset):
        raise ValueError(f"{path}: {mod.name!r} is a group, expected a dataset")
    if dset.dtype.newbyteorder("=") != np.dtype(mod.dtype):
        raise ValueError(f"{path}: dataset {mod.name!r} has dtype {dset.dtype}, MMEarth stores {mod.dtype}")
    shape = dset.shape
    if mod.level == "pixel":
        expected = f"(N, {len(mod.bands)}, S, S)"
        ok = len(shape) == 4 and shape[1] == len(mod.bands) and shape[2] == shape[3]
    else:
        expected = f"(N, {len(mod.bands)})"
        ok = len(shape) == 2 and shape[1] == len(mod.bands)
    if not ok:
        raise ValueError(f"{path}: dataset {mod.name!r} has shape {shape}, expected {expected} ({', '.join(mod.bands)})")
    if shape[0] != num_rows:
        raise ValueError(f"{path}: dataset {mod.name!r} has {shape[0]} rows, 'metadata' has {num_rows}")
    if mod.level == "pixel":
        if tile_size is not None and shape[2] != tile_size:
            raise ValueError(f"{path}: dataset {mod.name!r} has {shape[2]} px tiles, other modalities {tile_size} px")
        return shape[2]
    return tile_size
