"""Maps from a fine-tuned model: predict every scene of a GeoTIFF folder and write the classes as GeoTIFF.

    python run_finetuning.py --predict --checkpoint OUT/checkpoint-best.pth --src RASTERS --out MAPS \\
        [--spec SPEC] [--overlap PX] [--probabilities] [--batch-size N] [--device auto|cpu|cuda]

The checkpoint is a fine-tuning checkpoint (format v2, kind ``finetuning``) of GeoTIFF data
(``finetune.dataset: geotiff``): its ``encoder`` entry holds the architecture, the weights and, per input
domain, the normalisation statistics of the training split, and its ``label`` domain entry the class names
and colours, the spec (so no spec file is needed; ``--spec`` reads another one, e.g. for other folder
names) and the training chips of each split. Scenes are found under ``--src`` with the spec's input sources.

Each scene is predicted in tiles of the training input size (``data.input_size``) that overlap by
``--overlap`` pixels (the last row and column of tiles end at the scene edge); every pixel takes the
prediction of the tile in which it lies farthest from a tile edge (the boundary between two neighbours is
the middle of their overlap), so each tile's share of the map is exactly that tile's own prediction and
there are no seams. A scene smaller than a tile is padded with no-data. Pixels where no input domain holds
a valid value are no-data in the output. Written per scene, beside each other in ``--out``:

- ``<scene>.tif``: uint8 class ids (uint16 for more than 254 classes), no-data 255 (65535), the input grid's
  CRS, transform and size, a colour table and the class names (tag ``CLASS_NAMES``, JSON);
- ``<scene>_probabilities.tif`` (``--probabilities``): float32 class probabilities, one band per class
  (described by its name), NaN where there is no prediction;
- ``<scene>.png``: a preview of the class map with a legend (beside the Sentinel-2 RGB when it is an input).

Classification models paint each tile's class over its share of the map. When ``--src`` also holds the
spec's label rasters, the map is compared with them: a table of IoU per class (by name) on the pixels of
the training, validation and test chips of the checkpoint and on pixels in none of them (other scenes, chip
remainders), with the mIoU of predicting the most frequent training class everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from tqdm import tqdm

from multimae.domains import IGNORE_INDEX
from multimae.encoder import MultiModalEncoder
from utils.checkpoint import CheckpointError, load_state_checked, read_checkpoint
from utils.data.geotiff import ChipReader, FinetuneSpec, load_finetune_spec
from utils.data.geotiff_spec import Scene, find_scenes, open_scene
from utils.finetune import FineTuneModel, build_head
from utils.metrics import TaskMetrics, format_table
from utils.visualize import save_prediction_preview

__all__ = ["Predictor", "load_predictor", "tile_starts", "tile_shares", "predict_scene", "write_classes",
           "predict_folder", "main"]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``size`` pixels with at least ``overlap`` shared pixels
    between neighbours; the last tile ends at ``size`` (one tile at 0 when ``size <= tile``).

    Raises:
        ValueError: ``overlap`` outside [0, tile).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"--overlap must lie in [0, tile size {tile}), got {overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def tile_shares(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """The part of the axis each tile predicts: ``(lo, hi)`` in scene pixels, cut in the middle of each overlap.

    The shares are disjoint, cover ``[0, size)`` and each lies inside its tile.
    """
    bounds = [0] + [(nxt + cur + tile) // 2 for cur, nxt in zip(starts, starts[1:])] + [size]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


@dataclass
class Predictor:
    """A fine-tuned model ready to predict GeoTIFF scenes.

    Attributes:
        model: The encoder + head, in eval mode on ``device``.
        reader: Reads and normalises the input domains with the training statistics.
        task: ``segmentation`` or ``classification``.
        class_names, class_colors: Per class id.
        tile: Tile side in px (the training input size).
        label: The checkpoint's ``label`` entry (class values, training class counts, splits, spec).
        device: Where the model runs.
    """

    model: FineTuneModel
    reader: ChipReader
    task: str
    class_names: list[str]
    class_colors: list[str]
    tile: int
    label: dict
    device: torch.device

    @property
    def num_classes(self) -> int:
        """K."""
        return len(self.class_names)

    @torch.no_grad()
    def probabilities(self, inputs: dict[str, np.ndarray], valid: dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities of a batch of tiles: float32 (B, K, H, W) (classification: constant per tile).

        Args:
            inputs: Domain -> (B, C, H, W) float32 or (B, H, W) int64, as :meth:`ChipReader.read` gives.
            valid: Domain -> bool (B, H, W).
        """
        x = {d: torch.from_numpy(v).to(self.device) for d, v in inputs.items()}
        ok = {d: torch.from_numpy(v).to(self.device) for d, v in valid.items()}
        logits = self.model(x, ok).float()
        probs = logits.softmax(1)
        if probs.dim() == 2:
            probs = probs[:, :, None, None].expand(-1, -1, *next(iter(ok.values())).shape[-2:])
        return probs.cpu().numpy()


