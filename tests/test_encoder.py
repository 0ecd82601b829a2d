"""The multi-modal encoder's public API (multimae/encoder.py): tokenize, encode visible tokens, spec, pluggable FFN."""

from __future__ import annotations

import torch
from timm.layers import Mlp

from multimae.build import build_encoder, build_pretraining
from multimae.encoder import FFN_LAYERS, MultiModalEncoder
from tests.multimae_fixture import random_batch, tiny_cfg


def test_tokenize_then_encode_visible_equals_encode():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    enc = build_encoder(cfg).eval()
    inputs, valid = random_batch(cfg)
    tok = enc.tokenize(inputs, valid)
    assert tok.tokens.shape == (3, 24, 32) and tok.layout.domains == cfg["in_domains"]
    assert tok.valid.shape == (3, 24) and not tok.valid[0, 0] and tok.valid[1:, 0].all()  # patch 0 of sample 0 no-data
    everything = torch.arange(24).expand(3, -1)
    torch.testing.assert_close(enc.encode_visible(tok.tokens, everything), enc.encode(inputs, valid=valid))
    some = torch.tensor([[5, 1, 20]] * 3)  # any subset, in the order given
    out = enc.encode_visible(tok.tokens, some)
    assert out.shape == (3, 3 + 1, 32)
    torch.testing.assert_close(out, enc.forward_blocks(tok.tokens[:, [5, 1, 20]]))


def test_spec_rebuilds_the_same_encoder_for_other_domains_and_sizes():
    cfg = tiny_cfg()
    cfg["model"].update(patch_sizes={"s2_nir": 16}, domain_embed=True)
    enc = build_encoder(cfg)
    again = MultiModalEncoder.from_spec(enc.spec)
    again.load_state_dict(enc.state_dict())  # strict
    assert again.spec == enc.spec and again.patch_sizes["s2_nir"] == 16
    other = MultiModalEncoder.from_spec(enc.spec, in_domains=["s2_nir", "s1"], input_size=32)
    assert other.layout().tokens_per_domain == [4, 16] and other.input_size == 32
    assert list(other.domain_embeds) == ["s2_nir", "s1"]


class _AuxMlp(Mlp):
    """An Mlp that reports an auxiliary loss, as a mixture-of-experts feed-forward does."""

    def forward(self, x):
        out = super().forward(x)
        self.aux_loss = out.float().square().mean()
        return out


def test_a_pluggable_feed_forward_and_its_auxiliary_loss_reach_the_objective(monkeypatch):
    monkeypatch.setitem(FFN_LAYERS, "aux_mlp", lambda options, index, depth: _AuxMlp)
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg["model"]["ffn"] = "aux_mlp"
    model = build_pretraining(cfg)
    assert all(isinstance(b.mlp, _AuxMlp) for b in model.encoder.blocks)
    inputs, valid = random_batch(cfg, invalid=False)
    gen = torch.Generator().manual_seed(0)
    out = model({"inputs": inputs, "valid": valid}, generator=gen)
    aux = out["aux"]
    assert aux.item() > 0 and model.encoder.pop_aux_loss() is None  # collected once
    preds, masks = model.predict(inputs, valid=valid, generator=torch.Generator().manual_seed(0))
    model.encoder.pop_aux_loss()
    plain = model.criterion(preds, inputs, masks, valid)["loss"]
    torch.testing.assert_close(out["loss"], plain + aux)
    out["loss"].backward()
    assert model.encoder.blocks[0].mlp.fc1.weight.grad is not None
