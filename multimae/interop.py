"""Exchange encoder weights with timm's ``VisionTransformer``.

The multi-modal encoder with one continuous input adapter is a plain ViT: the same timm blocks, a
patch embedding, a position embedding and learnable prefix tokens. Encoders with parts a plain ViT lacks are
refused, naming the config field (:func:`check_plain_vit`): mixture-of-experts feed-forwards (``model.ffn``),
grouped-query attention (``model.kv_groups``) and, for the export, metadata tokens (``model.metadata``); their
export folder (:mod:`multimae.pretrained`) holds them. Key mapping (as the reference's ``multimae2vit_converter``):

=====================================  ==========================================================
MultiModalEncoder                      timm ``VisionTransformer``
=====================================  ==========================================================
``global_tokens`` (1, G, D)            ``cls_token`` (1, 1, D) = global token 0, and
                                       ``reg_token`` (1, G - 1, D) = the others (``reg_tokens=G-1``)
``input_adapters.<d>.proj.*``          ``patch_embed.proj.*``
sin-cos buffer of the adapter (N, D)   ``pos_embed`` (1, G + N, D): G zero rows (prefix), then it
(+ ``domain_embeds.<d>`` (1, 1, D))    (plus the domain embedding on every row, when the encoder has one)
``blocks.<i>.*``                       ``blocks.<i>.*``
(no final norm)                        ``norm``: **none**, build timm with ``final_norm=False``
=====================================  ==========================================================

Final norm (a decision): the encoder has no final LayerNorm (as the reference), and no LayerNorm
weights reproduce the identity, so the exported dict has no ``norm.*`` keys and the timm model must
be created with ``final_norm=False`` (and ``global_pool`` / ``fc_norm`` as the downstream task
wants). Then timm's ``forward_features`` gives exactly :meth:`MultiModalEncoder.encode`'s tokens, with the
prefix tokens first instead of last::

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=56, patch_size=8,
                            in_chans=3, num_classes=0, final_norm=False, reg_tokens=G - 1)
    vit.load_state_dict(export_timm_state_dict(encoder, "s2_rgb"))

Importing a timm ViT (:func:`load_timm_state_dict`) fills the blocks, the patch embedding of the
chosen domain and the global tokens; timm's ``pos_embed`` and ``norm`` are not used (the encoder's
position embedding is the fixed sin-cos one), and the returned report lists them.
"""

from __future__ import annotations

import torch

from multimae.domains import DOMAINS
from multimae.encoder import MultiModalEncoder

__all__ = ["check_plain_vit", "export_timm_state_dict", "load_timm_state_dict", "timm_vit_kwargs"]


def _check_domain(model: MultiModalEncoder, domain: str) -> None:
    if domain not in model.in_domains:
        raise ValueError(f"domain {domain!r} is not an input domain of the model ({model.in_domains})")
    if DOMAINS[domain].kind != "continuous":
        raise ValueError(f"domain {domain!r} is categorical; timm's patch embedding needs a continuous domain")


def check_plain_vit(model: MultiModalEncoder, *, with_tokens: bool = True) -> None:
    """Refuse an encoder that timm's ``VisionTransformer`` cannot express.

    Args:
        model: The encoder.
        with_tokens: Also refuse metadata tokens (an export: the ViT would compute other features). Loading timm
            weights into such an encoder is fine (the blocks match; the metadata adapter keeps its weights).

    Raises:
        ValueError: one line naming each config field in the way: ``model.ffn`` other than ``mlp`` (a
            mixture-of-experts feed-forward, not timm's ``Mlp``), ``model.kv_groups`` set (grouped-query
            attention, not timm's fused ``qkv``), ``model.metadata`` non-empty (tokens a ViT does not have).
    """
    problems = []
    if model.ffn != "mlp":
        problems.append(f"model.ffn is {model.ffn!r} (its blocks.<i>.mlp is not the one Mlp of a timm ViT block)")
    if model.kv_groups is not None:
        problems.append(f"model.kv_groups is {model.kv_groups} (grouped-query attention, not the fused qkv of a "
                        "timm ViT block)")
    if with_tokens and model.metadata_fields:
        problems.append(f"model.metadata is {model.metadata_fields} (metadata tokens, which a timm ViT does not "
                        "have: its features would differ)")
    if problems:
        raise ValueError(f"this encoder is no plain timm VisionTransformer: {'; '.join(problems)}; use its export "
                         "folder instead (tools/export_encoder.py, multimae.load_pretrained)")


