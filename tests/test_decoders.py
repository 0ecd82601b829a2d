"""SpatialDecoder: which embedding each token slot gets, and the cross-attention residual option."""

import pytest
import torch

from multimae.decoders import SpatialDecoder, decode_all
from multimae.masking import mask_to_ids

N_D = 4  # 16 px, patch 8


def _decoder(**kw):
    torch.manual_seed(0)
    args = dict(encoder_dim=8, context_domains=["s2_swir", "elevation"], query_domain="s2_swir", out_channels=2,
                out_patch_size=8, input_size=16, patch_size=8, dim=8, depth=1, num_heads=2)
    args.update(kw)
    return SpatialDecoder("s2_swir", **args).eval()


def _capture(dec):
    seen = {}
    dec.query_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("queries", i[0]))
    dec.context_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("context", i[0]))
    return seen


@pytest.mark.parametrize("query_domain", ["s2_swir", "canopy_height"])  # own segment, decode-only
def test_each_segment_gets_the_embedding_named_after_its_domain(query_domain):
    # Context domains in non-alphabetical order: ParameterDict sorts names, the segments must not.
    dec = _decoder(query_domain=query_domain)
    with torch.no_grad():
        for i, name in enumerate(dec.embed_domains):
            dec.domain_embeds[name].fill_(10.0 * (i + 1))
    seen = _capture(dec)
    mask = torch.tensor([[0.0, 1, 1, 1, 0, 1, 1, 1]])  # token 0 of each domain visible
    ids_keep, ids_restore = mask_to_ids(mask)
    encoded = torch.randn(1, 3, 8)  # 2 visible + 1 global
    with torch.no_grad():
        dec(encoded, ids_keep, ids_restore, (2, 2))
        proj = dec.context_proj(encoded)
    pos = dec.pos_embed
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


def test_decode_all_uses_the_same_embeddings():
    decs = [_decoder(), _decoder(query_domain="canopy_height")]
    with torch.no_grad():
        for dec in decs:
            for i, name in enumerate(dec.embed_domains):
                dec.domain_embeds[name].fill_(float(i + 1))
    ids_keep, ids_restore = mask_to_ids(torch.tensor([[0.0, 1, 1, 1, 0, 1, 1, 1]] * 2))
    encoded = torch.randn(2, 3, 8)
    with torch.no_grad():
        outs = decode_all(decs, encoded, ids_keep, ids_restore, (2, 2))
        for out, dec in zip(outs, decs):
            torch.testing.assert_close(out, dec(encoded, ids_keep, ids_restore, (2, 2)), atol=1e-5, rtol=1e-5)


def test_without_residual_the_cross_attention_output_replaces_the_queries():
    dec = _decoder(xattn_residual=False, depth=0)
    seen = _capture(dec)
    mlp_in = {}
    dec.mlp_norm.register_forward_hook(lambda m, i, o: mlp_in.__setitem__("x", i[0]))
    ids_keep, ids_restore = mask_to_ids(torch.tensor([[0.0, 1, 1, 1, 0, 1, 1, 1]]))
    with torch.no_grad():
        dec(torch.randn(1, 3, 8), ids_keep, ids_restore, (2, 2))
        attended = dec.xattn(dec.query_norm(seen["queries"]), dec.context_norm(seen["context"]))
    torch.testing.assert_close(mlp_in["x"], attended)
    dec.xattn_residual = True
    with torch.no_grad():
        dec(torch.randn(1, 3, 8), ids_keep, ids_restore, (2, 2))
        attended = dec.xattn(dec.query_norm(seen["queries"]), dec.context_norm(seen["context"]))
    torch.testing.assert_close(mlp_in["x"], seen["queries"] + attended)
