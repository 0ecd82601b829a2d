"""Convert GeoTIFF sources into an MMEarth file set (``<stem>.h5`` + three JSON files).

Usage::

    python tools/geotiff_to_mmearth.py --spec cfgs/data/terramesh_examples.yaml \\
        --src ../shared/data/terramesh_examples --out out/terramesh_64 --tile-size 64

The YAML spec (:mod:`utils.data.geotiff_spec`) says which MMEarth modality each source fills, where its
scenes are (one multi-band raster per scene, or one folder per scene with one raster per band at its
native resolution) and names its bands; bands are placed by name into MMEarth's stored order, and every
source is read on the scene's grid (the finest raster of the ``grid`` source), warped onto it where the
spec allows resampling. Each scene (or its ``--window``) is cut into non-overlapping ``tile_size``
windows from its top-left corner (the remainder at the right and bottom is dropped). Each Sentinel-2
source (e.g. an L1C and an L2A product) yields its own tiles, sharing the other modalities of the
window. Every MMEarth dataset is written (:class:`utils.data.mmearth_writer.MMEarthWriter`, atomically:
the previous file set stays intact until the new one is complete); what the sources lack holds its
no-data value.

Derived values:

- ``lat`` / ``lon``: sin / cos of the tile centre in WGS84 degrees (``rasterio.warp.transform``).
- ``month``: sin / cos of 2*pi*m/12 with m from the S2 source's date, else from the first
  ``month_from`` source with a date; NaN when no source has a date.
- ``aster`` slope (``slope: true``): degrees, arctan of the gradient magnitude of the elevation,
  ``numpy.gradient`` (central differences, one-sided at the scene edge) with the pixel size from the
  transform in metres (geographic CRS: degrees scaled at the tile latitude); rounded to int16.
  A pixel whose neighbours' elevation is missing gets no slope.
- ``era5``: NaN; ``biome`` / ``eco_region``: all-zero one-hot rows (= unknown).

Source values that are NaN / inf, equal the source no-data, lie outside the source raster after
resampling, or do not fit the stored dtype (after ``scale`` and the scene's offset) become no-data;
categorical codes absent from the spec's ``remap`` are an error. A split with a positive fraction that
comes out empty is an error; a supplied modality (or band) without a single valid pixel in the whole
file set is reported once.
"""

from __future__ import annotations

import argparse
import errno
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
    ConversionError, ConversionSpec, Scene, SceneRef, SourceSpec, find_scenes, load_spec, open_scene, to_stored,
)
from utils.data.mmearth_files import invalid_mask  # noqa: E402
from utils.data.mmearth_writer import MMEarthWriter, check_target, make_splits  # noqa: E402

__all__ = ["convert", "slope_degrees", "main", "TILE_SIZES"]

#: Tile sizes the file sets and the training code are built for: MMEarth64 and MMEarth / MMEarth100k.
TILE_SIZES = (64, 128)
_SLOPE = band_indices("aster", ["slope"])[0]
_SPLIT_GROUPS = ("location", "scene", "tile")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def _read_strip(scene: Scene, src: SourceSpec, box: tuple[int, int, int, int], lat: float,
                counts: dict) -> np.ndarray:
    """One source's grid window ``box`` = (row, col, height, width) as (C, height, width) stored values
    (float64, NaN = no-data), C = the modality's bands."""
    row0, col0, height, width = box
    mod = MODALITIES[src.modality]
    halo = 1 if src.slope else 0  # slope needs the real neighbours of the window's edge pixels
    top, left = max(row0 - halo, 0), max(col0 - halo, 0)
    bottom, right = min(row0 + height + halo, scene.height), min(col0 + width + halo, scene.width)
    bands = scene.read(src.name, Window(left, top, right - left, bottom - top))
    out = np.full((len(mod.bands), bottom - top, right - left), np.nan)
    src_counts = counts.setdefault(src.name, {})
    for band, channel in zip(bands, scene.channels[src.name]):
        if band is not None and channel is not None:
            x, nodata, label = band
            out[channel] = to_stored(x, src, nodata, scene.offsets[src.name], label, src_counts)
    if src.slope:
        elevation = out[band_indices("aster", ["elevation"])[0]]
        out[_SLOPE] = np.rint(slope_degrees(elevation, scene.transform, scene.crs, lat))
    return out[:, row0 - top:row0 - top + height, col0 - left:col0 - left + width]


