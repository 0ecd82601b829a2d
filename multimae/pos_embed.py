"""Fixed 2-D sine-cosine position embeddings for a grid of patch tokens.

The construction follows MoCo v3 (Chen et al., 2021) as used by MAE and MultiMAE: D / 4
frequencies ``omega_k = 1 / temperature ** (k / (D / 4))`` for ``k = 0 .. D/4 - 1``, and the
channels of a token at grid row ``r`` and column ``c`` are, in this order::

    [sin(r * omega), cos(r * omega), sin(c * omega), cos(c * omega)]

i.e. the first half of the channels encodes the row, the second half the column. This is the
channel order the MultiMAE-EO reference ends up with (its reference defect 32 is only that it is
undocumented); encoder and decoders use the same function, so the order is consistent everywhere.

By default the embeddings are built once for the actual token grid (``input_size / patch_size``
per side) and kept as non-persistent buffers: they are not stored in checkpoints and a model built
for another image size simply builds its own.

Base-grid tables (:func:`resized_sincos_pos_embed_2d`, :func:`grid_pos_embed` with ``base_grid``):
MultiMAE (Bachmann et al., ECCV 2022) and the MultiMAE-EO reference build every table on the grid
of a fixed 224 px image (28 x 28 tokens at patch 8) and resize it to the actual token grid with
``torch.nn.functional.interpolate`` (``align_corners=False``) on every forward pass: bicubic in the
image input adapters, bilinear in the class-map input adapter and in the decoders. The resized
table is far from one computed on the actual grid, so weights trained with it need it back; the
option reproduces it (computed once per grid instead of on every forward pass).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "POS_EMBED_MODES",
    "check_pos_embed_mode",
    "grid_pos_embed",
    "resize_pos_embed_2d",
    "resized_sincos_pos_embed_2d",
    "sincos_pos_embed_2d",
]

#: Interpolation modes a base-grid table can be resized with.
POS_EMBED_MODES = ("bilinear", "bicubic")

PosEmbedMode = Literal["bilinear", "bicubic"]


def sincos_pos_embed_2d(
    grid_h: int,
    grid_w: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the 2-D sin-cos position embedding of a ``grid_h x grid_w`` token grid.

    Args:
        grid_h: Token rows (image height / patch size).
        grid_w: Token columns (image width / patch size).
        dim: Embedding width D; must be divisible by 4.
        temperature: Base of the frequency ladder.
        device: Device of the result.
        dtype: dtype of the result.

    Returns:
        Tensor of shape (grid_h * grid_w, D), tokens in row-major order (row 0 first), channels
        ``[sin(row), cos(row), sin(col), cos(col)]``, each block D / 4 wide.

    Raises:
        ValueError: If ``dim`` is not divisible by 4 or the grid is empty.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"sin-cos position embedding needs a non-empty grid, got {grid_h} x {grid_w}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64, device=device),
        torch.arange(grid_w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    r = rows.reshape(-1, 1) * omega  # (N, D/4)
    c = cols.reshape(-1, 1) * omega  # (N, D/4)
    emb = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)  # (N, D)
    return emb.to(dtype)


def _pair(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def check_pos_embed_mode(mode: str, key: str = "pos_embed_mode") -> None:
    """Raise ``ValueError`` naming ``key`` unless ``mode`` is one of :data:`POS_EMBED_MODES`."""
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"{key} must be one of {', '.join(POS_EMBED_MODES)}, got {mode!r}")


def resize_pos_embed_2d(
    table: torch.Tensor, base_grid: int | tuple[int, int], grid: int | tuple[int, int], mode: PosEmbedMode
) -> torch.Tensor:
    """Resize a position-embedding table from one token grid to another.

    ``torch.nn.functional.interpolate`` of the table laid out as a (1, D, H0, W0) image, with
    ``align_corners=False``, as MultiMAE does at run time; the same grid returns the table unchanged.

    Args:
        table: (H0 * W0, D), tokens row-major over the base grid.
        base_grid: Base grid (H0, W0) (an int for a square grid).
        grid: Target grid (H, W).
        mode: ``bilinear`` or ``bicubic``.

    Returns:
        (H * W, D) in ``table``'s dtype, tokens row-major.

    Raises:
        ValueError: On an unknown mode or a table whose length does not match ``base_grid``.
    """
    check_pos_embed_mode(mode)
    (h0, w0), (h, w) = _pair(base_grid), _pair(grid)
    if table.ndim != 2 or table.shape[0] != h0 * w0:
        raise ValueError(f"position table of shape {tuple(table.shape)} does not match a {h0} x {w0} grid")
    if (h, w) == (h0, w0):
        return table
    image = table.T.reshape(1, table.shape[1], h0, w0)  # (1, D, H0, W0)
    out = F.interpolate(image, size=(h, w), mode=mode, align_corners=False)  # (1, D, H, W)
    return out.flatten(2)[0].T.contiguous()


def resized_sincos_pos_embed_2d(
    base_grid: int | tuple[int, int],
    grid: int | tuple[int, int],
    dim: int,
    mode: PosEmbedMode,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sin-cos table of ``base_grid`` resized to ``grid`` (MultiMAE's run-time position embedding).

    Built and resized in float64, then cast to ``dtype``.

    Args:
        base_grid: Grid (H0, W0) the table is built on, e.g. 28 (224 px at patch 8).
        grid: Token grid (H, W) of the input.
        dim: Embedding width D, divisible by 4.
        mode: ``bilinear`` or ``bicubic``.
        device: Device of the result.
        dtype: dtype of the result.

    Returns:
        (H * W, D), tokens row-major.
    """
    h0, w0 = _pair(base_grid)
    table = sincos_pos_embed_2d(h0, w0, dim, device=device, dtype=torch.float64)
    return resize_pos_embed_2d(table, (h0, w0), grid, mode).to(dtype)


def grid_pos_embed(
    grid: tuple[int, int],
    dim: int,
    *,
    base_grid: int | tuple[int, int] | None = None,
    mode: PosEmbedMode = "bicubic",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position embedding of a token grid: sin-cos on ``grid`` itself, or a resized base-grid table.

    Args:
        grid: Token grid (H, W).
        dim: Embedding width D.
        base_grid: None computes the sin-cos table on ``grid``; a grid resizes the table of that
            grid to ``grid`` with ``mode`` (:func:`resized_sincos_pos_embed_2d`).
        mode: Resize mode, used only with ``base_grid``.
        device: Device of the result.
        dtype: dtype of the result.

    Returns:
        (H * W, D), tokens row-major.
    """
    if base_grid is None:
        return sincos_pos_embed_2d(*grid, dim, device=device, dtype=dtype)
    return resized_sincos_pos_embed_2d(base_grid, grid, dim, mode, device=device, dtype=dtype)
