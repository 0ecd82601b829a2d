"""The MultiMAE-EO objective: gradients, shapes, no-data handling, determinism, errors, summary of the default config."""

import copy
import re

import pytest
import torch

from multimae.build import PRESETS, build_pretraining, model_summary
from tests.multimae_fixture import DEFAULTS, random_batch, tiny_cfg

N_D = 4  # tokens per domain at 16 px, patch 8


def _every_domain_visible_and_masked(model, batch_size):
    """Given masks: token 0 of every domain visible, the rest masked (so every embedding is used)."""
    mask = torch.ones(batch_size, N_D)
    mask[:, 0] = 0
    return {d: mask.clone() for d in model.encoder.in_domains}


def test_every_parameter_gets_a_gradient_with_all_domains_on():
    torch.manual_seed(0)  # drop path is random
    cfg = tiny_cfg()
    cfg["multimae"]["loss"]["weighting"] = "uncertainty"
    cfg["model"]["domain_embed"] = True
    cfg["model"]["drop_path"] = 0.1
    model = build_pretraining(cfg)
    inputs, valid = random_batch(cfg, 4, invalid=False)
    preds, masks = model.predict(inputs, valid=valid, masks=_every_domain_visible_and_masked(model, 4))
    model.criterion(preds, inputs, masks, valid)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    silent = [n for n, p in model.named_parameters() if torch.count_nonzero(p.grad) == 0]
    assert silent == []  # class_embed gets a (partly) non-zero gradient, its no-data row stays zero
    assert torch.count_nonzero(model.encoder.input_adapters["worldcover"].class_embed.weight.grad[-1]) == 0


def test_parameter_names_and_no_weight_decay():
    model = build_pretraining(tiny_cfg())
    prefixes = {".".join(n.split(".")[:2]) for n, _ in model.named_parameters()}
    assert prefixes == {"encoder.input_adapters", "encoder.blocks", "encoder.global_tokens"} | {
        f"decoders.{d}" for d in DEFAULTS["multimae"]["out_domains"]}
    assert "encoder.blocks.1.attn.qkv.weight" in dict(model.named_parameters())
    assert model.encoder.global_tokens.shape == (1, 1, 32)
    names = set(dict(model.named_parameters()))
    nwd = model.no_weight_decay()
    assert nwd <= names and "encoder.global_tokens" in nwd
    assert "decoders.s2_rgb.mask_token" in nwd and "encoder.input_adapters.worldcover.class_embed.weight" in nwd
    assert "decoders.elevation.domain_embeds.s2_rgb" in nwd
    assert not any("pos_embed" in k for k in model.state_dict())  # buffers are not persistent
    assert model.objective_state()["name"] == "multimae"
    assert not any(k.startswith("encoder.") for k in model.objective_state()["state_dict"])


def test_output_shapes_including_categorical_and_decode_only():
    cfg = tiny_cfg(input_size=32)
    cfg["in_domains"] = ["s2_rgb", "worldcover"]
    cfg["multimae"]["out_domains"] = ["s2_rgb", "worldcover", "s2_rgb_normpix", "elevation", "dynamic_world"]
    model = build_pretraining(cfg)
    assert model.encoder.layout()["s2_rgb"].num_tokens == 16
    inputs, valid = random_batch(cfg, 2)
    preds, masks = model.predict(inputs, valid=valid)
    assert preds["s2_rgb"].shape == (2, 3, 32, 32)
    assert preds["s2_rgb_normpix"].shape == (2, 3, 32, 32)
    assert preds["worldcover"].shape == (2, 11, 8, 8)
    assert preds["elevation"].shape == (2, 1, 32, 32)  # decode-only
    assert preds["dynamic_world"].shape == (2, 9, 8, 8)  # decode-only class map
    assert all(m.shape == (2, 16) for m in masks.values())
    assert torch.equal(masks["s2_rgb_normpix"], masks["s2_rgb"])
    assert (masks["elevation"] == 1).all()
    assert ((1 - masks["s2_rgb"] + 1 - masks["worldcover"]).sum(dim=1) == 8).all()
    tokens = model.encoder.encode(inputs, valid=valid)
    assert tokens.shape == (2, 2 * 16 + 1, 32)


