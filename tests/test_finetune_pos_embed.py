"""finetune.pos_embed: position embeddings of a fine-tuning encoder at another image size than pretraining,
checked against tables computed here from the sin-cos formula (numpy) and torch's interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multimae.build import build_encoder
from utils.checkpoint import encoder_entry
from utils.config import load_config
from utils.finetune import build_backbone

TINY = ["model.preset={dim: 32, depth: 1, heads: 2}", "model.class_embed_dim=8", "in_domains=[s2_rgb, dynamic_world]"]


def sincos(h: int, w: int, dim: int) -> torch.Tensor:
    """(h * w, dim) table, tokens row-major: [sin(r w_k), cos(r w_k), sin(c w_k), cos(c w_k)],
    w_k = 10000 ** (-k / (dim / 4)) (MoCo v3 / MAE / MultiMAE)."""
    q = dim // 4
    omega = 10000.0 ** (-np.arange(q) / q)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.from_numpy(np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)).float()


def resized(table: torch.Tensor, base: int, size: int, mode: str) -> torch.Tensor:
    """``table`` on a base x base grid, interpolated to size x size as an image (align_corners False)."""
    image = table.T.reshape(1, -1, base, base).double()
    return F.interpolate(image, size=(size, size), mode=mode, align_corners=False).flatten(2)[0].T.float()


def checkpoint(*extra) -> dict:
    """The ``encoder`` entry of a pretraining checkpoint at 16 px (patch 8: a 2 x 2 grid)."""
    return {"encoder": encoder_entry(build_encoder(load_config(None, [*TINY, "data.input_size=16", *extra])))}


def backbone(pretrained: dict, input_size: int, how: str | None = None, in_domains=("s2_rgb", "dynamic_world")):
    items = [f"data.input_size={input_size}"] + ([f"finetune.pos_embed={how}"] if how else [])
    return build_backbone(load_config(None, items), pretrained, list(in_domains))[0]


def _table(encoder, domain: str) -> torch.Tensor:
    """The position embedding the adapter adds, (N, D); for images read off its output on a zero image."""
    adapter = encoder.input_adapters[domain]
    if domain == "s2_rgb":
        size = encoder.input_size
        tokens = adapter(torch.zeros(1, 3, size, size))[0]  # (N, D): proj(0) = bias, + position
        return tokens - adapter.proj.bias
    return adapter.pos_embed[0]


def test_default_resizes_the_pretraining_grids_sincos_table():
    pre = checkpoint()
    encoder = backbone(pre, 32)  # the default: resize; 2 x 2 -> 4 x 4 tokens
    assert encoder.spec["pos_embed_grid"] == 2
    torch.testing.assert_close(_table(encoder, "s2_rgb"), resized(sincos(2, 2, 32), 2, 4, "bicubic"), atol=1e-6, rtol=0)
    torch.testing.assert_close(_table(encoder, "dynamic_world"), resized(sincos(2, 2, 32), 2, 4, "bilinear"),
                               atol=1e-6, rtol=0)
    assert not torch.allclose(_table(encoder, "s2_rgb"), sincos(4, 4, 32), atol=1e-2)  # not the same thing
    # every other grid comes from the same base table (here an evaluation at 48 px: 6 x 6)
    other = encoder.input_adapters["s2_rgb"].position_embedding((6, 6))
    torch.testing.assert_close(other, resized(sincos(2, 2, 32), 2, 6, "bicubic"), atol=1e-6, rtol=0)


def test_recompute_and_the_pretraining_size_give_the_sincos_table_of_the_grid():
    pre = checkpoint()
    encoder = backbone(pre, 32, "recompute")
    assert encoder.spec["pos_embed_grid"] is None
    torch.testing.assert_close(_table(encoder, "s2_rgb"), sincos(4, 4, 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(_table(encoder, "dynamic_world"), sincos(4, 4, 32), atol=1e-6, rtol=0)
    for how in ("resize", "recompute"):  # at the pretraining size both keep the pretraining table
        same = backbone(pre, 16, how)
        assert same.spec == pre["encoder"]["spec"]
        torch.testing.assert_close(_table(same, "s2_rgb"), sincos(2, 2, 32), atol=1e-6, rtol=0)


def test_a_base_grid_checkpoint_keeps_its_base_grid_unless_recomputed():
    pre = checkpoint("model.pos_embed_grid=28")  # the reference's tables: 224 px at patch 8
    encoder = backbone(pre, 32)
    assert encoder.spec["pos_embed_grid"] == 28
    torch.testing.assert_close(_table(encoder, "s2_rgb"), resized(sincos(28, 28, 32), 28, 4, "bicubic"),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(_table(encoder, "dynamic_world"), resized(sincos(28, 28, 32), 28, 4, "bilinear"),
                               atol=1e-6, rtol=0)
    again = backbone(pre, 16, "recompute")  # sin-cos on the grid itself, even at the pretraining size
    assert again.spec["pos_embed_grid"] is None
    torch.testing.assert_close(_table(again, "s2_rgb"), sincos(2, 2, 32), atol=1e-6, rtol=0)


def test_bad_values_and_per_domain_patch_sizes():
    pre = checkpoint("model.patch_sizes={dynamic_world: 16}")
    with pytest.raises(ValueError, match="finetune.pos_embed must be 'resize' or 'recompute', got 'bilinear'"):
        backbone(pre, 32, "bilinear")
    with pytest.raises(ValueError, match=r"'resize' needs one pretraining grid, .*dynamic_world patch 16 px .* "
                                         r"set finetune.pos_embed=recompute"):
        backbone(pre, 32)
    assert backbone(pre, 16).spec["pos_embed_grid"] is None  # the pretraining size: nothing to resize
    assert backbone(pre, 32, in_domains=["s2_rgb"]).spec["pos_embed_grid"] == 2  # one patch size among the inputs
    assert backbone(pre, 32, "recompute").patch_sizes == {"s2_rgb": 8, "dynamic_world": 16}
