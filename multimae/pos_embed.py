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
"""

from __future__ import annotations

import torch

__all__ = ["grid_coords", "sincos_pos_embed_2d", "sincos_pos_embed_coords"]


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
