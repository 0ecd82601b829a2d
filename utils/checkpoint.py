"""Checkpoints: atomic save, loading with ``weights_only=True``, RNG states, checked state-dict loads.

A checkpoint is a dict of plain types (tensors, numbers, strings, lists, dicts), so
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects. It is
written to ``<name>.tmp`` next to its destination, flushed to disk, then renamed over the
destination with ``os.replace``; a crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import subprocess
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


# ---------------------------------------------------------------------- checkpoint format v2
#: Version of the checkpoint layout this code writes (docs/DESIGN.md "Checkpoint contract").
FORMAT_VERSION = 2
#: Versions it reads: 1 (written before objectives were plug-ins, converted on read) and 2.
READABLE_VERSIONS = (1, 2)
_V1_KINDS = {"multimae_pretraining": "pretraining", "multimae_finetuning": "finetuning"}


def encoder_entry(encoder: nn.Module, domains: dict | None = None) -> dict:
    """The ``encoder`` entry of a v2 checkpoint: everything needed to rebuild and use the encoder.

    Args:
        encoder: A :class:`multimae.encoder.MultiModalEncoder`.
        domains: Per-domain band names, units and normalisation statistics the data used (the datasets'
            ``domain_info()``), or None.

    Returns:
        ``{"spec": architecture, "layout": token layout at the spec's input size, "domains": ...,
        "state_dict": weights}``.
    """
    return {"spec": encoder.spec, "layout": encoder.layout().to_dict(), "domains": domains or {},
            "state_dict": encoder.state_dict()}


def read_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """Load a checkpoint (:func:`load_checkpoint`), convert a v1 one to v2, and check its version and kind.

    Args:
        path: The checkpoint file.
        kind: ``pretraining`` or ``finetuning`` to require that kind.

    Returns:
        A v2 checkpoint dict (``format_version`` 2).

    Raises:
        CheckpointError: unreadable, an unknown ``format_version`` (names the file, the version and the
            readable ones), or another kind.
    """
    path = Path(path)
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this code base (a {type(state).__name__})")
    version = state.get("format_version", 1 if state.get("kind") in _V1_KINDS else None)
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r} is not one this code reads "
                              f"({', '.join(map(str, READABLE_VERSIONS))}); a newer code version wrote it?")
    if version == 1:
        state = upgrade_v1(state, path)
    if kind is not None and state.get("kind") != kind:
        raise CheckpointError(f"{path} is a {state.get('kind')!r} checkpoint, not {kind!r}")
    return state


def _v1_rename(key: str, in_domains: list[str]) -> str:
    """New name of a v1 model parameter (``MultiMAE`` keys, no wrapper prefix)."""
    from multimae.domains import DOMAINS

    if key.startswith("encoder."):
        return "encoder.blocks." + key[len("encoder."):]
    if key.startswith(("input_adapters.", "domain_embeds.", "global_tokens")):
        return "encoder." + key
    if key.startswith("output_adapters."):
        _, domain, rest = key.split(".", 2)
        if rest.startswith("domain_embeds."):
            # v1 decoders kept their domain embeddings in a ParameterDict built from a dict, i.e. sorted by
            # name, and added them to the segments in context order: the embedding named sorted[i] served
            # segment i. Name each by the segment it served, so the by-name lookup computes the same thing.
            query = DOMAINS[domain].source or domain
            embed = in_domains + ([] if query in in_domains else [query])
            rest = "domain_embeds." + embed[sorted(embed).index(rest[len("domain_embeds."):])]
        return f"decoders.{domain}.{rest}"
    return key


def upgrade_v1(state: dict, path: str | Path = "checkpoint") -> dict:
    """Convert a v1 checkpoint (``kind`` ``multimae_pretraining`` / ``multimae_finetuning``) to v2.

    Model keys move to the encoder (``input_adapters``, ``blocks`` (was ``encoder``), ``global_tokens``,
    ``domain_embeds``) and, for pretraining, to the objective (``decoders`` (was ``output_adapters``, domain
    embeddings renamed to the domain they served), ``criterion``); the optimizer's parameter names follow; the
    config is migrated (:func:`utils.config.migrate_config`). The converted checkpoint computes exactly what
    the v1 one did.

    Raises:
        CheckpointError: a key the conversion does not know (names it and the file).
    """
    from multimae.build import build_encoder
    from utils.config import migrate_config

    kind = _V1_KINDS[state["kind"]]
    cfg = migrate_config(state["config"])
    prefix = "model." if kind == "finetuning" else ""
    model = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state["model"].items()}
    in_domains = list(state.get("in_domains") or cfg["in_domains"])
    renamed = {}
    for key, value in model.items():
        if kind == "finetuning" and key.startswith("head."):
            renamed[key] = value
            continue
        new = _v1_rename(key, in_domains)
        if new == key:
            raise CheckpointError(f"{path}: v1 checkpoint key {prefix}{key!r} has no v2 counterpart")
        renamed[new] = value
    if kind == "pretraining":
        renamed.update({f"criterion.{k}": v for k, v in state.get("criterion", {}).items()})
    encoder_sd = {k[len("encoder."):]: v for k, v in renamed.items() if k.startswith("encoder.")}
    spec = build_encoder(cfg, in_domains=in_domains, init_weights=False).spec
    out = {k: v for k, v in state.items() if k not in ("model", "criterion", "domains", "kind")}
    out.update(format_version=FORMAT_VERSION, kind=kind, config=cfg,
               encoder={"spec": spec, "layout": None, "domains": state.get("domains", {}), "state_dict": encoder_sd})
    if kind == "pretraining":
        out["objective"] = {"name": "multimae",
                            "state_dict": {k: v for k, v in renamed.items() if not k.startswith("encoder.")}}
    else:
        out["head"] = {"state_dict": {k[len("head."):]: v for k, v in renamed.items() if k.startswith("head.")}}
    if "optimizer" in out:
        out["optimizer"] = _rename_optimizer(out["optimizer"], in_domains, kind)
    return out


def _rename_optimizer(opt_state: dict, in_domains: list[str], kind: str) -> dict:
    """A v1 optimizer state with its param groups' ``names`` in v2 names (the order is matched on load)."""
    groups = []
    for group in opt_state["param_groups"]:
        names = []
        for name in group.get("names", []):
            if kind == "finetuning":
                new = name if name.startswith("head.") else _v1_rename(name[len("model."):], in_domains)
            elif name.startswith("model."):
                new = _v1_rename(name[len("model."):], in_domains)
            else:
                new = name  # criterion.*
            names.append(new)
        groups.append({**group, "names": names})
    return {**opt_state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, matching parameters by their names when both sides have them.

    Param groups hold a ``names`` list (:func:`utils.optim.param_groups`); a saved state whose groups name
    the same parameters in another order (a converted v1 checkpoint) is reordered to the optimizer's order.

    Raises:
        CheckpointError: the saved groups name other parameters than the optimizer's (lists a few).
    """
    saved, own = state["param_groups"], optimizer.param_groups
    if (all("names" in g for g in saved) and all("names" in g for g in own)
            and [g["names"] for g in saved] != [g["names"] for g in own]):
        index = {name: pid for g in saved for name, pid in zip(g["names"], g["params"])}
        missing = [n for g in own for n in g["names"] if n not in index]
        if missing or len(saved) != len(own):
            raise CheckpointError("optimizer state does not match the model's parameters: "
                                  + (f"missing {', '.join(missing[:5])}" if missing else "the group count differs"))
        per_param, groups, new_id = {}, [], 0
        for g_saved, g_own in zip(saved, own):
            params = []
            for name in g_own["names"]:
                if index[name] in state["state"]:
                    per_param[new_id] = state["state"][index[name]]
                params.append(new_id)
                new_id += 1
            groups.append({**g_saved, "names": list(g_own["names"]), "params": params})
        state = {"state": per_param, "param_groups": groups}
    optimizer.load_state_dict(state)


def code_commit(folder: str | Path | None = None) -> str:
    """The git commit of the code in ``folder`` (default: this package's), ``<sha>-dirty`` when tracked files
    differ from it, or ``"unknown"`` outside a git checkout (an installed package). Recorded in checkpoints, so an
    export names the code that trained the weights."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
