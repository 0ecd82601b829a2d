"""Optimiser parameter groups (no weight decay, layer-wise lr decay) and the warm-up + cosine schedule.

Weight decay is applied only to matrices and convolution kernels: biases, normalisation weights,
position embeddings, learned tokens (global / mask tokens), domain embeddings and class
embeddings (``nn.Embedding``) are excluded, as in MAE / BEiT fine-tuning and nanoGPT.
``decay_everything=True`` reproduces the MultiMAE-EO reference, which decays all parameters.

Layer-wise lr decay (BEiT, Bao et al. 2022; used by MAE fine-tuning) scales the lr of encoder
block ``i`` by ``layer_decay ** (num_layers + 1 - layer_id)``: layer 0 holds everything before
the blocks (input adapters, tokens, embeddings), layers 1..L the blocks, L+1 the rest (heads,
decoders). Parameters named in ``full_rate`` (a fine-tuning encoder's adapters that the checkpoint
lacks) join layer L+1: nothing pretrained them, so nothing justifies a smaller rate.

Optimisers: AdamW (pretraining, fine-tuning) and, for linear probes, SGD with momentum or LARS
(You et al. 2017; MAE's ``main_linprobe.py``: the trust ratio on weight matrices only, plain momentum
SGD on biases), timm's ``Lars``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "no_decay_names",
    "multimae_layer_id",
    "param_groups",
    "describe_param_groups",
    "build_optimizer",
    "build_probe_optimizer",
    "cosine_lr",
    "set_lr",
]

_NO_DECAY_SUBSTRINGS = ("pos_embed", "global_tokens", "mask_token", "cls_token", "domain_embeds", "class_embed")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that get no weight decay.

    A parameter is exempt when it is 1-D (biases, norm weights, per-domain scalars), when it belongs
    to an ``nn.Embedding`` (class embeddings of categorical adapters), when its name contains one
    of ``pos_embed``, ``global_tokens``, ``mask_token``, ``cls_token``, ``domain_embeds`` or
    ``class_embed``, or when ``model.no_weight_decay()`` names it or one of its parent modules.
    """
    extra = set(getattr(model, "no_weight_decay", lambda: set())())
    embedding_params = {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, module in model.named_modules() if isinstance(module, nn.Embedding)
        for p_name, _ in module.named_parameters(recurse=False)
    }
    out = set()
    for name, param in model.named_parameters():
        if (param.ndim <= 1 or name in embedding_params or any(s in name for s in _NO_DECAY_SUBSTRINGS)
                or any(name == e or name.startswith(e.rstrip(".") + ".") for e in extra)):
            out.add(name)
    return out


