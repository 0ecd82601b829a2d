"""AnySat's scale-adaptive JEPA: EMA teacher, block masks shared by all modalities, latent regression plus
cross-modal MIL-NCE, any patch scale.

Astruc et al., "AnySat: One Earth Observation Model for Many Resolutions, Scales, and Modalities", CVPR 2025
(gastruc/AnySat), a joint-embedding predictive architecture after I-JEPA (Assran et al., CVPR 2023). One step:

1. The data-loader workers draw the batch's patch scale P from ``jepa.patch_sizes`` and build I-JEPA block
   masks on its patch grid, the same positions for every modality, plus AnySat's modality masking
   (:mod:`multimae.objectives.jepa_masks`, from per-sample seeds).
2. The student (the shared encoder) tokenizes every modality at P. At each context position the tokens kept
   by the modality masking are shown as they are; the others (and tokens without a valid pixel) become the
   learned mask token plus the token's position (and domain) embedding. The encoder encodes the M x C context
   tokens and its global tokens.
3. The predictor (:class:`JEPAPredictor`: ``jepa.predictor.depth`` timm blocks, the encoder's width by default)
   sees the encoded context plus, for each target block in turn, one query per (modality, target position):
   a learned mask token plus the position's sin-cos embedding and a learned modality embedding.
4. The teacher, an EMA copy of the encoder without gradients (eval mode), encodes the full unmasked sample at
   P; its tokens, layer-normalised over features, are the targets at the target positions of every modality.
5. Losses, in fp32 outside autocast: smooth L1 (``jepa.loss.smooth_l1_beta``) between predictions and targets,
   averaged over the target tokens with a valid pixel (weight ``jepa.loss.latent_weight``, AnySat's "mse"),
   plus MIL-NCE (:func:`mil_nce`) over the student's per-modality patch embeddings of all positions, taken
   before the position embedding and the transformer (temperature ``jepa.loss.temperature``, weight
   ``jepa.loss.contrastive_weight``).
6. After every optimizer step that was not skipped, the teacher follows the student with a momentum rising
   linearly over the run (``jepa.ema.momentum``, AnySat 0.996 -> 1.0).

Collapse watch: every step returns ``target_std`` (the mean over features of the per-feature standard
deviation of the valid target tokens of the batch) and ``pred_cos`` (their mean cosine with the predictions);
the first time ``target_std`` falls under ``jepa.collapse_floor`` after a step, a warning says so (once per run).

Scale-adaptive patches: FlexiViT's pseudo-inverse resize of each adapter's patch projection
(:mod:`multimae.adapters`), not AnySat's sub-patch pooling. Sub-patch pooling needs a new per-modality
projector of 10 m sub-patches plus a "spatial encoder" transformer run over the P x P sub-patches of every
patch: a second network inside the encoder, P^2 more tokens through it at every step, and adapters that are no
longer a strided convolution (so no timm export, and no loading of this framework's other checkpoints). The
resize adds no parameter, leaves every adapter exactly as it is at its trained patch size (fine-tuning, probes
and old checkpoints unchanged), and lets fine-tuning choose any patch size (``encoder.encode(..., patch_size=)``).
What it gives up: a resized projection is linear in the patch, so a patch larger than the trained one is
embedded as its least-squares downsample to the trained size (AnySat's pooling transformer keeps sub-patch
detail). Positions are patch centres in base-patch units (``model.patch_size``), i.e. ground distance, so the
scales agree.

Differences from AnySat, kept on purpose: the encoder keeps one token per (modality, position) and has no
final cross-block, so the targets are the teacher's per-modality tokens and the predictor's queries carry a
modality embedding; mask tokens keep their position (AnySat's replacement drops it); tokens without a valid
pixel are never shown, never targets and not in MIL-NCE; the encoder's global tokens go into the predictor
(AnySat's predictor has its own class token); MMEarth has no time series, so there is no date dropping. Under
DDP each rank draws the scale of its own batch.

Parameter names: ``encoder.*``, ``predictor.*``, ``mask_token``, ``teacher.*`` (the EMA copy, in the checkpoint's
objective state for exact resume; fine-tuning reads only ``encoder``). Config section ``jepa``
(``cfgs/defaults.yaml``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from multimae.domains import DOMAINS
from multimae.encoder import MultiModalEncoder, init_linear_layers
from multimae.objectives.base import Objective
from multimae.objectives.jepa_masks import JEPAMasking, check_masking
from multimae.pos_embed import sincos_pos_embed_coords

__all__ = ["JEPAObjective", "JEPAPredictor", "mil_nce", "ema_momentum"]

#: Similarity entries per chunk of MIL-NCE rows (4 MiB in fp32: reused by the allocator instead of mapped anew);
#: chunks are recomputed in the backward pass.
_MIL_NCE_CHUNK = 2**20


def ema_momentum(step: int, total_steps: int, momentum: tuple[float, float]) -> float:
    """Teacher momentum after optimizer step ``step`` (1-based) of ``total_steps``: linear from ``momentum[0]``
    to ``momentum[1]``, reached at the last step (I-JEPA's and AnySat's schedule)."""
    start, end = momentum
    return start + (end - start) * min(step, total_steps) / max(total_steps, 1)


#: Similarity logit that takes no part (finite, so rows without any candidate keep finite gradients).
_EXCLUDED = -1.0e4


def _block_lse(rows: torch.Tensor, feats: torch.Tensor, col_bias: torch.Tensor, first_block: int,
               block_len: int) -> torch.Tensor:
    """logsumexp over the candidates of the anchors ``rows`` (whole (sample, modality) blocks from
    ``first_block`` on, already divided by the temperature) against every token ``feats`` (T, D): (R,)."""
    k, blocks = rows.shape[0] // block_len, feats.shape[0] // block_len
    own = torch.zeros(k, 1, blocks, 1, device=rows.device)
    own[torch.arange(k), 0, first_block + torch.arange(k), 0] = _EXCLUDED  # the anchor's own block
    sim = (rows @ feats.T).view(k, block_len, blocks, block_len) + (own + col_bias.view(1, 1, blocks, block_len))
    return torch.logsumexp(sim.view(k * block_len, -1), dim=1)


def mil_nce(tokens: torch.Tensor, valid: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """MIL-NCE (Miech et al., CVPR 2020) across modalities, as AnySat applies it to per-modality patch tokens.

    Every valid token (b, m, n) is an anchor. Its positives are the valid tokens of the same sample at the same
    position n in the other modalities; its candidates are all valid tokens of the other (sample, modality)
    blocks (positives included); the tokens of its own (sample, modality) block are excluded. Similarities are
    cosines divided by ``temperature``. The loss of an anchor is
    ``logsumexp(candidates) - logsumexp(positives)``; the result is the mean over anchors with a valid positive.
    The (tokens x tokens) similarities are built a few blocks of rows at a time and recomputed in the backward
    pass, so memory stays bounded; the compute grows with the square of B x M x N.

    Args:
        tokens: (B, M, N, D) per-modality patch tokens.
        valid: bool (B, M, N), True for tokens with a valid pixel; None = all valid.
        temperature: Softmax temperature (AnySat 0.1).

    Returns:
        fp32 scalar; 0 (attached to the graph) when no anchor has a valid positive.
    """
    b, m, n, d = tokens.shape
    feats = F.normalize(tokens.float(), dim=-1)
    if valid is None:
        valid = torch.ones(b, m, n, dtype=torch.bool, device=tokens.device)
    # Positives: (B, N, M anchors, M others) similarities of the same sample and position.
    by_pos = feats.transpose(1, 2)  # (B, N, M, D)
    v = valid.transpose(1, 2)  # (B, N, M)
    pos_ok = v[:, :, None, :] & ~torch.eye(m, dtype=torch.bool, device=tokens.device)
    anchor = (v & pos_ok.any(dim=-1)).transpose(1, 2)  # (B, M, N)
    if not bool(anchor.any()):
        return feats.sum() * 0.0
    pos = (by_pos @ by_pos.transpose(-1, -2) / temperature).masked_fill(~pos_ok, _EXCLUDED)
    log_pos = torch.logsumexp(pos, dim=-1).transpose(1, 2)  # (B, M, N)
    # Candidates: every valid token of another (sample, modality) block; tokens in (b, m, n) order, so each
    # block is a run of N rows and columns.
    flat = feats.reshape(-1, d)  # (T, D)
    scaled = flat / temperature
    col_bias = torch.where(valid.reshape(-1), 0.0, _EXCLUDED)
    per_chunk = max(1, _MIL_NCE_CHUNK // (n * flat.shape[0]))  # blocks of rows per chunk
    lse = []
    for first in range(0, b * m, per_chunk):
        args = (scaled[first * n:(first + per_chunk) * n], flat, col_bias, first, n)
        if torch.is_grad_enabled() and flat.requires_grad:
            lse.append(checkpoint(_block_lse, *args, use_reentrant=False))
        else:
            lse.append(_block_lse(*args))
    log_all = torch.cat(lse).view(b, m, n)
    return (log_all - log_pos)[anchor].mean()


class JEPAPredictor(nn.Module):
    """Predicts the teacher's target tokens from the encoded context (I-JEPA's predictor, per modality).

    Args:
        encoder_dim: Width D of the encoder tokens (input and output).
        num_domains: Modalities M.
        dim: Predictor width.
        depth: timm ViT blocks.
        num_heads: Attention heads.
        mlp_ratio: Feed-forward hidden width / ``dim``.

    Parameter names: ``embed.*``, ``mask_token``, ``domain_embeds`` (M, dim), ``blocks.<i>.*``, ``norm.*``,
    ``head.*``.
    """

    def __init__(self, encoder_dim: int, num_domains: int, *, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.dim, self.num_domains = dim, num_domains
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.domain_embeds = nn.Parameter(torch.zeros(num_domains, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, encoder_dim)

    def forward(self, encoded: torch.Tensor, context_pos: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
        """Predict every target block.

        Args:
            encoded: (B, M * C + G, D) encoder outputs: the context tokens modality by modality (C positions
                each), then the G global tokens.
            context_pos: (B, C, dim) position embeddings of the context positions.
            target_pos: (B, T, K, dim) position embeddings of the K positions of each of the T target blocks.

        Returns:
            (B, T, M * K, D): predictions, modality by modality, for each target block.
        """
        b, t, k, _ = target_pos.shape
        m, c = self.num_domains, context_pos.shape[1]
        x = self.embed(encoded)
        context_add = (self.domain_embeds[None, :, None, :] + context_pos[:, None]).reshape(b, m * c, self.dim)
        x = torch.cat([x[:, :m * c] + context_add, x[:, m * c:]], dim=1)  # (B, L, dim)
        queries = self.mask_token + self.domain_embeds[None, None, :, None, :] + target_pos[:, :, None]
        queries = queries.reshape(b * t, m * k, self.dim)  # one sequence per (sample, target block)
        x = torch.cat([x[:, None].expand(-1, t, -1, -1).reshape(b * t, x.shape[1], self.dim), queries.to(x.dtype)],
                      dim=1)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x[:, -m * k:]))  # (B * T, M * K, D)
        return out.reshape(b, t, m * k, -1)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, ...) at ``index`` int64 (B, L) along the token axis: (B, L, ...)."""
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


