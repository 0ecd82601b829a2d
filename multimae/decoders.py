"""Spatial cross-attention decoders, one per output domain.

Follows MultiMAE's ``SpatialOutputAdapter`` (Bachmann et al., ECCV 2022, section 3.3), as used by
the MultiMAE-EO reference (dim 128, 2 blocks, 8 heads):

1. The encoder output (B, K + G, D) is projected to the decoder width Dd.
2. Every token position of every input domain gets a fixed 2-D sin-cos position embedding plus a
   learned per-domain embedding (owned by this decoder); masked positions hold a learned mask token.
3. **Queries**: this decoder's own domain segment (N_d tokens: visible features at their places,
   mask tokens elsewhere). A decode-only domain (an output that is not an input) uses mask token +
   position + its own domain embedding as queries; an output-only domain with a ``source``
   (``s2_rgb_normpix``) uses its source's segment.
4. **Context**: the K visible tokens (with their embeddings) and the G projected global tokens.
5. Pre-norm cross-attention of the queries over the context, then a residual MLP, then
   ``depth`` timm self-attention blocks, then a linear layer to C * p * p values per token,
   un-patchified to (B, C, H, W) (or to K class logits at 1 / ``label_downsample`` resolution).

Residual around the cross-attention (a decision; the reference has none): ``x = q + xattn(q, ctx)``.
With it, a visible query keeps its own encoded feature and the block is the standard pre-norm
transformer decoder layer; without it a query's own content reaches the output only through
attention. It adds no parameters, so the parameter count matches the reference.

Position embedding: by default the sin-cos table of the token grid. With ``pos_embed_grid`` it is
the sin-cos table of that base grid resized to the token grid, bilinear by default, as MultiMAE's
``SpatialOutputAdapter`` does (28 x 28 for its 224 px default at patch 8), for context and queries.

Domain embeddings are looked up by domain name (``domain_embeds.<domain>``) for each segment, so a
checkpoint's names say which segment an embedding belongs to.

Initialisation: the mask token and the domain embeddings start from a truncated normal (std 0.02),
as MAE initialises its mask token; the reference MultiMAE starts the mask token at zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from multimae.pos_embed import PosEmbedMode, check_pos_embed_mode, grid_pos_embed

__all__ = ["CrossAttention", "SpatialDecoder"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Nq, D) over a context (B, Nc, D), fused SDPA kernel.

    Args:
        dim: Token width D (queries and context).
        num_heads: Attention heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"model.decoder_heads {num_heads} must divide model.decoder_dim {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attend from ``x`` (B, Nq, D) to ``context`` (B, Nc, D); returns (B, Nq, D)."""
        b, nq, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, nq, h, d // h).transpose(1, 2)  # (B, h, Nq, d/h)
        k, v = self.kv(context).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Nc, d/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Nq, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class SpatialDecoder(nn.Module):
    """Cross-attention decoder reconstructing one output domain from the visible tokens.

    Args:
        name: Output domain name (error messages).
        encoder_dim: Width D of the encoder tokens.
        context_domains: The input domains, in the order their tokens are concatenated.
        query_domain: Domain whose token segment provides the queries: the output domain itself,
            its ``source`` for output-only domains, or a domain not in ``context_domains``
            (decode-only: queries are mask token + position + its domain embedding).
        out_channels: Channels C of the prediction (bands, or K classes for a class map).
        out_patch_size: Output pixels per token side p (patch size, or patch size / label_downsample).
        input_size: Image side in pixels the position embedding buffer is built for.
        patch_size: Input patch side P in pixels (token grid = input_size / P).
        dim: Decoder width Dd.
        depth: Self-attention blocks after the cross-attention.
        num_heads: Heads of the cross-attention and of the blocks.
        mlp_ratio: MLP hidden width / Dd.
        xattn_residual: Residual connection around the cross-attention (module docstring); False is
            MultiMAE's ``SpatialOutputAdapter``.
        pos_embed_grid: None: sin-cos computed on the token grid. A grid (tokens per side, e.g. 28):
            the sin-cos table of that grid resized to the token grid with ``pos_embed_mode``.
        pos_embed_mode: ``bilinear`` (MultiMAE's decoders) or ``bicubic``; used only with
            ``pos_embed_grid``.
    """

    def __init__(
        self,
        name: str,
        *,
        encoder_dim: int,
        context_domains: Sequence[str],
        query_domain: str,
        out_channels: int,
        out_patch_size: int,
        input_size: int,
        patch_size: int,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        xattn_residual: bool = True,
        pos_embed_grid: int | tuple[int, int] | None = None,
        pos_embed_mode: PosEmbedMode = "bilinear",
    ) -> None:
        super().__init__()
        check_pos_embed_mode(pos_embed_mode, f"decoder {name!r}: pos_embed_mode")
        self.name = name
        self.dim = dim
        self.context_domains = list(context_domains)
        self.query_domain = query_domain
        self.out_channels = out_channels
        self.out_patch_size = out_patch_size
        self.xattn_residual = xattn_residual
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.pos_embed_grid = pos_embed_grid
        self.pos_embed_mode = pos_embed_mode

        # Segment order: the context domains, then a decode-only query domain. ParameterDict sorts the
        # keys of a plain dict, so the order is kept here and embeddings are looked up by name.
        self.embed_domains = self.context_domains + ([] if query_domain in self.context_domains else [query_domain])
        self.context_proj = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.domain_embeds = nn.ParameterDict({d: nn.Parameter(torch.zeros(1, 1, dim)) for d in self.embed_domains})
        self.register_buffer("pos_embed", self._pos_table(self.grid), persistent=False)  # (N, Dd)

        self.query_norm = _LayerNorm(dim)
        self.context_norm = _LayerNorm(dim)
        self.xattn = CrossAttention(dim, num_heads)
        self.mlp_norm = _LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_LayerNorm) for _ in range(depth)
        )
        self.head = nn.Linear(dim, out_channels * out_patch_size**2)

        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for p in self.domain_embeds.values():
            nn.init.trunc_normal_(p, std=0.02)

    def _pos_table(self, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        """(N, Dd) position embedding of ``grid``: sin-cos on it, or the resized base-grid table."""
        return grid_pos_embed(grid, self.dim, base_grid=self.pos_embed_grid, mode=self.pos_embed_mode, device=device)

    def _pos(self, grid: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed.to(ref.dtype)
        return self._pos_table(grid, ref.device).to(ref.dtype)

    def stacked_domain_embeds(self) -> torch.Tensor:
        """Domain embeddings in segment order (``embed_domains``): (n_embed, 1, Dd)."""
        return torch.cat([self.domain_embeds[d] for d in self.embed_domains], dim=0)

    def forward(
        self,
        encoded: torch.Tensor,
        ids_keep: torch.Tensor,
        ids_restore: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """Reconstruct the output domain.

        Args:
            encoded: Encoder output (B, K + G, D): K visible tokens, then G global tokens.
            ids_keep: int64 (B, K), positions of the visible tokens among the N = n * N_d input
                tokens (see :func:`multimae.masking.mask_to_ids`).
            ids_restore: int64 (B, N), index of each position in ``[visible, masked]`` order.
            grid: Token grid (h, w) of every domain, N_d = h * w.

        Returns:
            (B, C, h * p, w * p): pixel values, or class logits for a class map.
        """
        b, k = ids_keep.shape
        n_d = grid[0] * grid[1]
        x = self.context_proj(encoded)  # (B, K + G, Dd)
        visible, global_tokens = x[:, :k], x[:, k:]

        pos = self._pos(grid, x)  # (N_d, Dd)
        embeds = self.stacked_domain_embeds()  # (n_embed, 1, Dd)
        embeds = (pos.unsqueeze(0) + embeds.to(x.dtype)).flatten(0, 1)  # (n_embed * N_d, Dd), segment order
        context = torch.cat([visible + embeds[ids_keep], global_tokens], dim=1)  # (B, K + G, Dd)

        if self.query_domain in self.context_domains:
            seg = self.context_domains.index(self.query_domain)
            seg_ids = ids_restore[:, seg * n_d : (seg + 1) * n_d]  # (B, N_d)
            tokens = torch.cat([visible, self.mask_token.expand(b, ids_restore.shape[1] - k, -1)], dim=1)
            queries = torch.gather(tokens, 1, seg_ids.unsqueeze(-1).expand(-1, -1, self.dim))
        else:  # decode-only: no tokens of this domain were encoded
            seg = len(self.context_domains)
            queries = self.mask_token.expand(b, n_d, -1)
        queries = queries + embeds[seg * n_d : (seg + 1) * n_d]  # (B, N_d, Dd)

        attended = self.xattn(self.query_norm(queries), self.context_norm(context))
        x = queries + attended if self.xattn_residual else attended
        x = x + self.mlp(self.mlp_norm(x))
        for block in self.blocks:
            x = block(x)
        x = self.head(x)  # (B, N_d, C * p * p)
        p = self.out_patch_size
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p)


# ---------------------------------------------------------------------- all decoders in one pass
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-decoder linear layer: x (E, M, Din), weight (E, Dout, Din), bias (E, Dout) -> (E, M, Dout)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-decoder LayerNorm over the last dim: x (E, ..., D), weight / bias (E, D)."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight.view(shape) + bias.view(shape)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Fused attention for E * B sequences: q (E, B, Nq, D), k / v (E, B, Nk, D) -> (E, B, Nq, D)."""
    e, b, nq, d = q.shape
    split = lambda t: t.reshape(e * b, t.shape[2], heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (E * B, h, Nq, d / h)
    return out.transpose(1, 2).reshape(e, b, nq, d)


def can_batch(decoders: Sequence[SpatialDecoder]) -> bool:
    """True if the decoders share every size, so :func:`decode_all` can run them as one batch."""
    first = decoders[0]
    signature = lambda d: (  # noqa: E731
        d.dim, len(d.blocks), d.xattn.num_heads, d.mlp.fc1.out_features, d.context_domains, d.xattn_residual,
        d.grid, d.query_norm.eps, d.pos_embed_grid, d.pos_embed_mode,
    )
    return all(signature(d) == signature(first) for d in decoders)


def decode_all(
    decoders: Sequence[SpatialDecoder],
    encoded: torch.Tensor,
    ids_keep: torch.Tensor,
    ids_restore: torch.Tensor,
    grid: tuple[int, int],
) -> list[torch.Tensor]:
    """Run E same-sized decoders as one batch; same result as calling each decoder's ``forward``.

    Each decoder keeps its own parameters (``output_adapters.<domain>.*``); they are stacked per
    forward pass, so every layer becomes one batched matrix product (``baddbmm``) over the E
    decoders instead of E small ones: about E-fold fewer kernel launches (meant for GPUs, where
    launches dominate 49 queries of width 128). On a 2-core CPU the stacking costs more than it
    saves (BENCHMARKS.md), so :class:`~multimae.model.MultiMAE` uses it on GPUs only.

    Args:
        decoders: Decoders with equal sizes and context domains (see :func:`can_batch`).
        encoded: Encoder output (B, K + G, D).
        ids_keep: int64 (B, K).
        ids_restore: int64 (B, N).
        grid: Token grid (h, w).

    Returns:
        One prediction per decoder, as :meth:`SpatialDecoder.forward` returns it.
    """
    first = decoders[0]
    stack = lambda get: torch.stack([get(d) for d in decoders])  # noqa: E731
    e, dim, eps, heads = len(decoders), first.dim, first.query_norm.eps, first.xattn.num_heads
    b, k = ids_keep.shape
    n, n_d, n_ctx = ids_restore.shape[1], grid[0] * grid[1], len(first.context_domains)

    # Context projection of all decoders in one GEMM: (B, K + G, D) -> (E, B, K + G, Dd).
    w = torch.cat([d.context_proj.weight for d in decoders])  # (E * Dd, D)
    x = F.linear(encoded, w, torch.cat([d.context_proj.bias for d in decoders]))
    x = x.view(b, -1, e, dim).permute(2, 0, 1, 3)
    visible, global_tokens = x[:, :, :k], x[:, :, k:]

    # Embedding tables (E, n_ctx + 1, N_d, Dd): position + domain embedding; row n_ctx = decode-only domain.
    zero = encoded.new_zeros(1, 1, dim)
    embeds = stack(lambda d: torch.cat([d.stacked_domain_embeds()] + [zero] * (n_ctx + 1 - len(d.embed_domains))))
    table = first._pos(grid, x).unsqueeze(0).unsqueeze(0) + embeds.to(x.dtype)  # (E, n_ctx + 1, N_d, Dd)
    context = torch.cat([visible + table.flatten(1, 2)[:, ids_keep], global_tokens], dim=2)  # (E, B, K + G, Dd)

    # Queries: each decoder's own segment; an extra mask-token slot (index N) serves decode-only decoders.
    segs = torch.tensor(
        [d.context_domains.index(d.query_domain) if d.query_domain in d.context_domains else n_ctx for d in decoders],
        device=ids_restore.device,
    )
    slots = torch.cat([visible, stack(lambda d: d.mask_token[0]).unsqueeze(1).expand(e, b, n - k + 1, dim)], dim=2)
    ids = torch.cat([ids_restore, ids_restore.new_full((b, n_d), n)], dim=1).view(b, n_ctx + 1, n_d)
    ids = ids[:, segs].permute(1, 0, 2)  # (E, B, N_d)
    queries = torch.gather(slots, 2, ids.unsqueeze(-1).expand(-1, -1, -1, dim))
    queries = queries + table[torch.arange(e, device=segs.device), segs].unsqueeze(1)  # (E, B, N_d, Dd)

    # Cross-attention + MLP, then the self-attention blocks, all on (E, B * N_d, Dd).
    def norm(t, get):
        return _layer_norm(t, stack(lambda d: get(d).weight), stack(lambda d: get(d).bias), eps)

    def lin(t, get):
        return _linear(t, stack(lambda d: get(d).weight), stack(lambda d: get(d).bias))

    qn = norm(queries, lambda d: d.query_norm).flatten(1, 2)
    cn = norm(context, lambda d: d.context_norm).flatten(1, 2)
    q = lin(qn, lambda d: d.xattn.q).view(e, b, n_d, dim)
    kv = lin(cn, lambda d: d.xattn.kv).view(e, b, -1, 2, dim)
    attended = lin(_attention(q, kv[..., 0, :], kv[..., 1, :], heads).flatten(1, 2), lambda d: d.xattn.proj)
    x = queries.flatten(1, 2) + attended if first.xattn_residual else attended
    x = x + lin(F.gelu(lin(norm(x, lambda d: d.mlp_norm), lambda d: d.mlp.fc1)), lambda d: d.mlp.fc2)
    for i in range(len(first.blocks)):
        blk = lambda d, i=i: d.blocks[i]  # noqa: E731
        qkv = lin(norm(x, lambda d: blk(d).norm1), lambda d: blk(d).attn.qkv).view(e, b, n_d, 3, dim)
        x = x + lin(_attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], heads).flatten(1, 2),
                    lambda d: blk(d).attn.proj)
        x = x + lin(F.gelu(lin(norm(x, lambda d: blk(d).norm2), lambda d: blk(d).mlp.fc1)),
                    lambda d: blk(d).mlp.fc2)

    x = x.view(e, b, n_d, dim)
    outs = []
    for j, d in enumerate(decoders):  # heads differ in width
        p = d.out_patch_size
        outs.append(rearrange(d.head(x[j]), "b (h w) (c p q) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p))
    return outs