def _spec_of(label: dict, spec_path: str | None, sources: list[str], with_label: bool) -> FinetuneSpec:
    if spec_path:
        return load_finetune_spec(spec_path, keep_sources=sources, with_label=with_label)
    return load_finetune_spec(label["spec_path"], label["spec"], keep_sources=sources, with_label=with_label)


def load_predictor(path: str | Path, spec_path: str | None = None, device: str = "auto") -> Predictor:
    """Rebuild a fine-tuned model and its reader from a checkpoint.

    Args:
        path: ``checkpoint-best.pth`` / ``checkpoint-last.pth`` of a GeoTIFF fine-tuning run.
        spec_path: A spec to read the rasters with instead of the checkpoint's copy.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Raises:
        FileNotFoundError: no such checkpoint.
        CheckpointError: not a fine-tuning checkpoint, one of other data than GeoTIFF folders, a multi-label
            model (no class per pixel), or weights that do not fit the stored architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no file {path}")
    ck = read_checkpoint(path, kind="finetuning")
    domains = ck["encoder"].get("domains") or {}
    label = domains.get("label")
    if label is None:
        raise CheckpointError(f"{path}: holds no label description (encoder.domains.label); prediction maps come "
                              f"from runs with finetune.dataset=geotiff")
    if ck["task"] == "multilabel":
        raise CheckpointError(f"{path}: a multilabel model has no single class per pixel to map")
    cfg, in_domains = ck["config"], list(ck["in_domains"])
    tile = int(cfg["data"]["input_size"])
    ft = cfg["finetune"]
    encoder = MultiModalEncoder.from_spec(ck["encoder"]["spec"], in_domains=in_domains, input_size=tile)
    names = list(label["class_names"])
    patch_size = ft.get("patch_size")  # configs written before finetune.patch_size: each domain's own
    head = build_head(ck["task"], ft["head"], encoder=encoder, num_classes=len(names), pool=ft["pool"],
                      probe=ft["protocol"] == "linear_probe", patch_size=patch_size)
    model = FineTuneModel(encoder, head, pool=ft["pool"], patch_size=patch_size)
    weights = {**{f"encoder.{k}": v for k, v in ck["encoder"]["state_dict"].items()},
               **{f"head.{k}": v for k, v in ck["head"]["state_dict"].items()}}
    load_state_checked(model, weights, what=f"fine-tuned model ({path})")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev).eval()
    sources = sorted({s for d in in_domains for s in domains[d]["spec_sources"]})
    spec = _spec_of(label, spec_path, sources, with_label=False)
    stats = {d: next(iter(domains[d]["stats"].values())) for d in in_domains if domains[d]["stats"]}
    norm = "per_tile" if any(domains[d]["normalization"] == "per_tile" for d in in_domains) else "band_stats"
    reader = ChipReader(spec, in_domains, stats, norm)
    return Predictor(model, reader, ck["task"], names, list(label["class_colors"]), tile, label, dev)


def _pad(inputs: dict, valid: dict, tile: int) -> tuple[dict, dict]:
    """Pad a window smaller than the tile at the bottom / right with no-data."""
    out_x, out_v = {}, {}
    for d, x in inputs.items():
        h, w = x.shape[-2:]
        pad = [(0, 0)] * (x.ndim - 2) + [(0, tile - h), (0, tile - w)]
        out_x[d] = np.pad(x, pad, constant_values=IGNORE_INDEX if x.ndim == 2 else 0)
        out_v[d] = np.pad(valid[d], [(0, tile - h), (0, tile - w)], constant_values=False)
    return out_x, out_v


def predict_scene(pred: Predictor, scene: Scene, overlap: int, batch_size: int = 16,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predict a whole scene in overlapping tiles (see the module docstring).

    Returns:
        float32 (K, H, W) class probabilities and bool (H, W): True where some input domain is valid (a
        prediction), False where the output is no-data.
    """
    t = pred.tile
    h, w = scene.height, scene.width
    rows, cols = tile_starts(h, t, overlap), tile_starts(w, t, overlap)
    row_shares, col_shares = tile_shares(rows, t, h), tile_shares(cols, t, w)
    probs = np.zeros((pred.num_classes, h, w), np.float32)
    observed = np.zeros((h, w), bool)
    jobs = [(r, rs, c, cs) for r, rs in zip(rows, row_shares) for c, cs in zip(cols, col_shares)]
    bar = tqdm(range(0, len(jobs), batch_size), desc=scene.name, unit="batch", disable=not progress, leave=False)
    for start in bar:
        batch = jobs[start:start + batch_size]
        xs, vs = [], []
        for r, _, c, _ in batch:
            x, v = pred.reader.read(scene, Window(c, r, min(t, w), min(t, h)))
            x, v = _pad(x, v, t)
            xs.append(x)
            vs.append(v)
        inputs = {d: np.stack([x[d] for x in xs]) for d in xs[0]}
        valid = {d: np.stack([v[d] for v in vs]) for d in vs[0]}
        p = pred.probabilities(inputs, valid)
        seen = np.any(np.stack(list(valid.values()), 1), 1)  # (B, t, t)
        for b, (r, (r0, r1), c, (c0, c1)) in enumerate(batch):
            probs[:, r0:r1, c0:c1] = p[b, :, r0 - r:r1 - r, c0 - c:c1 - c]
            observed[r0:r1, c0:c1] = seen[b, r0 - r:r1 - r, c0 - c:c1 - c]
    return probs, observed


