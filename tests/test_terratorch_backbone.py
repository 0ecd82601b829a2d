"""multimae/terratorch_backbone.py: an exported encoder as a TerraTorch backbone, and the example config.

Needs the ``terratorch`` extra (about 1 GB, ~30 s to import); skipped without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("terratorch", reason="terratorch absent (pip install '.[terratorch]'): the TerraTorch route "
                                         "is not tested")
from terratorch.registry import BACKBONE_REGISTRY  # noqa: E402
from terratorch.tasks import SemanticSegmentationTask  # noqa: E402

from multimae import load_pretrained  # noqa: E402
from multimae.terratorch_backbone import MultiMAEBackbone, terratorch_means_stds  # noqa: E402
from tests.export_fixture import exported, real_batch, terramesh64  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "cfgs" / "terratorch" / "terramesh_lulc.yaml"
S2_FILE_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


@pytest.fixture(scope="module")
def export(terramesh64, tmp_path_factory):
    folder, _ = exported(tmp_path_factory.mktemp("tt"), terramesh64)
    return folder, real_batch(terramesh64, split="test")


def _grid(tokens: torch.Tensor, start: int, side: int) -> torch.Tensor:
    """(B, side * side, D) row-major tokens from ``start`` -> (B, D, side, side)."""
    b, _, d = tokens.shape
    return tokens[:, start:start + side * side].reshape(b, side, side, d).permute(0, 3, 1, 2)


def test_registered_backbone_gives_the_encoder_tokens_as_maps(export):
    folder, batch = export
    domains = ["s2_rgb", "s1", "elevation"]
    backbone = BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), in_domains=domains).eval()
    assert isinstance(backbone, MultiMAEBackbone) and backbone.patch_size == 8
    assert backbone.out_channels == [3 * 32, 3 * 32]  # one map per block, the three grids side by side
    inputs = {d: batch["inputs"][d] for d in domains}
    with torch.no_grad():
        maps = backbone(inputs)
        tokens = load_pretrained(folder, in_domains=domains).encode(inputs)  # (B, 3 * 64 + 1, D), global last
    assert [tuple(m.shape) for m in maps] == [(8, 96, 8, 8)] * 2
    want = torch.cat([_grid(tokens, i * 64, 8) for i in range(3)], dim=1)  # the global token is not in any map
    torch.testing.assert_close(maps[-1], want, rtol=0, atol=0)
    mean = MultiMAEBackbone(load_pretrained(folder, in_domains=domains), merge="mean", out_indices=[-1])
    with torch.no_grad():
        (averaged,) = mean(inputs)
    torch.testing.assert_close(averaged, want.reshape(8, 3, 32, 8, 8).mean(1))


def test_bands_are_taken_by_name_from_the_files_order(export):
    folder, batch = export
    domains = ["s2_nir", "s2_rgb", "s1"]
    x = batch["inputs"]
    # The S2 file's channel order (B08 before B8A), with B01 / B09 that no chosen domain reads.
    by_band = {b: x["s2_rgb"][:, i] for i, b in enumerate(["B04", "B03", "B02"])}
    by_band |= {b: x["s2_nir"][:, i] for i, b in enumerate(["B8A", "B08"])}
    s2 = torch.stack([by_band.get(b, torch.full_like(x["s1"][:, 0], 7.0)) for b in S2_FILE_ORDER], dim=1)
    named = BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), in_domains=domains,
                                    bands={"S2L2A": S2_FILE_ORDER, "S1RTC": ["asc_VV", "asc_VH"]}).eval()
    plain = BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), in_domains=domains).eval()
    stacked = BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), in_domains=domains,
                                      bands=S2_FILE_ORDER + ["asc_VV", "asc_VH"]).eval()
    with torch.no_grad():
        want = plain({d: x[d] for d in domains})[-1]
        torch.testing.assert_close(named({"S2L2A": s2, "S1RTC": x["s1"]})[-1], want, rtol=0, atol=0)
        torch.testing.assert_close(stacked(torch.cat([s2, x["s1"]], dim=1))[-1], want, rtol=0, atol=0)
        # No bands named: a tensor holds the domains' bands one domain after another.
        flat = torch.cat([x[d] for d in domains], dim=1)
        torch.testing.assert_close(plain(flat)[-1], want, rtol=0, atol=0)


def test_bad_backbone_arguments_are_refused(export):
    folder, batch = export
    with pytest.raises(ValueError, match="no input channel is named 'B8A', a band of domain 's2_nir'"):
        BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), in_domains=["s2_nir"], bands=["B08"])
    with pytest.raises(ValueError, match="the encoder was not trained with worldcover"):
        BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), in_domains=["worldcover"])
    with pytest.raises(ValueError, match="backbone_out_indices"):
        BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), out_indices=[5])
    backbone = BACKBONE_REGISTRY.build("multimae_eo", ckpt_path=str(folder), in_domains=["s2_rgb", "s1"])
    with pytest.raises(ValueError, match="input has no entry 's1'"):
        backbone({"s2_rgb": batch["inputs"]["s2_rgb"]})
    with pytest.raises(ValueError, match="input has 3 channels; the bands of s2_rgb, s1 are 5"):
        backbone(batch["inputs"]["s2_rgb"])


def test_means_stds_come_from_the_export(export):
    folder, _ = export
    means, stds = terratorch_means_stds(folder, {"S2L2A": ["B02", "B8a", "B01"], "S1RTC": ["asc_VH"]},
                                        ["sentinel2_l2a"])
    domains = json.loads((folder / "config.json").read_text())["domains"]
    l2a = domains["s2_rgb"]["stats"]["sentinel2_l2a"]
    assert means["S2L2A"] == [l2a["mean"][2], domains["s2_nir"]["stats"]["sentinel2_l2a"]["mean"][0], 0.0]
    assert stds["S1RTC"] == [domains["s1"]["stats"]["sentinel1"]["std"][1]]
    with pytest.raises(ValueError, match="domains.s2_rgb.stats has sentinel2_l1c, sentinel2_l2a; choose one"):
        terratorch_means_stds(folder, {"S2L2A": ["B02"]})


def test_example_config_builds_a_task_that_trains(export):
    """The example's model_args (with this export) give a SemanticSegmentationTask whose training step runs."""
    folder, batch = export
    example = yaml.safe_load(EXAMPLE.read_text())
    args = example["model"]["init_args"]
    model_args = {**args["model_args"], "backbone_ckpt_path": str(folder)}
    bands = example["data"]["init_args"]["output_bands"]
    assert model_args["backbone_bands"] == bands
    task = SemanticSegmentationTask(model_factory="EncoderDecoderFactory", model_args=model_args, loss=args["loss"],
                                    ignore_index=args["ignore_index"], lr=args["lr"], plot_on_val=False)
    x = batch["inputs"]
    image = {"S2L2A": torch.cat([x["s2_rgb"][:, [2, 1, 0]], x["s2_rededge"], x["s2_nir"][:, [1, 0]], x["s2_swir"]], 1),
             "S1RTC": x["s1"], "DEM": x["elevation"]}
    assert [len(v) for v in bands.values()] == [t.shape[1] for t in image.values()]
    mask = x["dynamic_world"].clamp(min=0)
    loss = task.training_step({"image": image, "mask": mask}, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grads = [p.grad for n, p in task.model.named_parameters() if n.startswith("encoder.encoder.blocks.")]
    assert grads and all(g is not None for g in grads)  # the encoder is fine-tuned, not frozen


@pytest.mark.slow
def test_example_config_runs_with_the_terratorch_cli(export, tmp_path, monkeypatch):
    """``python -m multimae.terratorch_backbone fit -c cfgs/terratorch/terramesh_lulc.yaml`` on the real GeoTIFFs."""
    from terratorch.cli_tools import build_lightning_cli

    import multimae.terratorch_backbone  # noqa: F401  (registers the backbone)

    folder, _ = export
    monkeypatch.chdir(REPO)
    example = yaml.safe_load(EXAMPLE.read_text())
    for key in ("train_data_root", "val_data_root", "test_data_root"):
        for root in example["data"]["init_args"][key].values():
            if not (REPO / root).is_dir():
                pytest.skip(f"{REPO / root} absent: the example reads the TerraMesh GeoTIFFs next to the repository")
    cli = build_lightning_cli(["fit", "-c", str(EXAMPLE), f"--model.init_args.model_args.backbone_ckpt_path={folder}",
                               "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
                               "--trainer.accelerator=cpu"], run=True)
    assert cli.trainer.global_step == 2  # 5 scenes, batch 2, drop_last
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"]), sorted(metrics)
