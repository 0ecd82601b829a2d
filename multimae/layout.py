"""The token layout: which tokens of the encoder sequence belong to which domain, and where they lie.

The encoder concatenates the tokens of its input domains (in ``in_domains`` order) into one sequence of
N tokens, then appends G global tokens. A :class:`TokenLayout` describes that sequence once, so that
masking, decoders, heads and pictures never assume that every domain has the same number of tokens:

* a **grid segment** (a pixel-level domain) holds ``h * w`` patch tokens in row-major order, one per
  ``patch_size`` x ``patch_size`` pixel patch; domains may have their own patch size, so their grids may
  differ in size although they cover the same image;
* a **non-grid segment** (image-level values such as latitude, longitude or time of year) holds a few
  tokens with no place on the image (``grid`` is None).

Positions are given in *base-patch units*: the centre of patch (r, c) of a domain with patch size p lies
at ``(r + 0.5) * p / p0 - 0.5`` (and the same for c), with p0 the encoder's base patch size. Domains with
the base patch size get plain integer grid indices; a domain with 16 px patches on an 8 px base sits
between the base patches it covers, so every domain's position embedding agrees on the ground.

The layout is plain data (no tensors of the model) and round-trips through :meth:`TokenLayout.to_dict`
for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from multimae.pos_embed import grid_coords

__all__ = ["Segment", "TokenLayout"]


@dataclass(frozen=True)
class Segment:
    """One domain's run of tokens in the encoder sequence.

    Attributes:
        domain: Domain name (registry name).
        start: Index of the segment's first token in the sequence of N patch tokens.
        num_tokens: Tokens N_d of the segment.
        grid: (h, w) patch rows and columns of a grid segment; None for image-level tokens.
        patch_size: Patch side in pixels (grid segments), else None.
        gsd: Ground sample distance of the domain's input pixels in metres, or None when unknown.
    """

    domain: str
    start: int
    num_tokens: int
    grid: tuple[int, int] | None = None
    patch_size: int | None = None
    gsd: float | None = None

    @property
    def stop(self) -> int:
        """One past the segment's last token."""
        return self.start + self.num_tokens

    @property
    def slice(self) -> slice:
        """``slice(start, stop)`` over the patch-token axis."""
        return slice(self.start, self.stop)

    @property
    def is_grid(self) -> bool:
        """True for a segment of patch tokens on the image grid."""
        return self.grid is not None

    @property
    def patch_metres(self) -> float | None:
        """Ground side of one patch in metres (``patch_size * gsd``), None when either is unknown."""
        if self.patch_size is None or self.gsd is None:
            return None
        return self.patch_size * self.gsd


