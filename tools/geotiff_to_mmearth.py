"""Convert co-registered GeoTIFF folders into an MMEarth file set (``<stem>.h5`` + three JSON files).

Usage::

    python tools/geotiff_to_mmearth.py --spec cfgs/data/terramesh_examples.yaml \\
        --src ../shared/data/terramesh_examples --out out/terramesh_64 --tile-size 64

One folder per source, the same file name in every folder = the same scene on the same grid. The
YAML spec (:mod:`utils.data.geotiff_spec`) says which MMEarth modality each folder fills and names
its bands; bands are placed by name into MMEarth's stored order. Each scene is cut into
non-overlapping ``tile_size`` windows from its top-left corner (the remainder at the right and
bottom is dropped). Each Sentinel-2 source (e.g. an L1C and an L2A folder) yields its own tiles,
sharing the other modalities of the window. Every MMEarth dataset is written
(:class:`utils.data.mmearth_writer.MMEarthWriter`); what the sources lack holds its no-data value.

Derived values:

- ``lat`` / ``lon``: sin / cos of the tile centre in WGS84 degrees (``rasterio.warp.transform``).
- ``month``: sin / cos of 2*pi*m/12 with m from the S2 source's date, else from the first
  ``month_from`` source with a date; NaN when no source has a date.
- ``aster`` slope (``slope: true``): degrees, arctan of the gradient magnitude of the elevation,
  ``numpy.gradient`` (central differences, one-sided at the scene edge) with the pixel size from the
  transform in metres (geographic CRS: degrees scaled at the tile latitude); rounded to int16.
  A pixel whose neighbours' elevation is missing gets no slope.
- ``era5``: NaN; ``biome`` / ``eco_region``: all-zero one-hot rows (= unknown).

Source values that are NaN / inf, equal the source no-data, or do not fit the stored dtype become
no-data; categorical codes absent from the spec's ``remap`` are an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
from rasterio.windows import Window
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimae.domains import MODALITIES, band_indices  # noqa: E402
from utils.data.geotiff_spec import (  # noqa: E402
    ConversionError, ConversionSpec, Scene, SourceSpec, find_scenes, load_spec, open_scene,
)
from utils.data.mmearth_files import invalid_mask  # noqa: E402
from utils.data.mmearth_writer import MMEarthWriter, make_splits  # noqa: E402

__all__ = ["convert", "slope_degrees", "main"]

_SLOPE = band_indices("aster", ["slope"])[0]
_SPLIT_GROUPS = ("location", "scene", "tile")


def slope_degrees(elevation: np.ndarray, transform, crs, lat: float) -> np.ndarray:
    """Terrain slope in degrees from an elevation grid.

    Args:
        elevation: (H, W) float64 elevation in metres, NaN where missing; H, W >= 2.
        transform: Affine pixel-to-CRS transform of the grid.
        crs: The grid's CRS (projected in any linear unit, or geographic).
        lat: Latitude (degrees) used to scale a geographic CRS's degrees to metres.

    Returns:
        (H, W) float64 slope in degrees (0 flat .. 90 vertical), NaN where the elevation or a
        neighbour used by the central difference is missing.
    """
    dx, dy = np.hypot(transform.a, transform.d), np.hypot(transform.b, transform.e)
    if crs.is_geographic:
        dx, dy = dx * 111_320.0 * np.cos(np.radians(lat)), dy * 110_574.0
    else:
        factor = crs.linear_units_factor[1]
        dx, dy = dx * factor, dy * factor
    grad_y, grad_x = np.gradient(elevation, dy, dx)
    slope = np.degrees(np.arctan(np.hypot(grad_x, grad_y)))
    slope[np.isnan(elevation)] = np.nan
    return slope


def _to_stored(x: np.ndarray, src: SourceSpec, ds, path: Path, band: int, counts: dict) -> np.ndarray:
    """Raw raster values (float64) -> stored MMEarth values (float64, NaN = no-data)."""
    mod = MODALITIES[src.modality]
    invalid = ~np.isfinite(x)
    counts["non-finite"] = counts.get("non-finite", 0) + int(invalid.sum())
    nodata = src.nodata if src.nodata is not None else ds.nodata
    if nodata is not None:
        invalid |= x == nodata
    if src.remap is not None:
        codes = np.unique(x[~invalid])
        unknown = [c for c in codes.tolist() if c not in src.remap]
        if unknown:
            raise ConversionError(f"{path} band {band + 1}: class ids {unknown[:10]} are not in spec "
                                  f"sources.{src.name}.remap; add them (null = no-data)")
        y = np.full(x.shape, np.nan)
        for code, stored in src.remap.items():
            if stored is not None:
                y[(x == code) & ~invalid] = stored
        return y
    y = x * src.scale + src.offset
    info = np.iinfo(mod.dtype) if np.dtype(mod.dtype).kind in "iu" else np.finfo(mod.dtype)
    if np.dtype(mod.dtype).kind in "iu":
        y = np.rint(y)
    out_of_range = ~invalid & ((y < info.min) | (y > info.max))
    counts["out of dtype range"] = counts.get("out of dtype range", 0) + int(out_of_range.sum())
    y[invalid | out_of_range] = np.nan
    return y


def _read_strip(scene: Scene, src: SourceSpec, row0: int, size: int, width: int, lat: float,
                counts: dict) -> np.ndarray:
    """One source's rows ``row0 .. row0 + size`` as (C, size, width) stored values (float64, NaN = no-data)."""
    ds = scene.datasets[src.name]
    path = Path(ds.name)
    mod = MODALITIES[src.modality]
    top = max(row0 - 1, 0) if src.slope else row0  # a one-pixel halo so slope sees real neighbours
    bottom = min(row0 + size + 1, scene.height) if src.slope else row0 + size
    right = min(width + 1, scene.width) if src.slope else width
    raw = ds.read(window=Window(0, top, right, bottom - top)).astype(np.float64)
    out = np.full((len(mod.bands), bottom - top, right), np.nan)
    src_counts = counts.setdefault(src.name, {})
    for band, channel in enumerate(src.channels):
        if channel is not None:
            out[channel] = _to_stored(raw[band], src, ds, path, band, src_counts)
    if src.slope:
        elevation = out[band_indices("aster", ["elevation"])[0]]
        out[_SLOPE] = np.rint(slope_degrees(elevation, scene.transform, scene.crs, lat))
    return out[:, row0 - top:row0 - top + size, :width]


