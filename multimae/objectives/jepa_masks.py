"""Masks of the JEPA objective, built in the data-loader workers: a patch scale per batch, I-JEPA block masks on
its patch grid (the same positions for every modality) and AnySat's modality masking.

Per batch (a pure function of the batch's per-sample seeds, so the same for any worker count and on resume):

1. **Patch scale**: one patch side P (pixels) drawn uniformly from ``jepa.patch_sizes``; every modality of the
   batch is tokenized at P, on a (H / P) x (W / P) grid (AnySat draws its scale per batch the same way).
2. **Block sizes** (I-JEPA, Assran et al., CVPR 2023; the values AnySat's training module passes): one target
   block size from a scale s ~ U(target_scale) of the grid and an aspect ratio a ~ U(target_aspect)
   (height / width), and one context block size from s ~ U(context_scale) at aspect 1:
   ``h = round(sqrt(s * H * W * a))``, ``w = round(sqrt(s * H * W / a))``, at least 1. Target blocks are
   clipped to H - 1 rows and W - 1 columns, as I-JEPA clips every block, so that one never covers the grid;
   the context block may cover all of it (I-JEPA's clip would make a context scale of 1.0 unreachable).

Per sample (from the sample's own seed):

3. ``num_targets`` target blocks at uniform positions; the context is one context block at a uniform position
   minus every target position (no overlap). A draw whose context keeps fewer than ``min_context`` positions
   is redrawn (all blocks), up to ``MAX_DRAWS`` times; then the masks are refused with an error naming the
   settings. Every sample of a batch keeps the same number of context positions: the batch's smallest context,
   each sample dropping a random subset of its own (I-JEPA truncates to the smallest the same way, keeping the
   first positions in row-major order instead of a random subset). With AnySat's four targets of up to 0.8 of
   the grid the union of the targets covers most of it, so contexts are small, and the smallest of a large
   batch smaller still.
4. **Modality masking** (AnySat, ratio r = ``modality_ratio``): at every context position one random modality
   with a valid token stays; of the other (M - 1) x C tokens of the sample, ``int((M - 1) * C * (1 - r))``
   chosen at random (valid tokens first) stay too, and the rest are replaced by the objective's mask token.
   Tokens without a valid pixel never stay.

Each sample gets ``sample["jepa"]``: ``patch_size`` int64 (), ``context`` int64 (C,) grid positions (row-major,
sorted), ``targets`` int64 (T, K) grid positions of each target block (row-major within the block), ``keep``
bool (M, C) (True: the modality's real token at that context position is shown, in ``in_domains`` order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from multimae.adapters import patch_validity

__all__ = ["MAX_DRAWS", "block_size", "draw_blocks", "modality_keep", "check_masking", "JEPAMasking"]

#: Draws of the blocks of one sample before its masks are refused (a context smaller than ``min_context``).
MAX_DRAWS = 100


def block_size(rng: np.random.Generator, grid: tuple[int, int], scale: Sequence[float], aspect: Sequence[float],
               *, leave_margin: bool) -> tuple[int, int]:
    """(h, w) of a block of a (H, W) grid covering s ~ U(scale) of it at aspect h / w ~ U(aspect).

    Args:
        rng: Generator of the draws.
        grid: (H, W) positions.
        scale: (min, max) fraction of the grid.
        aspect: (min, max) height / width.
        leave_margin: Clip to H - 1 rows and W - 1 columns (target blocks) instead of H and W.

    Returns:
        (h, w), each at least 1.
    """
    s, a = rng.uniform(scale[0], scale[1]), rng.uniform(aspect[0], aspect[1])
    area = s * grid[0] * grid[1]
    margin = 1 if leave_margin else 0
    h = min(max(round(math.sqrt(area * a)), 1), max(grid[0] - margin, 1))
    w = min(max(round(math.sqrt(area / a)), 1), max(grid[1] - margin, 1))
    return h, w


def _block(rng: np.random.Generator, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Row-major positions (h * w,) of a block of ``size`` at a uniform position of ``grid``."""
    top = int(rng.integers(0, grid[0] - size[0] + 1))
    left = int(rng.integers(0, grid[1] - size[1] + 1))
    rows, cols = np.meshgrid(np.arange(top, top + size[0]), np.arange(left, left + size[1]), indexing="ij")
    return (rows * grid[1] + cols).reshape(-1)


