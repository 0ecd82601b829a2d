"""The converter spec (YAML) and the checks that turn co-registered GeoTIFF folders into scenes.

A spec maps source folders to MMEarth modalities::

    sources:
      S2L1C:                       # folder under --src (or set ``folder:``)
        modality: sentinel2
        s2_type: l1c               # sentinel2 only: l1c or l2a; each S2 source gives its own tiles
        bands: [B01, B02, B03, B04, B05, B06, B07, B08, B8A, B09, B10, B11, B12]   # raster band order
      DEM:
        modality: aster
        bands: [elevation]
        slope: true                # derive aster slope (degrees) from the elevation band
      LULC:
        modality: dynamic_world
        bands: [label]
        remap: {1: 1, 8: null}     # source class id -> stored MMEarth code; null = no-data
    month_from: [S1RTC]            # sources whose acquisition date sets ``month`` (first found wins)

Band names are the registry's (:mod:`multimae.domains`); bands are placed **by name** into the
modality's stored order, so a raster in B08, B8A order lands in MMEarth's B8A, B08 order. A ``null``
band entry skips that raster band. Other keys per source: ``folder``, ``nodata`` (source no-data,
default the raster's own), ``scale`` / ``offset`` (value * scale + offset before storing, e.g. 10000
for reflectance in 0..1), ``date_tag`` (raster tag holding the acquisition date, default
``datetime``) and ``dates`` (scene -> ``YYYY-MM-DD``, wins over the tag).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import yaml

from multimae.domains import MODALITIES, band_indices, canonical_band_name, get_modality

__all__ = ["ConversionError", "SourceSpec", "ConversionSpec", "load_spec", "find_scenes", "Scene", "open_scene"]

_SOURCE_KEYS = {"folder", "modality", "bands", "s2_type", "remap", "slope", "nodata", "scale", "offset",
                "date_tag", "dates"}
_TOP_KEYS = {"sources", "month_from", "description"}
_DATE = re.compile(r"(\d{4})[-:](\d{2})[-:](\d{2})")


class ConversionError(ValueError):
    """Bad spec or bad input rasters; the message names the file and the spec key."""


@dataclass(frozen=True)
class SourceSpec:
    """One source folder of the spec (see the module docstring for the keys).

    Attributes:
        channels: For each raster band, its channel index in the modality's stored order, or ``None``
            for a skipped band.
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


@dataclass(frozen=True)
class ConversionSpec:
    """A parsed spec: its sources in file order and the sources whose date sets ``month``."""

    path: str
    sources: tuple[SourceSpec, ...]
    month_from: tuple[str, ...]

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
    bands = raw.get("bands")
    if not isinstance(bands, list) or not bands:
        raise _fail(path, f"{key}.bands", "must list the raster's band names in file order (null skips a band)")
    canon = tuple(None if b is None else canonical_band_name(mod.name, str(b)) for b in bands)
    try:
        channels = tuple(None if b is None else band_indices(mod.name, [b])[0] for b in canon)
    except KeyError as err:
        raise _fail(path, f"{key}.bands", err.args[0]) from None
    named = [c for c in channels if c is not None]
    if len(set(named)) != len(named):
        raise _fail(path, f"{key}.bands", "a band is listed twice")
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
        if not _DATE.fullmatch(date):
            raise _fail(path, f"{key}.dates.{scene}", f"{date!r} is not a YYYY-MM-DD date")
    try:
        nodata = None if raw.get("nodata") is None else float(raw["nodata"])
        scale, offset = float(raw.get("scale", 1.0)), float(raw.get("offset", 0.0))
    except (TypeError, ValueError):
        raise _fail(path, key, "nodata, scale and offset must be numbers") from None
    return SourceSpec(
        name=name, folder=str(raw.get("folder", name)), modality=mod.name, bands=canon, channels=channels,
        s2_type=s2_type, remap=remap, slope=slope, nodata=nodata, scale=scale, offset=offset,
        date_tag=str(raw.get("date_tag", "datetime")), dates=dates,
    )


