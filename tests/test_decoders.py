"""SpatialDecoder: which embedding each token slot gets, the cross-attention residual option, base-grid tables."""

import pytest
import torch

from multimae.decoders import SpatialDecoder
from multimae.layout import TokenLayout
from multimae.masking import mask_to_ids
from multimae.pos_embed import resized_sincos_pos_embed_2d, sincos_pos_embed_2d, sincos_pos_embed_coords

LAYOUT = TokenLayout.build([("s2_swir", 4, (2, 2), 8, 10.0), ("elevation", 4, (2, 2), 8, 10.0)],
                           base_patch_size=8, image_size=(16, 16))


def _decoder(**kw):
    torch.manual_seed(0)
    args = dict(encoder_dim=8, context_domains=["s2_swir", "elevation"], query_domain="s2_swir", out_channels=2,
                out_patch_size=8, patch_size=8, dim=8, depth=1, num_heads=2)
    args.update(kw)
    return SpatialDecoder("s2_swir", **args).eval()


def _capture(dec):
    seen = {}
    dec.query_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("queries", i[0]))
    dec.context_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("context", i[0]))
    return seen


@pytest.mark.parametrize("query_domain", ["s2_swir", "canopy_height"])  # own segment, decode-only
def test_each_segment_gets_the_embedding_named_after_its_domain(query_domain):
    # Context domains in non-alphabetical order: ParameterDict sorts a dict's names, the segments must not.
    dec = _decoder(query_domain=query_domain)
    assert list(dec.domain_embeds) == ["s2_swir", "elevation"] + ([] if query_domain == "s2_swir" else [query_domain])
    with torch.no_grad():
        for i, name in enumerate(dec.domain_embeds):
            dec.domain_embeds[name].fill_(10.0 * (i + 1))
    seen = _capture(dec)
    mask = torch.tensor([[0.0, 1, 1, 1, 0, 1, 1, 1]])  # token 0 of each domain visible
    ids_keep, ids_restore = mask_to_ids(mask)
    encoded = torch.randn(1, 3, 8)  # 2 visible + 1 global
    with torch.no_grad():
        dec(encoded, ids_keep, ids_restore, LAYOUT)
        proj = dec.context_proj(encoded)
    pos = sincos_pos_embed_2d(2, 2, 8)
    ctx = seen["context"][0]
    torch.testing.assert_close(ctx[0], proj[0, 0] + pos[0] + 10.0)  # s2_swir token 0: first embedding
    torch.testing.assert_close(ctx[1], proj[0, 1] + pos[0] + 20.0)  # elevation token 0: second embedding
    torch.testing.assert_close(ctx[2], proj[0, 2])  # global token: no embedding
    q = seen["queries"][0]
    if query_domain == "s2_swir":
        torch.testing.assert_close(q[0], proj[0, 0] + pos[0] + 10.0)  # visible slot keeps its feature
        torch.testing.assert_close(q[1], dec.mask_token[0, 0] + pos[1] + 10.0)
    else:
        torch.testing.assert_close(q, dec.mask_token[0] + pos + 30.0)  # decode-only: its own embedding


def test_decode_only_domain_with_its_own_patch_size_sits_on_its_own_grid():
    dec = _decoder(query_domain="canopy_height", patch_size=16, base_patch_size=8, out_patch_size=16, out_channels=1)
    seen = _capture(dec)
    ids_keep, ids_restore = mask_to_ids(torch.tensor([[0.0, 1, 1, 1, 0, 1, 1, 1]]))
    with torch.no_grad():
        out = dec(torch.randn(1, 3, 8), ids_keep, ids_restore, LAYOUT)
    assert out.shape == (1, 1, 16, 16) and seen["queries"].shape == (1, 1, 8)  # one 16 px token
    # its centre lies at (0.5, 0.5) in base-patch units: between the four 8 px patches it covers
    emb = dec.domain_embeds["canopy_height"][0, 0]
    centre = sincos_pos_embed_coords(torch.tensor([[0.5, 0.5]]), 8)[0]
    torch.testing.assert_close(seen["queries"][0, 0] - dec.mask_token[0, 0] - emb, centre)


def test_base_grid_tables_are_resized_per_segment():
    dec = _decoder(pos_embed_grid=28)
    seen = _capture(dec)
    ids_keep, ids_restore = mask_to_ids(torch.tensor([[0.0, 1, 1, 1, 0, 1, 1, 1]]))
    encoded = torch.randn(1, 3, 8)
    with torch.no_grad():
        dec(encoded, ids_keep, ids_restore, LAYOUT)
        proj = dec.context_proj(encoded)
    table = resized_sincos_pos_embed_2d(28, 2, 8, "bilinear")
    torch.testing.assert_close(seen["context"][0, 1], proj[0, 1] + table[0] + dec.domain_embeds["elevation"][0, 0])
    with pytest.raises(ValueError, match="pos_embed_mode must be one of bilinear, bicubic"):
        _decoder(pos_embed_grid=28, pos_embed_mode="nearest")


def test_without_residual_the_cross_attention_output_replaces_the_queries():
    dec = _decoder(xattn_residual=False, depth=0)
    seen = _capture(dec)
    mlp_in = {}
    dec.mlp_norm.register_forward_hook(lambda m, i, o: mlp_in.__setitem__("x", i[0]))
    ids_keep, ids_restore = mask_to_ids(torch.tensor([[0.0, 1, 1, 1, 0, 1, 1, 1]]))
    with torch.no_grad():
        dec(torch.randn(1, 3, 8), ids_keep, ids_restore, LAYOUT)
        attended = dec.xattn(dec.query_norm(seen["queries"]), dec.context_norm(seen["context"]))
    torch.testing.assert_close(mlp_in["x"], attended)
    dec.xattn_residual = True
    with torch.no_grad():
        dec(torch.randn(1, 3, 8), ids_keep, ids_restore, LAYOUT)
        attended = dec.xattn(dec.query_norm(seen["queries"]), dec.context_norm(seen["context"]))
    torch.testing.assert_close(mlp_in["x"], seen["queries"] + attended)
