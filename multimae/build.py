"""Build the MultiMAE model and its criterion from a resolved config dict.

Presets name the encoder size, MAE-style (``model.preset: base``):

=======  =====  =====  =====  ==========
preset   width  depth  heads  like
=======  =====  =====  =====  ==========
tiny     192    12     3      ViT-Ti
small    384    12     6      ViT-S
base     768    12     12     ViT-B
large    1024   24     16     ViT-L
=======  =====  =====  =====  ==========

``model.preset`` may also be a mapping ``{dim: ..., depth: ..., heads: ...}`` (tests use tiny
custom sizes). Config keys read: ``in_domains``, ``out_domains``, ``data.input_size``,
``model.*``, ``masking.*`` and ``loss.*`` (see ``cfgs/defaults.yaml``). :func:`random_inputs` makes a
random batch of the shapes a config describes (benchmarks, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from multimae.criterion import MultiMAECriterion
from multimae.domains import DOMAINS
from multimae.model import MultiMAE

__all__ = ["PRESETS", "build_multimae", "build_criterion", "model_summary", "random_inputs", "resolve_preset"]

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 192, "depth": 12, "heads": 3},
    "small": {"dim": 384, "depth": 12, "heads": 6},
    "base": {"dim": 768, "depth": 12, "heads": 12},
    "large": {"dim": 1024, "depth": 24, "heads": 16},
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


def resolve_preset(preset: str | dict) -> dict[str, int]:
    """Encoder size ``{dim, depth, heads}`` of a preset name or a custom mapping.

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


def build_multimae(
    cfg: dict, *, in_domains: Sequence[str] | None = None, out_domains: Sequence[str] | None = None
) -> MultiMAE:
    """Build the model described by a resolved config.

    Args:
        cfg: Resolved config (``cfgs/defaults.yaml`` layout).
        in_domains: Override of ``cfg["in_domains"]`` (e.g. a fine-tuning subset).
        out_domains: Override of ``cfg["out_domains"]``.

    Returns:
        A :class:`MultiMAE` with masking defaults from ``cfg["masking"]``.

    Raises:
        ValueError: Naming the config key of a missing, mistyped or invalid value.
    """
    size = resolve_preset(_get(cfg, "model.preset", (str, dict)))
    alphas = _get(cfg, "masking.alphas", (int, float, list))
    return MultiMAE(
        in_domains=_domain_list(cfg, "in_domains", in_domains),
        out_domains=_domain_list(cfg, "out_domains", out_domains),
        input_size=_positive_int(cfg, "data.input_size"),
        patch_size=_positive_int(cfg, "model.patch_size"),
        dim=size["dim"],
        depth=size["depth"],
        num_heads=size["heads"],
        num_global_tokens=_positive_int(cfg, "model.num_global_tokens"),
        drop_path=float(_get(cfg, "model.drop_path", (int, float))),
        domain_embed=_get(cfg, "model.domain_embed", bool),
        class_embed_dim=_positive_int(cfg, "model.class_embed_dim"),
        decoder_dim=_positive_int(cfg, "model.decoder_dim"),
        decoder_depth=_get(cfg, "model.decoder_depth", int),
        decoder_heads=_positive_int(cfg, "model.decoder_heads"),
        num_encoded_tokens=_positive_int(cfg, "masking.num_encoded_tokens"),
        alphas=alphas,
        sample_domains_uniformly=_get(cfg, "masking.sample_domains_uniformly", bool),
    )


def build_criterion(cfg: dict, out_domains: Sequence[str] | None = None) -> MultiMAECriterion:
    """Build the pretraining criterion from ``loss.*`` and ``model.patch_size``.

    Raises:
        ValueError: Naming the config key of a missing or invalid value.
    """
    return MultiMAECriterion(
        _domain_list(cfg, "out_domains", out_domains),
        patch_size=_positive_int(cfg, "model.patch_size"),
        weighting=_get(cfg, "loss.weighting", str),
        loss_on_unmasked=_get(cfg, "loss.loss_on_unmasked", bool),
    )


def random_inputs(
    cfg: dict,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random ``inputs`` and all-valid ``valid`` for every domain the batch of ``cfg`` carries.

    Covers ``in_domains`` and ``out_domains`` except output-only domains (they read their source),
    drawn in that order: float32 (B, C, H, W) standard normal for continuous domains, int64 (B, H, W)
    class ids 0..K-1 for class maps, at ``data.input_size``.

    Args:
        cfg: Resolved config.
        batch_size: Samples B.
        device: Device of the tensors.
        generator: Optional generator (on ``device``); torch's global RNG otherwise.

    Returns:
        ``(inputs, valid)`` as in the batch contract (docs/DESIGN.md); ``valid`` is all True, one
        tensor per domain.
    """
    size = _positive_int(cfg, "data.input_size")
    inputs, valid = {}, {}
    for name in dict.fromkeys(_domain_list(cfg, "in_domains", None) + _domain_list(cfg, "out_domains", None)):
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


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def model_summary(cfg: dict) -> str:
    """Build model and criterion (no data read) and describe them.

    Returns:
        Text lines ``key: value``, among them ``tokens_per_domain: <int>``, ``encoded_tokens: <int>``
        and ``trainable_params: <int>`` (model + criterion), plus per-part parameter counts.
    """
    model = build_multimae(cfg)
    criterion = build_criterion(cfg)
    size = resolve_preset(cfg["model"]["preset"])
    n_d = next(iter(model.tokens_per_domain.values()))
    lines = [
        f"in_domains: {', '.join(model.in_domains)}",
        f"out_domains: {', '.join(model.out_domains)}",
    ]
    for name in model.out_domains:
        dom = DOMAINS[name]
        role = "input+output" if name in model.in_domains else "output only"
        lines.append(f"  {name}: {dom.kind}, {dom.num_classes or dom.num_channels} "
                     f"{'classes' if dom.num_classes else 'channels'}, loss {dom.loss}, {role}")
    lines += [
        f"encoder: dim {size['dim']}, depth {size['depth']}, heads {size['heads']}",
        f"input_size: {model.input_size}",
        f"patch_size: {model.patch_size}",
        f"tokens_per_domain: {n_d}",
        f"total_tokens: {n_d * len(model.in_domains)}",
        f"encoded_tokens: {model.num_encoded_tokens}",
        f"global_tokens: {model.num_global_tokens}",
        f"params_input_adapters: {_count(model.input_adapters)}",
        f"params_encoder: {_count(model.encoder) + model.global_tokens.numel()}",
        f"params_decoders: {_count(model.output_adapters)}",
        f"trainable_params: {_count(model) + _count(criterion)}",
    ]
    return "\n".join(lines)
