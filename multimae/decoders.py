"""Spatial cross-attention decoders, one per output domain.

Follows MultiMAE's ``SpatialOutputAdapter`` (Bachmann et al., ECCV 2022, section 3.3), as used by
the MultiMAE-EO reference (dim 128, 2 blocks, 8 heads):

1. The encoder output (B, K + G, D) is projected to the decoder width Dd.
2. Every token position of every input domain gets a fixed 2-D sin-cos position embedding (of its
   patch centre, :mod:`multimae.layout`) plus a learned per-domain embedding (owned by this decoder,
   looked up by domain name); masked positions hold a learned mask token.
3. **Queries**: this decoder's own domain segment of the token layout (N_d tokens: visible features at
   their places, mask tokens elsewhere). A decode-only domain (an output that is not an input) uses mask token +
   position + its own domain embedding as queries; an output-only domain with a ``source``
   (``s2_rgb_normpix``) uses its source's segment.
4. **Context**: the K visible tokens (with their embeddings) and the G projected global tokens.
5. Pre-norm cross-attention of the queries over the context, then a residual MLP, then
   ``depth`` timm self-attention blocks, then a linear layer to C * p * p values per token,
   un-patchified to (B, C, H, W) (or to K class logits at 1 / ``label_downsample`` resolution).
   Domains may have different patch sizes: the context covers every domain's segment, the queries
   lie on this decoder's own grid.

Residual around the cross-attention (a decision; the reference has none): ``x = q + xattn(q, ctx)``.
With it, a visible query keeps its own encoded feature and the block is the standard pre-norm
transformer decoder layer; without it a query's own content reaches the output only through
attention. It adds no parameters, so the parameter count matches the reference.

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

from multimae.layout import TokenLayout
from multimae.pos_embed import PosEmbedMode, check_pos_embed_mode, grid_coords, grid_pos_embed, sincos_pos_embed_coords

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
            raise ValueError(f"decoder heads {num_heads} must divide the decoder width {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``x`` (B, Nq, D) to ``context`` (B, Nc, D); returns (B, Nq, D).

        ``context_valid`` (bool (B, Nc), optional): False marks context padding, which no query attends to;
        every sample needs at least one True entry.
        """
        b, nq, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, nq, h, d // h).transpose(1, 2)  # (B, h, Nq, d/h)
        k, v = self.kv(context).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Nc, d/h)
        mask = None if context_valid is None else context_valid.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Nq, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class SpatialDecoder(nn.Module):
    """Cross-attention decoder reconstructing one output domain from the visible tokens.

    Args:
        name: Output domain name (error messages).
        encoder_dim: Width D of the encoder tokens.
        context_domains: The input domains, in the order of their segments in the token layout.
        query_domain: Domain whose token segment provides the queries: the output domain itself,
            its ``source`` for output-only domains, or a domain not in ``context_domains``
            (decode-only: queries are mask token + position + its domain embedding).
        out_channels: Channels C of the prediction (bands, or K classes for a class map).
        out_patch_size: Output pixels per token side p (patch size, or patch size / label_downsample).
        patch_size: Patch side P in pixels of the query domain's tokens (its grid = image side / P).
        base_patch_size: The encoder's base patch size p0, the unit of positions (default: P).
        dim: Decoder width Dd.
        depth: Self-attention blocks after the cross-attention.
        num_heads: Heads of the cross-attention and of the blocks.
        mlp_ratio: MLP hidden width / Dd.
        xattn_residual: Residual connection around the cross-attention (module docstring); False is
            MultiMAE's ``SpatialOutputAdapter``.
        pos_embed_grid: None: sin-cos of the patch centres. A grid (tokens per side, e.g. 28): every grid
            segment's embedding is the sin-cos table of that grid resized to the segment's grid with
            ``pos_embed_mode`` (MultiMAE's convention).
        pos_embed_mode: ``bilinear`` (MultiMAE's decoders) or ``bicubic``; used only with ``pos_embed_grid``.
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
        patch_size: int,
        base_patch_size: int | None = None,
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
        self.pos_embed_grid, self.pos_embed_mode = pos_embed_grid, pos_embed_mode
        self.name = name
        self.dim = dim
        self.context_domains = list(context_domains)
        self.query_domain = query_domain
        self.out_channels = out_channels
        self.out_patch_size = out_patch_size
        self.patch_size = patch_size
        self.base_patch_size = base_patch_size or patch_size
        self.xattn_residual = xattn_residual

        embed_domains = self.context_domains + ([] if query_domain in self.context_domains else [query_domain])
        self.context_proj = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Insertion order (a list, not a dict: ParameterDict sorts a dict's keys) = segment order, so the
        # random draws of the initialisation go to the segments in layout order.
        self.domain_embeds = nn.ParameterDict([(d, nn.Parameter(torch.zeros(1, 1, dim))) for d in embed_domains])
        self._pos_cache: dict = {}

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

    def query_grid(self, layout: TokenLayout) -> tuple[int, int]:
        """(h, w) tokens of this decoder's queries for an image of ``layout.image_size``."""
        if self.query_domain in layout:
            return layout[self.query_domain].grid
        h, w = layout.image_size
        return h // self.patch_size, w // self.patch_size

    def _table(self, grid: tuple[int, int] | None, ref: torch.Tensor) -> torch.Tensor:
        """The resized base-grid table (h * w, Dd) of a grid (``pos_embed_grid`` set)."""
        if grid is None:
            raise ValueError(f"decoder {self.name!r}: pos_embed_grid needs grid segments only")
        return grid_pos_embed(grid, self.dim, base_grid=self.pos_embed_grid, mode=self.pos_embed_mode,
                              device=ref.device).to(ref.dtype)

    def _embeddings(self, layout: TokenLayout, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position + domain embeddings (N, Dd) of every context token and (N_q, Dd) of the queries."""
        key = (layout, ref.device, ref.dtype)
        pos = self._pos_cache.get(key)
        if pos is None:
            if self.pos_embed_grid is None:
                context_pos = sincos_pos_embed_coords(layout.coords(device=ref.device), self.dim).to(ref.dtype)
            else:
                context_pos = torch.cat([self._table(seg.grid, ref) for seg in layout.segments])
            if self.query_domain in layout:
                query_pos = context_pos[layout[self.query_domain].slice]
            elif self.pos_embed_grid is None:
                scale = self.patch_size / self.base_patch_size
                coords = grid_coords(self.query_grid(layout), scale, device=ref.device)
                query_pos = sincos_pos_embed_coords(coords, self.dim).to(ref.dtype)
            else:
                query_pos = self._table(self.query_grid(layout), ref)
            pos = self._pos_cache[key] = (context_pos, query_pos)
        context_pos, query_pos = pos
        context = torch.cat([context_pos[seg.slice] + self.domain_embeds[seg.domain][0].to(ref.dtype)
                             for seg in layout.segments])  # (N, Dd)
        return context, query_pos + self.domain_embeds[self.query_domain][0].to(ref.dtype)

    def forward(
        self,
        encoded: torch.Tensor,
        ids_keep: torch.Tensor,
        ids_restore: torch.Tensor,
        layout: TokenLayout,
    ) -> torch.Tensor:
        """Reconstruct the output domain.

        Args:
            encoded: Encoder output (B, K + G, D): K visible tokens, then G global tokens.
            ids_keep: int64 (B, K), positions of the visible tokens among the N input tokens (see
                :func:`multimae.masking.mask_to_ids`).
            ids_restore: int64 (B, N), index of each position in ``[visible, masked]`` order.
            layout: Token layout of the input tokens (segments in ``context_domains`` order).

        Returns:
            (B, C, h * p, w * p) for the query grid (h, w): pixel values, or class logits for a class map.
        """
        if layout.domains != self.context_domains:
            raise ValueError(f"decoder {self.name!r}: layout domains {layout.domains} differ from its context "
                             f"domains {self.context_domains}")
        b, k = ids_keep.shape
        x = self.context_proj(encoded)  # (B, K + G, Dd)
        visible, global_tokens = x[:, :k], x[:, k:]

        embeds, query_embeds = self._embeddings(layout, x)  # (N, Dd), (N_q, Dd)
        context = torch.cat([visible + embeds[ids_keep], global_tokens], dim=1)  # (B, K + G, Dd)

        grid = self.query_grid(layout)
        if self.query_domain in layout:
            seg_ids = ids_restore[:, layout[self.query_domain].slice]  # (B, N_q)
            tokens = torch.cat([visible, self.mask_token.expand(b, ids_restore.shape[1] - k, -1)], dim=1)
            queries = torch.gather(tokens, 1, seg_ids.unsqueeze(-1).expand(-1, -1, self.dim))
        else:  # decode-only: no tokens of this domain were encoded
            queries = self.mask_token.expand(b, grid[0] * grid[1], -1)
        queries = queries + query_embeds  # (B, N_q, Dd)

        attended = self.xattn(self.query_norm(queries), self.context_norm(context))
        x = queries + attended if self.xattn_residual else attended
        x = x + self.mlp(self.mlp_norm(x))
        for block in self.blocks:
            x = block(x)
        x = self.head(x)  # (B, N_q, C * p * p)
        p = self.out_patch_size
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p)