def _provided(spec: ConversionSpec, s2: SourceSpec | None) -> dict[str, list[int]]:
    """Modality -> the channels the sources fill for tiles of S2 source ``s2``."""
    out: dict[str, list[int]] = {}
    for src in spec.sources:
        if src.modality == "sentinel2" and src is not s2:
            continue
        chans = [c for c in src.channels if c is not None] + ([_SLOPE] if src.slope else [])
        out.setdefault(src.modality, []).extend(chans)
    return out


def _bands_info(provided: dict[str, list[int]]) -> dict:
    """tile_info ``BANDS``: provided band names, MMEarth spelling (``B8``, ``sentinel1_asc``)."""
    out: dict = {}
    for name, chans in provided.items():
        bands = [MODALITIES[name].bands[c] for c in sorted(chans)]
        if name == "sentinel2":
            out[name] = [b if b == "B8A" else f"B{int(b[1:])}" for b in bands]
        elif name == "sentinel1":
            for orbit, prefix in (("asc", "asc_"), ("desc", "desc_")):
                pol = [b[len(prefix):] for b in bands if b.startswith(prefix)]
                out[f"sentinel1_{orbit}"] = pol or None
        else:
            out[name] = bands
    return out


def _sincos(angle: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(angle), np.cos(angle)], 1).astype(np.float32)


def _tile_block(spec, scene, strip, s2, size, n_cols, lats, lons):
    """Every modality for the ``n_cols`` tiles of one strip and S2 source ``s2`` (or None): dict of
    (n, C, ...) arrays, each tile's valid fraction per provided modality, and shared tile-info fields."""
    provided = _provided(spec, s2)
    data, valid_frac = {}, []
    for mod in MODALITIES.values():
        shape = (n_cols, len(mod.bands), size, size) if mod.level == "pixel" else (n_cols, len(mod.bands))
        fill = mod.fill_value
        if mod.name in provided:
            src_key = s2.name if mod.name == "sentinel2" else mod.name
            x = strip[src_key].reshape(len(mod.bands), size, n_cols, size).transpose(2, 0, 1, 3)
            data[mod.name] = np.where(np.isnan(x), fill, x).astype(mod.dtype)
        elif mod.level == "pixel":
            data[mod.name] = np.full(shape, fill, mod.dtype)
    data["lat"], data["lon"] = _sincos(np.radians(lats)), _sincos(np.radians(lons))
    date = scene.dates.get(s2.name) if s2 else None
    month_src = (s2.name if s2 and date else next((m for m in spec.month_from if m in scene.dates), None))
    if month_src:
        month = int(scene.dates[month_src][5:7])
        data["month"] = np.repeat(_sincos(np.array([2 * np.pi * month / 12])), n_cols, 0)
    else:
        data["month"] = np.full((n_cols, 2), np.nan, np.float32)
    data["era5"] = np.full((n_cols, len(MODALITIES["era5"].bands)), np.nan, np.float32)
    data["biome"] = np.zeros((n_cols, len(MODALITIES["biome"].bands)), np.uint8)
    data["eco_region"] = np.zeros((n_cols, len(MODALITIES["eco_region"].bands)), np.uint16)
    for j in range(n_cols):
        valid_frac.append({
            name: float((~invalid_mask(MODALITIES[name], data[name][j, chans])).mean())
            for name, chans in provided.items()
        })
    common = {"S2_DATE": date, "DATES": dict(scene.dates), "MONTH_SOURCE": month_src,
              "BANDS": _bands_info(provided)}
    return data, valid_frac, common


