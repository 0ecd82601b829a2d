"""MultiMAE-EO reference checkpoints: safe reading, architecture, key mapping, and module parity on its fixture.

The fixture (``../shared/reference/parity/multimae_eo_tiny.pt``) holds weights, inputs, masks and
outputs computed by the reference implementation itself; tests that need it skip when it is absent.
"""

import argparse
from pathlib import Path

import pytest
import torch

from multimae.adapters import majority_pool
from multimae.build import build_pretraining
from multimae.masking import mask_to_ids
from multimae.reference import (
    REFERENCE_DOMAINS,
    ReferenceCheckpointError,
    convert_reference_state_dict,
    infer_reference_architecture,
    load_reference_checkpoint,
)
from utils.config import merge_config
from tests.multimae_fixture import DEFAULTS

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "parity" / "multimae_eo_tiny.pt"
TOL = dict(atol=1e-5, rtol=1e-5)  # the fixture README's tolerances


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"reference parity fixture {FIXTURE} absent")
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def arch(fixture):
    return infer_reference_architecture(fixture["state_dict"], num_heads=fixture["config"]["num_heads"])


# ------------------------------------------------------------------------------------ reading
def test_reads_a_checkpoint_as_save_model_writes_it(tmp_path):
    sd = {"global_tokens": torch.randn(1, 1, 8)}
    args = argparse.Namespace(model="pretrain_multimae_base", in_domains=["rgb", "depth"], opt_betas=[0.9, 0.95],
                              input_size=56, resume="")
    path = tmp_path / "checkpoint-99.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 99,
                "scaler": {"scale": 65536.0}, "args": args}, path)
    ckpt = load_reference_checkpoint(path)
    assert torch.equal(ckpt.state_dict["global_tokens"], sd["global_tokens"])
    assert ckpt.args["in_domains"] == ["rgb", "depth"] and ckpt.args["input_size"] == 56
    assert ckpt.epoch == 99 and sorted(ckpt.other_keys) == ["optimizer", "scaler"]
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    ckpt = load_reference_checkpoint(bare)
    assert ckpt.args is None and ckpt.epoch is None and list(ckpt.state_dict) == ["global_tokens"]


class _NotAllowed:  # any class other than argparse.Namespace must not be unpickled
    pass


