"""Latent MIM Lite (OlmoEarth): frozen random-projection targets, four-role masking, patch discrimination, InfoNCE.

Herzog et al., "OlmoEarth: Stable Latent Image Modeling for Multimodal Earth Observation" (arXiv 2511.13655;
allenai/olmoearth_pretrain, ``nn/latent_mim.py``, ``train/loss.py``, ``train/masking.py``). The encoder's input
domains are *band sets* (e.g. ``s2_10m``, ``s2_20m``, ``s2_60m``, ``s1``); *decode-only* domains (class maps,
elevation, canopy height; ``latent_mim.decode_only``) are predicted, never encoded. One training step:

1. The data-loader workers draw two independently masked views of every sample
   (:class:`~multimae.objectives.latent_mim_masking.ModalityCrossMasking`): each token of every band set is
   encoder, target-only, decoder or missing.
2. **Targets** (no gradient, fp32): a frozen depth-0 copy of the encoder, ``target``, whose input adapters are
   copies of the encoder's *initial* patch projections (OlmoEarth's token exit depth 0, EMA decay 1,
   "projection-only target"), plus frozen random projections of the decode-only domains; applied to the
   whole unmasked sample, without position embeddings. It is never trained or updated; it lives in the
   checkpoint's ``objective`` entry (exact resume), which fine-tuning never reads.
3. Per view: the encoder encodes that view's encoder tokens (samples show different numbers of tokens:
   padded, padding hidden from attention), and a :class:`LatentPredictor` (cross-attention of one query per
   decoder token over the encoded tokens, conditioned on position and domain) predicts one latent per
   decoder token.
4. **Losses**, fp32 and outside autocast: per group (a domain, or an MMEarth modality with
   ``latent_mim.loss.group: modality``) and sample, :func:`patch_discrimination_loss` between the
   L2-normalised predictions and targets at decoder tokens; averaged over the samples that have a decoder
   token of the group, summed over groups, averaged over the two views; plus ``contrastive_weight`` times
   :func:`info_nce` between the two views' mean-pooled, projected encoder outputs.

Returned terms (the loop logs ``loss_<term>``): ``patch_disc``, ``patch_disc_<group>``, ``infonce`` (and
``aux`` for feed-forward auxiliary losses). Parameter names: ``encoder.*``, ``predictor.*``, ``pool_proj.*``;
frozen buffers of the state dict: ``target.*``. Config section ``latent_mim`` (``cfgs/defaults.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from multimae.decoders import CrossAttention
from multimae.domains import DOMAINS
from multimae.encoder import MultiModalEncoder, resolve_domains
from multimae.layout import TokenLayout
from multimae.objectives.base import Objective
from multimae.objectives.latent_mim_masking import DECODER, ENCODER, ModalityCrossMasking
from multimae.pos_embed import sincos_pos_embed_coords

__all__ = ["LatentMIMObjective", "LatentPredictor", "patch_discrimination_loss", "info_nce", "select_tokens",
           "predictor_position_embedding"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)
_GROUPS = ("domain", "modality")


def select_tokens(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, left-aligned and padded to the longest row.

    Args:
        mask: bool (B, N).

    Returns:
        ``ids`` int64 (B, M) positions in increasing order (padding entries hold other positions) and
        ``valid`` bool (B, M), False at padding; M = the largest row count (0 when there are none).
    """
    counts = mask.sum(dim=1)
    m = int(counts.max()) if mask.shape[0] else 0
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # True entries first, in order
    ids = order[:, :m]
    return ids, torch.arange(m, device=mask.device)[None, :] < counts[:, None]