def draw_blocks(rng: np.random.Generator, grid: tuple[int, int], target_size: tuple[int, int],
                context_size: tuple[int, int], num_targets: int, min_context: int) -> tuple[np.ndarray, np.ndarray]:
    """Target blocks and the context of one sample (module docstring, step 3).

    Returns:
        ``context`` int64 (C,) sorted positions, C >= ``min_context``; ``targets`` int64 (num_targets, h * w).

    Raises:
        ValueError: no draw of ``MAX_DRAWS`` left ``min_context`` context positions (names the settings).
    """
    for _ in range(MAX_DRAWS):
        targets = np.stack([_block(rng, grid, target_size) for _ in range(num_targets)])
        context = np.setdiff1d(_block(rng, grid, context_size), targets.reshape(-1))  # sorted
        if context.size >= min_context:
            return context.astype(np.int64), targets.astype(np.int64)
    raise ValueError(
        f"jepa.masking: {num_targets} target blocks of {target_size[0]} x {target_size[1]} on a {grid[0]} x {grid[1]} "
        f"patch grid left fewer than min_context={min_context} context positions in {MAX_DRAWS} draws; lower "
        "jepa.masking.target_scale or num_targets, or use smaller jepa.patch_sizes"
    )


def modality_keep(rng: np.random.Generator, token_valid: np.ndarray, ratio: float) -> np.ndarray:
    """Which modality tokens of the context stay real (module docstring, step 4).

    Args:
        rng: Generator of the draws.
        token_valid: bool (M, C), True where modality m has a valid pixel in the patch of context position c.
        ratio: Share of the (M - 1) x C non-anchor tokens replaced by the mask token.

    Returns:
        bool (M, C): True = the real token is shown; never True for an invalid token.
    """
    m, c = token_valid.shape
    invalid = (~token_valid).astype(np.float64)
    anchor = np.argmin(rng.random((m, c)) + 2.0 * invalid, axis=0)  # a random valid modality per position
    keep = np.zeros((m, c), dtype=bool)
    keep[anchor, np.arange(c)] = True
    n_keep = int((m - 1) * c * (1.0 - ratio))
    key = (rng.random((m, c)) + 2.0 * invalid).reshape(-1)
    key[np.flatnonzero(keep.reshape(-1))] = np.inf  # anchors are kept already
    keep.reshape(-1)[np.argsort(key, kind="stable")[:n_keep]] = True
    return keep & token_valid


