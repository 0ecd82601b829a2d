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

from multimae.pos_embed import sincos_pos_embed_2d

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
        xattn_residual: Residual connection around the cross-attention (module docstring).
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
    ) -> None:
        super().__init__()
        self.name = name
        self.dim = dim
        self.context_domains = list(context_domains)
        self.query_domain = query_domain
        self.out_channels = out_channels
        self.out_patch_size = out_patch_size
        self.xattn_residual = xattn_residual
        self.grid = (input_size // patch_size, input_size // patch_size)

        embed_domains = self.context_domains + ([] if query_domain in self.context_domains else [query_domain])
        self.context_proj = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.domain_embeds = nn.ParameterDict({d: nn.Parameter(torch.zeros(1, 1, dim)) for d in embed_domains})
        self.register_buffer("pos_embed", sincos_pos_embed_2d(*self.grid, dim), persistent=False)  # (N, Dd)

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

    def _pos(self, grid: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed.to(ref.dtype)
        return sincos_pos_embed_2d(*grid, self.dim, device=ref.device, dtype=ref.dtype)

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
        embeds = torch.cat([p for p in self.domain_embeds.values()], dim=0)  # (n_embed, 1, Dd)
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
