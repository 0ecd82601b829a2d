"""The converter spec (YAML) and the scenes it describes: which rasters fill which MMEarth modality.

A *source* is one product (an S2 level, S1, a DEM, a class map). It comes in one of two layouts:

- **one multi-band raster per scene** (TerraMesh: ``S2L1C/<scene>.tif``): ``bands`` lists the raster's
  bands in file order;
- **one single-band raster per band** at its native resolution, in one folder per scene (Sentinel-2
  products, SSL4EO-S12, Major-TOM, BigEarthNet): ``band_files`` is the file-name pattern with a
  ``{band}`` placeholder, and ``bands`` names the bands to read (any order).

::

    sources:
      S2L1C:                         # multi-band files under <src>/S2L1C/ (or set ``folder:``)
        modality: sentinel2
        s2_type: l1c                 # sentinel2 only: l1c or l2a; each S2 source gives its own tiles
        bands: [B01, B02, B03, B04, B05, B06, B07, B08, B8A, B09, B10, B11, B12]   # file order
      DEM:
        modality: aster
        bands: [elevation]
        slope: true                  # derive aster slope (degrees) from the elevation band
      LULC:
        modality: dynamic_world
        bands: [label]
        remap: {1: 1, 8: null}       # source class id -> stored MMEarth code; null = no-data
      s2a:                           # per-band files: <src>/s2a/<location>/<date>T.../B1.tif ...
        modality: sentinel2
        s2_type: l2a
        path: "{location}/{date}T*"  # where the scene folders are, relative to the source folder
        band_files: "{band}.tif"     # B1.tif, B01.tif, b01.tif all name B01
        bands: [B01, B02, B03, B04, B05, B06, B07, B08, B8A, B09, B11, B12]
        nodata: 0
        fields: {baseline: {file: metadata.json, key: PROCESSING_BASELINE}}
        offset_rules:                # per scene; the first rule that holds sets the offset
          - {field: baseline, min: 4.0, offset: -1000}
    scenes: {match: [location], pair: date_rank, max_days: 31}
    grid: s2a                        # whose finest raster is the scene grid (default: the first source)
    month_from: [S1RTC]              # sources whose acquisition date sets ``month`` (first found wins)

**Bands** are the registry's names (:mod:`multimae.domains`; Sentinel-2 in any spelling, ``B1`` =
``B01``) and are placed **by name** into the modality's stored order, so a raster in B08, B8A order
lands in MMEarth's B8A, B08 order. In a multi-band source a ``null`` entry skips that raster band. In a
per-band source ``bands`` may also be a mapping ``registry band: name in the file names`` (``{asc_VV:
VV}``).

**Path patterns** (``path``, ``band_files``): ``/`` separates folder levels; ``*`` matches any
characters and ``?`` one character within a level; ``{name}`` matches one or more characters and
records them as the scene field ``name``, ``{name:REGEX}`` restricts it; ``{date}`` matches
``YYYYMMDD`` or ``YYYY-MM-DD`` and is the acquisition date. ``*`` takes as much as it can and a
field as little as it can (``*_{band}.tif`` gives ``B01`` for ``S2A_MSIL2A_..._B01.tif``, as BigEarthNet
names its files). ``path`` points at files for multi-band
sources and at folders for per-band sources. Without ``path``, a multi-band source holds
``<scene>.tif`` / ``.tiff`` files (field ``scene``) and a per-band source is itself the one scene
folder (``folder: .`` for the ``--src`` folder).

**Fields** also come from a JSON file next to the rasters: ``fields: {name: {file: metadata.json,
key: KEY}}`` (``file`` relative to the scene folder, or to the folder of a multi-band file; it may use
``{field}`` placeholders of ``path``).

**Scenes** pair the sources' entries: ``scenes.match`` lists the fields that name one scene in every
source (default: the fields all sources share). ``scenes.pair: exact`` (default) wants exactly one
entry per source and scene; ``pair: date_rank`` sorts each source's entries of one ``match`` key by
date and pairs the k-th of each (SSL4EO-S12's seasons), refusing a pair whose dates span more than
``scenes.max_days``. The scene name is the ``match`` values joined by ``_`` (plus ``_t<k>`` with
``date_rank``; the folder name when there are no fields).

**Grid and resampling**: every source is read on the grid (CRS, transform, size) of the ``grid``
source's finest raster. ``resampling: none`` (the default for multi-band sources) requires a raster to
lie on that grid exactly (co-registered inputs); otherwise rasters off the grid are warped onto it
(``rasterio.vrt.WarpedVRT``) with the named ``rasterio.enums.Resampling`` method: ``bilinear`` by
default for per-band continuous sources, ``nearest`` (or ``mode``) for class maps and flags. Grid
pixels without a source pixel become no-data.

**Values**: stored = raw * ``scale`` + offset, where offset is the first ``offset_rules`` entry whose
condition holds for the scene (``min`` / ``max``: the field's value as a number, inclusive; ``match``:
a regular expression the whole value must match), else ``offset``. This removes e.g. the +1000 of
Sentinel-2 processing baseline 04.00 and later (``BOA_ADD_OFFSET`` = -1000). Other keys per source:
``folder``, ``nodata`` (source no-data, default the raster's own), ``date_tag`` (raster tag holding the
acquisition date, default ``datetime``), ``dates`` (scene -> ``YYYY-MM-DD``, wins over ``{date}`` and
the tag) and, for sentinel1, ``orbit_field``: a field holding ``ASCENDING`` / ``DESCENDING`` per scene,
which puts polarisation bands (``bands: [VV, VH]``) into the ``asc_`` or ``desc_`` channels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import date as _date
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
import yaml
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from multimae.domains import MODALITIES, band_indices, canonical_band_name, get_modality
from utils.data.mmearth_files import invalid_mask

__all__ = [
    "ConversionError", "PathPattern", "OffsetRule", "SourceSpec", "ConversionSpec", "load_spec", "read_spec_yaml",
    "parse_spec", "SourceEntry", "SceneRef", "find_scenes", "Scene", "open_scene", "to_stored",
]

_SOURCE_KEYS = {"folder", "modality", "bands", "s2_type", "remap", "slope", "nodata", "scale", "offset",
                "date_tag", "dates", "path", "band_files", "resampling", "offset_rules", "fields", "orbit_field"}
_TOP_KEYS = {"sources", "month_from", "description", "scenes", "grid"}
_SCENE_KEYS = {"match", "pair", "max_days"}
_RULE_KEYS = {"field", "min", "max", "match", "offset"}
_DATE = re.compile(r"(\d{4})[-:]?(\d{2})[-:]?(\d{2})")
_DATE_FIELD = r"\d{4}-?\d{2}-?\d{2}"
_PLACEHOLDER = re.compile(r"\{(\w+)(?::((?:[^{}]|\{[^{}]*\})+))?\}")
_POLARISATIONS = ("VV", "VH", "HH", "HV")
_ORBITS = {"ASCENDING": "asc", "DESCENDING": "desc"}


class ConversionError(ValueError):
    """Bad spec or bad input rasters; the message names the file and the spec key."""


@dataclass(frozen=True)
class PathPattern:
    """A compiled path pattern (see the module docstring): one regular expression per folder level.

    Attributes:
        text: The pattern as written in the spec.
        parts: One compiled regular expression per ``/``-separated level, matched against whole names.
        fields: Field names, in order of appearance.
    """

    text: str
    parts: tuple[re.Pattern, ...]
    fields: tuple[str, ...]

    @classmethod
    def compile(cls, text: str, where: str) -> PathPattern:
        """Compile ``text``; ``where`` ("spec X: sources.Y.path") prefixes error messages.

        Raises:
            ConversionError: empty, absolute or ``..`` levels, a repeated field, or a bad regex.
        """
        if not isinstance(text, str) or not text.strip("/"):
            raise ConversionError(f"{where}: must be a non-empty path pattern such as '{{scene}}/*'")
        if text.startswith("/") or ".." in text.split("/"):
            raise ConversionError(f"{where}: {text!r} must stay inside the source folder (no leading / or ..)")
        fields: list[str] = []
        parts = []
        for level in text.split("/"):
            if not level:
                raise ConversionError(f"{where}: {text!r} has an empty folder level ('//')")
            rx, pos = "", 0
            for m in _PLACEHOLDER.finditer(level):
                rx += _glob_to_regex(level[pos:m.start()], where, text)
                name, custom = m.group(1), m.group(2)
                if name in fields:
                    raise ConversionError(f"{where}: field {{{name}}} appears twice in {text!r}")
                fields.append(name)
                body = custom or (_DATE_FIELD if name == "date" else r"[^/]+?")
                rx += f"(?P<{name}>{body})"
                pos = m.end()
            rx += _glob_to_regex(level[pos:], where, text)
            try:
                parts.append(re.compile(rx))
            except re.error as err:
                raise ConversionError(f"{where}: bad regular expression in {text!r}: {err}") from None
        return cls(text, tuple(parts), tuple(fields))

    def find(self, root: Path, want_dirs: bool) -> list[tuple[Path, dict[str, str]]]:
        """Entries under ``root`` matching the pattern: (path, fields), sorted by path. The last level
        matches folders if ``want_dirs`` else files; hidden names (``.x``) are skipped."""
        level: list[tuple[Path, dict[str, str]]] = [(root, {})]
        for i, rx in enumerate(self.parts):
            last = i == len(self.parts) - 1
            found = []
            for folder, fields in level:
                for entry in sorted(folder.iterdir()):
                    if entry.name.startswith(".") or (entry.is_dir() != (want_dirs or not last)):
                        continue
                    m = rx.fullmatch(entry.name)
                    if m:
                        found.append((entry, {**fields, **m.groupdict()}))
            level = found
        return level


def _glob_to_regex(text: str, where: str, whole: str) -> str:
    if "{" in text or "}" in text:
        raise ConversionError(f"{where}: unbalanced or malformed {{field}} in {whole!r}")
    return "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in text)


@dataclass(frozen=True)
class OffsetRule:
    """``offset`` applies to a scene when its ``field`` satisfies every given condition.

    Attributes:
        field: Scene field (from ``path`` or ``fields``).
        min, max: Inclusive bounds on the field's value read as a number (``"0400"`` -> 400).
        match: Regular expression the whole value must match.
        offset: Value added after ``scale`` (stored = raw * scale + offset).
    """

    field: str
    offset: float
    min: float | None = None
    max: float | None = None
    match: str | None = None

    def holds(self, value: str, where: str) -> bool:
        """Whether the rule applies to a field ``value``; ``where`` names the file for errors.

        Raises:
            ConversionError: ``min`` / ``max`` given and ``value`` is not a number.
        """
        if self.match is not None and not re.fullmatch(self.match, value):
            return False
        if self.min is None and self.max is None:
            return True
        try:
            number = float(value)
        except ValueError:
            raise ConversionError(f"{where}: field {self.field!r} = {value!r} is not a number, but an "
                                  f"offset rule compares it with min / max") from None
        return (self.min is None or number >= self.min) and (self.max is None or number <= self.max)


@dataclass(frozen=True)
class SourceSpec:
    """One source of the spec (see the module docstring for the keys).

    Attributes:
        bands: Registry band names: file order for multi-band sources (``None`` = skipped band), the
            bands to read for per-band sources; bare polarisations (``VV``) with ``orbit_field``.
        channels: For each entry of ``bands``, its channel index in the modality's stored order
            (``None`` for a skipped band or with ``orbit_field``: see :meth:`channels_for`).
        band_tokens: Per-band sources: the band's name as it appears in the file names.
        path: Compiled ``path`` pattern, or ``None`` (the default layouts).
        band_files: Compiled ``band_files`` pattern (one level, with a ``band`` field), or ``None`` for
            a multi-band source.
        resampling: ``none`` (must lie on the scene grid) or a ``rasterio.enums.Resampling`` name.
        fields: Field name -> (JSON file pattern, key) read per scene.
    """

    name: str
    folder: str
    modality: str
    bands: tuple[str | None, ...]
    channels: tuple[int | None, ...]
    s2_type: str | None = None
    remap: dict[int, int | None] | None = None
    slope: bool = False
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    date_tag: str = "datetime"
    dates: dict[str, str] = field(default_factory=dict)
    path: PathPattern | None = None
    band_files: PathPattern | None = None
    band_tokens: tuple[str, ...] = ()
    resampling: str = "none"
    offset_rules: tuple[OffsetRule, ...] = ()
    fields: dict[str, tuple[str, str]] = field(default_factory=dict)
    orbit_field: str | None = None

    @property
    def per_band(self) -> bool:
        """True for one raster per band (``band_files``), False for one multi-band raster per scene."""
        return self.band_files is not None

    @property
    def path_fields(self) -> tuple[str, ...]:
        """Fields found with the scene on disk: those of ``path`` (``scene`` for the default multi-band
        layout, none for a lone per-band folder)."""
        if self.path is not None:
            return self.path.fields
        return () if self.per_band else ("scene",)

    @property
    def field_names(self) -> tuple[str, ...]:
        """Every scene field of this source: :attr:`path_fields` and the ``fields`` read from JSON."""
        return self.path_fields + tuple(f for f in self.fields if f not in self.path_fields)

    def channels_for(self, orbit: str | None) -> tuple[int | None, ...]:
        """Channels of ``bands`` for a scene: ``channels``, or with ``orbit_field`` the ``asc_`` /
        ``desc_`` channels of the polarisations for ``orbit`` (``"asc"`` or ``"desc"``)."""
        if self.orbit_field is None:
            return self.channels
        return tuple(band_indices(self.modality, [f"{orbit}_{b}"])[0] for b in self.bands)


@dataclass(frozen=True)
class ConversionSpec:
    """A parsed spec: its sources in file order, how scenes pair up, the grid source and the sources
    whose date sets ``month``."""

    path: str
    sources: tuple[SourceSpec, ...]
    month_from: tuple[str, ...]
    match: tuple[str, ...] = ()
    pair: str = "exact"
    max_days: float | None = None
    grid: str = ""

    @property
    def s2_sources(self) -> tuple[SourceSpec, ...]:
        """The sentinel2 sources; each one yields its own tiles (one per S2 product)."""
        return tuple(s for s in self.sources if s.modality == "sentinel2")


def _fail(path, key: str, msg: str) -> ConversionError:
    return ConversionError(f"spec {path}: {key}: {msg}")


def _parse_remap(path, key: str, remap, modality) -> dict[int, int | None]:
    if not isinstance(remap, dict) or not remap:
        raise _fail(path, key, "must be a non-empty mapping 'source id: stored code' (null = no-data)")
    allowed = set(modality.class_values)
    out = {}
    for src, dst in remap.items():
        if not isinstance(src, int) or not (dst is None or isinstance(dst, int)):
            raise _fail(path, f"{key}.{src}", f"ids must be integers (or null), got {src!r}: {dst!r}")
        if dst is not None and dst not in allowed:
            raise _fail(path, f"{key}.{src}", f"{dst} is not a stored {modality.name} class code; valid: "
                        f"{sorted(allowed)} (null = no-data)")
        out[src] = dst
    return out


def _parse_bands(path, key: str, raw, mod, per_band: bool, orbit: bool):
    """-> (canonical bands, channels, file-name tokens)."""
    bands = raw.get("bands")
    if per_band and isinstance(bands, dict) and bands:
        names, tokens = list(bands), [str(v) for v in bands.values()]
    elif isinstance(bands, list) and bands:
        names, tokens = bands, [None if b is None else str(b) for b in bands]
    else:
        what = "the bands to read (or a mapping band: name in the file names)" if per_band else \
            "the raster's band names in file order (null skips a band)"
        raise _fail(path, f"{key}.bands", f"must list {what}")
    if per_band and any(b is None for b in names):
        raise _fail(path, f"{key}.bands", "null entries only skip bands of a multi-band raster")
    if orbit:
        canon = tuple(str(b).upper() for b in names)
        bad = [b for b in canon if b not in _POLARISATIONS]
        if bad:
            raise _fail(path, f"{key}.bands", f"with orbit_field, list polarisations {list(_POLARISATIONS)} "
                        f"(the orbit comes from the field), got {bad}")
        channels = (None,) * len(canon)
        named = list(canon)
    else:
        canon = tuple(None if b is None else canonical_band_name(mod.name, str(b)) for b in names)
        try:
            channels = tuple(None if b is None else band_indices(mod.name, [b])[0] for b in canon)
        except KeyError as err:
            raise _fail(path, f"{key}.bands", err.args[0]) from None
        named = [c for c in channels if c is not None]
    if len(set(named)) != len(named):
        raise _fail(path, f"{key}.bands", "a band is listed twice")
    return canon, channels, tuple(t for t in tokens if t is not None) if per_band else ()


def _parse_rules(path, key: str, rules, fields: tuple[str, ...]) -> tuple[OffsetRule, ...]:
    if not isinstance(rules, list):
        raise _fail(path, key, "must be a list of {field, min / max / match, offset} rules")
    out = []
    for i, rule in enumerate(rules):
        k = f"{key}[{i}]"
        if not isinstance(rule, dict) or set(rule) - _RULE_KEYS or "field" not in rule or "offset" not in rule:
            raise _fail(path, k, f"needs 'field' and 'offset' and at least one of min, max, match; valid keys: "
                        f"{sorted(_RULE_KEYS)}")
        if not {"min", "max", "match"} & set(rule):
            raise _fail(path, k, "needs a condition: min, max or match")
        if rule["field"] not in fields:
            raise _fail(path, f"{k}.field", f"{rule['field']!r} is not a field of this source; its fields: "
                        f"{list(fields) or 'none (add a {field} to path, or fields)'}")
        try:
            lo = None if rule.get("min") is None else float(rule["min"])
            hi = None if rule.get("max") is None else float(rule["max"])
            offset = float(rule["offset"])
        except (TypeError, ValueError):
            raise _fail(path, k, "min, max and offset must be numbers") from None
        match = rule.get("match")
        if match is not None:
            try:
                re.compile(str(match))
            except re.error as err:
                raise _fail(path, f"{k}.match", f"bad regular expression: {err}") from None
        out.append(OffsetRule(str(rule["field"]), offset, lo, hi, None if match is None else str(match)))
    return tuple(out)


def _parse_fields(path, key: str, raw) -> dict[str, tuple[str, str]]:
    if not isinstance(raw, dict):
        raise _fail(path, key, "must map field names to {file: <json file>, key: <key>}")
    out = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"file", "key"}:
            raise _fail(path, f"{key}.{name}", "must be {file: <json file next to the rasters>, key: <top-level key>}")
        out[str(name)] = (str(entry["file"]), str(entry["key"]))
    return out


def _parse_source(path, name: str, raw) -> SourceSpec:
    key = f"sources.{name}"
    if not isinstance(raw, dict):
        raise _fail(path, key, "must be a mapping with at least 'modality' and 'bands'")
    unknown = set(raw) - _SOURCE_KEYS
    if unknown:
        raise _fail(path, key, f"unknown keys {sorted(unknown)}; valid keys: {sorted(_SOURCE_KEYS)}")
    try:
        mod = get_modality(raw.get("modality"))
    except KeyError as err:
        raise _fail(path, f"{key}.modality", err.args[0]) from None
    if mod.level != "pixel":
        raise _fail(path, f"{key}.modality", f"{mod.name!r} is image-level; only pixel-level maps come from rasters")
    where = f"spec {path}: {key}"
    band_files = None
    if raw.get("band_files") is not None:
        band_files = PathPattern.compile(raw["band_files"], f"{where}.band_files")
        if len(band_files.parts) != 1 or band_files.fields != ("band",):
            raise _fail(path, f"{key}.band_files", f"must be one file-name pattern with a single {{band}} field, "
                        f"e.g. 'B{{band}}.tif' or 's2_{{band}}.jp2'; got {raw['band_files']!r}")
    pattern = None if raw.get("path") is None else PathPattern.compile(raw["path"], f"{where}.path")
    if pattern is not None and "band" in pattern.fields:
        raise _fail(path, f"{key}.path", "{band} belongs in band_files, not in path")
    fields = _parse_fields(path, f"{key}.fields", raw["fields"]) if raw.get("fields") is not None else {}
    orbit_field = raw.get("orbit_field")
    if orbit_field is not None and mod.name != "sentinel1":
        raise _fail(path, f"{key}.orbit_field", f"only sentinel1 sources have an orbit, not {mod.name!r}")
    canon, channels, tokens = _parse_bands(path, key, raw, mod, band_files is not None, orbit_field is not None)
    s2_type = raw.get("s2_type")
    if (mod.name == "sentinel2") != (s2_type is not None) or s2_type not in (None, "l1c", "l2a"):
        raise _fail(path, f"{key}.s2_type", "sentinel2 sources need s2_type l1c or l2a; other modalities none")
    remap = raw.get("remap")
    if remap is not None:
        if mod.kind != "categorical":
            raise _fail(path, f"{key}.remap", f"only categorical modalities take a remap, not {mod.name!r}")
        remap = _parse_remap(path, f"{key}.remap", remap, mod)
    slope = bool(raw.get("slope", False))
    if slope and (mod.name != "aster" or "elevation" not in canon or "slope" in canon):
        raise _fail(path, f"{key}.slope", "needs modality aster with an 'elevation' band and no 'slope' band")
    dates = {str(k): str(v) for k, v in (raw.get("dates") or {}).items()}
    for scene, date in dates.items():
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            raise _fail(path, f"{key}.dates.{scene}", f"{date!r} is not a YYYY-MM-DD date")
    try:
        nodata = None if raw.get("nodata") is None else float(raw["nodata"])
        scale, offset = float(raw.get("scale", 1.0)), float(raw.get("offset", 0.0))
    except (TypeError, ValueError):
        raise _fail(path, key, "nodata, scale and offset must be numbers") from None
    discrete = mod.kind in ("categorical", "flags")
    default = "none" if band_files is None else ("nearest" if discrete else "bilinear")
    resampling = str(raw.get("resampling", default))
    if resampling != "none" and resampling not in Resampling.__members__:
        raise _fail(path, f"{key}.resampling", f"{resampling!r} is not 'none' or a rasterio Resampling method: "
                    f"{', '.join(Resampling.__members__)}")
    if discrete and resampling not in ("none", "nearest", "mode"):
        raise _fail(path, f"{key}.resampling", f"{mod.name} holds class codes or flags: use nearest or mode, "
                    f"not {resampling!r} (it would invent codes)")
    spec = SourceSpec(
        name=name, folder=str(raw.get("folder", name)), modality=mod.name, bands=canon, channels=channels,
        s2_type=s2_type, remap=remap, slope=slope, nodata=nodata, scale=scale, offset=offset,
        date_tag=str(raw.get("date_tag", "datetime")), dates=dates, path=pattern, band_files=band_files,
        band_tokens=tokens, resampling=resampling, fields=fields,
        orbit_field=None if orbit_field is None else str(orbit_field),
    )
    if orbit_field is not None:
        if orbit_field not in spec.field_names:
            raise _fail(path, f"{key}.orbit_field", f"{orbit_field!r} is not a field of this source; its fields: "
                        f"{list(spec.field_names)}")
    if raw.get("offset_rules") is not None:
        rules = _parse_rules(path, f"{key}.offset_rules", raw["offset_rules"], spec.field_names)
        spec = dataclasses.replace(spec, offset_rules=rules)
    return spec


def _parse_scenes(path, raw, sources: tuple[SourceSpec, ...]) -> tuple[tuple[str, ...], str, float | None]:
    raw = raw or {}
    if not isinstance(raw, dict) or set(raw) - _SCENE_KEYS:
        raise _fail(path, "scenes", f"must be a mapping with keys among {sorted(_SCENE_KEYS)}")
    pair = str(raw.get("pair", "exact"))
    if pair not in ("exact", "date_rank"):
        raise _fail(path, "scenes.pair", f"must be exact or date_rank, got {pair!r}")
    path_fields = [set(s.path_fields) for s in sources]
    common = set.intersection(*path_fields) - ({"date"} if pair == "date_rank" else set())
    match = raw.get("match")
    if match is None:
        match = [f for f in sources[0].path_fields if f in common]
    if not isinstance(match, list) or not all(isinstance(m, str) for m in match):
        raise _fail(path, "scenes.match", f"must list field names, got {match!r}")
    for s, own in zip(sources, path_fields):
        missing = [m for m in match if m not in own]
        if missing:
            raise _fail(path, "scenes.match", f"field(s) {missing} are not in sources.{s.name}.path "
                        f"(its fields: {sorted(own) or 'none'})")
        if pair == "date_rank" and "date" not in own:
            raise _fail(path, "scenes.pair", f"date_rank needs a {{date}} field in sources.{s.name}.path")
    max_days = raw.get("max_days")
    if max_days is not None:
        if pair != "date_rank":
            raise _fail(path, "scenes.max_days", "only applies with pair: date_rank")
        if not isinstance(max_days, (int, float)) or max_days < 0:
            raise _fail(path, "scenes.max_days", f"must be a number of days >= 0, got {max_days!r}")
    return tuple(match), pair, None if max_days is None else float(max_days)


def read_spec_yaml(path) -> dict:
    """The YAML mapping of a spec file.

    Raises:
        ConversionError: the file cannot be read, is not YAML, or is not a mapping with ``sources``.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConversionError(f"cannot read spec {path}: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), dict) or not raw["sources"]:
        raise ConversionError(f"spec {path}: needs a non-empty 'sources' mapping (folder -> modality, bands)")
    return raw


def load_spec(path) -> ConversionSpec:
    """Read and validate a converter spec.

    Raises:
        ConversionError: unreadable YAML, unknown keys, an unknown modality or band name (the message
            lists the valid ones), a bad remap, pattern, offset rule or resampling method, scene fields
            that not every source has, or two sources writing the same channel.
    """
    return parse_spec(read_spec_yaml(path), path)


def parse_spec(raw: dict, path, extra_keys: tuple[str, ...] = (),
               extra_sources: tuple[SourceSpec, ...] = ()) -> ConversionSpec:
    """Validate a spec's YAML mapping (:func:`read_spec_yaml`); see :func:`load_spec`.

    Args:
        raw: The mapping.
        path: The spec file, for messages.
        extra_keys: Top-level keys another reader consumes (skipped here, listed as valid in errors).
        extra_sources: Sources parsed by another reader (the fine-tuning label raster of
            :mod:`utils.data.geotiff`, whose ``modality`` is not a registry modality), appended after the
            spec's own: they take part in scene discovery, pairing and grid reading like any source.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), dict) or not raw["sources"]:
        raise ConversionError(f"spec {path}: needs a non-empty 'sources' mapping (folder -> modality, bands)")
    unknown = set(raw) - _TOP_KEYS - set(extra_keys)
    if unknown:
        raise _fail(path, "top level", f"unknown keys {sorted(unknown)}; valid keys: "
                    f"{sorted(_TOP_KEYS | set(extra_keys))}")
    sources = tuple(_parse_source(path, str(k), v) for k, v in raw["sources"].items()) + tuple(extra_sources)
    owner: dict[tuple[str, int], str] = {}
    for src in sources:
        if src.modality == "sentinel2":
            continue  # each S2 source makes its own tiles
        chans = [c for c in src.channels if c is not None]
        if src.orbit_field is not None:
            chans = [c for orbit in _ORBITS.values() for c in src.channels_for(orbit)]
        extra = [band_indices("aster", ["slope"])[0]] if src.slope else []
        for ch in chans + extra:
            other = owner.setdefault((src.modality, ch), src.name)
            if other != src.name:
                band = MODALITIES[src.modality].bands[ch]
                raise _fail(path, f"sources.{src.name}.bands", f"{src.modality} band {band!r} also comes from "
                            f"sources.{other}")
    names = [s.name for s in sources]
    month_from = raw.get("month_from", names)
    if not isinstance(month_from, list) or any(m not in names for m in month_from):
        raise _fail(path, "month_from", f"must list source names among {names}, got {month_from!r}")
    grid = raw.get("grid", names[0])
    if grid not in names:
        raise _fail(path, "grid", f"must name a source among {names}, got {grid!r}")
    match, pair, max_days = _parse_scenes(path, raw.get("scenes"), sources)
    return ConversionSpec(str(path), sources, tuple(month_from), match, pair, max_days, str(grid))


# ----------------------------------------------------------------------------- scene discovery


@dataclass(frozen=True)
class SourceEntry:
    """One source's part of a scene.

    Attributes:
        path: The multi-band raster, or the folder holding the per-band rasters.
        fields: Fields captured by the source's ``path`` pattern (``scene`` for the default layout).
    """

    path: Path
    fields: dict[str, str]

    @property
    def date(self) -> str | None:
        """The ``{date}`` field as ``YYYY-MM-DD``, if the pattern has one."""
        d = self.fields.get("date")
        m = _DATE.fullmatch(d) if d else None
        return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else None


@dataclass(frozen=True)
class SceneRef:
    """A scene found on disk: its name and each source's entry (not opened yet)."""

    name: str
    entries: dict[str, SourceEntry]


def _source_entries(spec: ConversionSpec, s: SourceSpec, src: Path) -> list[SourceEntry]:
    folder = (Path(src) / s.folder).resolve() if s.folder == "." else Path(src) / s.folder
    if not folder.is_dir():
        raise ConversionError(f"spec {spec.path}: sources.{s.name}: folder {folder} does not exist")
    if s.path is not None:
        found = [SourceEntry(p, f) for p, f in s.path.find(folder, want_dirs=s.per_band)]
        what = f"{'folders' if s.per_band else 'files'} matching path {s.path.text!r}"
    elif s.per_band:
        found, what = [SourceEntry(folder, {})], ""
    else:
        found = [SourceEntry(p, {"scene": p.stem}) for p in sorted(folder.iterdir())
                 if p.is_file() and p.suffix.lower() in (".tif", ".tiff")]
        what = ".tif/.tiff files"
    if not found:
        raise ConversionError(f"spec {spec.path}: sources.{s.name}: no {what} in {folder}")
    for e in found:
        if "date" in e.fields and e.date is None:
            raise ConversionError(f"{e.path}: {{date}} = {e.fields['date']!r} is not a date "
                                  f"[spec sources.{s.name}.path]")
    return found


def _days(a: str, b: str) -> int:
    return abs((_date.fromisoformat(a) - _date.fromisoformat(b)).days)


def find_scenes(spec: ConversionSpec, src) -> list[SceneRef]:
    """Find every scene under ``src`` and pair the sources' entries (``scenes`` in the spec).

    Returns:
        Scenes sorted by name.

    Raises:
        ConversionError: a source folder is missing or holds no matching entry, a scene is missing in a
            source, several entries of one source match one scene, or (``date_rank``) sources hold
            different numbers of dates for a place or a pair's dates span more than ``max_days``.
    """
    src = Path(src)
    by_source: dict[str, dict[tuple, list[SourceEntry]]] = {}
    for s in spec.sources:
        groups: dict[tuple, list[SourceEntry]] = {}
        for e in _source_entries(spec, s, src):
            groups.setdefault(tuple(e.fields[m] for m in spec.match), []).append(e)
        by_source[s.name] = groups
    keys = sorted(set().union(*by_source.values()))
    for s in spec.sources:
        missing = [k for k in keys if k not in by_source[s.name]]
        if not missing:
            continue
        names = ["_".join(k) for k in missing]
        if s.path is None and not s.per_band:
            raise ConversionError(
                f"sources.{s.name}: scene(s) {names} missing: expected {src / s.folder / names[0]}.tif "
                f"(every source folder needs the same file names)")
        raise ConversionError(f"sources.{s.name}: no entry for scene(s) {names} under {src / s.folder} "
                              f"(scenes.match {list(spec.match)})")
    scenes = []
    for key in keys:
        base = "_".join(key) if key else (src / spec.sources[0].folder).resolve().name
        entries = {s.name: sorted(by_source[s.name][key], key=lambda e: (e.date or "", str(e.path)))
                   for s in spec.sources}
        if spec.pair == "exact":
            for name, es in entries.items():
                if len(es) > 1:
                    raise ConversionError(
                        f"sources.{name}: {len(es)} entries match scene {base!r} "
                        f"({', '.join(str(e.path) for e in es)}); "
                        f"add the field that tells them apart to scenes.match, or set scenes.pair: date_rank")
            scenes.append(SceneRef(base, {name: es[0] for name, es in entries.items()}))
            continue
        counts = {name: len(es) for name, es in entries.items()}
        if len(set(counts.values())) > 1:
            listing = "; ".join(f"sources.{n}: {[e.date for e in es]}" for n, es in entries.items())
            raise ConversionError(f"scene {base!r}: scenes.pair date_rank needs the same number of dates in every "
                                  f"source, got {listing}")
        for k in range(next(iter(counts.values()))):
            pair = {name: es[k] for name, es in entries.items()}
            dates = sorted(e.date for e in pair.values())
            if spec.max_days is not None and _days(dates[0], dates[-1]) > spec.max_days:
                listing = ", ".join(f"{n} {e.date} ({e.path})" for n, e in pair.items())
                raise ConversionError(f"scene {base!r}, date rank {k}: dates span {_days(dates[0], dates[-1])} days "
                                      f"> scenes.max_days {spec.max_days:g}: {listing}")
            scenes.append(SceneRef(f"{base}_t{k}", pair))
    seen: dict[str, SceneRef] = {}
    for ref in scenes:
        other = seen.setdefault(ref.name, ref)
        if other is not ref:
            raise ConversionError(f"two scenes are both named {ref.name!r} ({other.entries} and {ref.entries}); "
                                  f"the fields of scenes.match {list(spec.match)} must tell them apart")
    return sorted(scenes, key=lambda r: r.name)


# ----------------------------------------------------------------------------- opened scenes


@dataclass
class _Band:
    """One band of a source as read on the scene grid."""

    ds: object           # rasterio dataset, or a WarpedVRT onto the grid
    index: int           # 1-based band index in ``ds``
    path: Path
    nodata: float | None  # raw no-data value in what ``ds`` returns (warped reads give NaN instead)
    warped: bool


@dataclass
class Scene:
    """One opened scene: every source's bands, readable on one grid.

    Attributes:
        name: Scene name.
        height, width: Grid size in pixels.
        crs: Grid coordinate reference system.
        transform: Affine pixel-to-CRS transform of the grid.
        dates: Source name -> acquisition date ``YYYY-MM-DD`` where the spec, the path or a tag gives one.
        channels: Source name -> channel of each entry of its ``bands`` (see ``SourceSpec.channels_for``).
        offsets: Source name -> value offset for this scene (``offset`` or the matching ``offset_rules``).
        fields: Source name -> scene fields (from the path pattern and ``fields``).
        paths: Source name -> the raster or folder the source was read from.
        resampled: Source name -> names of the bands warped onto the grid.
    """

    name: str
    height: int
    width: int
    crs: rasterio.crs.CRS
    transform: rasterio.Affine
    dates: dict[str, str]
    channels: dict[str, tuple[int | None, ...]]
    offsets: dict[str, float]
    fields: dict[str, dict[str, str]]
    paths: dict[str, Path]
    resampled: dict[str, list[str]]
    _bands: dict[str, list[_Band | None]] = field(repr=False, default_factory=dict)
    _opened: list = field(repr=False, default_factory=list)

    def read(self, source: str, window: Window) -> list[tuple[np.ndarray, float | None, str] | None]:
        """Read a window of the grid for each entry of the source's ``bands``.

        Args:
            source: Source name.
            window: Window on the scene grid (pixels).

        Returns:
            Per entry of ``bands``: ``(x, nodata, label)`` with ``x`` (h, w) float64 raw values (NaN
            where a warped read found no source pixel), the raw no-data value to mask (or None) and
            ``label`` ("<file> band <i>") for messages; ``None`` for a skipped band.

        Raises:
            ConversionError: a raster cannot be read (names the file).
        """
        bands = self._bands[source]
        out: list = [None] * len(bands)
        by_ds: dict[int, list[int]] = {}
        for i, b in enumerate(bands):
            if b is not None:
                by_ds.setdefault(id(b.ds), []).append(i)
        for members in by_ds.values():
            ds = bands[members[0]].ds
            try:
                data = ds.read([bands[i].index for i in members], window=window).astype(np.float64)
            except rasterio.errors.RasterioError as err:
                raise ConversionError(f"{bands[members[0]].path}: cannot read rows {window.row_off}.."
                                      f"{window.row_off + window.height - 1} ({err}) [spec sources.{source}]") from None
            for row, i in zip(data, members):
                b = bands[i]
                out[i] = (row, b.nodata, f"{b.path} band {b.index}")
        return out

    def close(self) -> None:
        """Close every raster (warped views before the files they read)."""
        _close_all(self._opened)


def _close_all(opened: list) -> None:
    for ds in reversed(opened):
        ds.close()


def _check_descriptions(spec: ConversionSpec, s: SourceSpec, ds, path: Path) -> None:
    """Reject a raster whose band descriptions name its bands in another order than the spec."""
    if s.modality not in MODALITIES:
        return  # an extra source (a label raster): its band is not a registry band
    mod = MODALITIES[s.modality]
    desc = [canonical_band_name(mod.name, d) if d else None for d in ds.descriptions]
    if not all(d in mod.bands for d in desc):
        return  # descriptions are absent or not band names (e.g. 'bands'): nothing to check
    for i, (d, b) in enumerate(zip(desc, s.bands)):
        if b is not None and d != b:
            raise ConversionError(
                f"{path}: band {i + 1} is described as {ds.descriptions[i]!r} but spec {spec.path} "
                f"sources.{s.name}.bands[{i}] says {b!r}"
            )


def _open(path: Path, s: SourceSpec):
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioError as err:
        raise ConversionError(f"{path}: cannot read ({err}) [spec sources.{s.name}]") from None


def _band_paths(spec: ConversionSpec, s: SourceSpec, folder: Path) -> list[Path]:
    """The file of each band of a per-band source in a scene folder, matched by band name."""
    mod = MODALITIES[s.modality]
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        m = s.band_files.parts[0].fullmatch(p.name)
        if m and p.is_file():
            found.setdefault(canonical_band_name(mod.name, m.group("band")).upper(), []).append(p)
    out = []
    for token in s.band_tokens:
        paths = found.get(canonical_band_name(mod.name, token).upper(), [])
        if len(paths) != 1:
            have = sorted(p.name for ps in found.values() for p in ps)
            problem = "no file" if not paths else f"{len(paths)} files ({', '.join(p.name for p in paths)})"
            raise ConversionError(f"{folder}: {problem} for band {token!r} (spec {spec.path} sources.{s.name}."
                                  f"band_files {s.band_files.text!r}; files matching it: {have or 'none'})")
        out.append(paths[0])
    return out


def _json_fields(s: SourceSpec, entry: SourceEntry) -> dict[str, str]:
    out = dict(entry.fields)
    folder = entry.path if s.per_band else entry.path.parent
    for name, (file_pattern, key) in s.fields.items():
        try:
            path = folder / file_pattern.format(**entry.fields)
        except (KeyError, IndexError, ValueError):
            raise ConversionError(f"sources.{s.name}.fields.{name}.file: {file_pattern!r} uses a field that "
                                  f"{entry.path} does not have ({sorted(entry.fields)})") from None
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise ConversionError(f"{path}: cannot read ({err.strerror}) "
                                  f"[spec sources.{s.name}.fields.{name}]") from None
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path}: not valid JSON ({err}) [spec sources.{s.name}.fields.{name}]") from None
        if not isinstance(data, dict) or key not in data or data[key] is None:
            raise ConversionError(f"{path}: has no key {key!r} [spec sources.{s.name}.fields.{name}]")
        out[name] = str(data[key])
    return out


