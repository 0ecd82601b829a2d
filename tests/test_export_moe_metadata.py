"""Export paths of an encoder with mixture-of-experts feed-forwards, grouped-query attention and metadata tokens
(an MoE-MAE encoder): the export folder, ONNX and the TerraTorch backbone either compute what it computes or
refuse it naming the config field. (The timm ViT format refuses it: tests/test_interop.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from multimae import load_pretrained
from multimae.build import build_pretraining
from multimae.encoder import MultiModalEncoder
from multimae.pretrained import read_pretrained_config
from tools.export_encoder import export_encoder, main
from utils.checkpoint import encoder_entry, save_checkpoint
from utils.config import load_config
from utils.data.mmearth import domain_record

DOMAINS = ["s2_rgb", "s1"]
FIELDS = ["lat", "week"]
MOE = ["model.ffn=moe", "model.ffn_options={experts: [2], hidden: [16, 16]}"]


def checkpoint(path: Path, *extra: str) -> dict:
    """A tiny MoE-MAE pretraining checkpoint (random weights) with the registry's domain records."""
    cfg = load_config(None, ["model.preset={dim: 32, depth: 2, heads: 4}", "data.input_size=16", "objective=moe_mae",
                             f"in_domains={DOMAINS}", "moe_mae.decoder.dim=16", "moe_mae.decoder.heads=2",
                             "moe_mae.decoder.kv_groups=1", "moe_mae.decoder.ffn_options={hidden: [8, 8]}", *extra])
    torch.manual_seed(0)
    model = build_pretraining(cfg)
    state = {"format_version": 2, "kind": "pretraining",
             "encoder": encoder_entry(model.encoder, {d: domain_record(d) for d in DOMAINS}),
             "objective": model.objective_state(), "config": cfg, "step": 5, "epoch": 1}
    save_checkpoint(state, path)
    return state


