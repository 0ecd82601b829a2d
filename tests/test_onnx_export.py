"""tools/export_onnx.py: the ONNX graph of an exported encoder matches PyTorch on real TerraMesh tiles.

Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript); skipped without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime absent (pip install '.[onnx]'): the ONNX route is not tested")
pytest.importorskip("onnxscript", reason="onnxscript absent (pip install '.[onnx]'): torch.onnx.export needs it")
onnx = pytest.importorskip("onnx", reason="onnx absent (pip install '.[onnx]')")
import onnxruntime as ort  # noqa: E402

from multimae import load_pretrained  # noqa: E402
from tests.export_fixture import exported, real_batch, terramesh64  # noqa: E402, F401
from tools.export_onnx import export_onnx, main, onnx_max_difference, real_inputs  # noqa: E402

SUBSET = ["s1", "dynamic_world", "s2_rgb"]


@pytest.fixture(scope="module")
def graph_file(terramesh64, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    folder, _ = exported(tmp, terramesh64)
    out, graph = export_onnx(folder, tmp / "encoder.onnx", domains=SUBSET, image_size=32, valid_masks=True)
    return folder, out, graph


def test_onnx_matches_pytorch_on_real_tiles(graph_file, terramesh64):
    folder, out, graph = graph_file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == SUBSET + [f"valid_{d}" for d in SUBSET]
    batch = real_batch(terramesh64, SUBSET, split="test", size=32)
    valid = {d: v.clone() for d, v in batch["valid"].items()}
    for v in valid.values():  # the sample is fully valid: mark a no-data patch so the masks matter
        v[0, 8:16, :8] = False
    feed = {d: batch["inputs"][d].numpy() for d in SUBSET} | {f"valid_{d}": valid[d].numpy() for d in SUBSET}
    (tokens,) = session.run(None, feed)
    reference = load_pretrained(folder, in_domains=SUBSET)  # eager, at the export's own 64 px build size
    with torch.no_grad():
        want = reference.encode(batch["inputs"], valid=valid).numpy()
    assert tokens.shape == (8, 3 * 16 + 1, 32)
    assert np.abs(tokens - want).max() <= 1e-4
    # The batch size is free: one tile alone gives its row of the batch.
    (single,) = session.run(None, {k: v[3:4] for k, v in feed.items()})
    assert np.abs(single - want[3:4]).max() <= 1e-4
    xs = real_inputs(terramesh64, graph, folder, split="val")
    assert onnx_max_difference(out, graph, xs) <= 1e-4


def test_graph_metadata_describes_its_inputs(graph_file):
    folder, out, _ = graph_file
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    config = json.loads(meta["multimae_eo_config"])
    assert list(config["domains"]) == SUBSET and config["domains"]["s2_rgb"]["bands"] == ["B04", "B03", "B02"]
    assert config["onnx"]["image_size"] == 32 and config["onnx"]["inputs"][:3] == SUBSET
    assert config["token_layout"]["segments"][0]["grid"] == [4, 4]
    assert config["code_commit"] == json.loads((folder / "config.json").read_text())["code_commit"]


def test_cli_checks_and_refuses(graph_file, terramesh64, tmp_path, capsys):
    folder = graph_file[0]
    assert main([str(folder), str(tmp_path / "e.onnx"), "--domains", "s2_rgb", "--image-size", "16",
                 "--check", str(terramesh64)]) == 0
    out = capsys.readouterr().out
    assert "terramesh64 val tiles: max |difference|" in out
    for args, message in [(["--domains", "worldcover"], "the encoder was not trained with worldcover"),
                          (["--image-size", "20"], "--image-size 20 is not divisible by the patch size 8")]:
        with pytest.raises(SystemExit):
            main([str(folder), str(tmp_path / "bad.onnx"), *args])
        assert message in capsys.readouterr().err