def _plan(spec: ConversionSpec, src: Path, scenes: list[str], size: int) -> list[tuple[str, int, int]]:
    """Open and check every scene before writing anything; returns (scene, tile rows, tile cols)."""
    plan = []
    for name in scenes:
        scene = open_scene(spec, src, name)
        scene.close()
        if scene.height < size or scene.width < size:
            print(f"warning: scene {name} ({scene.height} x {scene.width} px) is smaller than one "
                  f"{size}-px tile; skipped", file=sys.stderr)
            continue
        plan.append((name, scene.height // size, scene.width // size))
    if not plan:
        raise ConversionError(f"no scene under {src} holds a single {size} x {size} tile")
    return plan


def _centres(scene: Scene, row0: int, size: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    cols = np.arange(n_cols) * size + size / 2
    rows = np.full(n_cols, row0 + size / 2)
    t = scene.transform
    xs, ys = t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f
    lons, lats = rasterio.warp.transform(scene.crs, "EPSG:4326", list(xs), list(ys))
    return np.asarray(lats), np.asarray(lons)


def _convert_scene(spec, src, writer, name, n_rows, n_cols, size, start, groups, empty, counts) -> int:
    """Write every tile of one scene from row ``start`` on; returns the next free row."""
    scene = open_scene(spec, src, name)
    variants = spec.s2_sources or (None,)
    try:
        for i in range(n_rows):
            row0 = i * size
            lats, lons = _centres(scene, row0, size, n_cols)
            strip = {}
            for s in spec.sources:
                key = s.name if s.modality == "sentinel2" else s.modality
                part = _read_strip(scene, s, row0, size, n_cols * size, float(lats.mean()), counts)
                strip[key] = part if key not in strip else np.where(np.isnan(part), strip[key], part)
            for variant in variants:
                data, fracs, common = _tile_block(spec, scene, strip, variant, size, n_cols, lats, lons)
                s2_type = variant.s2_type if variant else "l1c"
                ids = [f"{name}_{s2_type}_r{i}_c{j}" for j in range(n_cols)]
                infos = []
                for j in range(n_cols):
                    infos.append({
                        "S2_type": s2_type, "CRS": str(scene.crs), "lat": float(lats[j]), "lon": float(lons[j]),
                        "biome": None, "eco_region": None,
                        "NO_DATA": any(f < 1 for f in fracs[j].values()),
                        "ALL_NO_DATA": all(f == 0 for f in fracs[j].values()),
                        "VALID_FRACTION": fracs[j], **common, "scene": name,
                        "window": {"row": row0, "col": j * size, "size": size},
                        "sources": {s.name: Path(scene.datasets[s.name].name).name for s in spec.sources
                                    if s.modality != "sentinel2" or s is variant},
                    })
                writer.write(start, data, ids, [s2_type] * n_cols, infos)
                for j in range(n_cols):
                    groups.append({"location": (name, i, j), "scene": name, "tile": start + j})
                    if infos[j]["ALL_NO_DATA"]:
                        empty.add(start + j)
                start += n_cols
    finally:
        scene.close()
    return start


def convert(
    spec_path, src, out, tile_size: int = 64, fractions: dict[str, float] | None = None, seed: int = 0,
    split_by: str = "location", overwrite: bool = False, compression_level: int = 4, progress: bool = True,
) -> dict:
    """Convert GeoTIFF folders into an MMEarth file set.

    Args:
        spec_path: YAML spec (:mod:`utils.data.geotiff_spec`).
        src: Folder holding one sub-folder per source.
        out: Output folder; its basename is the file stem (``out/<stem>.h5``, ``<stem>_band_stats.json``,
            ``<stem>_splits.json``, ``<stem>_tile_info.json``).
        tile_size: Tile side S in pixels (64 as MMEarth64, 128 as MMEarth).
        fractions: Split name -> fraction of groups; default train 0.8, val 0.1, test 0.1.
        seed: Seed of the split shuffle.
        split_by: Rows kept together in one split: ``location`` (the tiles of one window, e.g. its L1C
            and L2A versions), ``scene`` (all tiles of a scene: spatially disjoint splits) or ``tile``.
        overwrite: Replace an existing file set in ``out``.
        compression_level: gzip level.
        progress: Show a tqdm bar over scenes.

    Returns:
        Summary: ``paths`` (written files), ``num_tiles``, ``split_sizes``, ``empty_tiles`` (rows without
        any valid pixel, left out of the splits), ``invalid_pixels`` (per source and reason), ``seconds``.

    Raises:
        ConversionError: bad spec, missing folder or scene, mismatched rasters, bad band count or
            names, unknown class ids, bad fractions, or an existing output without ``overwrite``.
    """
    t0 = time.perf_counter()
    fractions = fractions or {"train": 0.8, "val": 0.1, "test": 0.1}
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ConversionError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    if split_by not in _SPLIT_GROUPS:
        raise ConversionError(f"split_by must be one of {_SPLIT_GROUPS}, got {split_by!r}")
    if tile_size < 2:
        raise ConversionError(f"tile_size must be >= 2 pixels, got {tile_size}")
    spec, src, out = load_spec(spec_path), Path(src), Path(out)
    if (out / f"{out.name}.h5").exists() and not overwrite:
        raise ConversionError(f"{out / (out.name + '.h5')} exists; pass --overwrite to replace it")
    plan = _plan(spec, src, find_scenes(spec, src), tile_size)
    variants = max(1, len(spec.s2_sources))
    num_tiles = sum(r * c for _, r, c in plan) * variants
    attrs = {"converter": "tools/geotiff_to_mmearth.py", "spec": Path(spec_path).read_text(), "source": str(src),
             "tile_size": tile_size}
    writer = MMEarthWriter(out, num_tiles, tile_size, compression_level=compression_level, attrs=attrs)
    groups, empty, counts, row = [], set(), {}, 0
    try:
        for name, n_rows, n_cols in tqdm(plan, desc="scenes", unit="scene", disable=not progress):
            row = _convert_scene(spec, src, writer, name, n_rows, n_cols, tile_size, row, groups, empty, counts)
        splits = make_splits([g[split_by] for g in groups], fractions, seed, exclude=empty)
        paths = writer.close(splits)
    except BaseException:
        writer.abort()
        raise
    return {"paths": paths, "num_tiles": num_tiles, "split_sizes": {k: len(v) for k, v in splits.items()},
            "empty_tiles": sorted(empty), "invalid_pixels": counts, "seconds": time.perf_counter() - t0}


def _fractions(text: str) -> dict[str, float]:
    try:
        out = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=FRACTION,... (e.g. train=0.8,val=0.1,test=0.1), got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input, with a one-line error)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="YAML spec: source folder -> modality, bands, remap")
    parser.add_argument("--src", required=True, help="folder holding one sub-folder per source")
    parser.add_argument("--out", required=True, help="output folder; its name is the file stem")
    parser.add_argument("--tile-size", type=int, default=64, help="tile side in pixels (64 or 128)")
    parser.add_argument("--splits", type=_fractions, default="train=0.8,val=0.1,test=0.1",
                        help="split fractions, e.g. train=0.8,val=0.1,test=0.1")
    parser.add_argument("--split-by", choices=_SPLIT_GROUPS, default="location",
                        help="rows kept in one split: location (L1C/L2A tiles of a window), scene, tile")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split shuffle")
    parser.add_argument("--compression-level", type=int, default=4, help="gzip level 0-9")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file set")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.spec, args.src, args.out, args.tile_size, args.splits, args.seed, args.split_by,
                          args.overwrite, args.compression_level)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['num_tiles']} tiles of {args.tile_size} px to {summary['paths']['h5']} "
          f"in {summary['seconds']:.2f} s; splits {summary['split_sizes']}")
    if summary["empty_tiles"]:
        print(f"{len(summary['empty_tiles'])} tiles without any valid pixel (left out of the splits)")
    for source, reasons in summary["invalid_pixels"].items():
        for reason, n in reasons.items():
            if n:
                print(f"sources.{source}: {n} pixels {reason} became no-data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
