"""The token layout (multimae/layout.py) and patch-centre positions (multimae/pos_embed.py)."""

from __future__ import annotations

import pytest
import torch

from multimae.layout import TokenLayout
from multimae.pos_embed import grid_coords, sincos_pos_embed_2d, sincos_pos_embed_coords


def _layout():
    return TokenLayout.build([("s2_rgb", 16, (4, 4), 8, 10.0), ("s2_atmos", 4, (2, 2), 16, 10.0),
                              ("lat", 1, None, None, None)], num_global_tokens=2, base_patch_size=8, image_size=(32, 32))


def test_segments_are_laid_end_to_end_and_split_a_sequence():
    layout = _layout()
    assert layout.domains == ["s2_rgb", "s2_atmos", "lat"] and layout.num_tokens == 21
    assert (layout["s2_atmos"].start, layout["s2_atmos"].stop, layout["s2_atmos"].patch_metres) == (16, 20, 160.0)
    assert [s.domain for s in layout.grid_segments()] == ["s2_rgb", "s2_atmos"] and not layout["lat"].is_grid
    x = torch.arange(2 * 23).view(2, 23)  # 21 patch tokens + 2 global tokens
    parts = layout.split(x)
    assert parts["s2_atmos"].tolist() == [[16, 17, 18, 19], [39, 40, 41, 42]] and parts["lat"].tolist() == [[20], [43]]
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    assert layout.describe()[1] == "s2_atmos: 4 tokens, grid 2 x 2, patch 16 px (160 m)"
    with pytest.raises(KeyError, match="'s1' is not in the token layout"):
        layout["s1"]
    with pytest.raises(ValueError, match="lists domain 's2_rgb' twice"):
        TokenLayout.build([("s2_rgb", 4, (2, 2), 8, None), ("s2_rgb", 4, (2, 2), 8, None)])


def test_positions_are_patch_centres_in_base_patch_units():
    coords = _layout().coords()
    assert coords[:4].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]  # base patch size: the grid indices
    # a 16 px patch covers base patches 0 and 1: its centre lies at 0.5; the next one at 2.5
    assert coords[16:20].tolist() == [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]
    assert torch.isnan(coords[20]).all()
    assert grid_coords((1, 3), 0.5).tolist() == [[-0.25, -0.25], [-0.25, 0.25], [-0.25, 0.75]]
    assert torch.equal(sincos_pos_embed_coords(grid_coords((3, 5)), 16), sincos_pos_embed_2d(3, 5, 16))
    emb = sincos_pos_embed_coords(torch.tensor([[0.5, 2.0]]), 8)  # D/4 = 2 frequencies: 1 and 1 / 100
    expected = torch.tensor([[0.5, 0.005], [2.0, 0.02]], dtype=torch.float64)
    torch.testing.assert_close(emb[0], torch.cat([expected[0].sin(), expected[0].cos(), expected[1].sin(),
                                                  expected[1].cos()]).float())