def _pair(value, key: str, *, high: float, high_open: bool, why: str = "") -> tuple[float, float]:
    """``[min, max]`` with 0 < min <= max <= high (< high when ``high_open``) as floats, else a ValueError."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if ok:
        lo, hi = float(value[0]), float(value[1])
        ok = 0.0 < lo <= hi and (hi < high if high_open else hi <= high)
    if not ok:
        raise ValueError(f"{key}: expected [min, max] with 0 < min <= max {'<' if high_open else '<='} {high:g}"
                         f"{why}, got {value!r}")
    return lo, hi


def check_masking(masking: dict, patch_sizes: Sequence[int], input_size: int,
                  label_downsample: dict[str, int]) -> dict:
    """Validate the ``jepa.masking`` section and ``jepa.patch_sizes`` against the input size.

    Args:
        masking: The ``jepa.masking`` section.
        patch_sizes: ``jepa.patch_sizes``.
        input_size: ``data.input_size`` in pixels.
        label_downsample: ``{domain: label_downsample}`` of the categorical in_domains.

    Returns:
        The settings as plain floats / ints / tuples (keyword arguments of :class:`JEPAMasking`).

    Raises:
        ValueError: one clear line naming the key: a patch size that does not divide ``data.input_size`` (or a
            class map's ``label_downsample``) or gives a 1 x 1 grid, a scale or aspect outside its range, a target
            block as large as the grid (it would leave no context), a ratio outside [0, 1].
    """
    if (not isinstance(patch_sizes, (list, tuple)) or not patch_sizes
            or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch_sizes)):
        raise ValueError(f"jepa.patch_sizes: expected a non-empty list of positive pixel counts, got {patch_sizes!r}")
    for p in patch_sizes:
        if input_size % p:
            raise ValueError(f"jepa.patch_sizes: {p} px does not divide data.input_size {input_size}")
        if input_size // p < 2:
            raise ValueError(f"jepa.patch_sizes: {p} px gives a 1 x 1 grid on data.input_size {input_size}: a target "
                             "block would leave no context")
        for name, ds in label_downsample.items():
            if p % ds:
                raise ValueError(f"jepa.patch_sizes: {p} px is not divisible by the label_downsample {ds} of "
                                 f"class map {name!r}")
    context_scale = _pair(masking["context_scale"], "jepa.masking.context_scale", high=1.0, high_open=False)
    target_scale = _pair(masking["target_scale"], "jepa.masking.target_scale", high=1.0, high_open=True,
                         why=" (a target block as large as the grid would leave no context)")
    target_aspect = _pair(masking["target_aspect"], "jepa.masking.target_aspect", high=math.inf, high_open=True)
    num_targets, min_context, ratio = masking["num_targets"], masking["min_context"], masking["modality_ratio"]
    if not isinstance(num_targets, int) or isinstance(num_targets, bool) or num_targets < 1:
        raise ValueError(f"jepa.masking.num_targets: expected a positive integer, got {num_targets!r}")
    if not isinstance(min_context, int) or isinstance(min_context, bool) or min_context < 1:
        raise ValueError(f"jepa.masking.min_context: expected a positive integer, got {min_context!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"jepa.masking.modality_ratio: expected a share in [0, 1], got {ratio!r}")
    return dict(context_scale=context_scale, target_scale=target_scale, target_aspect=target_aspect,
                num_targets=num_targets, min_context=min_context, modality_ratio=float(ratio))


class JEPAMasking:
    """The objective's worker-side batch transform: ``(samples, seeds) -> samples`` with ``sample["jepa"]``.

    Picklable (plain attributes), so DataLoader workers run it (``MMEarthDataset.batch_transform``).

    Args:
        domains: in_domains, in token order (the rows of ``keep``).
        patch_sizes: Patch sides in pixels to draw the batch's scale from.
        context_scale: (min, max) grid fraction of the context block.
        num_targets: Target blocks per sample.
        target_scale: (min, max) grid fraction of each target block.
        target_aspect: (min, max) height / width of the target blocks.
        modality_ratio: Share of the non-anchor context tokens replaced by the mask token.
        min_context: Fewest context positions a draw may leave.
    """

    def __init__(self, domains: Sequence[str], patch_sizes: Sequence[int], *, context_scale: tuple[float, float],
                 num_targets: int, target_scale: tuple[float, float], target_aspect: tuple[float, float],
                 modality_ratio: float, min_context: int) -> None:
        self.domains, self.patch_sizes = list(domains), [int(p) for p in patch_sizes]
        self.context_scale, self.target_scale, self.target_aspect = context_scale, target_scale, target_aspect
        self.num_targets, self.modality_ratio, self.min_context = num_targets, modality_ratio, min_context

    def batch_draws(self, seeds: np.ndarray, image_size: tuple[int, int]) -> tuple[int, tuple[int, int],
                                                                                 tuple[int, int], tuple[int, int]]:
        """The batch's patch size, grid, target block size and context block size (a function of ``seeds``).

        Raises:
            ValueError: the image size is not divisible by the drawn patch size (names ``jepa.patch_sizes``).
        """
        rng = np.random.default_rng(np.random.SeedSequence([int(s) for s in np.asarray(seeds, dtype=np.uint64)]))
        p = self.patch_sizes[int(rng.integers(len(self.patch_sizes)))]
        if image_size[0] % p or image_size[1] % p:
            raise ValueError(f"jepa.patch_sizes: {p} px does not divide the image size "
                             f"{image_size[0]} x {image_size[1]}")
        grid = (image_size[0] // p, image_size[1] // p)
        target = block_size(rng, grid, self.target_scale, self.target_aspect, leave_margin=True)
        context = block_size(rng, grid, self.context_scale, (1.0, 1.0), leave_margin=False)
        return p, grid, target, context

    def __call__(self, samples: list[dict], seeds: np.ndarray) -> list[dict]:
        """Add ``sample["jepa"]`` (module docstring) to every sample; ``seeds`` uint64 (B,), one per sample."""
        first = samples[0]["valid"][self.domains[0]]
        p, grid, target, context = self.batch_draws(seeds, tuple(first.shape[-2:]))
        rngs = [np.random.default_rng(int(s)) for s in np.asarray(seeds, dtype=np.uint64)]
        drawn = [draw_blocks(rng, grid, target, context, self.num_targets, self.min_context) for rng in rngs]
        n_ctx = min(c.size for c, _ in drawn)
        out = []
        for sample, rng, (ctx, targets) in zip(samples, rngs, drawn):
            if ctx.size > n_ctx:
                ctx = np.sort(rng.choice(ctx, n_ctx, replace=False))
            valid = np.stack([patch_validity(sample["valid"][d][None], p)[0].numpy() for d in self.domains])
            keep = modality_keep(rng, valid[:, ctx], self.modality_ratio)
            out.append({**sample, "jepa": {"patch_size": torch.tensor(p), "context": torch.from_numpy(ctx),
                                           "targets": torch.from_numpy(targets), "keep": torch.from_numpy(keep)}})
        return out