def write_classes(path: Path, classes: np.ndarray, scene: Scene, names: list[str], colors: list[str]) -> None:
    """Write a class map (int (H, W), ``IGNORE_INDEX`` = no-data) as a GeoTIFF on the scene's grid."""
    k = len(names)
    dtype, nodata = ("uint8", 255) if k < 255 else ("uint16", 65535)
    data = np.where(classes == IGNORE_INDEX, nodata, classes).astype(dtype)
    profile = dict(driver="GTiff", height=scene.height, width=scene.width, count=1, dtype=dtype, crs=scene.crs,
                   transform=scene.transform, nodata=nodata, compress="deflate", tiled=scene.width >= 256
                   and scene.height >= 256)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data, 1)
        ds.set_band_description(1, "class")
        ds.update_tags(CLASS_NAMES=json.dumps(names), NODATA_MEANING="no valid input pixel")
        if dtype == "uint8":
            cmap = {i: tuple(int(c[j:j + 2], 16) for j in (1, 3, 5)) + (255,) for i, c in enumerate(colors)}
            ds.write_colormap(1, cmap)


def _write_probabilities(path: Path, probs: np.ndarray, observed: np.ndarray, scene: Scene, names: list[str]) -> None:
    data = np.where(observed[None], probs, np.nan).astype(np.float32)
    profile = dict(driver="GTiff", height=scene.height, width=scene.width, count=len(names), dtype="float32",
                   crs=scene.crs, transform=scene.transform, nodata=float("nan"), compress="deflate")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        for i, n in enumerate(names, start=1):
            ds.set_band_description(i, n)


