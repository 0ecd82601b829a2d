"""Modality-aware four-role token masking of Latent MIM Lite, built in the data-loader workers.

OlmoEarth's ``modality_cross_random`` masking (Herzog et al., allenai/olmoearth_pretrain, ``train/masking.py``),
with this framework's domains as band sets. Every token of every band set (a *role domain*: an encoder input
domain or a decode-only domain) gets one role:

=====================  =====  =========================================================================
role                   value  meaning
=====================  =====  =========================================================================
:data:`ENCODER`        0      seen by the online encoder
:data:`TARGET_ONLY`    1      seen only by the frozen target projection (neither encoded nor predicted)
:data:`DECODER`        2      predicted by the predictor, the discrimination loss compares it to its target
:data:`MISSING`        3      no valid pixel in the token's patch
=====================  =====  =========================================================================

Per sample and view (:meth:`ModalityCrossMasking.draw`):

1. Base random mask: per MMEarth modality, its n tokens (all positions of all its band sets) are shuffled;
   ``int(n * encode_ratio)`` become encoder tokens, the next ``int(n * decode_ratio)`` decoder tokens, the rest
   target-only. Tokens without a valid pixel become missing; encoder tokens of decode-only domains become
   target-only (a decode-only domain is never encoded).
2. Present band sets: the encodable ones with at least one encoder token, and the decode-only ones with at
   least one valid token.
3. Roles of the band sets: one present band set is encoded and nothing decoded; of two, the first (in role
   order: input domains, then decode-only domains) is encoded and the second decoded; of more, a uniform
   number between ``min(min_encoded, E)`` and E of the E encodable present band sets is encoded and a uniform
   number between 1 and P of all P present band sets is decoded (drawn independently, so a band set may be
   both, with disjoint tokens, as in OlmoEarth v1).
4. In a band set that is not encoded, encoder tokens become target-only; in one that is not decoded, decoder
   tokens become target-only.
5. A sample left without an encoder or without a decoder token is redone: its encodable band sets get a
   plain random fill (per modality, its *valid* tokens shuffled and split by the two ratios); decode-only
   roles stay. A sample that still has none (fewer than two valid encodable tokens) keeps no encoder or no
   decoder token; the objective's losses skip it.

The draws depend only on the per-sample seed (a function of seed, epoch and sample row, see
``MMEarthDataset.sample_seeds``) and the view index, so worker count and resume do not change them.
This module is numpy plus :func:`multimae.adapters.patch_validity`; it holds no model state and pickles into
the workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from multimae.adapters import patch_validity
from multimae.domains import DOMAINS, IGNORE_INDEX

__all__ = ["ENCODER", "TARGET_ONLY", "DECODER", "MISSING", "ROLE_NAMES", "ModalityCrossMasking"]

ENCODER, TARGET_ONLY, DECODER, MISSING = 0, 1, 2, 3
#: Role value -> name (pictures, messages).
ROLE_NAMES = ("encoder", "target-only", "decoder", "missing")


class ModalityCrossMasking:
    """The worker-side batch transform of Latent MIM: two independently masked views of every sample.

    Args:
        domains: Role domains in role order: the encoder's input domains, then the decode-only domains.
        grids: (h, w) token grid of each role domain at the training image size.
        patch_sizes: Patch side in pixels of each role domain.
        decode_only: Domains that are predicted, never encoded.
        encode_ratio: Share of each modality's tokens drawn as encoder tokens (step 1).
        decode_ratio: Share drawn as decoder tokens; ``encode_ratio + decode_ratio <= 1``.
        min_encoded: Fewest encodable band sets encoded when three or more are present (step 3).
        num_views: Independently masked views per sample.

    Raises:
        ValueError: ratios outside (0, 1] or summing above 1, ``min_encoded`` below 1, a decode-only domain
            outside ``domains``, or missing grids / patch sizes (the messages name the ``latent_mim`` keys).
    """

    def __init__(self, domains: Sequence[str], grids: dict[str, tuple[int, int]], patch_sizes: dict[str, int],
                 decode_only: Sequence[str] = (), *, encode_ratio: float = 0.5, decode_ratio: float = 0.5,
                 min_encoded: int = 2, num_views: int = 2) -> None:
        if not (0 < encode_ratio <= 1 and 0 < decode_ratio <= 1 and encode_ratio + decode_ratio <= 1 + 1e-9):
            raise ValueError(f"latent_mim.masking: encode_ratio {encode_ratio} and decode_ratio {decode_ratio} must "
                             "each lie in (0, 1] and sum to at most 1")
        if min_encoded < 1:
            raise ValueError(f"latent_mim.masking.min_encoded_band_sets must be >= 1, got {min_encoded}")
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.domains = list(domains)
        unknown = [d for d in decode_only if d not in self.domains]
        missing = [d for d in self.domains if d not in grids or d not in patch_sizes]
        if unknown or missing:
            raise ValueError(f"masking domains {self.domains}: decode-only {unknown} not among them, or no grid / "
                             f"patch size for {missing}")
        self.grids = {d: tuple(grids[d]) for d in self.domains}
        self.patch_sizes = {d: int(patch_sizes[d]) for d in self.domains}
        self.num_tokens = {d: self.grids[d][0] * self.grids[d][1] for d in self.domains}
        self.decode_only = set(decode_only)
        self.encode_ratio, self.decode_ratio = float(encode_ratio), float(decode_ratio)
        self.min_encoded, self.num_views = int(min_encoded), int(num_views)
        self.categorical = {d for d in self.domains if DOMAINS[d].kind == "categorical"}
        by_modality: dict[str, list[str]] = {}
        for d in self.domains:
            by_modality.setdefault(DOMAINS[d].modality, []).append(d)
        self.modalities = by_modality  # MMEarth modality -> its role domains, in role order

    # ------------------------------------------------------------------ one sample
    def _split(self, n: int, rng: np.random.Generator, roles: np.ndarray, positions: np.ndarray) -> None:
        """Shuffle ``positions`` (n of them) and assign encoder / decoder / target-only by the two ratios."""
        order = positions[rng.permutation(len(positions))]
        n_enc, n_dec = int(n * self.encode_ratio), int(n * self.decode_ratio)
        roles[order] = TARGET_ONLY
        roles[order[:n_enc]] = ENCODER
        roles[order[n_enc:n_enc + n_dec]] = DECODER

    def _random_fill(self, token_valid: dict[str, np.ndarray], rng: np.random.Generator, *, valid_only: bool,
                     domains: Sequence[str]) -> dict[str, np.ndarray]:
        """Per modality, a random encoder / decoder / target-only split of its tokens of ``domains``."""
        out = {}
        for doms in self.modalities.values():
            doms = [d for d in doms if d in domains]
            if not doms:
                continue
            valid = np.concatenate([token_valid[d] for d in doms])
            roles = np.full(len(valid), TARGET_ONLY, np.int8)
            positions = np.flatnonzero(valid) if valid_only else np.arange(len(valid))
            self._split(len(positions), rng, roles, positions)
            roles[~valid] = MISSING
            for d, part in zip(doms, np.split(roles, np.cumsum([self.num_tokens[d] for d in doms])[:-1])):
                out[d] = part
        return out

    def draw(self, token_valid: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The roles of one view of one sample (module docstring, steps 1 to 5).

        Args:
            token_valid: {role domain: bool (N_d,)}, True where the token's patch holds a valid pixel.
            rng: The view's generator.

        Returns:
            {role domain: int8 (N_d,)} role values (:data:`ENCODER` ... :data:`MISSING`).
        """
        # 1. base random mask over all tokens, missing marked, decode-only never encoded
        roles = self._random_fill(token_valid, rng, valid_only=False, domains=self.domains)
        for d in self.decode_only:
            roles[d][roles[d] == ENCODER] = TARGET_ONLY
        # 2. present band sets
        present = [d for d in self.domains
                   if (token_valid[d].any() if d in self.decode_only else (roles[d] == ENCODER).any())]
        encodable = [d for d in present if d not in self.decode_only]
        # 3. which present band sets are encoded and which decoded
        if len(present) <= 2:
            encoded = set(present[:1]) - self.decode_only
            decoded = set(present[1:2])
        else:
            low = min(self.min_encoded, len(encodable))
            count = int(rng.integers(low, len(encodable) + 1)) if encodable else 0
            encoded = {encodable[i] for i in rng.choice(len(encodable), size=count, replace=False)} if count else set()
            count = int(rng.integers(1, len(present) + 1))
            decoded = {present[i] for i in rng.choice(len(present), size=count, replace=False)}
        # 4. apply the band-set roles
        for d in self.domains:
            r = roles[d]
            if d not in encoded:
                r[r == ENCODER] = TARGET_ONLY
            if d not in decoded:
                r[r == DECODER] = TARGET_ONLY
        # 5. no encoder or no decoder token: a plain random fill of the valid encodable tokens
        if not self._has_both(roles):
            encodable_domains = [d for d in self.domains if d not in self.decode_only]
            roles.update(self._random_fill(token_valid, rng, valid_only=True, domains=encodable_domains))
        return roles

    @staticmethod
    def _has_both(roles: dict[str, np.ndarray]) -> bool:
        flat = np.concatenate(list(roles.values()))
        return bool((flat == ENCODER).any() and (flat == DECODER).any())

    def token_valid(self, sample: dict) -> dict[str, np.ndarray]:
        """{role domain: bool (N_d,)} token validity of one sample (a patch with at least one valid pixel).

        Raises:
            ValueError: the sample lacks a role domain (names it).
        """
        out = {}
        for d in self.domains:
            if d not in sample["inputs"]:
                raise ValueError(f"latent_mim masking: the sample has no domain {d!r} (it needs {self.domains})")
            x = sample["inputs"][d]
            v = sample["valid"].get(d) if "valid" in sample else None
            h, w = x.shape[-2:]
            v = torch.ones(h, w, dtype=torch.bool) if v is None else v.bool()
            if d in self.categorical:
                v = v & (x != IGNORE_INDEX)
            out[d] = patch_validity(v[None], self.patch_sizes[d])[0].numpy()
            if out[d].shape[0] != self.num_tokens[d]:
                raise ValueError(f"latent_mim masking: domain {d!r} has {out[d].shape[0]} tokens of "
                                 f"{self.patch_sizes[d]} px, the objective was built for {self.num_tokens[d]} "
                                 f"(grid {self.grids[d]}); data.input_size must match the training image size")
        return out

    # ------------------------------------------------------------------ the batch transform
    def __call__(self, samples: list[dict], seeds) -> list[dict]:
        """Add ``"roles": {role domain: int8 (num_views, N_d)}`` to every sample.

        Args:
            samples: The batch's samples (batch contract of docs/DESIGN.md).
            seeds: uint64 (B,) per-sample seeds; view v of sample b draws from ``default_rng([seeds[b], v])``.
        """
        seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
        if len(seeds) != len(samples):
            raise ValueError(f"latent_mim masking: {len(seeds)} seeds for {len(samples)} samples")
        for sample, seed in zip(samples, seeds):
            valid = self.token_valid(sample)
            views = [self.draw(valid, np.random.default_rng([int(seed), v])) for v in range(self.num_views)]
            sample["roles"] = {d: torch.from_numpy(np.stack([view[d] for view in views])) for d in self.domains}
        return samples