def _scene_date(s: SourceSpec, scene: str, entry: SourceEntry, ds) -> str | None:
    if scene in s.dates:
        return s.dates[scene]
    if entry.date is not None:
        return entry.date
    m = _DATE.match(ds.tags().get(s.date_tag, ""))
    return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else None


def _aligned(ds, crs, transform, shape) -> bool:
    pixel = max(abs(transform.a), abs(transform.e))
    return (ds.crs == crs and ds.shape == shape
            and np.allclose(ds.transform[:6], transform[:6], rtol=0, atol=1e-3 * pixel))


def _grid_of(datasets: list) -> object:
    """The dataset with the smallest pixel area (first on ties): the source's finest raster."""
    return min(datasets, key=lambda d: abs(d.transform.a * d.transform.e))


def _open_rasters(spec: ConversionSpec, s: SourceSpec, entry: SourceEntry, opened: list) -> list[tuple[Path, object]]:
    """Open and check a source's rasters for one scene: (path, dataset) per file, in ``bands`` order for
    per-band sources. Every dataset opened is appended to ``opened``."""
    out = []
    for path in _band_paths(spec, s, entry.path) if s.per_band else [entry.path]:
        ds = _open(path, s)
        opened.append(ds)
        out.append((path, ds))
        if s.per_band and ds.count != 1:
            raise ConversionError(f"{path}: has {ds.count} bands; band_files of spec {spec.path} "
                                  f"sources.{s.name} must be single-band rasters")
        if not s.per_band:
            if ds.count != len(s.bands):
                raise ConversionError(f"{path}: has {ds.count} bands, spec {spec.path} "
                                      f"sources.{s.name}.bands lists {len(s.bands)}")
            _check_descriptions(spec, s, ds, path)
        if ds.crs is None:
            raise ConversionError(f"{path}: has no CRS; the converter needs georeferenced rasters")
    return out