def multimae_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a parameter of an objective or fine-tuning model for layer-wise lr decay.

    ``encoder.blocks.<i>.*`` -> i + 1; every other encoder parameter (input adapters, global tokens, domain
    embeddings) -> 0; anything else (decoders, heads, criterion) -> ``num_layers + 1``. A leading
    ``module.`` (DDP) prefix is ignored.
    """
    if name.startswith("module."):
        name = name[len("module."):]
    parts = name.split(".")
    if parts[0] != "encoder":
        return num_layers + 1
    if len(parts) > 2 and parts[1] == "blocks" and parts[2].isdigit():
        return int(parts[2]) + 1
    return 0


def param_groups(model: nn.Module, weight_decay: float, *, decay_everything: bool = False,
                 layer_decay: float | None = None, num_layers: int | None = None,
                 layer_id_fn: Callable[[str, int], int] = multimae_layer_id,
                 full_rate: Sequence[str] = ()) -> list[dict]:
    """Split trainable parameters into optimiser groups by weight decay and (optionally) layer.

    Args:
        model: The module to optimise (frozen parameters are skipped).
        weight_decay: Decoupled weight decay of the decayed group.
        decay_everything: Put every parameter in the decayed group (the reference's behaviour).
        layer_decay: Layer-wise lr decay factor in (0, 1]; None for none.
        num_layers: Number of encoder blocks; required with ``layer_decay``.
        layer_id_fn: Maps (parameter name, num_layers) to a layer id in 0..num_layers + 1.
        full_rate: Name prefixes of parameters that get layer id ``num_layers + 1`` (lr scale 1) whatever
            ``layer_id_fn`` says, e.g. ``encoder.input_adapters.s2_nir.`` for an adapter new to the checkpoint.

    Returns:
        Groups ``{"params", "weight_decay", "lr_scale", "names"}``; ``set_lr`` multiplies the
        scheduled lr by ``lr_scale``. Parameters exempt from weight decay are never grouped with decayed
        ones, even when ``weight_decay`` is 0 (LARS adapts only the groups of weight matrices).

    Raises:
        ValueError: ``layer_decay`` without ``num_layers``.
    """
    if layer_decay is not None and num_layers is None:
        raise ValueError("param_groups: layer_decay needs num_layers (the encoder depth)")
    exempt = set() if decay_everything else no_decay_names(model)
    full_rate = tuple(full_rate)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = name in exempt
        layer = 0
        if layer_decay is not None:
            layer = num_layers + 1 if name.startswith(full_rate) and full_rate else layer_id_fn(name, num_layers)
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault((layer, no_decay), {"params": [], "names": [],
                                                      "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def describe_param_groups(groups: Iterable[dict], lr: float) -> list[dict]:
    """The groups as plain types (what ``<output_dir>/param_groups.json`` holds).

    Args:
        groups: Groups from :func:`param_groups` (or an optimizer's ``param_groups``).
        lr: The schedule's peak learning rate.

    Returns:
        One dict per group: ``names`` (parameter names), ``lr_scale``, ``peak_lr`` (lr x lr_scale),
        ``weight_decay`` and ``num_params`` (scalar parameters in the group).
    """
    return [{"lr_scale": g.get("lr_scale", 1.0), "peak_lr": lr * g.get("lr_scale", 1.0),
             "weight_decay": g["weight_decay"], "num_params": sum(p.numel() for p in g["params"]),
             "names": list(g["names"])} for g in groups]


def build_optimizer(groups: Iterable[dict], optim_cfg: dict, lr: float) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the config section ``optim`` (betas, eps); group lr = lr * lr_scale.

    The ``names`` entries of the groups are kept on the optimizer's param groups for inspection
    (they are plain strings, so the optimizer state dict stays ``weights_only``-loadable).
    torch's fused AdamW kernel is used when every parameter is a floating-point CPU or CUDA tensor
    (BENCHMARKS.md compares it with the default path).
    """
    groups = list(groups)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg["betas"]), eps=optim_cfg["eps"],
                             weight_decay=optim_cfg["weight_decay"], fused=fused or None)


def build_probe_optimizer(groups: Iterable[dict], lr: float, *, name: str = "sgd",
                          momentum: float = 0.9) -> torch.optim.Optimizer:
    """The linear probe's optimiser: SGD with momentum or LARS (MAE ``main_linprobe.py``), group lr = lr * lr_scale.

    LARS (timm ``Lars``, trust coefficient 0.001) scales the update of each weight matrix by
    0.001 * ||w|| / ||update||; groups holding 1-D parameters (biases) take plain momentum SGD steps, as MAE's
    LARS does. Its per-step change is about lr * 0.001 of ||w||, so it suits MAE's large batches (16384) and
    lrs; at small batches SGD trains faster.

    Args:
        groups: Groups from :func:`param_groups` (with ``weight_decay`` per group).
        lr: Peak learning rate.
        name: ``sgd`` or ``lars`` (config key ``finetune.probe_optimizer``).
        momentum: Momentum of both (``finetune.probe_momentum``).

    Raises:
        ValueError: an unknown ``name``.
    """
    groups = list(groups)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        from timm.optim import Lars

        for g in groups:
            g["always_adapt"] = all(p.ndim > 1 for p in g["params"])  # 1-D groups: no decay (param_groups)
        return Lars(groups, lr=lr, momentum=momentum)
    raise ValueError(f"finetune.probe_optimizer must be 'sgd' or 'lars', got {name!r}")


def cosine_lr(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then half-cosine decay.

    Warm-up rises linearly from 0: ``base_lr * step / warmup_steps`` for ``step < warmup_steps``
    (MAE's per-iteration rule). Then ``min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * t))``
    with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``; steps past ``total_steps``
    stay at ``min_lr``.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group["lr_scale"]`` (scale 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
