"""Position embeddings: sin-cos layout, base-grid tables resized as MultiMAE does, adapter / decoder options."""

import math

import pytest
import torch
import torch.nn.functional as F

from multimae.adapters import CategoricalAdapter, PatchAdapter
from multimae.decoders import SpatialDecoder
from multimae.layout import TokenLayout
from multimae.pos_embed import grid_pos_embed, resize_pos_embed_2d, resized_sincos_pos_embed_2d, sincos_pos_embed_2d

# Cubic convolution (Keys, a = -0.75, as torch's bicubic) at offset 1/2: weights of rows 4i .. 4i+3
# when 28 rows shrink to 7 (source coordinate (i + 0.5) * 4 - 0.5 = 4i + 1.5).
_CUBIC_HALF = (-0.09375, 0.59375, 0.59375, -0.09375)


def _image(table, h, w):
    """(h * w, D) row-major -> (D, h, w)."""
    return table.T.reshape(-1, h, w)


def test_sincos_channels_are_row_then_column():
    dim = 8
    table = sincos_pos_embed_2d(3, 5, dim)
    omega = [1.0, 1.0 / 100.0]  # 10000 ** (-k / 2), k = 0, 1
    r, c = 2, 4
    expected = [math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega]
    expected += [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega]
    torch.testing.assert_close(table[r * 5 + c], torch.tensor(expected), atol=1e-6, rtol=0)


def test_bilinear_resize_28_to_7_averages_the_two_middle_rows_and_columns():
    base = sincos_pos_embed_2d(28, 28, 16, dtype=torch.float64)
    out = _image(resized_sincos_pos_embed_2d(28, 7, 16, "bilinear", dtype=torch.float64), 7, 7)
    img = _image(base, 28, 28)
    for i, j in [(0, 0), (3, 5), (6, 6)]:
        hand = img[:, 4 * i + 1 : 4 * i + 3, 4 * j + 1 : 4 * j + 3].mean(dim=(1, 2))
        torch.testing.assert_close(out[:, i, j], hand, atol=1e-12, rtol=0)


def test_bicubic_resize_28_to_7_uses_cubic_weights_at_one_half():
    base = _image(sincos_pos_embed_2d(28, 28, 16, dtype=torch.float64), 28, 28)
    out = _image(resized_sincos_pos_embed_2d(28, 7, 16, "bicubic", dtype=torch.float64), 7, 7)
    w = torch.tensor(_CUBIC_HALF, dtype=torch.float64)
    for i, j in [(0, 0), (2, 4), (6, 6)]:
        block = base[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]  # (D, 4, 4), rows / columns 4i .. 4i+3
        hand = torch.einsum("r,c,drc->d", w, w, block)
        torch.testing.assert_close(out[:, i, j], hand, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resize_equals_interpolate_and_differs_from_the_actual_grid(mode):
    base = sincos_pos_embed_2d(28, 28, 32)
    ref = F.interpolate(_image(base, 28, 28)[None], size=(7, 7), mode=mode, align_corners=False)[0]
    ours = resize_pos_embed_2d(base, 28, (7, 7), mode)
    torch.testing.assert_close(_image(ours, 7, 7), ref, atol=1e-6, rtol=0)
    assert (ours - sincos_pos_embed_2d(7, 7, 32)).abs().max() > 0.5  # the grid matters
    assert torch.equal(resize_pos_embed_2d(base, 28, 28, mode), base)  # same grid: unchanged


def test_grid_pos_embed_and_errors():
    assert torch.equal(grid_pos_embed((7, 7), 16), sincos_pos_embed_2d(7, 7, 16))
    torch.testing.assert_close(grid_pos_embed((7, 7), 16, base_grid=28, mode="bilinear"),
                               resized_sincos_pos_embed_2d(28, 7, 16, "bilinear"))
    with pytest.raises(ValueError, match="pos_embed_mode must be one of bilinear, bicubic, got 'nearest'"):
        resize_pos_embed_2d(sincos_pos_embed_2d(4, 4, 8), 4, 2, "nearest")
    with pytest.raises(ValueError, match=r"does not match a 5 x 5 grid"):
        resize_pos_embed_2d(sincos_pos_embed_2d(4, 4, 8), 5, 2, "bilinear")


def test_adapter_and_decoder_options_default_off_and_use_the_reference_modes():
    plain = PatchAdapter("s2_rgb", 3, 16, patch_size=8, input_size=56)
    assert torch.equal(plain.pos_embed[0], sincos_pos_embed_2d(7, 7, 16))  # today's behaviour
    patch = PatchAdapter("s2_rgb", 3, 16, patch_size=8, input_size=56, pos_embed_grid=28)
    cat = CategoricalAdapter("worldcover", 11, 16, patch_size=8, input_size=56, label_downsample=4,
                             pos_embed_grid=28)
    dec = SpatialDecoder("s2_rgb", encoder_dim=16, context_domains=["s2_rgb"], query_domain="s2_rgb",
                         out_channels=3, out_patch_size=8, patch_size=8, dim=16, depth=0,
                         num_heads=2, pos_embed_grid=28)
    layout7 = TokenLayout.build([("s2_rgb", 49, (7, 7), 8, None)], image_size=(56, 56))
    layout4 = TokenLayout.build([("s2_rgb", 16, (4, 4), 8, None)], image_size=(32, 32))
    torch.testing.assert_close(patch.pos_embed[0], resized_sincos_pos_embed_2d(28, 7, 16, "bicubic"))
    torch.testing.assert_close(cat.pos_embed[0], resized_sincos_pos_embed_2d(28, 7, 16, "bilinear"))
    zero = torch.zeros(1, 1, 16)
    context, _ = dec._embeddings(layout7, zero)
    torch.testing.assert_close(context - dec.domain_embeds["s2_rgb"][0], resized_sincos_pos_embed_2d(28, 7, 16, "bilinear"))
    # Another image size resizes the same base table to its own grid.
    tokens = patch(torch.zeros(1, 3, 32, 32)) - patch.proj.bias  # zero image: tokens = bias + position
    torch.testing.assert_close(tokens[0], resized_sincos_pos_embed_2d(28, 4, 16, "bicubic"), atol=1e-6, rtol=0)
    context, _ = dec._embeddings(layout4, zero)
    torch.testing.assert_close(context - dec.domain_embeds["s2_rgb"][0], resized_sincos_pos_embed_2d(28, 4, 16, "bilinear"))
    with pytest.raises(ValueError, match="domain 's2_rgb': pos_embed_mode must be one of"):
        PatchAdapter("s2_rgb", 3, 16, patch_size=8, input_size=56, pos_embed_grid=28, pos_embed_mode="area")