def _orbit(s: SourceSpec, entry: SourceEntry, fields: dict[str, str]) -> str | None:
    if s.orbit_field is None:
        return None
    value = fields[s.orbit_field]
    orbit = _ORBITS.get(value.strip().upper())
    if orbit is None:
        raise ConversionError(f"{entry.path}: orbit field {s.orbit_field!r} = {value!r}; expected ASCENDING or "
                              f"DESCENDING [spec sources.{s.name}.orbit_field]")
    return orbit


def _on_grid(spec: ConversionSpec, s: SourceSpec, path: Path, ds, grid, opened: list) -> tuple:
    """A view of ``ds`` on the scene grid: (dataset or WarpedVRT, raw no-data to mask, warped?)."""
    crs, transform, shape, grid_path = grid
    nodata = s.nodata if s.nodata is not None else ds.nodata
    if _aligned(ds, crs, transform, shape):
        return ds, nodata, False
    if s.resampling == "none":
        pixel = max(abs(transform.a), abs(transform.e))
        for what, ok, a, b in (
            ("size (height, width)", ds.shape == shape, ds.shape, shape),
            ("CRS", ds.crs == crs, ds.crs, crs),
            ("transform", np.allclose(ds.transform[:6], transform[:6], rtol=0, atol=1e-3 * pixel),
             tuple(ds.transform[:6]), tuple(transform[:6])),
        ):
            if not ok:
                raise ConversionError(
                    f"{path}: {what} {a} differs from {grid_path}: {b} (sources.{s.name} vs sources.{spec.grid}); "
                    f"co-register the rasters first, or set sources.{s.name}.resampling (e.g. bilinear) to warp "
                    f"them onto the grid")
    left, bottom, right, top = rasterio.warp.transform_bounds(ds.crs, crs, *ds.bounds)
    g_left, g_bottom, g_right, g_top = rasterio.transform.array_bounds(shape[0], shape[1], transform)
    if left >= g_right or right <= g_left or bottom >= g_top or top <= g_bottom:
        raise ConversionError(f"{path}: does not overlap the scene grid of {grid_path} [spec sources.{s.name}]")
    vrt = WarpedVRT(ds, crs=crs, transform=transform, width=shape[1], height=shape[0],
                    resampling=Resampling[s.resampling], src_nodata=nodata, nodata=math.nan, dtype="float64")
    opened.append(vrt)
    return vrt, None, True


