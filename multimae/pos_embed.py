"""Fixed 2-D sine-cosine position embeddings for a grid of patch tokens.

The construction follows MoCo v3 (Chen et al., 2021) as used by MAE and MultiMAE: D / 4
frequencies ``omega_k = 1 / temperature ** (k / (D / 4))`` for ``k = 0 .. D/4 - 1``, and the
channels of a token at grid row ``r`` and column ``c`` are, in this order::

    [sin(r * omega), cos(r * omega), sin(c * omega), cos(c * omega)]

i.e. the first half of the channels encodes the row, the second half the column. This is the
channel order the MultiMAE-EO reference ends up with (its reference defect 32 is only that it is
undocumented); encoder and decoders use the same function, so the order is consistent everywhere.

The embeddings are built once for the actual token grid (``input_size / patch_size`` per side) and
kept as non-persistent buffers: they are not stored in checkpoints and a model built for another
image size simply builds its own. :func:`sincos_pos_embed_coords` embeds arbitrary (row, column)
positions, e.g. the patch centres of a domain whose patch size differs from the base patch size
(:mod:`multimae.layout`); on integer grid indices it equals :func:`sincos_pos_embed_2d`.

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
    "grid_coords",
    "grid_pos_embed",
    "resize_pos_embed_2d",
    "resized_sincos_pos_embed_2d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_coords",
]

#: Interpolation modes a base-grid table can be resized with.
POS_EMBED_MODES = ("bilinear", "bicubic")

PosEmbedMode = Literal["bilinear", "bicubic"]


def grid_coords(grid: tuple[int, int], scale: float = 1.0, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Patch-centre (row, column) positions of a row-major grid, in units of a base patch.

    Args:
        grid: (h, w) patches.
        scale: This grid's patch size / the base patch size. The centre of patch (r, c) lies at
            ``((r + 0.5) * scale - 0.5, (c + 0.5) * scale - 0.5)``; scale 1 gives the integer indices exactly.
        device: Device of the result.

    Returns:
        float64 (h * w, 2), row-major.
    """
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64, device=device),
                                torch.arange(grid[1], dtype=torch.float64, device=device), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)
    if scale != 1.0:
        coords = (coords + 0.5) * scale - 0.5
    return coords


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
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"sin-cos position embedding needs a non-empty grid, got {grid_h} x {grid_w}")
    coords = grid_coords((grid_h, grid_w), device=device)
    return sincos_pos_embed_coords(coords, dim, temperature=temperature, dtype=dtype)


def sincos_pos_embed_coords(
    coords: torch.Tensor,
    dim: int,
    *,
    temperature: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sin-cos embedding of (row, column) positions, with the channel layout of :func:`sincos_pos_embed_2d`.

    Args:
        coords: (N, 2) positions (row, column) in patch units; fractional values are allowed. Computed
            in float64.
        dim: Embedding width D; must be divisible by 4.
        temperature: Base of the frequency ladder.
        dtype: dtype of the result.

    Returns:
        (N, D) on the device of ``coords``, channels ``[sin(row), cos(row), sin(col), cos(col)]``.

    Raises:
        ValueError: If ``dim`` is not divisible by 4 or ``coords`` is not (N, 2).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"sin-cos position embedding needs (N, 2) coordinates, got {tuple(coords.shape)}")
    coords = coords.to(torch.float64)
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64, device=coords.device) / quarter)
    r = coords[:, :1] * omega  # (N, D/4)
    c = coords[:, 1:] * omega  # (N, D/4)
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
