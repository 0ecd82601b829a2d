"""The Latent MIM Lite objective (multimae/objectives/latent_mim.py): losses against hand computations, frozen
targets, gradients, fp32 losses under autocast, bad input, checkpoint state and pictures."""

from __future__ import annotations

import copy
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from multimae.build import build_pretraining, model_summary, random_inputs
from multimae.objectives.latent_mim import info_nce, patch_discrimination_loss, select_tokens
from multimae.objectives.latent_mim_masking import DECODER, ENCODER, MISSING
from tests.multimae_fixture import DEFAULTS
from utils.optim import param_groups
from utils.visualize import save_pictures

IN_DOMAINS = ["s2_10m", "s2_20m", "s1"]
DECODE_ONLY = ["elevation", "worldcover"]


def tiny_cfg(in_domains=IN_DOMAINS, decode_only=DECODE_ONLY, input_size: int = 32) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    cfg["objective"] = "latent_mim"
    cfg["in_domains"] = list(in_domains)
    cfg["data"]["input_size"] = input_size
    cfg["model"].update(preset={"dim": 32, "depth": 2, "heads": 2}, class_embed_dim=8)
    cfg["latent_mim"]["decode_only"] = list(decode_only)
    cfg["latent_mim"]["predictor"].update(dim=32, depth=2, heads=4)
    return cfg


def make_batch(cfg, model, batch_size=4, seed=0, *, offsets=True, seeds=None) -> dict:
    """Random inputs (each sample with its own per-band offset, so samples differ), through the worker-side
    masking as the data loader applies it."""
    gen = torch.Generator().manual_seed(seed)
    inputs, valid = random_inputs(cfg, batch_size, generator=gen)
    if offsets:
        for x in inputs.values():
            if x.is_floating_point():
                x += 2 * torch.randn(batch_size, x.shape[1], 1, 1, generator=gen)
    samples = [{"inputs": {k: v[b] for k, v in inputs.items()}, "valid": {k: v[b] for k, v in valid.items()},
                "index": b} for b in range(batch_size)]
    seeds = np.arange(batch_size, dtype=np.uint64) * 7919 + 13 if seeds is None else seeds
    return default_collate(model.batch_transform()(samples, seeds))


# ---------------------------------------------------------------------------------------------- loss functions
def test_patch_discrimination_equals_a_hand_computed_value():
    tau = 0.1
    # sample 0: two decoder tokens; sample 1: one (its loss is 0: no negative); sample 2: padding only
    preds = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [9.0, 9.0]], [[1.0, 1.0], [1.0, 1.0]]])
    targets = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [5.0, 5.0]], [[1.0, 1.0], [1.0, 1.0]]])
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    s = 1 / math.sqrt(2)
    # sample 0, normalised: p0 = (1, 0), p1 = (0, 1); t0 = (1, 0), t1 = (s, s)
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(s / tau)))
    row1 = -math.log(math.exp(s / tau) / (math.exp(0 / tau) + math.exp(s / tau)))
    sample0 = (row0 + row1) / 2 * 2 * tau
    expected = (sample0 + 0.0) / 2  # mean over the two samples with a decoder token
    got = patch_discrimination_loss(preds, targets, valid, tau)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-6)
    none = patch_discrimination_loss(preds, targets, torch.zeros_like(valid), tau)
    assert none.item() == 0.0 and torch.isfinite(none)


def test_similar_negatives_are_dropped_only_above_the_threshold():
    tau = 0.1
    preds = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    targets = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])  # tokens 0 and 1 share one target direction
    valid = torch.ones(1, 3, dtype=torch.bool)
    s = 1 / math.sqrt(2)
    # token 0 (p = (1, 0)): negatives 1 (identical target, dropped) and 2; token 1 (p = (0, 1)): negatives 0
    # (dropped) and 2; token 2 (p = (s, s)): negatives 0 and 1 (targets (1, 0): cosine 0 with (0, 1), kept)
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0.0)))
    row1 = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(1 / tau)))
    row2 = -math.log(math.exp(s / tau) / (math.exp(s / tau) + 2 * math.exp(s / tau)))
    expected = (row0 + row1 + row2) / 3 * 2 * tau
    got = patch_discrimination_loss(preds, targets, valid, tau, similar_negatives=0.999)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert patch_discrimination_loss(preds, targets, valid, tau).item() > got.item()


def test_patch_discrimination_gradient_is_finite_with_padding():
    preds = torch.randn(3, 4, 8, requires_grad=True)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    patch_discrimination_loss(preds, torch.randn(3, 4, 8), valid).backward()
    assert torch.isfinite(preds.grad).all() and (preds.grad[2] == 0).all() and (preds.grad[1, 2:] == 0).all()


