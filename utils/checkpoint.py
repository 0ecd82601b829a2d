"""Checkpoints: atomic save, loading with ``weights_only=True``, RNG states, checked state-dict loads.

A checkpoint is a dict of plain types (tensors, numbers, strings, lists, dicts), so
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects. It is
written to ``<name>.tmp`` next to its destination, flushed to disk, then renamed over the
destination with ``os.replace``; a crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "resume_path",
    "rng_state",
    "set_rng_state",
    "load_state_checked",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """Read a checkpoint onto the CPU with ``weights_only=True``; with ``kind``, check its ``"kind"`` key.

    Raises:
        CheckpointError: the file is missing or cannot be read (truncated, not a checkpoint, or
            holding types outside ``weights_only``), or is not of ``kind``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    found = state.get("kind") if isinstance(state, dict) else type(state).__name__
    if kind is not None and found != kind:
        raise CheckpointError(f"{path} is a {found!r} checkpoint, not {kind!r}")
    return state


def resume_path(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, per config key ``resume``.

    ``auto``: ``<output_dir>/checkpoint-last.pth`` if it exists, else None; ``never``: None;
    anything else is a checkpoint path.

    Raises:
        CheckpointError: an explicit path that does not exist.
    """
    if resume == "never":
        return None
    if resume == "auto":
        last = Path(output_dir) / "checkpoint-last.pth"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"config key 'resume': checkpoint {path} not found")
    return path


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's RNG states as plain types: Python, numpy, torch CPU, every CUDA device, and
    the named extra ``generators`` (e.g. a DataLoader's)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what ``rng_state`` captured (CUDA states only when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], *, what: str = "model",
                       ignore_missing: Iterable[str] = (), ignore_unexpected: Iterable[str] = ()) -> None:
    """Load a state dict and fail with the exact key differences (MAE's strict=False + assert).

    Args:
        module: Destination module.
        state: Source state dict.
        what: Name used in the error message (``"model"``, ``"encoder"``...).
        ignore_missing: Key prefixes allowed to be absent from ``state`` (e.g. a new head).
        ignore_unexpected: Key prefixes of ``state`` allowed to have no destination (e.g. decoders).

    Raises:
        CheckpointError: keys are missing, unexpected or have other shapes; the message lists them.
    """
    own = module.state_dict()
    skip_missing, skip_unexpected = tuple(ignore_missing), tuple(ignore_unexpected)
    missing = [k for k in own if k not in state and not k.startswith(skip_missing or ("\0",))]
    unexpected = [k for k in state if k not in own and not k.startswith(skip_unexpected or ("\0",))]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{what} state does not match the checkpoint (another model shape or domain set?)"]
        for title, keys in (("missing in checkpoint", missing), ("not in model", unexpected),
                            ("shape differs", shapes)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
