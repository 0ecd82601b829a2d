"""Task heads for fine-tuning and probing the MultiMAE encoder.

Pure torch. The heads read the encoder's output tokens, (B, sum N_d + M + G, D): N_d patch tokens per input
domain (in ``in_domains`` order), M metadata tokens (encoders with ``model.metadata``), then G global tokens.

* :class:`LinearHead` (classification, multi-label): pool the tokens (:func:`pool_tokens`: mean over all tokens
  including the metadata and global ones, or the first global token), normalise, Linear. Fine-tuning (``norm="layer"``):
  LayerNorm, as EPFL MultiMAE's ``LinearOutputAdapter`` (Bachmann et al., ECCV 2022;
  ``multimae/output_adapters.py``), with a small-scale initialisation. Linear probe (``norm="batch"``):
  BatchNorm without affine parameters, then the Linear layer (trunc-normal std 0.01), as MAE's linear probe
  (He et al., CVPR 2022, ``main_linprobe.py``): the frozen features are standardised, the probe stays linear.
* :class:`ConvNeXtSegHead` (segmentation): the patch tokens of every input domain are concatenated along
  the channel axis, a Linear maps each token to a ``upsample x upsample`` block of sub-patch features,
  a few ConvNeXt blocks (``timm.models.convnext.ConvNeXtBlock``) refine the (H / P * upsample) grid, a
  1 x 1 convolution gives class logits and a bilinear resize brings them to the pixel grid. The same
  design as EPFL MultiMAE's ``ConvNeXtAdapter``, smaller by default.
* :class:`LinearSegHead` (segmentation linear probe): the same linear (1 x 1) map on every token of the token
  grid to K logits, bilinearly upsampled to the pixel grid; normalised as :class:`LinearHead`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import nn

__all__ = ["POOLS", "NORMS", "pool_tokens", "LinearHead", "ConvNeXtSegHead", "LinearSegHead"]

#: Token poolings (config key ``finetune.pool``).
POOLS = ("mean", "global")
#: Feature normalisations of the linear heads: ``layer`` (LayerNorm, fine-tuning), ``batch`` (BatchNorm without
#: affine parameters, linear probes).
NORMS = ("layer", "batch")


def pool_tokens(tokens: torch.Tensor, pool: str, num_global_tokens: int) -> torch.Tensor:
    """(B, N + G, D) encoder tokens -> (B, D) embedding: ``mean`` of all tokens (metadata and global ones
    included) or the first ``global`` token (the heads, kNN and the logistic probe pool the same way).

    Raises:
        ValueError: unknown ``pool`` or ``global`` pooling without global tokens.
    """
    _check_pool(pool, num_global_tokens)
    if pool == "mean":
        return tokens.mean(dim=1)
    return tokens[:, -num_global_tokens]


def _check_pool(pool: str, num_global_tokens: int) -> None:
    if pool not in POOLS:
        raise ValueError(f"finetune.pool must be 'mean' or 'global', got {pool!r}")
    if pool == "global" and num_global_tokens < 1:
        raise ValueError("finetune.pool 'global' needs model.num_global_tokens >= 1")


def _norm(kind: str, dim: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"head norm must be one of {', '.join(NORMS)}, got {kind!r}")
    # eps 1e-6 as MAE's probe BatchNorm
    return nn.LayerNorm(dim) if kind == "layer" else nn.BatchNorm1d(dim, affine=False, eps=1e-6)


class LinearHead(nn.Module):
    """Pooled tokens -> normalisation -> Linear, for classification and multi-label classification.

    Args:
        dim: Token width D.
        num_classes: Output logits K.
        pool: ``mean`` (all tokens, global ones included) or ``global`` (the first global token).
        num_global_tokens: G, the global tokens at the end of the sequence (``global`` pooling needs >= 1).
        norm: ``layer`` (LayerNorm, fine-tuning) or ``batch`` (BatchNorm1d without affine, MAE's linear probe).
        init_std: Std of the trunc-normal init of the Linear weight (MAE's probe: 0.01; EPFL fine-tuning:
            0.02 x 0.001, small logits at start keep the layer-decayed encoder stable).

    Raises:
        ValueError: unknown ``pool`` or ``norm``, or ``global`` pooling without global tokens.
    """

    def __init__(self, *, dim: int, num_classes: int, pool: str = "mean", num_global_tokens: int = 1,
                 norm: str = "layer", init_std: float = 0.02) -> None:
        super().__init__()
        _check_pool(pool, num_global_tokens)
        self.pool, self.num_global_tokens = pool, num_global_tokens
        self.norm = _norm(norm, dim)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N + G, D) encoder tokens -> (B, D) embedding (before the normalisation), see :func:`pool_tokens`."""
        return pool_tokens(tokens, self.pool, self.num_global_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N + G, D) encoder tokens -> (B, K) logits."""
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
    """Linear segmentation head: one linear (1 x 1) map of every token to K logits, upsampled to the pixels.

    The token grids of the input domains are concatenated along the channel axis (n * D features per token),
    normalised (``batch``: BatchNorm without affine parameters, statistics over every token of the batch;
    ``layer``: LayerNorm), mapped to K logits by one Linear shared by all tokens (a 1 x 1 convolution on the
    (h, w) grid) and bilinearly resized to (h * P, w * P). With ``norm="batch"`` the only trainable
    parameters are the Linear's: a linear probe.

    Args:
        dim: Token width D.
        num_classes: Output classes K.
        num_domains: Number of input domains whose token grids are concatenated.
        patch_size: Patch side P in pixels.
        norm: ``batch`` (linear probe) or ``layer``.

    Raises:
        ValueError: an unknown ``norm``.
    """

    def __init__(self, *, dim: int, num_classes: int, num_domains: int, patch_size: int, norm: str = "batch") -> None:
        super().__init__()
        self.patch_size, self.num_domains = patch_size, num_domains
        self.norm = _norm(norm, dim * num_domains)
        self.fc = nn.Linear(dim * num_domains, num_classes)
        trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, grids: list[torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
        """Same contract as :meth:`ConvNeXtSegHead.forward`: grids -> (B, K, h * P, w * P) logits."""
        x = _concat_grids(grids, grid_size, self.num_domains)  # (B, h*w, n*D)
        b, n, c = x.shape
        x = self.fc(self.norm(x.reshape(b * n, c)))  # (B*h*w, K): BatchNorm1d wants (samples, C)
        h, w = grid_size
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, K, h, w)
        return F.interpolate(x, size=(h * self.patch_size, w * self.patch_size), mode="bilinear", align_corners=False)


def _concat_grids(grids: list[torch.Tensor], grid_size: tuple[int, int], num_domains: int) -> torch.Tensor:
    """Check and concatenate per-domain token grids: n x (B, h*w, D) -> (B, h*w, n*D)."""
    if len(grids) != num_domains:
        raise ValueError(f"segmentation head built for {num_domains} input domains, got {len(grids)} token grids")
    n = grid_size[0] * grid_size[1]
    for g in grids:
        if g.shape[1] != n:
            raise ValueError(f"a token grid holds {g.shape[1]} tokens, expected {n} for grid {tuple(grid_size)}")
    return torch.cat(grids, dim=-1)