def test_info_nce_equals_cross_entropy_of_cosine_logits():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.1
    assert info_nce(a, b, 0.1).item() == pytest.approx(F.cross_entropy(logits, torch.arange(5)).item(), rel=1e-6)
    keep = torch.tensor([True, False, True, True, False])
    assert info_nce(a, b, 0.1, keep).item() == pytest.approx(info_nce(a[keep], b[keep], 0.1).item(), rel=1e-6)
    assert info_nce(a[:1], b[:1]).item() == 0.0  # one sample: no negative, no loss


def test_select_tokens_left_aligns_in_order():
    mask = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, False]])
    ids, valid = select_tokens(mask)
    assert ids.shape == (3, 3)
    assert valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert ids[0, :2].tolist() == [1, 3] and ids[2].tolist() == [0, 1, 2]


def test_info_nce_of_the_model_is_lower_for_two_views_of_the_same_samples_than_for_shuffled_pairs():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_pretraining(cfg).eval()
    batch = make_batch(cfg, model, batch_size=8)
    tok = model.encoder.tokenize(batch["inputs"], batch["valid"])
    layout = model.target.layout(32)
    roles = model._roles(batch, layout, 8)
    with torch.no_grad():
        a, b = (model._encode_view(tok.tokens, roles[:, v])["pooled"] for v in range(2))
    same = info_nce(a, b, 0.1).item()
    shuffled = [info_nce(a, b[torch.roll(torch.arange(8), k)], 0.1).item() for k in range(1, 8)]
    assert same < min(shuffled)


# ---------------------------------------------------------------------------------------------- the objective
def test_loss_terms_gradients_and_frozen_targets_after_training_steps():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg["model"]["drop_path"] = 0.1
    model = build_pretraining(cfg)
    # targets of input domains are copies of the encoder's initial patch projections
    for d in IN_DOMAINS:
        enc, tgt = model.encoder.input_adapters[d].state_dict(), model.target.input_adapters[d].state_dict()
        assert all(torch.equal(enc[k], tgt[k]) for k in enc)
    before = {k: v.clone() for k, v in model.target.state_dict().items()}
    enc_before = model.encoder.input_adapters["s2_10m"].proj.weight.detach().clone()
    groups = param_groups(model, 0.02)
    names = {n for g in groups for n in g["names"]}
    assert names and not any(n.startswith("target.") for n in names)  # never optimised
    opt = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2, weight_decay=0.02)
    for step in range(3):
        batch = make_batch(cfg, model, seed=step)
        out = model(batch)
        expected = {"loss", "patch_disc", "infonce"} | {f"patch_disc_{d}" for d in IN_DOMAINS + DECODE_ONLY}
        assert set(out) == expected and all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
        summed = sum(out[f"patch_disc_{d}"] for d in IN_DOMAINS + DECODE_ONLY)
        assert out["patch_disc"].item() == pytest.approx(summed.item(), rel=1e-5)
        assert out["loss"].item() == pytest.approx(out["patch_disc"].item() + 0.1 * out["infonce"].item(), rel=1e-5)
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            silent = [n for n, p in model.named_parameters() if p.requires_grad and
                      (p.grad is None or torch.count_nonzero(p.grad) == 0)]
            assert silent == []
        opt.step()
    after = model.target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert not torch.equal(enc_before, model.encoder.input_adapters["s2_10m"].proj.weight)  # the encoder trained
    state = model.objective_state()
    assert state["name"] == "latent_mim" and "target.input_adapters.worldcover.proj.weight" in state["state_dict"]
    assert not any(k.startswith("encoder.") for k in state["state_dict"])