def open_scene(spec: ConversionSpec, ref: SceneRef) -> Scene:
    """Open a scene's rasters, check them against the spec and put every band onto the scene grid.

    Raises:
        ConversionError: unreadable file, band count not matching ``bands`` (a multi-band raster) or not 1
            (a per-band raster), a band file missing, band descriptions contradicting ``bands``, missing
            CRS, a raster off the grid with ``resampling: none`` (size / CRS / transform differing), a
            raster not overlapping the grid, or a bad JSON field, offset-rule value or orbit value.
    """
    opened: list = []
    try:
        rasters, fields, dates, channels, offsets = {}, {}, {}, {}, {}
        for s in spec.sources:
            entry = ref.entries[s.name]
            fields[s.name] = _json_fields(s, entry)
            rasters[s.name] = _open_rasters(spec, s, entry, opened)
            if (d := _scene_date(s, ref.name, entry, rasters[s.name][0][1])) is not None:
                dates[s.name] = d
            channels[s.name] = s.channels_for(_orbit(s, entry, fields[s.name]))
            where = f"{entry.path} [spec sources.{s.name}]"
            offsets[s.name] = next((r.offset for r in s.offset_rules if r.holds(fields[s.name][r.field], where)),
                                   s.offset)
        grid_ds = _grid_of([ds for _, ds in rasters[spec.grid]])
        grid = (grid_ds.crs, grid_ds.transform, grid_ds.shape, Path(grid_ds.name))
        bands: dict[str, list[_Band | None]] = {}
        resampled: dict[str, list[str]] = {}
        for s in spec.sources:
            views = [(path, *_on_grid(spec, s, path, ds, grid, opened)) for path, ds in rasters[s.name]]
            if s.per_band:
                bands[s.name] = [_Band(v, 1, p, nd, w) for p, v, nd, w in views]
                resampled[s.name] = [b for b, (_, _, _, w) in zip(s.bands, views) if w]
            else:
                p, v, nd, w = views[0]
                bands[s.name] = [None if b is None else _Band(v, i + 1, p, nd, w) for i, b in enumerate(s.bands)]
                resampled[s.name] = [b for b in s.bands if b is not None] if w else []
    except BaseException:
        _close_all(opened)
        raise
    paths = {s.name: ref.entries[s.name].path for s in spec.sources}
    crs, transform, shape, _ = grid
    return Scene(ref.name, shape[0], shape[1], crs, transform, dates, channels, offsets, fields, paths,
                 resampled, bands, opened)


