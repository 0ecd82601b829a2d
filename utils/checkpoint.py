"""Checkpoints: atomic save, verified loading with ``weights_only=True``, RNG states, checked state-dict
loads, the output-folder lock and the resume checks.

A checkpoint is a dict of plain types (tensors, numbers, strings, lists, dicts), so
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects. It is
written to a temporary file of its own (``<name>.<pid>-<random>.tmp``) next to its destination,
flushed to disk, then renamed over the destination with ``os.replace``; a crash at any point leaves
the previous checkpoint intact, and two writers never share a temporary file.

``torch.save`` writes a zip archive whose members carry CRC-32 checksums; :func:`verify_checkpoint`
checks them before a load, so a damaged file is refused instead of loaded with garbage values, and
:func:`resume_path` then falls back to the newest intact ``checkpoint-epoch<N>.pth``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "verify_checkpoint",
    "load_checkpoint",
    "resume_path",
    "holds_run",
    "lock_output_dir",
    "data_fingerprint",
    "check_resume_data",
    "rng_state",
    "set_rng_state",
    "load_state_checked",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_KEPT = re.compile(r"^checkpoint-epoch(\d+)\.pth$")
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of files whose CRCs were checked


def _temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _out_of_space(err: BaseException) -> bool:
    """True when ``err`` or an exception it was raised from is a full disk (torch wraps the OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        err = err.__cause__ or err.__context__
    return False


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (own temporary file, fsync, ``os.replace``, fsync of the folder).

    Returns:
        The path written.

    Raises:
        CheckpointError: the disk (or quota) is full: ``no space left on <folder>``; the previous file
            at ``path``, if any, is intact and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        if _out_of_space(err):
            kept = f"; the previous {path.name} is intact" if path.is_file() else ""
            raise CheckpointError(f"no space left on {path.parent} while writing {path.name}{kept}") from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def verify_checkpoint(path: str | Path) -> Path:
    """Check a checkpoint's zip structure and the CRC-32 of every member (reads the whole file once).

    Files that are not zip archives (torch's legacy format) are left to ``torch.load`` to judge, except
    when they look like a truncated or damaged zip.

    Returns:
        ``path``.

    Raises:
        CheckpointError: the file is missing, truncated, or a member's data does not match its CRC
            (names the file and the member).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} not found" if isinstance(err, FileNotFoundError)
                              else f"cannot read checkpoint {path}: {err}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return path
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":
            if head[:1] == b"\x80":  # a legacy (pickle protocol 2+) torch file: torch.load checks it
                return path
            raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a checkpoint (no zip header, "
                                  f"{st.st_size} bytes)")
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or truncated ({type(err).__name__}: "
                              f"{err})") from None
    if bad is not None:
        raise CheckpointError(f"cannot read checkpoint {path}: damaged, member {bad} fails its CRC check")
    _VERIFIED.add(key)
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """Verify (:func:`verify_checkpoint`) and read a checkpoint onto the CPU with ``weights_only=True``;
    with ``kind``, check its ``"kind"`` key.

    Raises:
        CheckpointError: the file is missing, damaged (CRC mismatch, truncated), cannot be read (not a
            checkpoint, or holding types outside ``weights_only``), or is not of ``kind``.
    """
    path = verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    found = state.get("kind") if isinstance(state, dict) else type(state).__name__
    if kind is not None and found != kind:
        raise CheckpointError(f"{path} is a {found!r} checkpoint, not {kind!r}")
    return state


def _kept_checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-epoch<N>.pth`` files of ``folder``, newest epoch first."""
    kept = [(int(m.group(1)), p) for p in folder.glob("checkpoint-epoch*.pth") if (m := _KEPT.match(p.name))]
    return [p for _, p in sorted(kept, reverse=True)]


def holds_run(output_dir: str | Path) -> list[Path]:
    """The checkpoints (``checkpoint-*.pth``) in ``output_dir``: a non-empty list means a run lives there."""
    folder = Path(output_dir)
    return sorted(p for p in folder.glob("checkpoint-*.pth") if p.is_file()) if folder.is_dir() else []


def resume_path(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, per config key ``resume``.

    ``auto``: ``<output_dir>/checkpoint-last.pth``, verified; when it is damaged or unreadable (or
    absent beside kept checkpoints), the newest intact ``checkpoint-epoch<N>.pth``, with a warning on
    stderr naming both; None when the folder holds no checkpoint. ``never``: None, but only for a
    folder that holds no run. Anything else is a checkpoint path (verified when it is loaded).

    Raises:
        CheckpointError: ``never`` and ``output_dir`` holds checkpoints (names the folder and how to
            proceed); ``auto`` and no checkpoint of the folder is intact (names each file and its
            fault); an explicit path that does not exist.
    """
    out = Path(output_dir)
    if resume == "never":
        found = holds_run(out)
        if found:
            raise CheckpointError(
                f"config key 'resume' is 'never' but output_dir {out} holds a run ({', '.join(p.name for p in found)}),"
                " which this run would overwrite: choose another output_dir, move that run aside, or "
                "resume=auto to continue it")
        return None
    if resume == "auto":
        last = out / "checkpoint-last.pth"
        candidates = ([last] if last.is_file() else []) + _kept_checkpoints(out)
        faults = [] if last.is_file() or not candidates else [f"{last}: not found"]
        for path in candidates:
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                faults.append(str(err))
                continue
            if path != last:
                print(f"warning: {last} is {'damaged' if last.is_file() else 'missing'} ({faults[0]}); resuming "
                      f"from {path} instead", file=sys.stderr)
            return path
        if candidates:
            raise CheckpointError(f"no intact checkpoint in {out} to resume from: " + "; ".join(faults)
                                  + ". Move the folder aside (or resume=never into a new output_dir) to start over")
        return None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"config key 'resume': checkpoint {path} not found")
    return path


def _holder(lock_path: Path) -> dict:
    try:
        return json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def lock_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``output_dir`` for the duration of the ``with`` block (one run per folder).

    The lock is ``fcntl.flock`` on ``<output_dir>/.lock``, which records the holder's pid, host and
    command line. The kernel drops a flock when its process dies, so a crashed or killed run never
    blocks its re-run (the next holder overwrites the dead one's record and says so). On file
    systems without ``flock`` (Lustre mounted without it), the file ``<output_dir>/.lock.owner``,
    created with ``O_EXCL`` and removed on exit, is the lock instead; one left by a process of this
    host that no longer runs is taken over. Call it on rank 0 only: the other ranks share the folder.

    Yields:
        The lock file's path.

    Raises:
        CheckpointError: another process holds the folder (names its pid, host and command);
            ``output_dir`` or the lock file cannot be created.
    """
    out = Path(output_dir)
    lock_path = out / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300]}
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CheckpointError(f"cannot lock output_dir {out}: {err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(out, _holder(lock_path), lock_path) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise CheckpointError(f"cannot lock output_dir {out}: {err}") from None
            with _owner_file_lock(out / ".lock.owner", me):
                yield out / ".lock.owner"
            return
        previous = _holder(lock_path)
        if previous.get("pid") not in (None, me["pid"]):
            print(f"warning: output_dir {out}: taking over the lock of pid {previous['pid']} on host "
                  f"{previous.get('host', '?')}, which no longer holds it", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield lock_path
        finally:
            os.ftruncate(fd, 0)  # the file stays: unlinking it under the lock would race the next holder
    finally:
        os.close(fd)


def _holder(lock_path: Path) -> dict:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _in_use(out: Path, holder: dict, lock_path: Path) -> CheckpointError:
    return CheckpointError(
        f"output_dir {out} is in use by another run: pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"({holder.get('command', '?')}); wait for it to end or choose another output_dir (lock file {lock_path})")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def _owner_file_lock(path: Path, me: dict) -> Iterator[None]:
    """The lock-file protocol of :func:`lock_output_dir` where ``flock`` is unsupported."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            holder = _holder(path)
            pid = holder.get("pid")
            if holder.get("host") != me["host"] or not isinstance(pid, int) or _running(pid):
                raise _in_use(path.parent, holder, path) from None
            print(f"warning: output_dir {path.parent}: taking over the stale lock of pid {pid} on this host, "
                  "which no longer runs", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    else:
        raise _in_use(path.parent, _holder(path), path)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def data_fingerprint(dataset, steps_per_epoch: int) -> dict:
    """What a resume must find unchanged about the training data, as plain types for the checkpoint.

    Args:
        dataset: The training set: ``domain_info()`` (bands, normalisation and statistics per domain)
            and ``rows_digest`` (digest of the split's rows), as :class:`utils.data.mmearth.MMEarthDataset`.
        steps_per_epoch: Optimizer steps per epoch of this run.

    Returns:
        ``{"domains": ..., "split_digest": str, "steps_per_epoch": int}``.
    """
    return {"domains": dataset.domain_info(), "split_digest": dataset.rows_digest,
            "steps_per_epoch": int(steps_per_epoch)}


def _domain_differences(saved: dict, current: dict) -> list[str]:
    out = []
    for name in sorted(set(saved) | set(current)):
        if name not in saved or name not in current:
            out.append(f"domain {name} {'added' if name in current else 'removed'}")
            continue
        a, b = saved[name], current[name]
        for key in sorted(set(a) | set(b)):
            if key == "stats":
                sa, sb = a.get("stats") or {}, b.get("stats") or {}
                for sk in sorted(set(sa) | set(sb)):
                    for field in ("mean", "std"):
                        va, vb = (sa.get(sk) or {}).get(field), (sb.get(sk) or {}).get(field)
                        same = (va is not None and vb is not None and len(va) == len(vb)
                                and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0) for x, y in zip(va, vb)))
                        if not same:
                            out.append(f"domain {name}: band statistics {sk}.{field} {va} -> {vb}")
            elif a.get(key) != b.get(key):
                out.append(f"domain {name}: {key} {a.get(key)!r} -> {b.get(key)!r}")
    return out


def check_resume_data(state: dict, current: dict, path: str | Path, *, resume_anyway: bool = False) -> list[str]:
    """Refuse to resume a checkpoint trained on other data than this run reads.

    Compares the checkpoint's ``domains`` (bands, normalisation, band statistics), ``split_digest``
    and ``steps_per_epoch`` entries with :func:`data_fingerprint` of this run; entries a checkpoint
    lacks are not compared.

    Args:
        state: The loaded checkpoint.
        current: ``data_fingerprint(train_set, steps_per_epoch)`` of this run.
        path: The checkpoint's path, for the message.
        resume_anyway: Config key ``resume_anyway``: return the differences instead of raising.

    Returns:
        The differences (empty when the data is unchanged), one line each.

    Raises:
        CheckpointError: something differs and ``resume_anyway`` is false (the message names what).
    """
    diffs = []
    if "domains" in state and "domains" in current:
        diffs += _domain_differences(state["domains"], current["domains"])
    if "split_digest" in state and "split_digest" in current and state["split_digest"] != current["split_digest"]:
        diffs.append(f"training split rows differ (digest {state['split_digest'][:12]} -> "
                     f"{current['split_digest'][:12]})")
    if "steps_per_epoch" in state and "steps_per_epoch" in current \
            and state["steps_per_epoch"] != current["steps_per_epoch"]:
        diffs.append(f"steps per epoch {state['steps_per_epoch']} -> {current['steps_per_epoch']}")
    if diffs and not resume_anyway:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} differences)" if len(diffs) > 6 else "")
        raise CheckpointError(f"{path} was trained on other data than this run reads: {shown}. Point data_path at "
                              "the original file set, choose another output_dir, or pass resume_anyway=true")
    return diffs


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
