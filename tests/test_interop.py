"""timm interop: the exported encoder loads into a timm ViT and gives the same features."""

import pytest
import timm
import torch

from multimae.build import build_encoder
from multimae.interop import export_timm_state_dict, load_timm_state_dict, timm_vit_kwargs
from tests.multimae_fixture import tiny_cfg


def _model(num_global_tokens=1):
    cfg = tiny_cfg()
    cfg["model"]["num_global_tokens"] = num_global_tokens
    cfg["in_domains"] = ["s2_rgb", "elevation", "worldcover"]
    return build_encoder(cfg).eval()


@pytest.mark.parametrize("num_global_tokens", [1, 2])
def test_exported_encoder_gives_the_same_features_in_timm(num_global_tokens):
    torch.manual_seed(0)
    model = _model(num_global_tokens)
    state = export_timm_state_dict(model, "elevation")
    kwargs = timm_vit_kwargs(model, "elevation")
    assert kwargs["final_norm"] is False and kwargs["class_token"] is True
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    vit.load_state_dict(state)  # strict: every key maps
    x = torch.randn(2, 1, 16, 16)
    ours = model.forward_blocks(model.input_adapters["elevation"](x))  # (B, N + G, D), global tokens last
    theirs = vit.forward_features(x)  # (B, G + N, D), prefix tokens first
    g = num_global_tokens
    torch.testing.assert_close(theirs[:, g:], ours[:, :-g], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs[:, :g], ours[:, -g:], rtol=1e-4, atol=1e-5)


def test_timm_state_dict_loads_back_into_the_encoder():
    torch.manual_seed(0)
    source, target = _model(), _model()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **timm_vit_kwargs(source, "s2_rgb"))
    vit.load_state_dict(export_timm_state_dict(source, "s2_rgb"))
    report = load_timm_state_dict(target, vit.state_dict(), "s2_rgb")
    assert report["unused"] == ["pos_embed"]
    assert "input_adapters.elevation.proj.weight" in report["not_loaded"]
    assert not any(k.startswith("blocks.") for k in report["not_loaded"])
    for key, value in source.state_dict().items():
        if key.startswith(("blocks.", "global_tokens", "input_adapters.s2_rgb.")):
            assert torch.equal(target.state_dict()[key], value), key


def test_interop_errors_name_the_problem():
    model = _model()
    with pytest.raises(ValueError, match="'worldcover' is categorical"):
        export_timm_state_dict(model, "worldcover")
    with pytest.raises(ValueError, match="not an input domain"):
        export_timm_state_dict(model, "s2_nir")
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=0)
    with pytest.raises(ValueError, match=r"shape mismatch for '.*': model \(32, .*timm \(192"):
        load_timm_state_dict(model, wide.state_dict(), "s2_rgb")


def _encoder(*extra):
    cfg = tiny_cfg()
    cfg["in_domains"] = ["s2_rgb", "s1"]
    for key, value in extra:
        cfg["model"][key] = value
    return build_encoder(cfg).eval()


def test_the_domain_embedding_is_exported_with_the_position_embedding():
    torch.manual_seed(0)
    model = _encoder(("domain_embed", True))
    with torch.no_grad():
        model.domain_embeds["s2_rgb"].normal_()  # far from its small init, so a dropped embedding shows
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **timm_vit_kwargs(model, "s2_rgb")).eval()
    vit.load_state_dict(export_timm_state_dict(model, "s2_rgb"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = model.forward_blocks(model.input_adapters["s2_rgb"](x) + model.domain_embeds["s2_rgb"])
        theirs = vit.forward_features(x)
    torch.testing.assert_close(theirs[:, 1:], ours[:, :-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs[:, :1], ours[:, -1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra, field", [
    ((("ffn", "moe"), ("ffn_options", {"experts": [2], "hidden": [16, 16]})), r"model.ffn is 'moe'"),
    ((("kv_groups", 1),), r"model.kv_groups is 1 \(grouped-query attention"),
    ((("metadata", ["lat", "week"]),), r"model.metadata is \['lat', 'week'\] \(metadata tokens"),
])
def test_encoders_a_plain_vit_cannot_express_are_refused_naming_the_field(extra, field):
    model = _encoder(*extra)
    message = rf"this encoder is no plain timm VisionTransformer: {field}.*tools/export_encoder.py"
    for export in (export_timm_state_dict, timm_vit_kwargs):
        with pytest.raises(ValueError, match=message) as err:
            export(model, "s2_rgb")
        assert "\n" not in str(err.value)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=0)
    if model.metadata_fields:  # the blocks are timm's: importing timm weights works, the metadata tokens keep theirs
        report = load_timm_state_dict(model, vit.state_dict(), "s2_rgb")
        assert "metadata_adapter.proj.lat.weight" in report["not_loaded"]
        assert torch.equal(model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    else:
        with pytest.raises(ValueError, match=message):
            load_timm_state_dict(model, vit.state_dict(), "s2_rgb")


def test_moe_and_grouped_query_attention_together_name_both_fields():
    model = _encoder(("ffn", "moe"), ("ffn_options", {"experts": [2], "hidden": [16, 16]}), ("kv_groups", 1),
                     ("metadata", ["hour"]))
    with pytest.raises(ValueError, match=r"model.ffn is 'moe' .*; model.kv_groups is 1 .*; model.metadata is"):
        export_timm_state_dict(model, "s2_rgb")