def test_targets_are_projections_without_position_and_losses_stay_fp32_under_autocast():
    cfg = tiny_cfg()
    model = build_pretraining(cfg)
    batch = make_batch(cfg, model)
    targets = model._targets(batch["inputs"], batch["valid"])
    adapter = model.target.input_adapters["s2_10m"]
    x = torch.where(batch["valid"]["s2_10m"][:, None], batch["inputs"]["s2_10m"], 0.0)
    torch.testing.assert_close(targets[:, :16], adapter.proj(x).flatten(2).transpose(1, 2), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        inner = model._targets(batch["inputs"], batch["valid"])
    assert inner.dtype == torch.float32 and torch.equal(inner, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_grouping_by_modality_puts_the_sentinel2_band_sets_together():
    cfg = tiny_cfg()
    cfg["latent_mim"]["loss"]["group"] = "modality"
    model = build_pretraining(cfg)
    assert model.groups == {"sentinel2": ["s2_10m", "s2_20m"], "sentinel1": ["s1"], "aster": ["elevation"],
                            "esa_worldcover": ["worldcover"]}
    out = model(make_batch(cfg, model))
    assert {"patch_disc_sentinel2", "patch_disc_aster"} <= set(out) and torch.isfinite(out["loss"])


def test_reference_band_groups_and_no_decode_only_domain_work_too():
    cfg = tiny_cfg(in_domains=["s2_rgb", "s2_rededge", "s2_nir", "s2_swir", "elevation", "worldcover"], decode_only=[])
    model = build_pretraining(cfg)
    out = model(make_batch(cfg, model))
    assert torch.isfinite(out["loss"]) and "patch_disc_worldcover" in out


def test_bad_configs_name_the_key():
    with pytest.raises(ValueError, match="latent_mim.decode_only: 'elevation' is also in in_domains"):
        build_pretraining(tiny_cfg(in_domains=["s2_10m", "elevation"], decode_only=["elevation"]))
    with pytest.raises(ValueError, match="at least two band sets"):
        build_pretraining(tiny_cfg(in_domains=["s2_10m"], decode_only=[]))
    with pytest.raises(ValueError, match="latent_mim.decode_only: unknown domain 'srtm'"):
        build_pretraining(tiny_cfg(decode_only=["srtm"]))
    with pytest.raises(ValueError, match="latent_mim.decode_only: 's2_rgb_normpix' is output-only"):
        build_pretraining(tiny_cfg(decode_only=["s2_rgb_normpix"]))
    cfg = tiny_cfg()
    cfg["latent_mim"]["loss"]["group"] = "band"
    with pytest.raises(ValueError, match="latent_mim.loss.group"):
        build_pretraining(cfg)
    cfg = tiny_cfg()
    cfg["latent_mim"]["masking"]["decode_ratio"] = 0.8
    with pytest.raises(ValueError, match="latent_mim.masking: encode_ratio 0.5 and decode_ratio 0.8"):
        build_pretraining(cfg)


def test_bad_batches_give_clear_errors_or_finite_losses():
    cfg = tiny_cfg()
    model = build_pretraining(cfg)
    batch = make_batch(cfg, model)
    with pytest.raises(ValueError, match="batch has no 'roles'"):
        model({k: v for k, v in batch.items() if k != "roles"})
    wrong = {**batch, "roles": {**batch["roles"], "s1": batch["roles"]["s1"][:, :, :3]}}
    with pytest.raises(ValueError, match=r"roles\['s1'\] must have shape"):
        model(wrong)
    no_map = {**batch, "inputs": {k: v for k, v in batch["inputs"].items() if k != "worldcover"}}
    with pytest.raises(ValueError, match="no decode-only domain 'worldcover'"):
        model(no_map)
    # every sample missing in a domain (no Sentinel-1 in the whole batch): masked, finite
    inputs, valid = random_inputs(cfg, 4, generator=torch.Generator().manual_seed(1))
    valid["s1"][:] = False
    inputs["s1"].zero_()
    samples = [{"inputs": {k: v[b] for k, v in inputs.items()}, "valid": {k: v[b] for k, v in valid.items()},
                "index": b} for b in range(4)]
    batch = default_collate(model.batch_transform()(samples, np.arange(4, dtype=np.uint64)))
    assert (batch["roles"]["s1"] == MISSING).all()
    out = model(batch)
    assert all(torch.isfinite(v) for v in out.values()) and out["patch_disc_s1"].item() == 0.0
    # a sample with no valid pixel at all, and a batch without any decoder token: finite, zero where empty
    for d in valid:
        valid[d][0] = False
    samples[0] = {"inputs": {k: v[0] for k, v in inputs.items()}, "valid": {k: v[0] for k, v in valid.items()},
                  "index": 0}
    batch = default_collate(model.batch_transform()(samples, np.arange(4, dtype=np.uint64)))
    assert not any((batch["roles"][d][0] == ENCODER).any() for d in batch["roles"])
    assert torch.isfinite(model(batch)["loss"])
    for d in batch["roles"]:
        batch["roles"][d] = torch.where(batch["roles"][d] == DECODER, 1, batch["roles"][d]).to(torch.int8)
    out = model(batch)
    assert out["patch_disc"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()  # every predictor parameter still takes part (DDP)
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_summary_and_pictures(tmp_path):
    cfg = tiny_cfg()
    text = model_summary(cfg)
    assert "objective: latent_mim" in text and "decode-only: elevation, worldcover" in text
    assert "params_target: 0" in text
    model = build_pretraining(cfg).eval()
    data = model.pictures(make_batch(cfg, model, batch_size=2))
    assert data["kind"] == "latent" and data["rgb"].shape == (2, 3, 32, 32)
    sim, roles = data["similarity"]["elevation"], data["roles"]["elevation"]
    assert torch.equal(~torch.isnan(sim), roles == DECODER) and sim[~torch.isnan(sim)].abs().max() <= 1 + 1e-5
    assert set(data["tokens"]) == set(IN_DOMAINS) and data["tokens"]["s1"].shape == (2, 16, 32)
    paths = save_pictures(tmp_path, "step000003", data)
    assert [p.name for p in paths] == ["sample0_step000003.png", "sample1_step000003.png"]
    assert paths[0].parent.name == "latent" and mpimg.imread(paths[0]).shape[0] > 600  # 1 + 5 rows of panels