def timm_vit_kwargs(model: MultiModalEncoder, domain: str) -> dict:
    """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` matching the export.

    Raises:
        ValueError: ``domain`` is not a continuous input domain, or the encoder is no plain ViT
            (:func:`check_plain_vit`).
    """
    _check_domain(model, domain)
    check_plain_vit(model)
    block = model.blocks[0]
    return {
        "img_size": model.input_size,
        "patch_size": model.patch_sizes[domain],
        "in_chans": DOMAINS[domain].num_channels,
        "embed_dim": model.dim,
        "depth": model.depth,
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.dim,
        "qkv_bias": True,
        "class_token": True,
        "reg_tokens": model.num_global_tokens - 1,
        "final_norm": False,
        "num_classes": 0,
    }


def export_timm_state_dict(model: MultiModalEncoder, domain: str) -> dict[str, torch.Tensor]:
    """Encoder plus one continuous input adapter as a timm ``VisionTransformer`` state dict.

    Args:
        model: The encoder (a MultiModalEncoder).
        domain: A continuous input domain whose adapter becomes ``patch_embed``.

    Returns:
        {timm key: tensor} for a ViT built with :func:`timm_vit_kwargs` (``final_norm=False``,
        class token, ``reg_tokens = G - 1``); tensors are detached copies.

    Raises:
        ValueError: If ``domain`` is not a continuous input domain, or the encoder is no plain ViT
            (:func:`check_plain_vit`: ``model.ffn``, ``model.kv_groups``, ``model.metadata``).
    """
    _check_domain(model, domain)
    check_plain_vit(model)
    adapter = model.input_adapters[domain]
    g = model.num_global_tokens
    pos = adapter.pos_embed.detach()  # (1, N, D)
    if model.domain_embeds is not None:  # added to every token of the domain, as the position embedding is
        pos = pos + model.domain_embeds[domain].detach()
    out = {
        "cls_token": model.global_tokens.detach()[:, :1].clone(),
        "pos_embed": torch.cat([pos.new_zeros(1, g, model.dim), pos], dim=1).clone(),
        "patch_embed.proj.weight": adapter.proj.weight.detach().clone(),
        "patch_embed.proj.bias": adapter.proj.bias.detach().clone(),
    }
    if g > 1:
        out["reg_token"] = model.global_tokens.detach()[:, 1:].clone()
    for key, value in model.blocks.state_dict().items():
        out[f"blocks.{key}"] = value.detach().clone()
    return out


def load_timm_state_dict(model: MultiModalEncoder, state_dict: dict[str, torch.Tensor], domain: str) -> dict[str, list[str]]:
    """Load a timm ViT state dict into the encoder, the global tokens and one input adapter.

    Args:
        model: The encoder (a MultiModalEncoder; modified in place).
        state_dict: timm ``VisionTransformer`` state dict with the same width and depth.
        domain: Continuous input domain that receives ``patch_embed.proj``.

    Returns:
        ``{"unused": [...], "not_loaded": [...]}``: timm keys ignored (``pos_embed``, ``norm.*``,
        ``head.*``, ...) and model parameters left as they were (other adapters, decoders).

    Raises:
        ValueError: If the domain is unsuitable, the encoder's blocks are not timm's (``model.ffn``,
            ``model.kv_groups``, :func:`check_plain_vit`), a block key is missing, or shapes differ (the
            message names the key).
    """
    _check_domain(model, domain)
    check_plain_vit(model, with_tokens=False)
    mapped: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            mapped[key] = value
        elif key.startswith("patch_embed.proj."):
            mapped[f"input_adapters.{domain}.proj.{key.rsplit('.', 1)[1]}"] = value
        elif key in ("cls_token", "reg_token"):
            continue
        else:
            unused.append(key)
    if "cls_token" not in state_dict:
        raise ValueError("timm state dict has no 'cls_token' (build the ViT with class_token=True)")
    tokens = [state_dict["cls_token"]] + ([state_dict["reg_token"]] if "reg_token" in state_dict else [])
    mapped["global_tokens"] = torch.cat(tokens, dim=1)

    own = model.state_dict()
    for key, value in mapped.items():
        if key not in own:
            raise ValueError(f"timm key for {key!r} has no counterpart in the model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for {key!r}: model {tuple(own[key].shape)}, timm {tuple(value.shape)}")
    expected = {k for k in own if k.startswith("blocks.")}
    missing = sorted(expected - set(mapped))
    if missing:
        raise ValueError(f"timm state dict lacks encoder weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    result = model.load_state_dict(mapped, strict=False)
    return {"unused": sorted(unused), "not_loaded": sorted(result.missing_keys)}