def pairs(values: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """{field: (B, 2) (sin, cos) of 2 pi v / period} (lat: degrees, period 360; week: period 52)."""
    period = {"lat": 360.0, "week": 52.0}
    out = {}
    for f, v in values.items():
        angle = torch.tensor(v, dtype=torch.float64) * 2 * math.pi / period[f]
        out[f] = torch.stack([angle.sin(), angle.cos()], dim=1).float()
    return out


def inputs(b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"s2_rgb": torch.randn(b, 3, 16, 16, generator=g), "s1": torch.randn(b, 2, 16, 16, generator=g)}


@pytest.fixture(scope="module")
def moe_export(tmp_path_factory):
    """(export folder, checkpoint dict) of an encoder with MoE feed-forwards, GQA and two metadata tokens."""
    tmp = tmp_path_factory.mktemp("moe")
    state = checkpoint(tmp / "checkpoint-last.pth", *MOE, "model.kv_groups=2", f"model.metadata={FIELDS}")
    return export_encoder(tmp / "checkpoint-last.pth", tmp / "export"), state


def test_export_folder_computes_what_the_checkpoint_computes(moe_export):
    folder, state = moe_export
    arch = read_pretrained_config(folder)["architecture"]
    assert (arch["ffn"], arch["kv_groups"], arch["metadata"]) == ("moe", 2, FIELDS)
    encoder = load_pretrained(folder)
    reference = MultiModalEncoder.from_spec(state["encoder"]["spec"], init_weights=False)
    reference.load_state_dict(state["encoder"]["state_dict"])
    reference.eval()
    meta = pairs({"lat": [48.1, -33.9], "week": [3.0, 27.0]})
    with torch.no_grad():
        tokens = encoder.encode(inputs(), metadata=meta)
        assert tokens.shape == (2, 2 * 4 + 2 + 1, 32)
        torch.testing.assert_close(tokens, reference.encode(inputs(), metadata=meta), rtol=0, atol=0)
        other = encoder.encode(inputs(), metadata={**meta, "lat": pairs({"lat": [0.0, 60.0]})["lat"]})
    assert not torch.allclose(tokens, other)  # the exported metadata tokens take part
    card = (folder / "README.md").read_text()
    assert "mixture-of-experts feed-forwards, grouped-query attention with 2 key / value heads" in card
    assert "tokens = encoder.encode(inputs, valid=valid, metadata=metadata)" in card
    assert "| `lat` | latitude, degrees | 360 |" in card and "| `week` | ISO week of the acquisition, 1..53 | 52 |" in card
    assert "the metadata tokens (lat, week), then the 1 global token(s) **last**" in card
    assert "| `week` | 1 | - | - |" in card  # the layout table: a metadata token has no grid and no patch


def test_cli_exports_it_in_one_go(moe_export, tmp_path, capsys):
    _, state = moe_export
    save_checkpoint(state, tmp_path / "c.pth")
    assert main([str(tmp_path / "c.pth"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_onnx_takes_the_metadata_and_refuses_mixture_of_experts(tmp_path, moe_export, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime absent (pip install '.[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript absent (pip install '.[onnx]')")
    onnx = pytest.importorskip("onnx", reason="onnx absent (pip install '.[onnx]')")
    import onnxruntime as ort

    from tools.export_onnx import export_onnx
    from tools.export_onnx import main as onnx_main

    checkpoint(tmp_path / "gqa.pth", "model.kv_groups=2", f"model.metadata={FIELDS}")
    folder = export_encoder(tmp_path / "gqa.pth", tmp_path / "gqa")
    out, graph = export_onnx(folder, tmp_path / "gqa.onnx")
    assert graph.input_names == ["s2_rgb", "s1", "metadata_lat", "metadata_week"]
    assert [i.name for i in onnx.load(str(out)).graph.input] == graph.input_names
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = inputs(3)
    meta = pairs({"lat": [10.0, 50.0, -20.0], "week": [1.0, 20.0, 40.0]})
    meta["week"][1] = float("nan")  # sample 1 has no date: the missing embedding
    feed = {**{d: t.numpy() for d, t in x.items()}, **{f"metadata_{f}": t.numpy() for f, t in meta.items()}}
    (got,) = session.run(None, feed)
    encoder = load_pretrained(folder)
    with torch.no_grad():
        want = encoder.encode(x, metadata=meta)
        absent = encoder.encode(x, metadata={"lat": meta["lat"]})  # no week at all
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(want[1], absent[1])  # NaN pair = the field's missing embedding
    (moved,) = session.run(None, {**feed, "metadata_lat": pairs({"lat": [-60.0, 5.0, 70.0]})["lat"].numpy()})
    assert abs(moved - got).max() > 1e-3  # the graph reads its metadata inputs

    with pytest.raises(ValueError, match=r"architecture.ffn \(model.ffn\) is 'moe'; .*only model.ffn 'mlp' exports"):
        export_onnx(moe_export[0], tmp_path / "moe.onnx")
    with pytest.raises(SystemExit) as exit_info:
        onnx_main([str(moe_export[0]), str(tmp_path / "moe.onnx")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "model.ffn" in err
    assert not (tmp_path / "moe.onnx").exists()


def test_terratorch_maps_hold_the_grid_tokens_and_read_the_metadata(moe_export):
    pytest.importorskip("terratorch", reason="terratorch absent (pip install '.[terratorch]')")
    from multimae.terratorch_backbone import MultiMAEBackbone

    folder, _ = moe_export
    backbone = MultiMAEBackbone(load_pretrained(folder), out_indices=[-1]).eval()
    meta = pairs({"lat": [48.1, -33.9], "week": [3.0, 27.0]})
    with torch.no_grad():
        (maps,) = backbone(inputs(), metadata=meta)
        tokens = load_pretrained(folder).encode(inputs(), metadata=meta)  # (B, 4 + 4 + 2 + 1, D)
        (without,) = backbone(inputs())
    assert maps.shape == (2, 64, 2, 2)  # two 2 x 2 grids side by side; no metadata or global token
    want = torch.cat([tokens[:, s:s + 4].reshape(2, 2, 2, 32).permute(0, 3, 1, 2) for s in (0, 4)], dim=1)
    torch.testing.assert_close(maps, want, rtol=0, atol=0)
    assert not torch.allclose(maps, without)  # no metadata: the missing embeddings
