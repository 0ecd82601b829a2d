"""Multi-modal EO foundation models: pure-torch encoder, objectives, masking, losses and the domain registry.

Public entry points (see docs/DESIGN.md for the contracts)::

    from multimae import build_encoder, build_pretraining, model_summary
    from multimae import load_pretrained   # an encoder exported by tools/export_encoder.py

Names are imported on first use (PEP 562), so ``import multimae.domains`` (the pure-Python registry, used by
the converter) does not import torch.
"""

from __future__ import annotations

import importlib

#: Public name -> module that defines it.
_EXPORTS = {
    "CategoricalAdapter": "adapters", "PatchAdapter": "adapters", "majority_pool": "adapters",
    "patch_validity": "adapters",
    "PRESETS": "build", "build_encoder": "build", "build_pretraining": "build", "model_summary": "build",
    "resolve_preset": "build",
    "MultiMAECriterion": "criterion",
    "SpatialDecoder": "decoders",
    "DOMAINS": "domains", "IGNORE_INDEX": "domains", "MODALITIES": "domains", "Domain": "domains",
    "Modality": "domains", "get_domain": "domains", "get_modality": "domains",
    "MultiModalEncoder": "encoder", "Tokens": "encoder",
    "export_timm_state_dict": "interop", "load_timm_state_dict": "interop", "timm_vit_kwargs": "interop",
    "Segment": "layout", "TokenLayout": "layout",
    "mask_to_ids": "masking", "random_masks": "masking", "split_masks": "masking",
    "OBJECTIVES": "objectives", "Objective": "objectives", "build_objective": "objectives",
    "get_objective": "objectives",
    "MultiMAEObjective": "objectives.multimae",
    "sincos_pos_embed_2d": "pos_embed", "sincos_pos_embed_coords": "pos_embed",
    "load_pretrained": "pretrained", "read_pretrained_config": "pretrained", "save_pretrained": "pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multimae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"multimae.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