def patch_discrimination_loss(preds: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                              temperature: float = 0.1, similar_negatives: float | None = None) -> torch.Tensor:
    """OlmoEarth's patch discrimination loss of one group (its ``modality_patch_discrimination``).

    For sample b with c valid tokens: the (c, c) matrix of cosine similarities between its predictions and
    its targets, divided by ``temperature``; cross-entropy with the matching target (the diagonal) as the
    positive and the sample's other c - 1 targets as negatives, times ``2 * temperature``, averaged over the c
    tokens. The result is the mean over the samples with c >= 1 (0 when there are none).

    Args:
        preds: (B, C, D) predictions; rows beyond a sample's count are padding.
        targets: (B, C, D) targets aligned with ``preds``.
        valid: bool (B, C), False at padding.
        temperature: tau.
        similar_negatives: None, or a cosine: negatives whose target is at least this similar to the positive's
            target are dropped (OlmoEarth v1.1's ``modality_patch_discrimination_masked_negatives``, 0.999 for
            decode-only maps, where many patches share one class or value).

    Returns:
        fp32 scalar.
    """
    p = F.normalize(preds.float(), dim=-1)
    t = F.normalize(targets.float(), dim=-1)
    b, c, _ = p.shape
    logits = torch.bmm(p, t.transpose(1, 2)) / temperature  # (B, C, C)
    negative = valid[:, None, :].expand(b, c, c)  # padding is no negative
    if similar_negatives is not None:
        same = torch.bmm(t, t.transpose(1, 2)) >= similar_negatives
        negative = negative & (~same | torch.eye(c, dtype=torch.bool, device=p.device))
    logits = logits.masked_fill(~negative, float("-inf"))
    logits = torch.where(valid[:, :, None], logits, 0.0)  # padding rows: finite, weighted 0 below
    labels = torch.arange(c, device=p.device).repeat(b)
    ce = F.cross_entropy(logits.reshape(b * c, c), labels, reduction="none").view(b, c)
    weight = valid.float()
    count = weight.sum(dim=1)
    per_sample = (ce * weight).sum(dim=1) / count.clamp(min=1) * (2 * temperature)
    has = (count > 0).float()
    return (per_sample * has).sum() / has.sum().clamp(min=1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE between two views over the batch (OlmoEarth's ``InfoNCE`` loss).

    L2-normalised rows, logits ``a @ b.T / temperature``, cross-entropy with the same sample of the other view
    (the diagonal) as the positive.

    Args:
        a: (B, D) one vector per sample of view A.
        b: (B, D) of view B.
        temperature: tau.
        valid: Optional bool (B,): samples to use (others are dropped from both sides).

    Returns:
        fp32 scalar; 0 (with a gradient path) when fewer than two samples are usable.
    """
    a, b = a.float(), b.float()
    if valid is not None:
        a, b = a[valid], b[valid]
    if a.shape[0] < 2:
        return (a.sum() + b.sum()) * 0.0
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


#: OlmoEarth's ground sample distance unit (metres) and the sin-cos temperature that reproduces its frequency
#: ladder (1 down to 10000^(-1/4)) with :func:`multimae.pos_embed.sincos_pos_embed_coords`.
_BASE_GSD_M = 10.0
_PREDICTOR_POS_TEMPERATURE = 10.0


def predictor_position_embedding(layout: TokenLayout, dim: int, *, device=None) -> torch.Tensor:
    """(N, dim) sin-cos embedding of the patch centres of ``layout`` as OlmoEarth's encodings measure them.

    OlmoEarth (``nn/encodings.py``, ``nn/flexi_vit.py``) places patch (r, c) at (r, c) times the gsd ratio
    ``gsd * patch_size / 10 m`` (so positions are in 10 m pixels) and uses frequencies from 1 down to
    10000^(-1/4); neighbouring patches then get clearly different embeddings (cosine about 0.5 at 8 px patches,
    against 0.98 for the encoder's base-patch-unit embedding with temperature 10000), which is what lets
    content-free queries find the context tokens at their position. Here: :meth:`TokenLayout.coords` (base-patch
    units) times ``base_patch_size * gsd / 10`` (the gsd of the first grid segment; 10 m when unknown), embedded
    with temperature 10.
    """
    grid = layout.grid_segments()
    gsd = next((s.gsd for s in grid if s.gsd is not None), _BASE_GSD_M)
    coords = layout.coords(device=device) * (layout.base_patch_size * gsd / _BASE_GSD_M)
    return sincos_pos_embed_coords(coords, dim, temperature=_PREDICTOR_POS_TEMPERATURE)


class _CrossBlock(nn.Module):
    """Pre-norm cross-attention of the queries over a fixed context, then a residual MLP (queries only)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.query_norm, self.context_norm = _LayerNorm(dim), _LayerNorm(dim)
        self.xattn = CrossAttention(dim, num_heads)
        self.mlp_norm = _LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor | None) -> torch.Tensor:
        x = x + self.xattn(self.query_norm(x), self.context_norm(context), context_valid)
        return x + self.mlp(self.mlp_norm(x))


class LatentPredictor(nn.Module):
    """OlmoEarth's predictor: one query per decoder token attends to the encoded tokens of its sample.

    The encoder output is layer-normalised and projected to the predictor width; every context token (encoded
    patch tokens) and every query (a learned mask token) gets the fixed sin-cos embedding of its patch centre
    (:func:`predictor_position_embedding`, OlmoEarth's convention) plus a learned embedding of its domain; the
    global tokens join the context as they are. ``depth`` pre-norm cross-attention blocks update the queries only (no attention among
    queries); a final norm and a linear layer give one latent of the target width per query. The objective starts
    the key projections as copies of the query projections (:meth:`tie_query_key`).

    Args:
        domains: Role domains in layout order (input domains, then decode-only domains).
        encoder_dim: Encoder width D.
        dim: Predictor width.
        depth: Cross-attention blocks.
        num_heads: Attention heads (divide ``dim``).
        mlp_ratio: MLP hidden width / ``dim``.
        out_dim: Target width.
    """

    def __init__(self, domains: Sequence[str], *, encoder_dim: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, out_dim: int) -> None:
        super().__init__()
        if dim % num_heads != 0 or dim % 4 != 0:
            raise ValueError(f"latent_mim.predictor: heads {num_heads} must divide dim {dim}, and dim must be "
                             "divisible by 4 (sin-cos positions)")
        self.domains, self.dim = list(domains), dim
        self.input_norm = _LayerNorm(encoder_dim)
        self.encoder_to_predictor = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.domain_embeds = nn.ParameterDict([(d, nn.Parameter(torch.zeros(1, dim))) for d in self.domains])
        self.blocks = nn.ModuleList(_CrossBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = _LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for p in self.domain_embeds.values():
            nn.init.trunc_normal_(p, std=0.02)
        self._pos_cache: dict = {}

    @torch.no_grad()
    def tie_query_key(self) -> None:
        """Start every block's key projection as a copy of its query projection.

        Queries (a mask token plus position and domain embeddings) and context tokens then meet in one space:
        their attention logits start as a similarity (a positive semi-definite form), largest where the
        position embeddings agree, so every query starts out attending to the context tokens at and around its
        own position instead of uniformly. With independent random projections the predictor first sits on a
        plateau at the chance level of the discrimination loss for a few hundred steps before it finds them.
        The two projections train independently afterwards.
        """
        for block in self.blocks:
            attn = block.xattn
            attn.kv.weight[:self.dim].copy_(attn.q.weight)
            attn.kv.bias[:self.dim].copy_(attn.q.bias)

    def embeddings(self, layout: TokenLayout, ref: torch.Tensor) -> torch.Tensor:
        """(N, dim) position + domain embedding of every token of ``layout`` (role domains in order)."""
        if layout.domains != self.domains:
            raise ValueError(f"predictor domains {self.domains} differ from the layout's {layout.domains}")
        key = (layout, ref.device)
        pos = self._pos_cache.get(key)
        if pos is None:
            pos = self._pos_cache[key] = predictor_position_embedding(layout, self.dim, device=ref.device)
        domain = torch.cat([self.domain_embeds[s.domain].expand(s.num_tokens, -1) for s in layout.segments])
        return (pos + domain).to(ref.dtype)

    def forward(self, encoded: torch.Tensor, ids_keep: torch.Tensor, keep_valid: torch.Tensor | None,
                ids_query: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Predict the latents of the queried tokens.

        Args:
            encoded: Encoder output (B, K + G, D): K encoded tokens (some padding), then G global tokens.
            ids_keep: int64 (B, K) layout positions of the encoded tokens.
            keep_valid: bool (B, K), False at padding; None when there is none.
            ids_query: int64 (B, Q) layout positions of the decoder tokens (padding rows are computed too).
            layout: The role layout (positions 0..N-1 of ``ids_keep`` and ``ids_query``).

        Returns:
            (B, Q, out_dim).
        """
        b, k = ids_keep.shape
        x = self.encoder_to_predictor(self.input_norm(encoded))  # (B, K + G, dim)
        embeds = self.embeddings(layout, x)  # (N, dim)
        context = torch.cat([x[:, :k] + embeds[ids_keep], x[:, k:]], dim=1)
        context_valid = None
        if keep_valid is not None:
            context_valid = torch.cat([keep_valid, keep_valid.new_ones(b, x.shape[1] - k)], dim=1)
        queries = self.mask_token.to(x.dtype) + embeds[ids_query]  # (B, Q, dim)
        for block in self.blocks:
            queries = block(queries, context, context_valid)
        return self.head(self.norm(queries))


class LatentMIMObjective(Objective):
    """OlmoEarth's Latent MIM Lite around the shared encoder (module docstring).

    Args:
        encoder: The encoder to train (built with ``init_weights=False``; :meth:`init_weights` runs after).
        decode_only: Domains only predicted (never encoded, not in ``in_domains``), with frozen random targets.
        encode_ratio: Per-modality share of tokens drawn as encoder tokens.
        decode_ratio: Per-modality share drawn as decoder tokens.
        min_encoded: Fewest encodable band sets encoded when three or more are present.
        predictor_dim: Predictor width (None: the encoder's).
        predictor_depth: Predictor blocks.
        predictor_heads: Predictor heads (None: the encoder's).
        predictor_mlp_ratio: Predictor MLP hidden width / predictor width.
        temperature: tau of the patch discrimination.
        group: ``domain`` (negatives: other decoder tokens of the same sample and domain) or ``modality`` (of
            the same sample and MMEarth modality, OlmoEarth's grouping).
        contrastive_weight: Weight of the InfoNCE term (0 turns it off).
        contrastive_temperature: tau of the InfoNCE term.
        similar_negatives: None, or a cosine: in groups made only of decode-only domains, negatives whose target
            is at least this similar to the positive's are dropped (OlmoEarth v1.1: 0.999).

    Raises:
        ValueError: unknown, duplicate or output-only decode-only domains, a decode-only domain that is also an
            input domain, fewer than two band sets, or an invalid setting (the messages name the config key).
    """

    name = "latent_mim"

    def __init__(
        self,
        encoder: MultiModalEncoder,
        *,
        decode_only: Sequence[str] = (),
        encode_ratio: float = 0.5,
        decode_ratio: float = 0.5,
        min_encoded: int = 2,
        predictor_dim: int | None = None,
        predictor_depth: int = 4,
        predictor_heads: int | None = None,
        predictor_mlp_ratio: float = 4.0,
        temperature: float = 0.1,
        group: str = "domain",
        contrastive_weight: float = 0.1,
        contrastive_temperature: float = 0.1,
        similar_negatives: float | None = None,
    ) -> None:
        super().__init__(encoder)
        if getattr(encoder, "metadata_fields", ()):
            raise ValueError(f"model.metadata: the latent_mim objective masks and predicts band-set tokens only; drop "
                             f"the metadata tokens ({', '.join(encoder.metadata_fields)}) or choose another objective")
        decode_only = list(decode_only)
        for dom in resolve_domains(decode_only, "latent_mim.decode_only", empty=None, output_only=False):
            if dom.name in encoder.in_domains:
                raise ValueError(f"latent_mim.decode_only: {dom.name!r} is also in in_domains; a decode-only domain is "
                                 "never encoded, so list it in only one of the two")
        self.domains = list(encoder.in_domains) + decode_only
        if len(self.domains) < 2:
            raise ValueError(f"latent_mim needs at least two band sets (in_domains plus latent_mim.decode_only), got "
                             f"{self.domains}: with one there is nothing to predict it from")
        if temperature <= 0 or contrastive_temperature <= 0 or contrastive_weight < 0:
            raise ValueError("latent_mim.loss: temperature and contrastive_temperature must be > 0 and "
                             f"contrastive_weight >= 0; got {temperature}, {contrastive_temperature}, "
                             f"{contrastive_weight}")
        if group not in _GROUPS:
            raise ValueError(f"latent_mim.loss.group must be one of {', '.join(_GROUPS)}, got {group!r}")
        if predictor_depth < 1:
            raise ValueError(f"latent_mim.predictor.depth must be >= 1, got {predictor_depth}")
        self.decode_only = decode_only
        self.temperature, self.group = float(temperature), group
        if similar_negatives is not None and not -1 <= similar_negatives <= 1:
            raise ValueError(f"latent_mim.loss.decode_only_similar_negatives must be a cosine in [-1, 1] or null, "
                             f"got {similar_negatives}")
        self.similar_negatives = similar_negatives
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_temperature = float(contrastive_temperature)

        # Frozen targets: a depth-0 encoder over every role domain (adapters only, no blocks), never trained.
        spec = dict(encoder.spec, in_domains=self.domains, depth=0, domain_embed=False,
                    patch_sizes={d: encoder.patch_size_of(d) for d in self.domains
                                 if encoder.patch_size_of(d) != encoder.patch_size})
        self.target = MultiModalEncoder.from_spec(spec)
        self.target.requires_grad_(False)
        layout = self.target.layout()
        self.masking = ModalityCrossMasking(
            self.domains, {s.domain: s.grid for s in layout.segments},
            {s.domain: s.patch_size for s in layout.segments}, decode_only, encode_ratio=encode_ratio,
            decode_ratio=decode_ratio, min_encoded=min_encoded)
        self.predictor = LatentPredictor(
            self.domains, encoder_dim=encoder.dim, dim=predictor_dim or encoder.dim, depth=predictor_depth,
            num_heads=predictor_heads or encoder.num_heads, mlp_ratio=predictor_mlp_ratio, out_dim=self.target.dim)
        self.pool_proj = nn.Linear(encoder.dim, encoder.dim)  # OlmoEarth's ProjectAndAggregate (mean, then Linear)
        self.groups = self._groups()

    def _groups(self) -> dict[str, list[str]]:
        if self.group == "domain":
            return {d: [d] for d in self.domains}
        groups: dict[str, list[str]] = {}
        for d in self.domains:
            groups.setdefault(DOMAINS[d].modality, []).append(d)
        return groups

    @classmethod
    def from_config(cls, cfg: dict, encoder: MultiModalEncoder) -> "LatentMIMObjective":
        """Build from config section ``latent_mim`` (``cfgs/defaults.yaml``)."""
        sec = cfg["latent_mim"]
        masking, pred, loss = sec["masking"], sec["predictor"], sec["loss"]
        return cls(
            encoder, decode_only=sec["decode_only"], encode_ratio=masking["encode_ratio"],
            decode_ratio=masking["decode_ratio"], min_encoded=masking["min_encoded_band_sets"],
            predictor_dim=pred["dim"], predictor_depth=pred["depth"], predictor_heads=pred["heads"],
            predictor_mlp_ratio=pred["mlp_ratio"], temperature=loss["temperature"], group=loss["group"],
            contrastive_weight=loss["contrastive_weight"], contrastive_temperature=loss["contrastive_temperature"],
            similar_negatives=loss["decode_only_similar_negatives"],
        )

    @classmethod
    def data_domains(cls, cfg: dict) -> list[str]:
        """``in_domains`` plus ``latent_mim.decode_only``."""
        return list(dict.fromkeys(list(cfg["in_domains"]) + list(cfg["latent_mim"]["decode_only"])))

    def init_weights(self) -> None:
        """The base initialisation, the predictor's tied query / key start (:meth:`LatentPredictor.tie_query_key`),
        then the targets of the input domains become copies of the encoder's initial patch projections
        (decode-only targets keep their own random initialisation)."""
        super().init_weights()
        self.predictor.tie_query_key()
        with torch.no_grad():
            for d in self.encoder.in_domains:
                self.target.input_adapters[d].load_state_dict(self.encoder.input_adapters[d].state_dict())

    def describe(self) -> list[str]:
        """Band sets with their roles, masking ratios, predictor size and loss settings."""
        m = self.masking
        return [
            f"band sets: {', '.join(self.encoder.in_domains)} (encodable); "
            f"decode-only: {', '.join(self.decode_only) or 'none'}",
            f"masking: per modality {m.encode_ratio:g} encode / {m.decode_ratio:g} decode, at least "
            f"{m.min_encoded} band sets encoded, 2 views per sample",
            f"targets: frozen projections of width {self.target.dim} "
            "(initial encoder adapters; random for decode-only)",
            f"predictor: dim {self.predictor.dim}, depth {len(self.predictor.blocks)}",
            f"loss: patch discrimination per {self.group} (tau {self.temperature:g}) + "
            f"{self.contrastive_weight:g} x InfoNCE (tau {self.contrastive_temperature:g})",
        ]

    def batch_transform(self) -> ModalityCrossMasking:
        """The worker-side masking: adds ``roles`` {role domain: int8 (2, N_d)} to every sample."""
        return self.masking

    def train(self, mode: bool = True) -> "LatentMIMObjective":
        """Train / eval mode; the frozen targets stay in eval mode."""
        super().train(mode)
        self.target.eval()
        return self

    # ------------------------------------------------------------------ one view
    def _roles(self, batch: dict, layout: TokenLayout, b: int) -> torch.Tensor:
        """The batch's roles as int64 (B, V, N) in role-layout order (checked)."""
        if "roles" not in batch:
            raise ValueError("batch has no 'roles': the latent_mim objective's token roles are drawn by its "
                             "batch_transform in the data-loader workers (attach it to the dataset)")
        parts = []
        for seg in layout.segments:
            r = batch["roles"].get(seg.domain)
            if r is None or r.ndim != 3 or tuple(r.shape[::2]) != (b, seg.num_tokens):
                got = None if r is None else tuple(r.shape)
                raise ValueError(f"batch roles[{seg.domain!r}] must have shape (B={b}, views, {seg.num_tokens}), "
                                 f"got {got}")
            parts.append(r.long())
        return torch.cat(parts, dim=2)

    def _targets(self, inputs: dict, valid: dict) -> torch.Tensor:
        """(B, N, D) fp32 targets of every role-layout token: the frozen projections, outside autocast."""
        for d in self.decode_only:
            if d not in inputs:
                raise ValueError(f"batch has no decode-only domain {d!r} (latent_mim.decode_only)")
        with torch.no_grad(), torch.autocast(self.encoder.global_tokens.device.type, enabled=False):
            return self.target.tokenize(inputs, valid).patch_embeds.float()  # projections without position

    def _encode_view(self, tokens: torch.Tensor, roles: torch.Tensor) -> dict:
        """Encode one view: the encoder tokens of ``roles`` (B, N) and the pooled, projected output."""
        n_enc = tokens.shape[1]
        ids_keep, keep_valid = select_tokens(roles[:, :n_enc] == ENCODER)
        padded = not bool(keep_valid.all())
        encoded = self.encoder.encode_visible(tokens, ids_keep, keep_valid if padded else None)
        weight = keep_valid.to(encoded.dtype)[..., None]
        count = weight.sum(dim=1)
        pooled = (encoded[:, :ids_keep.shape[1]] * weight).sum(dim=1) / count.clamp(min=1)  # (B, D)
        return {"encoded": encoded, "ids_keep": ids_keep, "keep_valid": keep_valid if padded else None,
                "pooled": self.pool_proj(pooled), "has_encoder": count[:, 0] > 0}

    def _predict_view(self, view: dict, roles: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, ...]:
        """Predictions (B, Q, D) at the decoder tokens of ``roles`` (B, N), their positions and validity."""
        ids_query, query_valid = select_tokens(roles == DECODER)
        if ids_query.shape[1] == 0:
            return None, ids_query, query_valid
        preds = self.predictor(view["encoded"], view["ids_keep"], view["keep_valid"], ids_query, layout)
        return preds, ids_query, query_valid

    def _view_losses(self, preds, ids_query, query_valid, targets: torch.Tensor,
                     layout: TokenLayout) -> dict[str, torch.Tensor]:
        """Patch discrimination per group of one view (fp32, autocast off)."""
        if preds is None:  # no decoder token in the batch: zeros that still reach every predictor parameter (DDP)
            zero = sum(p.sum() for p in self.predictor.parameters()).float() * 0.0
            return {g: zero for g in self.groups}
        preds = preds.float()
        group_of = torch.empty(layout.num_tokens, dtype=torch.long, device=targets.device)
        for gi, doms in enumerate(self.groups.values()):
            for d in doms:
                group_of[layout[d].slice] = gi
        token_group = group_of[ids_query]  # (B, Q)
        out = {}
        for gi, g in enumerate(self.groups):
            sel, sel_valid = select_tokens(query_valid & (token_group == gi))  # (B, C) into the Q axis
            if sel.shape[1] == 0:
                out[g] = preds.sum() * 0.0
                continue
            p = torch.gather(preds, 1, sel[..., None].expand(-1, -1, preds.shape[-1]))
            pos = torch.gather(ids_query, 1, sel)
            t = torch.gather(targets, 1, pos[..., None].expand(-1, -1, targets.shape[-1]))
            similar = self.similar_negatives if set(self.groups[g]) <= set(self.decode_only) else None
            out[g] = patch_discrimination_loss(p, t, sel_valid, self.temperature, similar)
        return out

    # ------------------------------------------------------------------ the training step
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Latent MIM losses of a batch: ``{"loss", "patch_disc", "patch_disc_<group>", "infonce"}`` (fp32).

        The masks come from the batch (``roles``, drawn by :meth:`batch_transform`); ``generator`` is unused.

        Raises:
            ValueError: the batch lacks ``roles`` or a domain, or the roles have the wrong shape.
        """
        inputs, valid = batch["inputs"], batch.get("valid")
        tok = self.encoder.tokenize(inputs, valid)
        targets = self._targets(inputs, valid)
        layout = self.target.layout(tuple(inputs[self.encoder.in_domains[0]].shape[-2:]))
        roles = self._roles(batch, layout, tok.tokens.shape[0])
        views, per_view, aux = [], [], []
        for v in range(roles.shape[1]):
            view = self._encode_view(tok.tokens, roles[:, v])
            extra = self.encoder.pop_aux_loss()
            if extra is not None:
                aux.append(extra.float())
            preds = self._predict_view(view, roles[:, v], layout)
            with torch.autocast(targets.device.type, enabled=False):
                per_view.append(self._view_losses(*preds, targets, layout))
            views.append(view)
        with torch.autocast(targets.device.type, enabled=False):
            out = {f"patch_disc_{g}": torch.stack([pv[g] for pv in per_view]).mean() for g in self.groups}
            out["patch_disc"] = torch.stack([sum(pv.values()) for pv in per_view]).mean()
            usable = views[0]["has_encoder"] & views[-1]["has_encoder"]
            out["infonce"] = info_nce(views[0]["pooled"], views[-1]["pooled"], self.contrastive_temperature, usable)
            out["loss"] = out["patch_disc"] + self.contrastive_weight * out["infonce"]
            if aux:
                out["aux"] = torch.stack(aux).mean()
                out["loss"] = out["loss"] + out["aux"]
        return out

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def pictures(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """What ``utils.visualize`` draws for kind ``latent`` (view 0 of ``batch``).

        Returns:
            ``{"kind": "latent", "rgb": float (B, 3, H, W) z-scored Sentinel-2 B04, B03, B02 or None,
            "rgb_valid": bool (B, H, W) or None, "grids": {domain: (h, w)}, "roles": {domain: int (B, N_d)},
            "similarity": {domain: float (B, N_d)}, cosine between prediction and target at decoder tokens
            (NaN elsewhere), "hit": {domain: bool (B, N_d)}, True where a decoder token's prediction is closest
            to its own target among its group's decoder targets of the sample, "tokens": {in_domain: float
            (B, N_d, D)} the encoder's output with every token visible}``.
        """
        inputs, valid = batch["inputs"], batch.get("valid")
        tok = self.encoder.tokenize(inputs, valid)
        targets = self._targets(inputs, valid)
        layout = self.target.layout(tuple(inputs[self.encoder.in_domains[0]].shape[-2:]))
        roles = self._roles(batch, layout, tok.tokens.shape[0])[:, 0]
        view = self._encode_view(tok.tokens, roles)
        preds, ids_query, query_valid = self._predict_view(view, roles, layout)
        b, n = roles.shape
        sim = torch.full((b, n), float("nan"), device=roles.device)
        hit = torch.zeros(b, n, dtype=torch.bool, device=roles.device)
        if preds is not None:
            p = F.normalize(preds.float(), dim=-1)
            t = F.normalize(torch.gather(targets, 1, ids_query[..., None].expand(-1, -1, targets.shape[-1])), dim=-1)
            cos = torch.einsum("bqd,bkd->bqk", p, t)  # (B, Q, Q)
            group_of = torch.empty(n, dtype=torch.long, device=roles.device)
            for gi, doms in enumerate(self.groups.values()):
                for d in doms:
                    group_of[layout[d].slice] = gi
            g = group_of[ids_query]
            same = (g[:, :, None] == g[:, None, :]) & query_valid[:, None, :]
            best = cos.masked_fill(~same, float("-inf")).argmax(dim=-1)
            own = torch.arange(ids_query.shape[1], device=roles.device)[None]
            rows = torch.arange(b, device=roles.device)[:, None].expand_as(ids_query)
            sim[rows[query_valid], ids_query[query_valid]] = cos.diagonal(dim1=1, dim2=2)[query_valid]
            hit[rows[query_valid], ids_query[query_valid]] = (best == own)[query_valid]
        self.encoder.pop_aux_loss()
        encoded = self.encoder.encode(inputs, valid=valid)
        self.encoder.pop_aux_loss()
        enc_layout = self.encoder.layout(tuple(inputs[self.encoder.in_domains[0]].shape[-2:]))
        rgb, rgb_valid = _rgb(inputs, valid, self.domains)
        return {
            "kind": "latent", "rgb": rgb, "rgb_valid": rgb_valid,
            "grids": {s.domain: s.grid for s in layout.segments},
            "roles": layout.split(roles), "similarity": layout.split(sim), "hit": layout.split(hit),
            "tokens": {d: x.float() for d, x in enc_layout.split(encoded[:, :enc_layout.num_tokens]).items()},
        }


def _rgb(inputs: dict, valid: dict | None, domains: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Sentinel-2 B04, B03, B02 (B, 3, H, W) from the first domain that holds all three, else (None, None)."""
    for d in domains:
        dom = DOMAINS[d]
        if dom.modality == "sentinel2" and {"B04", "B03", "B02"} <= set(dom.bands):
            idx = [dom.bands.index(b) for b in ("B04", "B03", "B02")]
            return inputs[d][:, idx].float(), None if valid is None else valid.get(d)
    return None, None
