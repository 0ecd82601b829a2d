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
image size simply builds its own.
"""

from __future__ import annotations

import torch

__all__ = ["sincos_pos_embed_2d"]


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
