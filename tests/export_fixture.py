"""Real TerraMesh tiles and tiny pretraining checkpoints for the export tests (safetensors, ONNX, TerraTorch).

Import the fixtures into a test module (``from tests.export_fixture import terramesh64``); pytest then
shares the session-scoped conversion between modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from multimae.build import build_pretraining
from tools.export_encoder import export_encoder
from tools.geotiff_to_mmearth import convert
from utils.checkpoint import encoder_entry, save_checkpoint
from utils.config import load_config
from utils.data.mmearth import MMEarthDataset

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "cfgs" / "data" / "terramesh_examples.yaml"
#: The demo's input domains (cfgs/pretrain/demo.yaml): every domain the converted TerraMesh sample holds.
DEMO_DOMAINS = ["s2_rgb", "s2_rededge", "s2_nir", "s2_swir", "s1", "elevation", "dynamic_world"]
TINY = ["model.preset={dim: 32, depth: 2, heads: 2}", "model.class_embed_dim=8", "multimae.decoder.dim=16",
        "multimae.decoder.depth=1", "multimae.decoder.heads=2", "multimae.masking.num_encoded_tokens=16",
        "data.elevation_norm=band_stats"]


@pytest.fixture(scope="session")
def terramesh64(shared_data_dir, tmp_path_factory) -> Path:
    """The real TerraMesh sample converted to 64 px MMEarth tiles (as ``make demo`` does)."""
    src = shared_data_dir / "terramesh_examples"
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    out = tmp_path_factory.mktemp("terramesh") / "terramesh64"
    convert(SPEC, src, out, tile_size=64, progress=False)
    return out


def real_batch(data_path: Path, domains=DEMO_DOMAINS, split: str = "val", size: int = 64) -> dict:
    """Every tile of ``split`` as one batch (the batch contract of docs/DESIGN.md), full tiles, no augmentation."""
    ds = MMEarthDataset(data_path, domains, split, input_size=size, elevation_norm="band_stats")
    return default_collate([ds[i] for i in range(len(ds))])


def write_checkpoint(path: Path, data_path: Path, *extra: str, in_domains=DEMO_DOMAINS, seed: int = 0) -> dict:
    """A tiny pretraining checkpoint (v2, random weights) whose domain records come from ``data_path``.

    Returns:
        The checkpoint dict written.
    """
    cfg = load_config(None, [*TINY, f"in_domains={list(in_domains)}", f"multimae.out_domains={list(in_domains)}",
                             f"data_path={data_path}", "data.input_size=64", *extra])
    torch.manual_seed(seed)
    model = build_pretraining(cfg)
    ds = MMEarthDataset(data_path, list(in_domains), "train", input_size=64, elevation_norm="band_stats")
    state = {"format_version": 2, "kind": "pretraining",
             "encoder": encoder_entry(model.encoder, ds.domain_info()),
             "objective": model.objective_state(), "config": cfg, "step": 12, "epoch": 3}
    save_checkpoint(state, path)
    return state


def exported(tmp_path: Path, data_path: Path, *extra: str, in_domains=DEMO_DOMAINS) -> tuple[Path, dict]:
    """(export folder, checkpoint dict) of a fresh tiny checkpoint."""
    state = write_checkpoint(tmp_path / "checkpoint-last.pth", data_path, *extra, in_domains=in_domains)
    return export_encoder(tmp_path / "checkpoint-last.pth", tmp_path / "export"), state