def test_refuses_other_objects_and_non_checkpoints(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": argparse.Namespace(hook=_NotAllowed())}, path)
    with pytest.raises(ReferenceCheckpointError, match=r"evil.pth: .*it holds a .*_NotAllowed object"):
        load_reference_checkpoint(path)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ReferenceCheckpointError, match="expected a dict, got list"):
        load_reference_checkpoint(tmp_path / "list.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "nontensor.pth")
    with pytest.raises(ReferenceCheckpointError, match="non-tensor entries: a"):
        load_reference_checkpoint(tmp_path / "nontensor.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        load_reference_checkpoint(tmp_path / "missing.pth")


# ------------------------------------------------------------------------------- architecture
def test_architecture_of_the_fixture(fixture, arch):
    c = fixture["config"]
    assert arch.in_domains == ("s2_rgb", "s2_rededge", "s2_nir", "s2_swir", "elevation", "worldcover12")
    assert arch.out_domains == arch.in_domains + ("s2_rgb_normpix",)
    assert arch.source_in_domains == tuple(c["token_order"])
    assert (arch.dim, arch.depth, arch.num_heads, arch.mlp_ratio) == (96, 2, 4, 4.0)
    assert (arch.decoder_dim, arch.decoder_depth, arch.decoder_heads) == (32, 1, 8)
    assert (arch.patch_size, arch.num_global_tokens, arch.class_embed_dim) == (8, 1, 64)
    assert arch.pos_embed_grid == (28, 28) and arch.input_size is None


def test_heads_from_flag_model_name_or_width(fixture):
    sd = fixture["state_dict"]
    with pytest.raises(ReferenceCheckpointError, match="width 96 is not a multiple of 64 .* give the number of heads"):
        infer_reference_architecture(sd)
    with pytest.raises(ReferenceCheckpointError, match=r"args.model is 'pretrain_multimae_base' \(768 wide\)"):
        infer_reference_architecture(sd, {"model": "pretrain_multimae_base"})
    with pytest.raises(ReferenceCheckpointError, match="heads do not divide the widths: encoder 96 / 5"):
        infer_reference_architecture(sd, num_heads=5)
    small = {"global_tokens": torch.zeros(1, 1, 128), "encoder.0.mlp.fc1.weight": torch.zeros(512, 128),
             "input_adapters.rgb.proj.weight": torch.zeros(128, 3, 8, 8),
             "input_adapters.rgb.pos_emb": torch.zeros(1, 128, 28, 28)}
    args = {"in_domains": "rgb", "out_domains": [], "input_size": 56, "decoder_num_heads": 4}
    arch = infer_reference_architecture(small, args)
    assert (arch.num_heads, arch.decoder_heads, arch.input_size, arch.out_domains) == (2, 4, 56, ())
    named = dict(small, **{"global_tokens": torch.zeros(1, 1, 768),
                           "input_adapters.rgb.pos_emb": torch.zeros(1, 768, 28, 28)})
    assert infer_reference_architecture(named, dict(args, model="pretrain_multimae_base")).num_heads == 12
    with pytest.raises(ReferenceCheckpointError, match="pos_emb has width 128, but the encoder is 768 wide"):
        infer_reference_architecture(dict(named, **{"input_adapters.rgb.pos_emb": torch.zeros(1, 128, 28, 28)}), args)


# ---------------------------------------------------------------------------------------- mapping
def test_every_key_is_copied_or_checked(fixture, arch):
    sd = fixture["state_dict"]
    conv = convert_reference_state_dict(sd, arch)
    assert sorted(list(conv.sources.values()) + conv.checked) == sorted(sd)
    assert len(conv.checked) == 13 and all(k.endswith(".pos_emb") for k in conv.checked)
    assert conv.sources["blocks.1.attn.qkv.weight"] == "encoder.1.attn.qkv.weight"
    assert conv.sources["decoders.s2_rgb_normpix.xattn.kv.weight"] == "output_adapters.norm_rgb.decoder.kv.weight"
    assert conv.sources["decoders.worldcover12.domain_embeds.s2_nir"] == "output_adapters.semseg.task_embeddings.ebands"
    emb = conv.encoder["input_adapters.worldcover12.class_embed.weight"]
    assert emb.shape == (13, 64) and torch.equal(emb[:12], sd["input_adapters.semseg.class_emb.weight"])
    assert not emb[12].any() and list(conv.filled) == ["input_adapters.worldcover12.class_embed.weight"]


def _reference_model(fixture, arch):
    """This project's encoder and MultiMAE-EO objective with the reference options, loaded with the fixture."""
    cfg = merge_config(DEFAULTS, arch.config_overrides(), "reference architecture")
    cfg["data"]["input_size"] = fixture["config"]["input_size"]
    model = build_pretraining(cfg).eval()
    conv = convert_reference_state_dict(fixture["state_dict"], arch)
    weights = {**{f"encoder.{k}": v for k, v in conv.encoder.items()}, **conv.decoders}
    return model, weights


def test_mapped_names_and_shapes_are_the_projects_model(fixture, arch):
    model, weights = _reference_model(fixture, arch)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in weights.items()} == ours


def test_bad_state_dicts_name_the_keys(fixture, arch):
    sd = dict(fixture["state_dict"])
    broken = {k: v for k, v in sd.items() if k != "encoder.1.mlp.fc2.bias"}
    broken["output_adapters.rgb.extra.weight"] = torch.zeros(1)
    with pytest.raises(ReferenceCheckpointError) as err:
        convert_reference_state_dict(broken, arch)
    assert "missing keys: encoder.<i>.mlp.fc2.bias" in str(err.value)
    assert "unexpected keys: output_adapters.rgb.extra.weight" in str(err.value)
    wide = dict(sd, **{"output_adapters.depth.pos_emb": torch.zeros(1, 64, 28, 28)})
    with pytest.raises(ReferenceCheckpointError, match=r"wrong shapes: output_adapters.depth.pos_emb \(1, 64, 28, 28\) "
                                                       r"\(expected \(1, 32, 28, 28\)\)"):
        convert_reference_state_dict(wide, arch)
    learned = dict(sd, **{"input_adapters.rgb.pos_emb": sd["input_adapters.rgb.pos_emb"] + 0.01})
    with pytest.raises(ReferenceCheckpointError, match="input_adapters.rgb.pos_emb is not the fixed 2-D sin-cos table"):
        convert_reference_state_dict(learned, arch)


def test_epfl_imagenet_multimae_is_refused_with_its_keys(fixture):
    # EPFL's ImageNet MultiMAE: rgb, depth and a 133-class COCO semseg, no Sentinel-2 band groups, no norm_rgb.
    keep = ("rgb", "depth", "semseg")
    epfl = {k: v for k, v in fixture["state_dict"].items()
            if k.split(".")[0] not in ("input_adapters", "output_adapters") or k.split(".")[1] in keep}
    epfl = {k: v for k, v in epfl.items() if ".task_embeddings." not in k or k.split(".")[-1] in keep}
    epfl["input_adapters.semseg.class_emb.weight"] = torch.zeros(133, 64)
    epfl["output_adapters.semseg.out_proj.weight"] = torch.zeros(133 * 4, 32)
    arch = infer_reference_architecture(epfl, num_heads=4)
    with pytest.raises(ReferenceCheckpointError) as err:
        convert_reference_state_dict(epfl, arch)
    msg = str(err.value)
    assert "it has no input adapter for ired, ebands, sired" in msg
    assert "missing keys: input_adapters.ebands.* (3 keys), input_adapters.ired.* (3 keys)" in msg
    assert "output_adapters.norm_rgb.* (40 keys)" in msg and "output_adapters.rgb.task_embeddings.ired" in msg
    assert "input_adapters.semseg.class_emb.weight (133, 64) (expected (12, 64))" in msg
    taskonomy = dict(epfl, **{"input_adapters.normal.proj.weight": torch.zeros(96, 3, 8, 8)})
    with pytest.raises(ReferenceCheckpointError, match="domains normal are not the reference's .* unexpected keys: "
                                                       "input_adapters.normal.proj.weight"):
        infer_reference_architecture(taskonomy, num_heads=4)


# ------------------------------------------------------------------------------ parity
def test_the_projects_model_with_reference_options_reproduces_the_fixture(fixture, arch):
    model, weights = _reference_model(fixture, arch)
    model.load_state_dict(weights, strict=True)
    inputs = {REFERENCE_DOMAINS[k]: v for k, v in fixture["inputs"].items()}
    inputs["worldcover12"] = fixture["semseg_fullres"]  # full resolution: pooled by 4 in adapter and criterion
    assert torch.equal(majority_pool(fixture["semseg_fullres"], 4, 12), fixture["inputs"]["semseg"])
    masks = {REFERENCE_DOMAINS[k]: v.float() for k, v in fixture["task_masks"].items()}
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.encode(inputs), fixture["encoder_tokens"], **TOL)
        tok = model.encoder.tokenize(inputs)
        mask = torch.cat([masks[d] for d in arch.in_domains], dim=1)
        ids_keep, _ = mask_to_ids(mask)
        assert torch.equal(ids_keep, fixture["visible_index"])
        torch.testing.assert_close(model.encoder.encode_visible(tok.tokens, ids_keep),
                                   fixture["encoder_tokens_masked"], **TOL)
        preds, out_masks = model.predict(inputs, masks={d: masks[d] for d in arch.in_domains})
        for ref_name, expected in fixture["preds"].items():
            torch.testing.assert_close(preds[REFERENCE_DOMAINS[ref_name]], expected, **TOL, msg=ref_name)
        unmasked, _ = model.predict(inputs, mask_all_visible=True)
        for ref_name, expected in fixture["preds_unmasked"].items():
            torch.testing.assert_close(unmasked[REFERENCE_DOMAINS[ref_name]], expected, **TOL, msg=ref_name)
        losses = model.criterion(preds, inputs, out_masks)
    for ref_name, expected in fixture["losses"].items():
        ours = losses["loss"] if ref_name == "total" else losses[REFERENCE_DOMAINS[ref_name]]
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0, msg=ref_name)
