"""Reconstruction pictures (utils/visualize.py) from synthetic model outputs."""

from __future__ import annotations

import matplotlib.image as mpimg
import torch

from utils.visualize import save_reconstructions


def test_one_png_per_sample_with_every_domain(tmp_path):
    b, s, p = 3, 16, 8
    inputs = {"s2_rgb": torch.randn(b, 3, s, s), "elevation": torch.randn(b, 1, s, s),
              "dynamic_world": torch.randint(0, 9, (b, s, s))}
    inputs["dynamic_world"][0, :4] = -1  # no-data drawn black
    valid = {d: torch.ones(b, s, s, dtype=torch.bool) for d in inputs}
    valid["elevation"][1, 0, 0] = False
    preds = {"s2_rgb": torch.randn(b, 3, s, s), "elevation": torch.randn(b, 1, s, s),
             "dynamic_world": torch.randn(b, 9, s // 4, s // 4), "s2_rgb_normpix": torch.randn(b, 3, s, s)}
    masks = {d: torch.tensor([[1.0, 0.0, 1.0, 1.0]]).repeat(b, 1) for d in preds}
    paths = save_reconstructions(tmp_path / "rec", "step000010", inputs, valid, preds, masks,
                                 patch_sizes={d: p for d in preds}, norm_pix=["s2_rgb_normpix"], num_samples=2)
    assert [x.name for x in paths] == ["sample0_step000010.png", "sample1_step000010.png"]
    img = mpimg.imread(paths[0])
    assert img.shape[0] > 700 and img.shape[1] > 700  # 4 domain rows x 4 columns of panels