class JEPAObjective(Objective):
    """AnySat's scale-adaptive JEPA around the shared encoder (module docstring).

    Args:
        encoder: The student encoder (built with ``init_weights=False``; :meth:`init_weights` runs after).
        patch_sizes: Patch sides in pixels, one drawn per batch; each divides the encoder's ``input_size``.
        momentum: (start, end) of the teacher momentum, both in [0, 1].
        masking: The ``jepa.masking`` section (context_scale, num_targets, target_scale, target_aspect,
            modality_ratio, min_context).
        predictor_dim: Predictor width (None: the encoder's).
        predictor_depth: Predictor blocks.
        predictor_heads: Predictor attention heads (None: the encoder's).
        latent_weight: Weight of the smooth-L1 latent regression.
        contrastive_weight: Weight of MIL-NCE.
        temperature: MIL-NCE temperature.
        smooth_l1_beta: Transition point of the smooth L1 (1.0: torch's default, AnySat's).
        collapse_floor: ``target_std`` under which the collapse watch warns.

    Raises:
        ValueError: one line naming the config key: per-domain patch sizes or resized base-grid position tables in
            the encoder, a patch size that does not divide the input size, a momentum outside [0, 1], mask
            settings out of range (a target block that would leave no context), MIL-NCE with one modality.
    """

    name = "jepa"

    def __init__(
        self,
        encoder: MultiModalEncoder,
        *,
        patch_sizes: Sequence[int],
        momentum: Sequence[float] = (0.996, 1.0),
        masking: dict,
        predictor_dim: int | None = None,
        predictor_depth: int = 4,
        predictor_heads: int | None = None,
        latent_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        temperature: float = 0.1,
        smooth_l1_beta: float = 1.0,
        collapse_floor: float = 0.1,
    ) -> None:
        super().__init__(encoder)
        own = {d: p for d, p in encoder.patch_sizes.items() if p != encoder.patch_size}
        if own:
            raise ValueError(f"model.patch_sizes: the jepa objective tokenizes every domain on one patch grid; drop "
                             f"the per-domain patch sizes {own}")
        if getattr(encoder, "metadata_fields", ()):
            raise ValueError(f"model.metadata: the jepa objective masks and predicts grid tokens only; drop the "
                             f"metadata tokens ({', '.join(encoder.metadata_fields)}) or choose another objective")
        if encoder.pos_embed_grid is not None:
            raise ValueError("model.pos_embed_grid: the jepa objective needs positions in ground distance (null), "
                             f"got {encoder.pos_embed_grid}")
        if (not isinstance(momentum, (list, tuple)) or len(momentum) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
                           for v in momentum)):
            raise ValueError(f"jepa.ema.momentum: expected [start, end], both in [0, 1], got {momentum!r}")
        if temperature <= 0:
            raise ValueError(f"jepa.loss.temperature must be > 0, got {temperature}")
        if contrastive_weight != 0 and len(encoder.in_domains) < 2:
            raise ValueError("jepa.loss.contrastive_weight: MIL-NCE needs at least 2 in_domains (its positives are the "
                             "other modalities); set it to 0 for a single domain")
        if min(latent_weight, contrastive_weight, smooth_l1_beta) < 0:
            raise ValueError("jepa.loss: latent_weight, contrastive_weight and smooth_l1_beta must be >= 0")
        label_downsample = {d: DOMAINS[d].label_downsample for d in encoder.in_domains
                            if DOMAINS[d].kind == "categorical"}
        settings = check_masking(masking, patch_sizes, encoder.input_size, label_downsample)
        self.patch_sizes = [int(p) for p in patch_sizes]
        self.momentum = (float(momentum[0]), float(momentum[1]))
        self.latent_weight, self.contrastive_weight = float(latent_weight), float(contrastive_weight)
        self.temperature, self.smooth_l1_beta = float(temperature), float(smooth_l1_beta)
        self.collapse_floor = float(collapse_floor)
        self.masking = JEPAMasking(encoder.in_domains, self.patch_sizes, **settings)
        dim = predictor_dim or encoder.dim
        heads = predictor_heads or encoder.num_heads
        if dim % heads or dim % 4:
            raise ValueError(f"jepa.predictor: width {dim} must be divisible by 4 and by the heads {heads}")
        self.predictor = JEPAPredictor(encoder.dim, len(encoder.in_domains), dim=dim, depth=predictor_depth,
                                       num_heads=heads, mlp_ratio=encoder.mlp_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)
        self._pairs = None  # (teacher, student) parameter pairs, built on first use
        self._last_target_std: torch.Tensor | None = None
        self.collapse_warned = False

    @classmethod
    def from_config(cls, cfg: dict, encoder: MultiModalEncoder) -> "JEPAObjective":
        """Build from config section ``jepa`` (``cfgs/defaults.yaml``)."""
        sec = cfg["jepa"]
        pred, loss = sec["predictor"], sec["loss"]
        return cls(encoder, patch_sizes=sec["patch_sizes"], momentum=sec["ema"]["momentum"], masking=sec["masking"],
                   predictor_dim=pred["dim"], predictor_depth=pred["depth"], predictor_heads=pred["heads"],
                   latent_weight=loss["latent_weight"], contrastive_weight=loss["contrastive_weight"],
                   temperature=loss["temperature"], smooth_l1_beta=loss["smooth_l1_beta"],
                   collapse_floor=sec["collapse_floor"])

    def describe(self) -> list[str]:
        """Patch scales, masks, predictor, losses and teacher momentum for ``--summary``."""
        mk = self.masking
        return [
            f"patch_sizes: {self.patch_sizes} px, one per batch (grids "
            f"{', '.join(f'{self.encoder.input_size // p}x{self.encoder.input_size // p}' for p in self.patch_sizes)})",
            f"masks: context block {mk.context_scale} of the grid, {mk.num_targets} target blocks {mk.target_scale} at "
            f"aspect {mk.target_aspect}, modality ratio {mk.modality_ratio}",
            f"predictor: width {self.predictor.dim}, depth {len(self.predictor.blocks)}, heads "
            f"{self.predictor.blocks[0].attn.num_heads if len(self.predictor.blocks) else 0}",
            f"loss: {self.latent_weight:g} x smooth L1 (beta {self.smooth_l1_beta:g}) + {self.contrastive_weight:g} x "
            f"MIL-NCE (temperature {self.temperature:g})",
            f"teacher: EMA momentum {self.momentum[0]:g} -> {self.momentum[1]:g}",
        ]

    def init_weights(self) -> None:
        """The encoder's initialisation, xavier-uniform Linear layers of the predictor, trunc-normal (std 0.02)
        mask tokens and modality embeddings, then the teacher as an exact copy of the encoder."""
        self.encoder.init_weights()
        init_linear_layers(self.predictor)
        for p in (self.mask_token, self.predictor.mask_token, self.predictor.domain_embeds):
            nn.init.trunc_normal_(p, std=0.02)
        self.teacher.load_state_dict(self.encoder.state_dict())

    def train(self, mode: bool = True) -> "JEPAObjective":
        """Train mode for the student and predictor; the teacher always runs in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """The encoder's no-decay names plus the mask tokens and the predictor's modality embeddings."""
        return super().no_weight_decay() | {"mask_token", "predictor.mask_token", "predictor.domain_embeds"}

    def batch_transform(self) -> JEPAMasking:
        """The worker-side masks (:class:`~multimae.objectives.jepa_masks.JEPAMasking`)."""
        return self.masking

    # ------------------------------------------------------------------ training step
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses of a batch carrying ``batch["jepa"]`` masks (the batch transform's):
        ``{"loss", "latent", "contrastive", "target_std", "pred_cos"}`` (plus ``aux`` from the encoder's
        feed-forward). ``generator`` is unused: the masks come with the batch.

        Raises:
            ValueError: the batch has no masks, or masks for other domains.
        """
        masks = batch.get("jepa")
        if masks is None:
            raise ValueError("batch has no 'jepa' masks: the data loader must apply JEPAObjective.batch_transform()")
        inputs, valid = batch["inputs"], batch.get("valid")
        p = int(masks["patch_size"][0])
        context, keep, targets = masks["context"], masks["keep"], masks["targets"]  # (B, C), (B, M, C), (B, T, K)
        tok = self.encoder.tokenize(inputs, valid, patch_size=p)
        layout, (b, n_all, d) = tok.layout, tok.tokens.shape
        m, c = len(layout.segments), context.shape[1]
        t, k = targets.shape[1:]
        if keep.shape[1] != m:
            raise ValueError(f"batch masks hold {keep.shape[1]} modalities, the encoder has {m} in_domains")
        offsets = torch.tensor([seg.start for seg in layout.segments], device=context.device)
        token_valid = tok.valid if tok.valid is not None else torch.ones(b, n_all, dtype=torch.bool,
                                                                         device=context.device)

        # Student: the context tokens of every modality, those not kept replaced by the mask token.
        ctx_ids = (offsets[None, :, None] + context[:, None, :]).reshape(b, m * c)
        shown = keep.reshape(b, m * c) & _gather_tokens(token_valid, ctx_ids)
        x = _gather_tokens(tok.tokens, ctx_ids)
        added = _gather_tokens(tok.tokens - tok.patch_embeds, ctx_ids)  # position (+ domain) embeddings
        x = torch.where(shown[..., None], x, self.mask_token.to(x.dtype) + added)
        encoded = self.encoder.forward_blocks(x)  # (B, M * C + G, D)

        # Predictor: one query per (modality, target position) of each target block.
        first = layout.segments[0]
        pos_table = sincos_pos_embed_coords(layout.coords(device=context.device)[first.slice], self.predictor.dim)
        pred = self.predictor(encoded, pos_table[context], pos_table[targets])  # (B, T, M * K, D)

        # Teacher: every token of the full sample, layer-normalised; the targets of every modality.
        with torch.no_grad():
            teacher_tokens = self.teacher.encode(inputs, valid=valid, patch_size=p)[:, :n_all]
            self.teacher.pop_aux_loss()
        tgt_ids = (offsets[None, None, :, None] + targets[:, :, None, :]).reshape(b, t * m * k)
        target_valid = _gather_tokens(token_valid, tgt_ids).reshape(b, t, m * k)

        with torch.autocast(device_type=x.device.type, enabled=False):
            target = _gather_tokens(F.layer_norm(teacher_tokens.float(), (d,)), tgt_ids).reshape(b, t, m * k, d)
            pred = pred.float()
            per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=self.smooth_l1_beta).mean(dim=-1)
            count = target_valid.sum()
            latent = torch.where(target_valid, per_token, 0.0).sum() / count.clamp(min=1)
            contrastive = mil_nce(tok.patch_embeds.float().reshape(b, m, -1, d), token_valid.reshape(b, m, -1),
                                  self.temperature)
            loss = self.latent_weight * latent + self.contrastive_weight * contrastive
            with torch.no_grad():
                kept_targets, kept_preds = target[target_valid], pred[target_valid]  # (V, D)
                if kept_targets.shape[0] >= 2:
                    target_std = kept_targets.std(dim=0).mean()
                    pred_cos = F.cosine_similarity(kept_preds, kept_targets, dim=-1).mean()
                else:  # nothing to measure in this batch
                    target_std = pred_cos = torch.full((), float("nan"), device=x.device)
        if self.training:
            self._last_target_std = target_std
        out = {"loss": loss, "latent": latent, "contrastive": contrastive, "target_std": target_std,
               "pred_cos": pred_cos}
        aux = self.encoder.pop_aux_loss()
        if aux is not None:
            out["loss"] = out["loss"] + aux.float()
            out["aux"] = aux.float()
        return out

    # ------------------------------------------------------------------ teacher
    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher, ``t <- m t + (1 - m) s`` with m = :func:`ema_momentum`, then the collapse
        watch (one warning per run when ``target_std`` of the last training step fell under the floor)."""
        if self._pairs is None:
            student = dict(self.encoder.named_parameters())
            self._pairs = [(p, student[name]) for name, p in self.teacher.named_parameters()]
        m = ema_momentum(step, total_steps, self.momentum)
        teacher = [t for t, _ in self._pairs]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, [s.detach() for _, s in self._pairs], alpha=1.0 - m)
        std = self._last_target_std
        if std is not None and not self.collapse_warned and bool(std < self.collapse_floor):
            self.collapse_warned = True
            warnings.warn(f"jepa collapse watch: at step {step} the teacher targets' per-feature std is "
                          f"{float(std):.4g}, under jepa.collapse_floor {self.collapse_floor:g} (the representation "
                          "may be collapsing; see loss_target_std and loss_pred_cos in log.jsonl)", RuntimeWarning,
                          stacklevel=2)

    def extra_state(self) -> dict:
        """Whether the collapse watch has warned (so a resumed run does not warn again)."""
        return {"collapse_warned": self.collapse_warned}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""
        self.collapse_warned = bool(state.get("collapse_warned", False))
