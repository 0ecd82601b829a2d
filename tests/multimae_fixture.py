"""Tiny MultiMAE-EO configs and random batches for the encoder, objective, masking, criterion and interop tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from multimae.build import random_inputs

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[1] / "cfgs" / "defaults.yaml").read_text())


def tiny_cfg(input_size: int = 16, **masking) -> dict:
    """Defaults with a 32-wide, 2-block encoder and 32-wide decoders on 16 px images (patch 8 -> 4 tokens)."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"]["input_size"] = input_size
    cfg["model"].update(preset={"dim": 32, "depth": 2, "heads": 2}, class_embed_dim=8)
    cfg["multimae"]["decoder"].update(dim=32, heads=4, depth=1)
    cfg["multimae"]["masking"]["num_encoded_tokens"] = 8
    cfg["multimae"]["masking"].update(masking)
    return cfg


def random_batch(cfg: dict, batch_size: int = 3, *, seed: int = 0, invalid: bool = True) -> tuple[dict, dict]:
    """Random inputs {domain: tensor} and validity {domain: bool (B, H, W)} for every domain of ``cfg``.

    :func:`multimae.build.random_inputs` with a seeded generator. With ``invalid``, the top-left
    8 x 8 patch of sample 0 is no-data in every domain and a few pixels elsewhere are invalid;
    invalid pixels hold 0 (continuous) or -1 (class maps), as the datasets deliver them.
    """
    inputs, valid = random_inputs(cfg, batch_size, generator=torch.Generator().manual_seed(seed))
    if invalid:
        for name, v in valid.items():
            v[0, :8, :8] = False
            v[1:, 1, 2:5] = False
            x = inputs[name]
            if x.is_floating_point():
                x.mul_(v.unsqueeze(1))
            else:
                x[~v] = -1
    return inputs, valid
