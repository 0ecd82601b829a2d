"""Training-side no-data guards on MMEarth file sets: a domain without any valid pixel in the whole file set is
reported once and contributes no loss (nor gradient) to pretraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from multimae.criterion import MultiMAECriterion
from tests.geotiff_fixture import write_scene, write_tif
from tools.geotiff_to_mmearth import convert
from utils.data.mmearth import MMEarthDataset


def test_all_no_data_domain_is_reported_once(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        write_scene(src, f"s{i}", 64, 64, seed=i, label=False)
        write_tif(src / "S1" / f"s{i}.tif", np.full((2, 64, 64), np.nan, np.float32))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"sources": {
        "S2": {"modality": "sentinel2", "s2_type": "l2a", "bands": ["B02", "B03", "B04", "B08"], "nodata": 0},
        "S1": {"modality": "sentinel1", "bands": ["asc_VV", "asc_VH"]}}}))
    out = tmp_path / "set"
    convert(spec, src, out, 64, {"train": 0.34, "val": 0.33, "test": 0.33}, split_by="tile", progress=False)
    capsys.readouterr()
    train = MMEarthDataset(out, ["s2_rgb", "s1"], "train")
    MMEarthDataset(out, ["s2_rgb", "s1"], "val")
    err = capsys.readouterr().err
    assert err.count("domain 's1' (sentinel1 asc_VV, asc_VH) has no valid pixel in the whole file set") == 1
    assert "s2_rgb" not in err
    assert not train[0]["valid"]["s1"].any()


@pytest.mark.parametrize("weighting", ["none", "uncertainty"])
def test_a_domain_without_valid_pixels_contributes_no_loss(weighting):
    crit = MultiMAECriterion(["s2_rgb", "s1"], patch_size=8, weighting=weighting)
    pred = {d: torch.randn(2, c, 16, 16, requires_grad=True) for d, c in (("s2_rgb", 3), ("s1", 2))}
    target = {"s2_rgb": torch.randn(2, 3, 16, 16), "s1": torch.zeros(2, 2, 16, 16)}
    valid = {"s2_rgb": torch.ones(2, 16, 16, dtype=torch.bool), "s1": torch.zeros(2, 16, 16, dtype=torch.bool)}
    masks = {d: torch.ones(2, 4) for d in pred}
    out = crit(pred, target, masks, valid)
    assert out["s1"].item() == 0.0 and out["s2_rgb"].item() > 0
    out["loss"].backward()
    assert (pred["s1"].grad == 0).all() and pred["s2_rgb"].grad.abs().sum() > 0
    if weighting == "uncertainty":
        assert out["loss"].item() == pytest.approx(out["s2_rgb"].item())  # exp(-0) * L + 0 for s2_rgb only
