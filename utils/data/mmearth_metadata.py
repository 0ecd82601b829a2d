"""Image-level metadata of an MMEarth file set as the (sin, cos) pairs of :mod:`multimae.metadata`.

Where each field comes from (format: ``../shared/reference/data_formats.md`` sections 1.2 and 1.4):

- ``lat``, ``lon``, ``month``: the HDF5 datasets of the same name, which already hold the pairs
  (sin / cos of the latitude and longitude in radians, of 2 pi m / 12); read per row with the other modalities.
- ``week``, ``day_of_year``, ``hour``: the acquisition date of ``<stem>_tile_info.json``, joined to the HDF5 rows
  through ``metadata`` field 0 (tile id): ``S2_DATE``, else (files written by ``tools/geotiff_to_mmearth.py``,
  whose Sentinel-2 sources carry no date) ``DATES[MONTH_SOURCE]``, the date the HDF5 month was taken from.
  Dates are ``YYYY-MM-DD`` with an optional ``THH:MM[:SS...]`` (UTC); ``hour`` needs the time part.

A value that is NaN or absent for a row gives a NaN pair (the encoder's missing embedding). A field the file
set cannot provide at all (its HDF5 dataset or the tile-info file is missing, no tile has a date, no date has
a time) is NaN for every row, with one warning that names the field and the file.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from multimae.domains import Modality, get_modality
from multimae.metadata import METADATA_FIELDS, check_metadata_fields, cyclic_encoding
from utils.data.mmearth_files import MMEarthFiles

__all__ = ["HDF5_FIELDS", "TILE_INFO_FIELDS", "MMEarthMetadata", "parse_date", "date_values"]

#: Metadata field -> HDF5 dataset holding its (sin, cos) pair per row.
HDF5_FIELDS = {"lat": "lat", "lon": "lon", "month": "month"}
#: Fields computed from the tile-info acquisition date.
TILE_INFO_FIELDS = ("week", "day_of_year", "hour")

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}(?:\.\d+)?))?)?")


def parse_date(text) -> tuple[dt.date, float | None] | None:
    """``YYYY-MM-DD[THH:MM[:SS[.fff]]]`` -> (date, UTC hour of day as a fraction or None), None if unreadable."""
    if not isinstance(text, str):
        return None
    m = _DATE.match(text.strip())
    if m is None:
        return None
    try:
        day = dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
    hour = None if m[4] is None else int(m[4]) + int(m[5]) / 60 + (float(m[6]) if m[6] else 0.0) / 3600
    return day, hour


def date_values(day: dt.date, hour: float | None) -> dict[str, float]:
    """The tile-info fields of one acquisition: ISO week, day of the year (1-based) and UTC hour (NaN if unknown)."""
    return {"week": float(day.isocalendar().week), "day_of_year": float(day.timetuple().tm_yday),
            "hour": float("nan") if hour is None else hour}


def _tile_date(entry) -> str | None:
    if not isinstance(entry, dict):
        return None
    date = entry.get("S2_DATE")
    if date is None and isinstance(entry.get("DATES"), dict):
        date = entry["DATES"].get(entry.get("MONTH_SOURCE"))
    return date


@lru_cache(maxsize=4)
def _tile_info_pairs(tile_info: str, h5_path: str, fields: tuple[str, ...], stamp: tuple) -> dict[str, np.ndarray]:
    """float32 (num_rows, 2) pairs of tile-info fields for every HDF5 row (cached per file version: the train and
    validation datasets read the large JSON once)."""
    with h5py.File(h5_path, "r") as h5:
        if "metadata" not in h5 or h5["metadata"].dtype.names is None:
            raise KeyError(f"{h5_path}: dataset 'metadata' (tile_id, S2_type) missing; needed to join "
                           f"{Path(tile_info).name} to the rows")
        dset = h5["metadata"]
        ids = dset.fields(dset.dtype.names[0])[:]  # by position: field names differ between files
    info = json.loads(Path(tile_info).read_text())
    values = {f: np.full(len(ids), np.nan) for f in fields}
    no_entry, timed = 0, 0
    for row, raw in enumerate(ids):
        entry = info.get(bytes(raw).decode(errors="replace").strip("\x00 "))
        no_entry += entry is None
        parsed = parse_date(_tile_date(entry))
        if parsed is None:
            continue
        timed += parsed[1] is not None
        for f, v in date_values(*parsed).items():
            if f in values:
                values[f][row] = v
    if no_entry:
        warnings.warn(f"{tile_info}: {no_entry} of {len(ids)} rows of {Path(h5_path).name} have no tile-info entry; "
                      f"their {', '.join(fields)} use the learned missing embedding", stacklevel=2)
    for f in fields:
        if np.isnan(values[f]).all():
            what = "a time of day (THH:MM)" if f == "hour" and not timed else "a readable acquisition date"
            warnings.warn(f"metadata field {f!r} (model.metadata) is absent from {tile_info}: no tile has {what}; "
                          "the learned missing embedding is used for every sample", stacklevel=2)
    return {f: cyclic_encoding(values[f], METADATA_FIELDS[f].period) for f in fields}


class MMEarthMetadata:
    """The metadata pairs of the rows of an MMEarth file set.

    Args:
        files: The file set.
        fields: Field names of :data:`multimae.metadata.METADATA_FIELDS`.

    Attributes:
        modalities: The HDF5 metadata modalities to read per row with the others ({name: Modality}).

    Raises:
        ValueError: an unknown or repeated field (names ``model.metadata``).
        KeyError: tile-info fields without the HDF5 ``metadata`` dataset that joins them to rows.
    """

    def __init__(self, files: MMEarthFiles, fields: Sequence[str]) -> None:
        self.fields = check_metadata_fields(fields)
        with h5py.File(files.h5, "r") as h5:
            present = set(h5)
        self.modalities: dict[str, Modality] = {}
        self._absent: list[str] = []
        for f in self.fields:
            if f in HDF5_FIELDS:
                if HDF5_FIELDS[f] in present:
                    self.modalities[HDF5_FIELDS[f]] = get_modality(HDF5_FIELDS[f])
                else:
                    self._absent.append(f)
                    warnings.warn(f"metadata field {f!r} (model.metadata) is absent from {files.h5}: no dataset "
                                  f"{HDF5_FIELDS[f]!r}; the learned missing embedding is used for every sample",
                                  stacklevel=3)
        wanted = tuple(f for f in self.fields if f in TILE_INFO_FIELDS)
        self._table: dict[str, np.ndarray] = {}
        if wanted and files.tile_info is None:
            self._absent += list(wanted)
            for f in wanted:
                warnings.warn(f"metadata field {f!r} (model.metadata) is absent from the file set of {files.h5}: no "
                              f"{files.stem}_tile_info.json; the learned missing embedding is used for every sample",
                              stacklevel=3)
        elif wanted:
            stat = files.tile_info.stat()
            self._table = _tile_info_pairs(str(files.tile_info), str(files.h5), wanted,
                                           (stat.st_mtime_ns, stat.st_size, files.h5.stat().st_mtime_ns))

    def batch(self, raw: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """{field: float32 (B, 2)} for HDF5 ``rows``; ``raw`` holds the rows' HDF5 metadata modalities (B, 2)."""
        out = {}
        for f in self.fields:
            if f in self._absent:
                out[f] = np.full((len(rows), 2), np.nan, np.float32)
            elif f in HDF5_FIELDS:
                out[f] = np.asarray(raw[HDF5_FIELDS[f]], dtype=np.float32)
            else:
                out[f] = self._table[f][rows]
        return out