def test_domains_with_their_own_patch_size():
    cfg = tiny_cfg(input_size=32)
    cfg["in_domains"] = ["s2_rgb", "s2_atmos", "worldcover"]
    cfg["model"]["patch_sizes"] = {"s2_atmos": 16, "elevation": 16}
    cfg["multimae"]["out_domains"] = ["s2_rgb", "s2_atmos", "worldcover", "elevation"]
    cfg["multimae"]["masking"]["num_encoded_tokens"] = 10
    model = build_pretraining(cfg)
    layout = model.encoder.layout()
    assert layout.tokens_per_domain == [16, 4, 16] and layout["s2_atmos"].grid == (2, 2)
    inputs, valid = random_batch(cfg, 2)
    preds, masks = model.predict(inputs, valid=valid)
    assert preds["s2_atmos"].shape == (2, 2, 32, 32) and masks["s2_atmos"].shape == (2, 4)
    assert preds["elevation"].shape == (2, 1, 32, 32) and masks["elevation"].shape == (2, 4)  # decode-only, 16 px
    assert sum((1 - masks[d]).sum(dim=1) for d in cfg["in_domains"]).eq(10).all()
    out = model({"inputs": inputs, "valid": valid})
    assert torch.isfinite(out["loss"]) and set(out) >= {"s2_atmos", "elevation"}


def test_nodata_pixels_do_not_change_the_loss():
    cfg = tiny_cfg()
    model = build_pretraining(cfg).eval()
    inputs, valid = random_batch(cfg)

    def loss(batch):
        return model({"inputs": batch, "valid": valid}, generator=torch.Generator().manual_seed(0))["loss"]

    changed = copy.deepcopy(inputs)
    for name, x in changed.items():
        if x.is_floating_point():
            x[~valid[name].unsqueeze(1).expand_as(x)] = 123.0
        else:
            x[~valid[name]] = 5
    assert loss(changed).item() == loss(inputs).item()


def test_entirely_nodata_patches_are_not_encoded():
    cfg = tiny_cfg(num_encoded_tokens=4)
    model = build_pretraining(cfg)
    inputs, valid = random_batch(cfg, 64, invalid=False)
    for name in ("s2_rgb", "s2_rededge", "s2_nir"):  # three domains missing entirely
        valid[name][:] = False
    valid["elevation"][:, :8, :8] = False  # and the first patch of elevation
    _, masks = model.predict(inputs, valid=valid)
    for name in ("s2_rgb", "s2_rededge", "s2_nir"):
        assert (masks[name] == 1).all()
    assert (masks["elevation"][:, 0] == 1).all()
    assert sum((1 - masks[d]).sum(dim=1) for d in model.encoder.in_domains).eq(4).all()


def test_seeded_runs_are_deterministic():
    cfg = tiny_cfg()
    inputs, valid = random_batch(cfg)

    def run():
        torch.manual_seed(0)
        model = build_pretraining(cfg)
        preds, masks = model.predict(inputs, valid=valid)
        return preds, masks

    (p1, m1), (p2, m2) = run(), run()
    for d in p1:
        assert torch.equal(p1[d], p2[d]) and torch.equal(m1[d], m2[d])


def test_other_image_size_loads_the_same_state_dict():
    small = build_pretraining(tiny_cfg(input_size=16))
    large = build_pretraining(tiny_cfg(input_size=32))
    large.load_state_dict(small.state_dict())  # strict: position embeddings are not in it
    inputs, valid = random_batch(tiny_cfg(input_size=32), 2)
    assert small.encoder.encode(inputs, valid=valid).shape == (2, 6 * 16 + 1, 32)  # its own grid, no interpolation


