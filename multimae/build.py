"""Build the encoder and the pretraining objective from a resolved config dict.

Presets name the encoder size, MAE-style (``model.preset: base``):

===========  =====  =====  =====  =========  ============  ========================================
preset       width  depth  heads  kv groups  expert hidden  like
===========  =====  =====  =====  =========  ============  ========================================
tiny         192    12     3      -          -              ViT-Ti
small        384    12     6      -          -              ViT-S
base         768    12     12     -          -              ViT-B
large        1024   24     16     -          -              ViT-L
moe_mae_s    144    15     8      4          144 -> 72      MoE-MAE S (Albughdadi, arXiv 2509.10919)
moe_mae_xs   128    12     8      4          96 -> 32       MoE-MAE XS
moe_mae_xxs  108    9      6      3          81 -> 27       MoE-MAE XXS
===========  =====  =====  =====  =========  ============  ========================================

The MoE-MAE presets also set grouped-query attention (``model.kv_groups`` when it is null) and, with
``model.ffn: moe``, the first and last expert hidden size (``model.ffn_options.hidden`` when it is not set).
``model.preset`` may also be a mapping ``{dim: ..., depth: ..., heads: ...}`` (tests use tiny custom sizes).
Config keys read: ``in_domains``, ``data.input_size``, ``model.*`` (the encoder), ``objective`` and its
section (see ``cfgs/defaults.yaml``). :func:`random_inputs` makes a random batch of the shapes a config
describes (benchmarks, tests); :func:`model_summary` describes a config's model without reading data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from multimae.domains import DOMAINS
from multimae.encoder import MultiModalEncoder, patch_layout
from multimae.metadata import METADATA_FIELDS, check_metadata_fields, cyclic_encoding
from multimae.objectives import Objective, build_objective, get_objective

__all__ = ["PRESETS", "resolve_preset", "encoder_kwargs", "build_encoder", "build_pretraining", "data_domains",
           "random_inputs", "random_metadata", "model_summary"]

PRESETS: dict[str, dict] = {
    "tiny": {"dim": 192, "depth": 12, "heads": 3},
    "small": {"dim": 384, "depth": 12, "heads": 6},
    "base": {"dim": 768, "depth": 12, "heads": 12},
    "large": {"dim": 1024, "depth": 24, "heads": 16},
    # The source's build_model sizes (models/moe_mae.py: embed_dim, depth, num_heads, num_groups, dfirsth, dlasth).
    "moe_mae_s": {"dim": 144, "depth": 15, "heads": 8, "kv_groups": 4, "moe_hidden": [144, 72]},
    "moe_mae_xs": {"dim": 128, "depth": 12, "heads": 8, "kv_groups": 4, "moe_hidden": [96, 32]},
    "moe_mae_xxs": {"dim": 108, "depth": 9, "heads": 6, "kv_groups": 3, "moe_hidden": [81, 27]},
}


def _get(cfg: dict, key: str, types: type | tuple[type, ...]) -> Any:
    """Read a dotted key (``model.patch_size``), checking presence and type."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"config has no key {key!r}")
        value = value[part]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"config key {key!r} must be {types}, got {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"config key {key!r} has the wrong type: {value!r}")
    return value


def _positive_int(cfg: dict, key: str) -> int:
    value = _get(cfg, key, int)
    if value < 1:
        raise ValueError(f"config key {key!r} must be a positive integer, got {value}")
    return value


def resolve_preset(preset: str | dict) -> dict:
    """Encoder size ``{dim, depth, heads}`` of a preset name or a custom mapping (MoE-MAE presets add
    ``kv_groups`` and ``moe_hidden``).

    Raises:
        ValueError: Naming ``model.preset`` for an unknown name or a malformed mapping.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return dict(PRESETS[preset])
    if isinstance(preset, dict):
        if set(preset) != {"dim", "depth", "heads"} or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in preset.values()
        ):
            raise ValueError(f"model.preset: a custom preset needs positive ints dim, depth, heads; got {preset}")
        if preset["dim"] % preset["heads"] != 0:
            raise ValueError(f"model.preset: heads {preset['heads']} must divide dim {preset['dim']}")
        return dict(preset)
    raise ValueError(f"model.preset must be a preset name or a mapping, got {preset!r}")


def _domain_list(cfg: dict, key: str, given: Sequence[str] | None) -> list[str]:
    names = list(given) if given is not None else _get(cfg, key, list)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key}: expected a list of domain names, got {names!r}")
    return names


def encoder_kwargs(cfg: dict, in_domains: Sequence[str] | None = None) -> dict[str, Any]:
    """Keyword arguments of :class:`MultiModalEncoder` from ``in_domains``, ``data.input_size`` and ``model.*``.

    Raises:
        ValueError: Naming the config key of a missing, mistyped or invalid value.
    """
    size = resolve_preset(_get(cfg, "model.preset", (str, dict)))
    ffn, ffn_options = _get(cfg, "model.ffn", str), dict(_get(cfg, "model.ffn_options", dict))
    if ffn == "moe" and "moe_hidden" in size:
        ffn_options.setdefault("hidden", list(size["moe_hidden"]))
    kv_groups = _get(cfg, "model.kv_groups", (int, type(None)))
    return dict(
        in_domains=_domain_list(cfg, "in_domains", in_domains),
        input_size=_positive_int(cfg, "data.input_size"),
        patch_size=_positive_int(cfg, "model.patch_size"),
        patch_sizes=dict(_get(cfg, "model.patch_sizes", dict)),
        dim=size["dim"], depth=size["depth"], num_heads=size["heads"],
        mlp_ratio=float(_get(cfg, "model.mlp_ratio", (int, float))),
        num_global_tokens=_positive_int(cfg, "model.num_global_tokens"),
        drop_path=float(_get(cfg, "model.drop_path", (int, float))),
        domain_embed=_get(cfg, "model.domain_embed", bool),
        class_embed_dim=_positive_int(cfg, "model.class_embed_dim"),
        gsd=float(_get(cfg, "model.gsd", (int, float))),
        ffn=ffn,
        ffn_options=ffn_options,
        pos_embed_grid=_get(cfg, "model.pos_embed_grid", (int, type(None))),
        kv_groups=size.get("kv_groups") if kv_groups is None else kv_groups,
        metadata=check_metadata_fields(_get(cfg, "model.metadata", list)),
    )


def build_encoder(cfg: dict, *, in_domains: Sequence[str] | None = None, init_weights: bool = True) -> MultiModalEncoder:
    """The encoder a config describes (``in_domains`` overrides ``cfg["in_domains"]``)."""
    return MultiModalEncoder(**encoder_kwargs(cfg, in_domains), init_weights=init_weights)


def build_pretraining(cfg: dict) -> Objective:
    """Encoder plus ``cfg["objective"]`` around it, initialised (the pretraining model).

    Raises:
        ValueError: Naming the config key of an invalid encoder or objective setting.
    """
    get_objective(cfg["objective"])  # unknown objective: fail before building anything
    return build_objective(cfg, build_encoder(cfg, init_weights=False))


def data_domains(cfg: dict) -> list[str]:
    """Domains a pretraining batch must carry: ``in_domains`` plus the objective's targets, in that order."""
    return get_objective(cfg["objective"]).data_domains(cfg)


