"""Input adapters: turn one domain's pixels into a grid of tokens for the shared encoder.

One adapter per input domain (Bachmann et al., MultiMAE, ECCV 2022, section 3.1):

* :class:`PatchAdapter` for continuous domains (any number of bands): a strided ``Conv2d`` patch
  embedding, then the fixed 2-D sin-cos position embedding of the token grid.
* :class:`CategoricalAdapter` for class maps (ESA WorldCover, Dynamic World): the (B, H, W) class
  map is majority-pooled by ``label_downsample`` (never interpolated), each class id is embedded
  (no-data gets its own zero, untrained embedding), and a strided ``Conv2d`` with kernel
  ``patch_size // label_downsample`` makes the tokens, so both kinds of domain give the same grid.

``project`` is an adapter's embedding without the position embedding (the frozen projection-only targets of
latent objectives use it); ``forward`` adds the position embedding to it.

Position embeddings are non-persistent buffers built for the grid of ``input_size`` (see
:mod:`multimae.pos_embed`); an input of another size (divisible by the patch size) gets an
embedding computed for its own grid. Positions are patch centres in units of the encoder's base
patch size (:mod:`multimae.layout`), so an adapter with a larger patch than the base places its
tokens where they lie on the ground. With ``pos_embed_grid`` set, the embedding is instead the
sin-cos table of that base grid resized to the token grid (MultiMAE's convention, needed by
weights trained with it): bicubic by default in :class:`PatchAdapter`, bilinear in
:class:`CategoricalAdapter`, the modes of MultiMAE's ``PatchedInputAdapter`` and
``SemSegInputAdapter``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multimae.domains import IGNORE_INDEX
from multimae.pos_embed import PosEmbedMode, check_pos_embed_mode, grid_coords, grid_pos_embed, sincos_pos_embed_coords

__all__ = ["PatchAdapter", "CategoricalAdapter", "majority_pool", "patch_validity"]


def majority_pool(labels: torch.Tensor, factor: int, num_classes: int) -> torch.Tensor:
    """Downsample a class map by taking the most frequent valid class in each block.

    ``IGNORE_INDEX`` pixels do not vote; a block with no valid pixel becomes ``IGNORE_INDEX``.
    Ties go to the lowest class id. Used by :class:`CategoricalAdapter` for its input and by the
    criterion for its cross-entropy targets, so both see the same pooled map.

    Args:
        labels: int64 class map (B, H, W), ids 0..K-1 or ``IGNORE_INDEX``; H and W divisible by
            ``factor``.
        factor: Block side in pixels (``Domain.label_downsample``); 1 returns ``labels`` as is.
        num_classes: Number of valid classes K.

    Returns:
        int64 class map (B, H / factor, W / factor).
    """
    if factor == 1:
        return labels
    b, h, w = labels.shape
    ids = torch.where(labels == IGNORE_INDEX, num_classes, labels)  # no-data -> extra class K
    votes = F.one_hot(ids, num_classes + 1)[..., :num_classes]  # (B, H, W, K), no-data drops out
    votes = votes.view(b, h // factor, factor, w // factor, factor, num_classes).sum(dim=(2, 4))
    count, winner = votes.max(dim=-1)  # first maximum = lowest class id on ties
    return torch.where(count > 0, winner, IGNORE_INDEX)


def patch_validity(valid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-token validity: True where a patch holds at least one valid pixel.

    Args:
        valid: bool (B, H, W), True where the pixel is valid.
        patch_size: Patch side P in pixels.

    Returns:
        bool (B, N) with N = (H / P) * (W / P), tokens in row-major order.
    """
    b, h, w = valid.shape
    blocks = valid.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size)
    return blocks.any(dim=4).any(dim=2).flatten(1)


