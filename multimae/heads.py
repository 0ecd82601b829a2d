"""Task heads for fine-tuning and probing the MultiMAE encoder.

Pure torch. The heads read the encoder's output tokens, (B, sum N_d + G, D): N_d patch tokens per input
domain (in ``in_domains`` order) followed by G global tokens.

* :class:`LinearHead` (classification, multi-label): pool the tokens (mean over all tokens including the
  global ones, or the first global token), LayerNorm, Linear. As EPFL MultiMAE's ``LinearOutputAdapter``
  (Bachmann et al., ECCV 2022; ``multimae/output_adapters.py``), with a small-scale initialisation.
* :class:`ConvNeXtSegHead` (segmentation): the patch tokens of every input domain are concatenated along
  the channel axis, a Linear maps each token to a ``upsample x upsample`` block of sub-patch features,
  a few ConvNeXt blocks (``timm.models.convnext.ConvNeXtBlock``) refine the (H / P * upsample) grid, a
  1 x 1 convolution gives class logits and a bilinear resize brings them to the pixel grid. The same
  design as EPFL MultiMAE's ``ConvNeXtAdapter``, smaller by default.
* :class:`LinearSegHead` (segmentation linear probe): one Linear per token to K x P x P logits, rearranged
  into the pixel grid (OlmoEarth's segmentation linear probe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import nn

__all__ = ["LinearHead", "ConvNeXtSegHead", "LinearSegHead"]


class LinearHead(nn.Module):
    """Pooled tokens -> LayerNorm -> Linear, for classification and multi-label classification.

    Args:
        dim: Token width D.
        num_classes: Output logits K.
        pool: ``mean`` (all tokens, global ones included) or ``global`` (the first global token).
        num_global_tokens: G, the global tokens at the end of the sequence (``global`` pooling needs >= 1).
        init_scale: Multiplier on the trunc-normal(0.02) init of the Linear weight (EPFL uses 0.001 for
            full fine-tuning; small logits at start keep the layer-decayed encoder stable).

    Raises:
        ValueError: unknown ``pool`` or ``global`` pooling without global tokens.
    """

    def __init__(
        self, *, dim: int, num_classes: int, pool: str = "mean", num_global_tokens: int = 1, init_scale: float = 1.0
    ) -> None:
        super().__init__()
        if pool not in ("mean", "global"):
            raise ValueError(f"finetune.pool must be 'mean' or 'global', got {pool!r}")
        if pool == "global" and num_global_tokens < 1:
            raise ValueError("finetune.pool 'global' needs model.num_global_tokens >= 1")
        self.pool, self.num_global_tokens = pool, num_global_tokens
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        with torch.no_grad():
            self.fc.weight.mul_(init_scale)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) encoder tokens -> (B, D) embedding (before the LayerNorm); used by kNN too."""
        if self.pool == "mean":
            return tokens.mean(dim=1)
        return tokens[:, -self.num_global_tokens]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) encoder tokens -> (B, K) logits."""
        return self.fc(self.norm(self.pool_tokens(tokens)))


class ConvNeXtSegHead(nn.Module):
    """Token grids of several domains -> per-pixel class logits, with a light ConvNeXt decoder.

    Args:
        dim: Token width D.
        num_classes: Output classes K.
        num_domains: Number of input domains n whose token grids are concatenated (n * D channels).
        patch_size: Patch side P in pixels; the logits come out at (h * P, w * P).
        hidden_dim: Channels C of the decoder feature map.
        upsample: Each token becomes an ``upsample x upsample`` block of features (EPFL: 4); P must be
            divisible by it.
        depth: Number of ConvNeXt blocks (EPFL: 4).

    Raises:
        ValueError: ``patch_size`` not divisible by ``upsample``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_classes: int,
        num_domains: int,
        patch_size: int,
        hidden_dim: int = 96,
        upsample: int = 4,
        depth: int = 2,
    ) -> None:
        super().__init__()
        if patch_size % upsample:
            raise ValueError(f"patch size {patch_size} is not divisible by the head's upsample factor {upsample}")
        self.patch_size, self.upsample, self.num_domains = patch_size, upsample, num_domains
        self.proj = nn.Linear(dim * num_domains, hidden_dim * upsample * upsample)
        self.blocks = nn.Sequential(*(ConvNeXtBlock(hidden_dim) for _ in range(depth)))
        self.classifier = nn.Conv2d(hidden_dim, num_classes, kernel_size=1)

    def forward(self, grids: list[torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
        """Decode token grids into logits.

        Args:
            grids: ``num_domains`` tensors (B, h * w, D), the patch tokens of each input domain in
                row-major grid order.
            grid_size: (h, w), tokens per column and row.

        Returns:
            (B, K, h * P, w * P) class logits.

        Raises:
            ValueError: wrong number of grids or a grid whose token count is not h * w.
        """
        x = _concat_grids(grids, grid_size, self.num_domains)  # (B, h*w, n*D)
        h, w = grid_size
        x = self.proj(x)  # (B, h*w, C*u*u)
        x = rearrange(x, "b (h w) (c u v) -> b c (h u) (w v)", h=h, w=w, u=self.upsample, v=self.upsample)
        x = self.classifier(self.blocks(x))  # (B, K, h*u, w*u)
        return F.interpolate(x, size=(h * self.patch_size, w * self.patch_size), mode="bilinear", align_corners=False)


class LinearSegHead(nn.Module):
    """Linear segmentation probe: each token -> K x P x P logits of the pixels it covers.

    Args:
        dim: Token width D.
        num_classes: Output classes K.
        num_domains: Number of input domains whose token grids are concatenated.
        patch_size: Patch side P in pixels.
    """

    def __init__(self, *, dim: int, num_classes: int, num_domains: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size, self.num_domains = patch_size, num_domains
        self.norm = nn.LayerNorm(dim * num_domains)
        self.fc = nn.Linear(dim * num_domains, num_classes * patch_size * patch_size)

    def forward(self, grids: list[torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
        """Same contract as :meth:`ConvNeXtSegHead.forward`: grids -> (B, K, h * P, w * P) logits."""
        x = self.fc(self.norm(_concat_grids(grids, grid_size, self.num_domains)))  # (B, h*w, K*P*P)
        h, w = grid_size
        p = self.patch_size
        return rearrange(x, "b (h w) (k p q) -> b k (h p) (w q)", h=h, w=w, p=p, q=p)


def _concat_grids(grids: list[torch.Tensor], grid_size: tuple[int, int], num_domains: int) -> torch.Tensor:
    """Check and concatenate per-domain token grids: n x (B, h*w, D) -> (B, h*w, n*D)."""
    if len(grids) != num_domains:
        raise ValueError(f"segmentation head built for {num_domains} input domains, got {len(grids)} token grids")
    n = grid_size[0] * grid_size[1]
    for g in grids:
        if g.shape[1] != n:
            raise ValueError(f"a token grid holds {g.shape[1]} tokens, expected {n} for grid {tuple(grid_size)}")
    return torch.cat(grids, dim=-1)