def random_inputs(
    cfg: dict,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random ``inputs`` and all-valid ``valid`` for every domain the batch of ``cfg`` carries.

    Covers :func:`data_domains` except output-only domains (they read their source), drawn in that order:
    float32 (B, C, H, W) standard normal for continuous domains, int64 (B, H, W) class ids 0..K-1 for class
    maps, at ``data.input_size``.

    Args:
        cfg: Resolved config.
        batch_size: Samples B.
        device: Device of the tensors.
        generator: Optional generator (on ``device``); torch's global RNG otherwise.

    Returns:
        ``(inputs, valid)`` as in the batch contract (docs/DESIGN.md); ``valid`` is all True, one tensor per
        domain.
    """
    size = _positive_int(cfg, "data.input_size")
    inputs, valid = {}, {}
    for name in data_domains(cfg):
        dom = DOMAINS[name]
        if dom.source is not None:
            continue
        if dom.kind == "categorical":
            shape = (batch_size, size, size)
            inputs[name] = torch.randint(0, dom.num_classes, shape, generator=generator, device=device)
        else:
            shape = (batch_size, dom.num_channels, size, size)
            inputs[name] = torch.randn(shape, generator=generator, device=device)
        valid[name] = torch.ones(batch_size, size, size, dtype=torch.bool, device=device)
    return inputs, valid


def random_metadata(cfg: dict, batch_size: int, *, device: torch.device | str | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random ``metadata`` for the fields of ``model.metadata``: {field: float32 (B, 2)} (sin, cos) pairs of
    values drawn uniformly over each field's period (batch contract, docs/DESIGN.md)."""
    out = {}
    for name in check_metadata_fields(_get(cfg, "model.metadata", list)):
        period = METADATA_FIELDS[name].period
        values = torch.rand(batch_size, generator=generator, dtype=torch.float64) * period
        out[name] = torch.from_numpy(cyclic_encoding(values.numpy(), period)).to(device)
    return out


def count_trainable(module: torch.nn.Module) -> int:
    """Number of trainable parameter values of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def model_summary(cfg: dict) -> str:
    """Build the pretraining model (no data read) and describe it.

    Returns:
        Text lines ``key: value``, among them ``objective``, the token layout (one line per domain),
        ``tokens_per_domain`` (one number when every domain has the same), ``total_tokens``,
        ``trainable_params: <int>`` and per-part parameter counts.
    """
    model = build_pretraining(cfg)
    enc = model.encoder
    layout = enc.layout()
    patches = patch_layout(layout)
    counts = sorted(set(patches.tokens_per_domain))
    meta = layout.num_tokens - patches.num_tokens
    lines = [f"objective: {model.name}", f"in_domains: {', '.join(enc.in_domains)}"]
    lines += model.describe() if hasattr(model, "describe") else []
    lines += [
        f"encoder: dim {enc.dim}, depth {enc.depth}, heads {enc.num_heads}"
        f"{'' if enc.kv_groups is None else f' ({enc.kv_groups} key/value groups)'}, feed-forward {enc.ffn}",
        f"input_size: {enc.input_size}",
        f"patch_size: {enc.patch_size}",
        f"token_layout: {patches.num_tokens} patch tokens"
        f"{f' + {meta} metadata (always visible)' if meta else ''} + {layout.num_global_tokens} global",
        *[f"  {line}" for line in layout.describe()],
        f"tokens_per_domain: {counts[0] if len(counts) == 1 else dict(zip(patches.domains, patches.tokens_per_domain))}",
        f"total_tokens: {patches.num_tokens}",
        f"global_tokens: {enc.num_global_tokens}",
        f"params_input_adapters: {count_trainable(enc.input_adapters)}",
        f"params_encoder: {count_trainable(enc) - count_trainable(enc.input_adapters)}",
    ]
    for name, child in model.named_children():
        if name != "encoder":
            lines.append(f"params_{name}: {count_trainable(child)}")
    lines.append(f"trainable_params: {count_trainable(model)}")
    return "\n".join(lines)