class _GridAdapter(nn.Module):
    """Shared part of the adapters: size checks and the position embedding of the token grid."""

    def __init__(self, name: str, dim: int, patch_size: int, input_size: int, base_patch_size: int | None,
                 pos_embed_grid: int | tuple[int, int] | None = None, pos_embed_mode: PosEmbedMode = "bicubic") -> None:
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(
                f"domain {name!r}: data.input_size {input_size} is not divisible by its patch size {patch_size}"
            )
        check_pos_embed_mode(pos_embed_mode, f"domain {name!r}: pos_embed_mode")
        self.name = name
        self.dim = dim
        self.patch_size = patch_size
        self.pos_scale = patch_size / (base_patch_size or patch_size)
        self.pos_embed_grid, self.pos_embed_mode = pos_embed_grid, pos_embed_mode
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.register_buffer("pos_embed", self.position_embedding(self.grid).unsqueeze(0), persistent=False)

    def position_embedding(self, grid: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
        """(h * w, D) embedding of a (h, w) token grid: sin-cos of this adapter's patch centres, or, with
        ``pos_embed_grid``, the sin-cos table of that grid resized to (h, w) with ``pos_embed_mode``."""
        if self.pos_embed_grid is not None:
            return grid_pos_embed(grid, self.dim, base_grid=self.pos_embed_grid, mode=self.pos_embed_mode,
                                  device=device)
        return sincos_pos_embed_coords(grid_coords(grid, self.pos_scale, device=device), self.dim)

    def _check_size(self, h: int, w: int) -> tuple[int, int]:
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"domain {self.name!r}: image size {h} x {w} px is not divisible by the patch size {self.patch_size}"
            )
        return h // self.patch_size, w // self.patch_size

    def _add_pos(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if grid != self.grid:  # another image size: embed its own grid (cheap, no interpolation)
            pos = self.position_embedding(grid, tokens.device).unsqueeze(0)
        return tokens + pos.to(tokens.dtype)


class PatchAdapter(_GridAdapter):
    """Patch embedding of a continuous domain (Sentinel-2 band groups, elevation, ...).

    Args:
        name: Domain name (used in error messages).
        in_channels: Bands C of the domain.
        dim: Token width D of the encoder.
        patch_size: Patch side P in pixels.
        input_size: Image side in pixels the position embedding buffer is built for.
        base_patch_size: The encoder's base patch size p0, the unit of positions (default: P).
        pos_embed_grid: None: sin-cos of the patch centres. A grid (tokens per side, e.g. 28 for MultiMAE's
            224 px at patch 8): the sin-cos table of that grid resized to the token grid with ``pos_embed_mode``.
        pos_embed_mode: ``bicubic`` (MultiMAE's image adapters) or ``bilinear``.
    """

    def __init__(self, name: str, in_channels: int, dim: int, *, patch_size: int, input_size: int,
                 base_patch_size: int | None = None, pos_embed_grid: int | tuple[int, int] | None = None,
                 pos_embed_mode: PosEmbedMode = "bicubic") -> None:
        super().__init__(name, dim, patch_size, input_size, base_patch_size, pos_embed_grid, pos_embed_mode)
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # MAE / MultiMAE: xavier-uniform on the flattened kernel, as for a Linear layer.
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
        nn.init.zeros_(self.proj.bias)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The patch projection alone (no position embedding): (B, C, H, W) -> tokens (B, N, D), row-major.

        Raises:
            ValueError: On a wrong rank, dtype, channel count or an image size not divisible by P.
        """
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"domain {self.name!r}: expected a float tensor (B, C, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"domain {self.name!r}: expected {self.in_channels} channels, got {x.shape[1]}")
        self._check_size(x.shape[2], x.shape[3])
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed an image.

        Args:
            x: float (B, C, H, W), z-scored, invalid pixels already filled.

        Returns:
            Tokens (B, N, D) with position embedding, N = (H / P) * (W / P), row-major.

        Raises:
            ValueError: On a wrong rank, dtype, channel count or an image size not divisible by P.
        """
        tokens = self.project(x)
        return self._add_pos(tokens, self._check_size(x.shape[2], x.shape[3]))


class CategoricalAdapter(_GridAdapter):
    """Class-map adapter: majority pooling, class embedding, patch projection.

    Args:
        name: Domain name (used in error messages).
        num_classes: Valid classes K; the embedding has K + 1 rows, row K (``padding_idx``) is the
            zero embedding of ``IGNORE_INDEX`` pixels and is never trained.
        dim: Token width D of the encoder.
        patch_size: Patch side P in pixels of the full-resolution map.
        input_size: Image side in pixels the position embedding buffer is built for.
        label_downsample: Majority-pooling factor ds; P must be divisible by ds.
        class_embed_dim: Width of the class embedding.
        base_patch_size: The encoder's base patch size p0, the unit of positions (default: P).
        pos_embed_grid: As in :class:`PatchAdapter`.
        pos_embed_mode: ``bilinear`` (MultiMAE's ``SemSegInputAdapter``) or ``bicubic``; used only with
            ``pos_embed_grid``.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        dim: int,
        *,
        patch_size: int,
        input_size: int,
        label_downsample: int = 1,
        class_embed_dim: int = 64,
        base_patch_size: int | None = None,
        pos_embed_grid: int | tuple[int, int] | None = None,
        pos_embed_mode: PosEmbedMode = "bilinear",
    ) -> None:
        super().__init__(name, dim, patch_size, input_size, base_patch_size, pos_embed_grid, pos_embed_mode)
        if patch_size % label_downsample != 0:
            raise ValueError(
                f"domain {name!r}: model.patch_size {patch_size} is not divisible by its label_downsample "
                f"{label_downsample}"
            )
        self.num_classes = num_classes
        self.label_downsample = label_downsample
        self.class_embed = nn.Embedding(num_classes + 1, class_embed_dim, padding_idx=num_classes)
        sub_patch = patch_size // label_downsample
        self.proj = nn.Conv2d(class_embed_dim, dim, kernel_size=sub_patch, stride=sub_patch)
        nn.init.trunc_normal_(self.class_embed.weight, std=0.02)
        with torch.no_grad():
            self.class_embed.weight[num_classes].zero_()
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
        nn.init.zeros_(self.proj.bias)

    def pool(self, labels: torch.Tensor) -> torch.Tensor:
        """Majority-pool a (B, H, W) class map by ``label_downsample`` (see :func:`majority_pool`)."""
        return majority_pool(labels, self.label_downsample, self.num_classes)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embed a class map.

        Args:
            labels: Integer class map (B, H, W), ids 0..K-1 or ``IGNORE_INDEX`` (-1).

        Returns:
            Tokens (B, N, D) with position embedding, N = (H / P) * (W / P), row-major.

        Raises:
            ValueError: On a floating-point or boolean map, a wrong rank, a size not divisible by P
                or class ids outside -1..K-1.
        """
        tokens = self.project(labels)
        return self._add_pos(tokens, self._check_size(labels.shape[1], labels.shape[2]))

    def project(self, labels: torch.Tensor) -> torch.Tensor:
        """Pooling, class embedding and patch projection alone (no position embedding): (B, H, W) -> (B, N, D).

        Raises:
            ValueError: As :meth:`forward`.
        """
        if labels.ndim != 3 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"domain {self.name!r}: expected an int64 class map (B, H, W), got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        self._check_size(labels.shape[1], labels.shape[2])
        labels = labels.long()
        # A data-dependent check cannot be part of a traced or exported graph (ONNX); it runs in eager mode.
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if not tracing and bool(((labels < IGNORE_INDEX) | (labels >= self.num_classes)).any()):
            raise ValueError(
                f"domain {self.name!r}: class ids must lie in 0..{self.num_classes - 1} or be {IGNORE_INDEX} (no-data)"
            )
        pooled = self.pool(labels)  # (B, H/ds, W/ds)
        ids = torch.where(pooled == IGNORE_INDEX, self.num_classes, pooled)
        emb = self.class_embed(ids).permute(0, 3, 1, 2)  # (B, E, H/ds, W/ds)
        return self.proj(emb).flatten(2).transpose(1, 2)  # (B, N, D)
