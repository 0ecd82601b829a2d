"""MultiMAE for Earth observation: pure-torch model, masking, losses and the domain registry.

Public entry points (see docs/DESIGN.md for the contracts)::

    from multimae import build_multimae, build_criterion, model_summary
"""

from multimae.adapters import CategoricalAdapter, PatchAdapter, majority_pool, patch_validity
from multimae.build import PRESETS, build_criterion, build_multimae, model_summary, resolve_preset
from multimae.criterion import MultiMAECriterion
from multimae.decoders import SpatialDecoder
from multimae.domains import DOMAINS, IGNORE_INDEX, MODALITIES, Domain, Modality, get_domain, get_modality
from multimae.interop import export_timm_state_dict, load_timm_state_dict, timm_vit_kwargs
from multimae.masking import mask_to_ids, random_masks, split_masks
from multimae.model import MultiMAE
from multimae.pos_embed import sincos_pos_embed_2d

__all__ = [
    "PRESETS",
    "build_multimae",
    "build_criterion",
    "model_summary",
    "resolve_preset",
    "MultiMAE",
    "MultiMAECriterion",
    "PatchAdapter",
    "CategoricalAdapter",
    "SpatialDecoder",
    "majority_pool",
    "patch_validity",
    "random_masks",
    "mask_to_ids",
    "split_masks",
    "sincos_pos_embed_2d",
    "export_timm_state_dict",
    "load_timm_state_dict",
    "timm_vit_kwargs",
    "DOMAINS",
    "MODALITIES",
    "IGNORE_INDEX",
    "Domain",
    "Modality",
    "get_domain",
    "get_modality",
]