@dataclass(frozen=True)
class TokenLayout:
    """The sequence of patch tokens the encoder sees, domain by domain, plus its global tokens.

    Attributes:
        segments: One :class:`Segment` per input domain, in sequence order (``start`` increasing, no gaps).
        num_global_tokens: G learned tokens appended after the N patch tokens.
        base_patch_size: Patch side p0 in pixels that positions are measured in.
        image_size: (H, W) pixels of the image the grid segments cover; None without grid segments.
    """

    segments: tuple[Segment, ...]
    num_global_tokens: int = 1
    base_patch_size: int = 8
    image_size: tuple[int, int] | None = None
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index, pos = {}, 0
        for seg in self.segments:
            if seg.domain in index:
                raise ValueError(f"token layout lists domain {seg.domain!r} twice")
            if seg.start != pos or seg.num_tokens < 1:
                raise ValueError(f"token layout: segment {seg.domain!r} starts at {seg.start}, expected {pos}")
            if seg.grid is not None and seg.grid[0] * seg.grid[1] != seg.num_tokens:
                raise ValueError(f"token layout: segment {seg.domain!r} has {seg.num_tokens} tokens, grid {seg.grid}")
            index[seg.domain] = seg
            pos = seg.stop
        object.__setattr__(self, "_index", index)

    @classmethod
    def build(cls, entries, *, num_global_tokens: int = 1, base_patch_size: int = 8,
              image_size: tuple[int, int] | None = None) -> "TokenLayout":
        """Lay segments end to end.

        Args:
            entries: ``(domain, num_tokens, grid, patch_size, gsd)`` per domain, in sequence order.
            num_global_tokens: G.
            base_patch_size: p0 in pixels.
            image_size: (H, W) of the grid segments' image.
        """
        segments, start = [], 0
        for domain, num_tokens, grid, patch_size, gsd in entries:
            segments.append(Segment(domain, start, int(num_tokens), None if grid is None else tuple(grid),
                                    patch_size, gsd))
            start += int(num_tokens)
        return cls(tuple(segments), num_global_tokens, base_patch_size, image_size)

    # ------------------------------------------------------------------ lookups
    @property
    def domains(self) -> list[str]:
        """Domain names in sequence order."""
        return [s.domain for s in self.segments]

    @property
    def num_tokens(self) -> int:
        """N, the patch tokens of all segments (global tokens excluded)."""
        return self.segments[-1].stop if self.segments else 0

    @property
    def tokens_per_domain(self) -> list[int]:
        """N_d of each segment, in sequence order."""
        return [s.num_tokens for s in self.segments]

    def __getitem__(self, domain: str) -> Segment:
        try:
            return self._index[domain]
        except KeyError:
            raise KeyError(f"domain {domain!r} is not in the token layout ({', '.join(self.domains)})") from None

    def __contains__(self, domain: str) -> bool:
        return domain in self._index

    def grid_segments(self) -> list[Segment]:
        """The segments of patch tokens on the image grid, in sequence order."""
        return [s for s in self.segments if s.is_grid]

    def split(self, x: torch.Tensor, dim: int = 1) -> dict[str, torch.Tensor]:
        """Cut a tensor along its token axis into one piece per domain.

        Args:
            x: Tensor whose ``dim`` axis holds the N patch tokens (global tokens, if any, are ignored).
            dim: The token axis.

        Returns:
            {domain: x restricted to the domain's tokens along ``dim``}.
        """
        return {s.domain: x.narrow(dim, s.start, s.num_tokens) for s in self.segments}

    def coords(self, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Patch-centre positions of every grid token in base-patch units (see the module docstring).

        Returns:
            float64 (N, 2): (row, column) per patch token in sequence order; NaN rows for non-grid tokens.
        """
        out = torch.full((self.num_tokens, 2), float("nan"), dtype=torch.float64, device=device)
        for seg in self.grid_segments():
            out[seg.slice] = grid_coords(seg.grid, seg.patch_size / self.base_patch_size, device=device)
        return out

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Plain-type description (for checkpoints and ``config.json`` exports)."""
        return {
            "segments": [{"domain": s.domain, "num_tokens": s.num_tokens, "grid": list(s.grid) if s.grid else None,
                          "patch_size": s.patch_size, "gsd": s.gsd} for s in self.segments],
            "num_global_tokens": self.num_global_tokens,
            "base_patch_size": self.base_patch_size,
            "image_size": list(self.image_size) if self.image_size else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TokenLayout":
        """Inverse of :meth:`to_dict`."""
        entries = [(s["domain"], s["num_tokens"], s["grid"], s["patch_size"], s["gsd"]) for s in data["segments"]]
        size = data.get("image_size")
        return cls.build(entries, num_global_tokens=data["num_global_tokens"],
                         base_patch_size=data["base_patch_size"], image_size=tuple(size) if size else None)

    def describe(self) -> list[str]:
        """One text line per segment, e.g. ``s2_rgb: 49 tokens, grid 7 x 7, patch 8 px (80 m)``."""
        lines = []
        for s in self.segments:
            if s.is_grid:
                metres = f" ({s.patch_metres:g} m)" if s.patch_metres is not None else ""
                lines.append(f"{s.domain}: {s.num_tokens} tokens, grid {s.grid[0]} x {s.grid[1]}, "
                             f"patch {s.patch_size} px{metres}")
            else:
                lines.append(f"{s.domain}: {s.num_tokens} tokens, image-level (no grid position)")
        lines.append(f"global: {self.num_global_tokens} tokens, last in the sequence")
        return lines