def _provided(spec: ConversionSpec, scene: Scene, s2: SourceSpec | None) -> dict[str, list[int]]:
    """Modality -> the channels the sources fill for tiles of S2 source ``s2``."""
    out: dict[str, list[int]] = {}
    for src in spec.sources:
        if src.modality == "sentinel2" and src is not s2:
            continue
        chans = [c for c in scene.channels[src.name] if c is not None] + ([_SLOPE] if src.slope else [])
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
    (n, C, ...) arrays, each tile's valid fraction per provided modality, the provided channels and
    shared tile-info fields."""
    provided = _provided(spec, scene, s2)
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
    return data, valid_frac, provided, common


def _box(scene: Scene, window: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """The part of the grid to tile: ``window`` (row, col, height, width) clipped to the scene."""
    if window is None:
        return 0, 0, scene.height, scene.width
    row, col, height, width = window
    return row, col, max(0, min(height, scene.height - row)), max(0, min(width, scene.width - col))


def _plan(spec: ConversionSpec, refs: list[SceneRef], size: int, window) -> list[tuple[SceneRef, tuple, int, int]]:
    """Open and check every scene before writing anything; returns (scene, box, tile rows, tile cols)."""
    plan = []
    for ref in tqdm(refs, desc="checking scenes", unit="scene", disable=len(refs) < 20):
        scene = open_scene(spec, ref)
        scene.close()
        box = _box(scene, window)
        if box[2] < size or box[3] < size:
            what = "its --window part" if window else "it"
            print(f"warning: scene {ref.name} ({scene.height} x {scene.width} px): {what} is smaller than one "
                  f"{size}-px tile; skipped", file=sys.stderr)
            continue
        longest = f"{ref.name}_l1c_r{box[2] // size - 1}_c{box[3] // size - 1}"
        if not longest.isascii() or len(longest) > 100:
            where = ", ".join(str(e.path) for e in ref.entries.values())
            raise ConversionError(f"scene {ref.name!r} ({where}) gives tile ids such as {longest!r}, which MMEarth's "
                                  f"metadata (tile_id: ASCII, at most 100 bytes) cannot hold; rename the files or "
                                  f"folders, or name scenes by other fields (scenes.match)")
        plan.append((ref, box, box[2] // size, box[3] // size))
    if not plan:
        raise ConversionError(f"no scene holds a single {size} x {size} tile"
                              + (f" inside --window {','.join(map(str, window))}" if window else ""))
    return plan


def _centres(scene: Scene, row0: int, col0: int, size: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    cols = col0 + np.arange(n_cols) * size + size / 2
    rows = np.full(n_cols, row0 + size / 2)
    t = scene.transform
    xs, ys = t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f
    lons, lats = rasterio.warp.transform(scene.crs, "EPSG:4326", list(xs), list(ys))
    return np.asarray(lats), np.asarray(lons)


def _groups(plan, variants: int, start: int = 0, prefix: str = "") -> list[dict]:
    """The split-group keys of every row, in row order (as :func:`_convert_scene` writes them), from row ``start``;
    ``prefix`` keeps the scenes of several inputs apart."""
    out, row = [], start
    for ref, _, n_rows, n_cols in plan:
        for i in range(n_rows):
            for _ in range(variants):
                for j in range(n_cols):
                    out.append({"location": (prefix + ref.name, i, j), "scene": prefix + ref.name, "tile": row})
                    row += 1
    return out


def _relative(path: Path, src: Path) -> str:
    try:
        return str(path.resolve().relative_to(src.resolve()))
    except ValueError:
        return str(path)


def _convert_scene(spec, src, writer, ref, box, n_rows, n_cols, size, start, empty, counts, seen) -> int:
    """Write every tile of one scene from row ``start`` on; returns the next free row."""
    scene = open_scene(spec, ref)
    variants = spec.s2_sources or (None,)
    row0, col0 = box[0], box[1]
    try:
        for i in range(n_rows):
            r = row0 + i * size
            lats, lons = _centres(scene, r, col0, size, n_cols)
            strip = {}
            for s in spec.sources:
                key = s.name if s.modality == "sentinel2" else s.modality
                part = _read_strip(scene, s, (r, col0, size, n_cols * size), float(lats.mean()), counts)
                strip[key] = part if key not in strip else np.where(np.isnan(part), strip[key], part)
            for variant in variants:
                data, fracs, provided, common = _tile_block(spec, scene, strip, variant, size, n_cols, lats, lons)
                s2_type = variant.s2_type if variant else "l1c"
                ids = [f"{ref.name}_{s2_type}_r{i}_c{j}" for j in range(n_cols)]
                used = [s for s in spec.sources if s.modality != "sentinel2" or s is variant]
                infos = []
                for j in range(n_cols):
                    infos.append({
                        "S2_type": s2_type, "CRS": str(scene.crs), "lat": float(lats[j]), "lon": float(lons[j]),
                        "biome": None, "eco_region": None,
                        "NO_DATA": any(f < 1 for f in fracs[j].values()),
                        "ALL_NO_DATA": all(f == 0 for f in fracs[j].values()),
                        "VALID_FRACTION": fracs[j], **common, "scene": ref.name,
                        "window": {"row": r, "col": col0 + j * size, "size": size},
                        "sources": {s.name: _relative(scene.paths[s.name], src) for s in used},
                        "OFFSETS": {s.name: scene.offsets[s.name] for s in used},
                        "RESAMPLED": {s.name: scene.resampled[s.name] for s in used if scene.resampled[s.name]},
                    })
                    for name, chans in provided.items():
                        entry = seen.setdefault((name, s2_type if name == "sentinel2" else None), [set(), False])
                        entry[0].update(chans)
                        entry[1] = entry[1] or fracs[j][name] > 0
                writer.write(start, data, ids, [s2_type] * n_cols, infos)
                for j in range(n_cols):
                    if infos[j]["ALL_NO_DATA"]:
                        empty.add(start + j)
                start += n_cols
    finally:
        scene.close()
    return start


def _check_splits(splits: dict[str, list[int]], fractions: dict[str, float], split_by: str, groups: list,
                  why: str) -> None:
    """An empty split with a positive fraction is an error naming the split and the option."""
    for name, rows in splits.items():
        if rows or fractions[name] <= 0:
            continue
        n = len(set(groups))
        positive = [k for k, f in fractions.items() if f > 0]
        unit = {"location": "tile location", "scene": "scene", "tile": "tile"}[split_by]
        hint = ("use --split-by location or tile for spatially mixed splits, or convert more scenes"
                if split_by == "scene" else "convert more scenes or a larger --window")
        raise ConversionError(
            f"split {name!r} would be empty: --split-by {split_by} gives {n} {unit} group(s){why} for the "
            f"{len(positive)} splits with a positive fraction in --splits ({', '.join(positive)}); {hint}, or "
            f"give {name} fraction 0 in --splits")


def _no_valid_data(writer: MMEarthWriter, seen: dict, specs: list[ConversionSpec]) -> list[str]:
    """One message per supplied modality (per S2 product) or band without any valid pixel."""
    out = []
    for (name, s2_type), (chans, any_valid) in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        mod = MODALITIES[name]
        label = f"{name} ({s2_type})" if s2_type else name
        sources = ", ".join(dict.fromkeys(f"sources.{s.name}" for spec in specs for s in spec.sources
                                          if s.modality == name and (s2_type is None or s.s2_type == s2_type)))
        if not any_valid:
            out.append(f"{label} from {sources}: no valid pixel in the whole file set")
            continue
        key = f"sentinel2_{s2_type}" if s2_type else mod.stats_key
        if key in writer.stats:
            empty = [mod.bands[c] for c in sorted(chans) if writer.stats[key].count[c] == 0]
            if empty:
                out.append(f"{label} band(s) {', '.join(empty)} from {sources}: no valid pixel in the whole file set")
    return out


def convert(
    spec_path, src, out, tile_size: int = 64, fractions: dict[str, float] | None = None, seed: int = 0,
    split_by: str = "location", overwrite: bool = False, compression_level: int = 4, progress: bool = True,
    window: tuple[int, int, int, int] | None = None,
) -> dict:
    """Convert GeoTIFF sources into an MMEarth file set.

    Several inputs (a list of specs with the list of their source folders, e.g. TerraMesh and the per-band
    Sentinel-2 scenes) go into one file set: their tiles one after the other, one set of band statistics,
    splits drawn over all of them.

    Args:
        spec_path: YAML spec (:mod:`utils.data.geotiff_spec`), or a list of specs.
        src: Folder holding the sources' folders, or a list of folders (one per spec).
        out: Output folder; its basename is the file stem (``out/<stem>.h5``, ``<stem>_band_stats.json``,
            ``<stem>_splits.json``, ``<stem>_tile_info.json``). Other files in it are kept.
        tile_size: Tile side S in pixels, one of :data:`TILE_SIZES` (64 as MMEarth64, 128 as MMEarth).
        fractions: Split name -> fraction of groups; default train 0.8, val 0.1, test 0.1.
        seed: Seed of the split shuffle.
        split_by: Rows kept together in one split: ``location`` (the tiles of one window, e.g. its L1C
            and L2A versions), ``scene`` (all tiles of a scene: spatially disjoint splits) or ``tile``.
        overwrite: Replace an existing file set in ``out``.
        compression_level: gzip level.
        progress: Show a tqdm bar over scenes.
        window: Only tile this part of every scene grid: (row, col, height, width) in pixels.

    Returns:
        Summary: ``paths`` (written files), ``num_tiles``, ``split_sizes``, ``empty_tiles`` (rows without
        any valid pixel, left out of the splits), ``invalid_pixels`` (per source and reason),
        ``no_valid_data`` (messages for supplied modalities or bands without a valid pixel anywhere),
        ``leftovers`` (hidden folders of interrupted runs beside ``out``), ``seconds``.

    Raises:
        ConversionError: bad spec, missing folder or scene, mismatched rasters, bad band count or
            names, unknown class ids, an unsupported tile size, bad fractions or window, a split that
            comes out empty, an existing output without ``overwrite``, or a full disk ("no space left
            on ..."). Nothing in ``out`` is changed then.
    """
    t0 = time.perf_counter()
    if tile_size not in TILE_SIZES:
        raise ConversionError(f"--tile-size {tile_size} is not supported: MMEarth tiles are 64 px (MMEarth64) "
                              f"or 128 px (MMEarth, MMEarth100k); use --tile-size 64 or --tile-size 128")
    fractions = fractions or {"train": 0.8, "val": 0.1, "test": 0.1}
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ConversionError(f"--splits: fractions must be >= 0 and sum to 1, got {fractions}")
    if split_by not in _SPLIT_GROUPS:
        raise ConversionError(f"--split-by must be one of {_SPLIT_GROUPS}, got {split_by!r}")
    if window is not None and (len(window) != 4 or min(window[:2]) < 0 or min(window[2:]) < 1):
        raise ConversionError(f"--window must be ROW,COL,HEIGHT,WIDTH with ROW, COL >= 0 and HEIGHT, WIDTH >= 1, "
                              f"got {window}")
    spec_paths = list(spec_path) if isinstance(spec_path, (list, tuple)) else [spec_path]
    srcs = [Path(x) for x in (list(src) if isinstance(src, (list, tuple)) else [src])]
    if len(spec_paths) != len(srcs):
        raise ConversionError(f"--spec and --src come in pairs: got {len(spec_paths)} spec(s) and {len(srcs)} folder(s)")
    out = Path(out)
    try:
        leftovers = check_target(out, overwrite)
    except FileExistsError as err:
        raise ConversionError(str(err)) from None
    for path in leftovers:
        print(f"warning: {path} was left by an interrupted conversion, or belongs to one still running (an "
              f".old-* folder may hold a previous file set); delete it when no conversion runs", file=sys.stderr)
    inputs, groups, num_tiles = [], [], 0  # (spec, src, plan) per input; split groups of every row
    for k, (path, folder) in enumerate(zip(spec_paths, srcs)):
        spec = load_spec(path)
        plan = _plan(spec, find_scenes(spec, folder), tile_size, window)
        variants = max(1, len(spec.s2_sources))
        prefix = f"{k}:" if len(srcs) > 1 else ""
        groups += [g[split_by] for g in _groups(plan, variants, num_tiles, prefix)]
        num_tiles += sum(r * c for _, _, r, c in plan) * variants
        inputs.append((spec, folder, plan))
    _check_splits(make_splits(groups, fractions, seed), fractions, split_by, groups, "")
    attrs = {"converter": "tools/geotiff_to_mmearth.py",
             "spec": "\n---\n".join(Path(x).read_text() for x in spec_paths),
             "source": ", ".join(map(str, srcs)), "tile_size": tile_size}
    if window is not None:
        attrs["window"] = ",".join(map(str, window))
    try:
        writer = MMEarthWriter(out, num_tiles, tile_size, overwrite=overwrite, compression_level=compression_level,
                               attrs=attrs)
    except OSError as err:
        raise _os_error(err, out) from None
    empty, counts, seen, row = set(), {}, {}, 0
    try:
        with tqdm(total=sum(len(plan) for _, _, plan in inputs), desc="scenes", unit="scene",
                  disable=not progress) as bar:
            for spec, folder, plan in inputs:
                for ref, box, n_rows, n_cols in plan:
                    row = _convert_scene(spec, folder, writer, ref, box, n_rows, n_cols, tile_size, row, empty,
                                         counts, seen)
                    bar.update()
        splits = make_splits(groups, fractions, seed, exclude=empty)
        _check_splits(splits, fractions, split_by, [g for r, g in enumerate(groups) if r not in empty],
                      f" after leaving out {len(empty)} tile(s) without any valid pixel")
        no_valid = _no_valid_data(writer, seen, [spec for spec, _, _ in inputs])
        paths = writer.close(splits)
    except OSError as err:
        writer.abort()
        raise _os_error(err, out) from None
    except BaseException:
        writer.abort()
        raise
    return {"paths": paths, "num_tiles": num_tiles, "split_sizes": {k: len(v) for k, v in splits.items()},
            "empty_tiles": sorted(empty), "invalid_pixels": counts, "no_valid_data": no_valid,
            "leftovers": leftovers, "seconds": time.perf_counter() - t0}


def _os_error(err: OSError, out: Path) -> Exception:
    """A full disk becomes one ConversionError naming the output folder; other OSErrors pass unchanged."""
    if err.errno == errno.ENOSPC:
        return ConversionError(f"no space left on {out.parent} (writing {out}); the partial file set was removed "
                               f"and nothing was replaced")
    if err.errno == errno.EDQUOT:
        return ConversionError(f"disk quota exceeded on {out.parent} (writing {out}); the partial file set was "
                               f"removed and nothing was replaced")
    if isinstance(err, FileExistsError):
        return ConversionError(str(err))
    return err


def _fractions(text: str) -> dict[str, float]:
    try:
        out = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=FRACTION,... (e.g. train=0.8,val=0.1,test=0.1), got {text!r}")
    return out


def _window(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected ROW,COL,HEIGHT,WIDTH in pixels, got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input, with a one-line error)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, action="append",
                        help="YAML spec: sources -> modality, layout, bands, remap (repeat with --src for several inputs)")
    parser.add_argument("--src", required=True, action="append",
                        help="folder holding the sources' folders (one per --spec, in the same order)")
    parser.add_argument("--out", required=True, help="output folder; its name is the file stem")
    parser.add_argument("--tile-size", type=int, default=64,
                        help=f"tile side in pixels: {' or '.join(map(str, TILE_SIZES))} (MMEarth64, MMEarth)")
    parser.add_argument("--splits", type=_fractions, default="train=0.8,val=0.1,test=0.1",
                        help="split fractions, e.g. train=0.8,val=0.1,test=0.1")
    parser.add_argument("--split-by", choices=_SPLIT_GROUPS, default="location",
                        help="rows kept in one split: location (L1C/L2A tiles of a window), scene, tile")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split shuffle")
    parser.add_argument("--window", type=_window, default=None,
                        help="only tile ROW,COL,HEIGHT,WIDTH (pixels of the 10 m grid) of every scene")
    parser.add_argument("--compression-level", type=int, default=4, help="gzip level 0-9")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file set in --out")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.spec, args.src, args.out, args.tile_size, args.splits, args.seed, args.split_by,
                          args.overwrite, args.compression_level, window=args.window)
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
    for message in summary["no_valid_data"]:
        print(f"warning: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
