"""Multi-modal EO foundation models: pure-torch encoder, objectives, masking, losses and the domain registry.

Public entry points (see docs/DESIGN.md for the contracts)::

    from multimae import build_encoder, build_pretraining, model_summary
    from multimae import load_pretrained   # an encoder exported by tools/export_encoder.py
"""

from multimae.adapters import CategoricalAdapter, PatchAdapter, majority_pool, patch_validity
from multimae.build import PRESETS, build_encoder, build_pretraining, model_summary, resolve_preset
from multimae.criterion import MultiMAECriterion
from multimae.decoders import SpatialDecoder
from multimae.domains import DOMAINS, IGNORE_INDEX, MODALITIES, Domain, Modality, get_domain, get_modality
from multimae.encoder import MultiModalEncoder, Tokens
from multimae.interop import export_timm_state_dict, load_timm_state_dict, timm_vit_kwargs
from multimae.layout import Segment, TokenLayout
from multimae.masking import mask_to_ids, random_masks, split_masks
from multimae.objectives import OBJECTIVES, Objective, build_objective, get_objective
from multimae.objectives.multimae import MultiMAEObjective
from multimae.pos_embed import sincos_pos_embed_2d, sincos_pos_embed_coords
from multimae.pretrained import load_pretrained, read_pretrained_config, save_pretrained

__all__ = [
    "PRESETS",
    "build_encoder",
    "build_pretraining",
    "build_objective",
    "get_objective",
    "model_summary",
    "resolve_preset",
    "MultiModalEncoder",
    "Tokens",
    "TokenLayout",
    "Segment",
    "OBJECTIVES",
    "Objective",
    "MultiMAEObjective",
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
    "sincos_pos_embed_coords",
    "export_timm_state_dict",
    "load_timm_state_dict",
    "timm_vit_kwargs",
    "load_pretrained",
    "read_pretrained_config",
    "save_pretrained",
    "DOMAINS",
    "MODALITIES",
    "IGNORE_INDEX",
    "Domain",
    "Modality",
    "get_domain",
    "get_modality",
]