# ----------------------------------------------------------------------------- values


def to_stored(x: np.ndarray, src: SourceSpec, nodata, offset: float, label: str, counts: dict) -> np.ndarray:
    """Raw raster values of one band -> the values MMEarth stores (float64, NaN = no-data).

    NaN / inf, the raw ``nodata`` value, values outside the stored dtype (after ``scale`` and ``offset``,
    rounded for integer dtypes) and values equal to a stored no-data value become NaN; a categorical
    source's class ids go through its ``remap``.

    Args:
        x: (h, w) float64 raw values (:meth:`Scene.read`).
        src: The band's source.
        nodata: Raw no-data value to mask, or None.
        offset: The scene's value offset of the source (:attr:`Scene.offsets`).
        label: "<file> band <i>", for messages.
        counts: Reason -> number of pixels made no-data, updated in place.

    Raises:
        ConversionError: a class id absent from the source's ``remap``.
    """
    mod = MODALITIES[src.modality]
    invalid = ~np.isfinite(x)
    counts["NaN / inf or no source pixel"] = counts.get("NaN / inf or no source pixel", 0) + int(invalid.sum())
    if nodata is not None:
        invalid |= x == nodata
    if src.remap is not None:
        codes = np.unique(x[~invalid])
        unknown = [c for c in codes.tolist() if c not in src.remap]
        if unknown:
            raise ConversionError(f"{label}: class ids {unknown[:10]} are not in spec "
                                  f"sources.{src.name}.remap; add them (null = no-data)")
        y = np.full(x.shape, np.nan)
        for code, stored in src.remap.items():
            if stored is not None:
                y[(x == code) & ~invalid] = stored
        return y
    y = x * src.scale + offset
    integer = np.dtype(mod.dtype).kind in "iu"
    info = np.iinfo(mod.dtype) if integer else np.finfo(mod.dtype)
    if integer:
        y = np.rint(y)
    out_of_range = ~invalid & ((y < info.min) | (y > info.max))
    counts["out of dtype range"] = counts.get("out of dtype range", 0) + int(out_of_range.sum())
    y[invalid | out_of_range] = np.nan
    kept = ~np.isnan(y)
    collide = np.zeros(y.shape, bool)
    collide[kept] = invalid_mask(mod, y[kept].astype(mod.dtype))  # e.g. DN 1000 - 1000 = 0 = S2 no-data
    key = "equal to a stored no-data value after scale / offset"
    counts[key] = counts.get(key, 0) + int(collide.sum())
    y[collide] = np.nan
    return y