def _split_masks(pred: Predictor, scene: Scene) -> dict[str, np.ndarray]:
    """Split name -> bool (H, W) pixels of the checkpoint's chips of that split in this scene; ``none``: the rest."""
    tile = int(pred.label["tile_size"])
    out = {}
    taken = np.zeros((scene.height, scene.width), bool)
    for split, ids in pred.label["splits"].items():
        m = np.zeros_like(taken)
        for chip in ids:
            if pred.task == "segmentation":
                head, _, tail = chip.rpartition("_r")
                if head != scene.name:
                    continue
                i, j = (int(v) for v in tail.split("_c"))
                m[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = True
            elif chip == scene.name:
                m[:] = True
        out[split] = m
        taken |= m
    out["none"] = ~taken
    return out


def predict_folder(checkpoint, src, out, *, spec_path: str | None = None, overlap: int | None = None,
                   probabilities: bool = False, batch_size: int = 16, device: str = "auto") -> dict:
    """Predict every scene under ``src`` into ``out`` (see the module docstring).

    Returns:
        ``{"scenes": {scene: {"classes": path, "probabilities": path or None, "preview": path,
        "class_fraction": {name: fraction of predicted pixels}}}, "evaluation": {split: {"miou",
        "per_class_iou": {name: IoU or None}, "majority_miou", "pixels"}} (when label rasters are present),
        "seconds"}``; ``out/predictions.json`` holds the same.

    Raises:
        FileNotFoundError, CheckpointError, ConversionError: see :func:`load_predictor`, a missing folder or
            scene, unreadable rasters.
    """
    t0 = time.perf_counter()
    pred = load_predictor(checkpoint, spec_path, device)
    overlap = pred.tile // 4 if overlap is None else int(overlap)
    src, out = Path(src), Path(out)
    spec = pred.reader.spec
    evaluate = False
    if pred.task == "segmentation" and (spec_path or pred.label.get("spec")):
        labelled = _spec_of(pred.label, spec_path, pred.reader.sources, with_label=True)
        evaluate = (src / labelled.label.source.folder).is_dir()
        if evaluate:
            spec = labelled
    truth = ChipReader(spec, []) if evaluate else None
    refs = find_scenes(spec.scenes, src)
    out.mkdir(parents=True, exist_ok=True)
    k = pred.num_classes
    major = int(np.argmax(pred.label["train_class_counts"]))
    metrics = {s: (TaskMetrics("segmentation", k), TaskMetrics("segmentation", k), [0])
               for s in [*pred.label["splits"], "none"]}
    rgb = None
    if "s2_rgb" in pred.reader.in_domains:
        rgb = ChipReader(pred.reader.spec, ["s2_rgb"], {"s2_rgb": pred.reader.stats["s2_rgb"]}, "band_stats")
    results = {}
    for ref in tqdm(refs, desc="predicting scenes", unit="scene", disable=len(refs) < 2):
        scene = open_scene(spec.scenes, ref)
        try:
            probs, observed = predict_scene(pred, scene, overlap, batch_size)
            classes = np.where(observed, probs.argmax(0), IGNORE_INDEX)
            paths = {"classes": out / f"{ref.name}.tif", "probabilities": None, "preview": out / f"{ref.name}.png"}
            write_classes(paths["classes"], classes, scene, pred.class_names, pred.class_colors)
            if probabilities:
                paths["probabilities"] = out / f"{ref.name}_probabilities.tif"
                _write_probabilities(paths["probabilities"], probs, observed, scene, pred.class_names)
            whole = Window(0, 0, scene.width, scene.height)
            image = valid = None
            if rgb is not None:
                x, v = rgb.read(scene, whole)
                image, valid = x["s2_rgb"], v["s2_rgb"]
            save_prediction_preview(paths["preview"], classes, pred.class_names, pred.class_colors, image=image,
                                    image_valid=valid, title=f"{ref.name}: {Path(checkpoint).name}")
            if evaluate:
                label = truth.label(scene, whole)
                for split, mask in _split_masks(pred, scene).items():
                    sel = torch.from_numpy(np.where(mask & observed, label, IGNORE_INDEX))[None]
                    model_m, major_m, pixels = metrics[split]
                    model_m.update(torch.from_numpy(np.where(observed, classes, 0))[None], sel)
                    major_m.update(torch.full_like(sel, major), sel)
                    pixels[0] += int((sel >= 0).sum())
        finally:
            scene.close()
        n = max(int(observed.sum()), 1)
        frac = {name: float((classes == i).sum()) / n for i, name in enumerate(pred.class_names)}
        results[ref.name] = {**{key: None if p is None else str(p) for key, p in paths.items()},
                             "class_fraction": frac}
        print(f"{ref.name}: {scene.height} x {scene.width} px -> {paths['classes']}")
    evaluation = {}
    for split, (model_m, major_m, pixels) in metrics.items():
        if pixels[0] == 0:
            continue
        m, b = model_m.compute(), major_m.compute()
        evaluation[split] = {"miou": m["miou"], "majority_miou": b["miou"], "pixels": pixels[0],
                             "per_class_iou": dict(zip(pred.class_names, m["per_class_iou"]))}
    summary = {"checkpoint": str(checkpoint), "src": str(src), "tile": pred.tile, "overlap": overlap,
               "scenes": results, "evaluation": evaluation, "majority_class": pred.class_names[major],
               "seconds": round(time.perf_counter() - t0, 2)}
    (out / "predictions.json").write_text(json.dumps(summary, indent=1))
    if evaluation:
        _print_evaluation(evaluation, pred.class_names, pred.class_names[major])
    return summary


def _print_evaluation(evaluation: dict, names: list[str], major: str) -> None:
    splits = list(evaluation)
    rows = [{"class": n, **{s: evaluation[s]["per_class_iou"][n] for s in splits}} for n in names]
    rows.append({"class": "mIoU", **{s: evaluation[s]["miou"] for s in splits}})
    rows.append({"class": f"majority ({major}) mIoU", **{s: evaluation[s]["majority_miou"] for s in splits}})
    rows.append({"class": "labelled pixels", **{s: evaluation[s]["pixels"] for s in splits}})
    print("\nIoU of the predicted maps against the label rasters, on the pixels of the checkpoint's chips of "
          "each split ('none': pixels in no chip; '-': class absent there and never predicted):")
    print(format_table(rows, ["class", *splits]))


def main(argv: list[str] | None = None) -> dict:
    """Command line of ``run_finetuning.py --predict`` (``--predict`` itself removed from ``argv``)."""
    parser = argparse.ArgumentParser(prog="run_finetuning.py --predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint of a finetune.dataset=geotiff run")
    parser.add_argument("--src", required=True, help="folder holding the spec's source folders")
    parser.add_argument("--out", required=True, help="folder for <scene>.tif, <scene>.png, predictions.json")
    parser.add_argument("--spec", default=None, help="spec to read the rasters with (default: the checkpoint's)")
    parser.add_argument("--overlap", type=int, default=None, help="pixels shared by neighbouring tiles "
                        "(default: a quarter of the tile)")
    parser.add_argument("--probabilities", action="store_true", help="also write <scene>_probabilities.tif")
    parser.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return predict_folder(args.checkpoint, args.src, args.out, spec_path=args.spec, overlap=args.overlap,
                          probabilities=args.probabilities, batch_size=args.batch_size, device=args.device)


if __name__ == "__main__":
    from utils.config import user_errors

    with user_errors():
        main(sys.argv[1:])