def _bad(cfg_change=None, batch_change=None, **forward):
    cfg = tiny_cfg()
    if cfg_change:
        cfg_change(cfg)
    model = build_pretraining(cfg)
    inputs, valid = random_batch(tiny_cfg())
    if batch_change:
        batch_change(inputs, valid)
    model.predict(inputs, valid=valid, **forward)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_change": lambda i, v: i.pop("s2_nir")}, "no input domain 's2_nir'"),
        ({"batch_change": lambda i, v: i.update(s2_rgb=torch.zeros(3, 4, 16, 16))}, "'s2_rgb': expected 3 channels"),
        ({"batch_change": lambda i, v: i.update(worldcover=i["worldcover"].float())}, "'worldcover': expected an int64"),
        ({"batch_change": lambda i, v: i.update(elevation=i["elevation"].long())}, "'elevation': expected a float"),
        ({"batch_change": lambda i, v: i.update(worldcover=i["worldcover"] + 20)}, "'worldcover': class ids"),
        ({"num_encoded_tokens": 25}, "masking.num_encoded_tokens"),
        ({"cfg_change": lambda c: c["multimae"]["masking"].update(num_encoded_tokens=25)},
         "multimae.masking.num_encoded_tokens"),
        ({"cfg_change": lambda c: c["model"].update(preset="huge")}, "model.preset"),
        ({"cfg_change": lambda c: c["model"].update(patch_size=5)}, "data.input_size 16 is not divisible"),
        ({"cfg_change": lambda c: c["model"].update(patch_sizes={"s2_nir": 3})},
         "not divisible by model.patch_sizes.s2_nir 3"),
        ({"cfg_change": lambda c: c["model"].update(ffn="moe_x")}, "model.ffn: unknown feed-forward kind"),
        ({"cfg_change": lambda c: c.update(in_domains=["s2_rgb", "sentinel_3"])}, "in_domains: unknown domain"),
        ({"cfg_change": lambda c: c.update(in_domains=["s2_rgb_normpix"])}, "in_domains: 's2_rgb_normpix' is output-only"),
        ({"cfg_change": lambda c: c["multimae"].update(out_domains=[])}, "multimae.out_domains is empty"),
        ({"cfg_change": lambda c: c["multimae"].update(out_domains=["s2_rgb", "s2_rgb"])}, "lists a domain twice"),
        ({"cfg_change": lambda c: c.update(objective="simclr")}, "unknown objective 'simclr'"),
        ({"cfg_change": lambda c: c["multimae"]["masking"].update(alphas=[1.0, 2.0])}, "masking.alphas"),
    ],
)
def test_bad_input_errors_name_the_domain_or_key(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad(**kwargs)


def test_image_size_not_divisible_by_patch_size():
    model = build_pretraining(tiny_cfg())
    inputs, _ = random_batch(tiny_cfg())
    inputs = {k: v[..., :12, :12] for k, v in inputs.items()}
    with pytest.raises(ValueError, match="'s2_rgb': image size 12 x 12 px is not divisible by the patch size 8"):
        model.predict(inputs)


def test_default_config_summary_matches_reference_geometry():
    text = model_summary(DEFAULTS)
    values = dict(line.split(": ", 1) for line in text.splitlines() if not line.startswith(" "))
    assert values["tokens_per_domain"] == "49" and values["encoded_tokens"] == "49"
    params = int(values["trainable_params"])
    assert abs(params - 90.78e6) / 90.78e6 < 0.03, params
    assert "worldcover" in values["in_domains"] and "s2_rgb_normpix" in values["out_domains"]
    assert values["objective"] == "multimae" and "elevation: 49 tokens, grid 7 x 7, patch 8 px (80 m)" in text
    assert PRESETS["base"] == {"dim": 768, "depth": 12, "heads": 12}