def load_spec(path) -> ConversionSpec:
    """Read and validate a converter spec.

    Raises:
        ConversionError: unreadable YAML, unknown keys, an unknown modality or band name (the message
            lists the valid ones), a bad remap, or two sources writing the same channel.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConversionError(f"cannot read spec {path}: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), dict) or not raw["sources"]:
        raise ConversionError(f"spec {path}: needs a non-empty 'sources' mapping (folder -> modality, bands)")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise _fail(path, "top level", f"unknown keys {sorted(unknown)}; valid keys: {sorted(_TOP_KEYS)}")
    sources = tuple(_parse_source(path, str(k), v) for k, v in raw["sources"].items())
    owner: dict[tuple[str, int], str] = {}
    for src in sources:
        if src.modality == "sentinel2":
            continue  # each S2 source makes its own tiles
        extra = [band_indices("aster", ["slope"])[0]] if src.slope else []
        for ch in [c for c in src.channels if c is not None] + extra:
            other = owner.setdefault((src.modality, ch), src.name)
            if other != src.name:
                band = MODALITIES[src.modality].bands[ch]
                raise _fail(path, f"sources.{src.name}.bands", f"{src.modality} band {band!r} also comes from "
                            f"sources.{other}")
    names = [s.name for s in sources]
    month_from = raw.get("month_from", names)
    if not isinstance(month_from, list) or any(m not in names for m in month_from):
        raise _fail(path, "month_from", f"must list source names among {names}, got {month_from!r}")
    return ConversionSpec(str(path), sources, tuple(month_from))


def find_scenes(spec: ConversionSpec, src: Path) -> list[str]:
    """Scene names (file stems) present in every source folder, sorted.

    Raises:
        ConversionError: a source folder is missing or empty, or a scene is missing in one source.
    """
    files: dict[str, dict[str, Path]] = {}
    for s in spec.sources:
        folder = Path(src) / s.folder
        if not folder.is_dir():
            raise ConversionError(f"spec {spec.path}: sources.{s.name}: folder {folder} does not exist")
        found = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff")}
        if not found:
            raise ConversionError(f"spec {spec.path}: sources.{s.name}: no .tif/.tiff files in {folder}")
        files[s.name] = found
    scenes = sorted(set().union(*files.values()))
    for s in spec.sources:
        missing = [sc for sc in scenes if sc not in files[s.name]]
        if missing:
            raise ConversionError(
                f"sources.{s.name}: scene(s) {missing} missing: expected {Path(src) / s.folder / missing[0]}.tif "
                f"(every source folder needs the same file names)"
            )
    return scenes


@dataclass
class Scene:
    """One scene: an open raster per source, checked to share one grid.

    Attributes:
        name: Scene name (the file stem).
        datasets: Source name -> open ``rasterio`` dataset.
        height, width: Raster size in pixels.
        crs: Shared coordinate reference system.
        transform: Affine pixel-to-CRS transform (of the first source).
        dates: Source name -> acquisition date ``YYYY-MM-DD`` where the spec or a tag gives one.
    """

    name: str
    datasets: dict[str, rasterio.io.DatasetReader]
    height: int
    width: int
    crs: rasterio.crs.CRS
    transform: rasterio.Affine
    dates: dict[str, str]

    def close(self) -> None:
        """Close every raster."""
        for ds in self.datasets.values():
            ds.close()


def _check_descriptions(spec: ConversionSpec, s: SourceSpec, ds, path: Path) -> None:
    """Reject a raster whose band descriptions name its bands in another order than the spec."""
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


def _scene_date(s: SourceSpec, scene: str, ds) -> str | None:
    if scene in s.dates:
        return s.dates[scene]
    m = _DATE.match(ds.tags().get(s.date_tag, ""))
    return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else None


def open_scene(spec: ConversionSpec, src: Path, scene: str) -> Scene:
    """Open a scene's rasters and check them against the spec and against each other.

    Raises:
        ConversionError: unreadable file, band count not matching ``bands``, band descriptions
            contradicting ``bands``, missing CRS, or size / CRS / transform differing between sources.
    """
    datasets, dates, ref = {}, {}, None
    try:
        for s in spec.sources:
            path = Path(src) / s.folder / f"{scene}.tif"
            path = path if path.exists() else next((Path(src) / s.folder).glob(f"{scene}.[tT][iI][fF]*"))
            try:
                ds = datasets[s.name] = rasterio.open(path)
            except rasterio.errors.RasterioError as err:
                raise ConversionError(f"{path}: cannot read ({err}) [spec sources.{s.name}]") from None
            if ds.count != len(s.bands):
                raise ConversionError(
                    f"{path}: has {ds.count} bands, spec {spec.path} sources.{s.name}.bands lists {len(s.bands)}"
                )
            _check_descriptions(spec, s, ds, path)
            if ds.crs is None:
                raise ConversionError(f"{path}: has no CRS; the converter needs georeferenced rasters")
            if (d := _scene_date(s, scene, ds)) is not None:
                dates[s.name] = d
            if ref is None:
                ref = (path, ds)
                continue
            rpath, rds = ref
            pixel = max(abs(rds.transform.a), abs(rds.transform.e))
            for what, ok, a, b in (
                ("size (height, width)", ds.shape == rds.shape, ds.shape, rds.shape),
                ("CRS", ds.crs == rds.crs, ds.crs, rds.crs),
                ("transform", np.allclose(ds.transform[:6], rds.transform[:6], rtol=0, atol=1e-3 * pixel),
                 tuple(ds.transform[:6]), tuple(rds.transform[:6])),
            ):
                if not ok:
                    raise ConversionError(f"{path}: {what} {a} differs from {rpath}: {b} (sources.{s.name} vs "
                                          f"sources.{spec.sources[0].name}); co-register the rasters first")
    except BaseException:
        for ds in datasets.values():
            ds.close()
        raise
    _, rds = ref
    return Scene(scene, datasets, rds.height, rds.width, rds.crs, rds.transform, dates)
