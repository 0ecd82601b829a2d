"""One optimisation step, the same for pretraining and fine-tuning.

The engine knows nothing about the task: a *step function* maps a batch to a dict that holds
``"loss"`` (a scalar tensor, computed in fp32) and optionally more scalar tensors (per-domain
losses), like timm's task modules and MAE's ``train_one_epoch``. The engine adds mixed precision
(bf16 autocast by default on CUDA, fp16 with a gradient scaler as an option, fp32 on CPU),
gradient accumulation (no DDP all-reduce until the last micro-batch), gradient clipping, a
finite-loss guard (a non-finite loss on any rank skips the step on every rank and is counted;
``max_nonfinite_steps`` in a row raise ``NonFiniteLossError``) and the cross-rank mean of the
logged values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils.checkpoint import load_optimizer_state
from utils.dist import DistInfo, all_reduce_mean

__all__ = ["resolve_precision", "autocast", "NonFiniteLossError", "StepOutput", "Engine", "build_engine", "evaluate"]

StepFn = Callable[[dict], dict]


def resolve_precision(precision: str, device: torch.device) -> str:
    """Resolve config key ``precision`` (auto, bf16, fp16, fp32) for ``device``.

    ``auto`` is bf16 on CUDA and fp32 on CPU. Half precision on CPU falls back to fp32 (CPU
    autocast is slow and changes numerics, which would break exact-resume checks).

    Raises:
        ValueError: an unknown precision name.
    """
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"config key 'precision' must be auto, bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda":
        return "fp32"
    return "bf16" if precision == "auto" else precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16 / fp16, a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive non-finite losses."""


@dataclass
class StepOutput:
    """What one optimizer step reports.

    Attributes:
        values: Mean over micro-batches and ranks of every scalar the step function returned
            (``loss`` and e.g. per-domain losses), as Python floats.
        grad_norm: Global L2 norm of the gradients before clipping (NaN when skipped).
        skipped: True when the step was skipped because a loss was not finite.
    """

    values: dict[str, float] = field(default_factory=dict)
    grad_norm: float = float("nan")
    skipped: bool = False


class Engine:
    """Mixed precision, accumulation, clipping and the finite-loss guard around one optimizer.

    Args:
        model: The module whose ``forward`` the step function calls, possibly wrapped in DDP
            (its ``no_sync`` is used while accumulating).
        optimizer: The optimizer over the model's parameters.
        device: Device the batches are moved to.
        precision: ``bf16``, ``fp16`` or ``fp32`` (see ``resolve_precision``).
        clip_grad: Max global gradient norm, or None for no clipping.
        max_nonfinite_steps: Consecutive non-finite steps that stop the run.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 precision: str = "fp32", clip_grad: float | None = None, max_nonfinite_steps: int = 20) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self.clip_grad = clip_grad
        self.max_nonfinite_steps = max_nonfinite_steps
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0

    def to_device(self, batch):
        """Move every tensor of a nested dict / list batch to the engine's device."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        # Gradients are all-reduced only on the last micro-batch; earlier ones accumulate locally.
        if isinstance(self.model, DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, step_fn: StepFn, micro_batches: Sequence[dict]) -> StepOutput:
        """Forward and backward every micro-batch, then take (or skip) one optimizer step.

        Args:
            step_fn: ``batch -> {"loss": scalar tensor, other scalar tensors...}``.
            micro_batches: ``accum_steps`` batches (already on any device; moved here).

        Returns:
            The step's mean values, gradient norm and whether it was skipped.

        Raises:
            NonFiniteLossError: ``max_nonfinite_steps`` consecutive steps had a non-finite loss.
        """
        self.model.train()
        n = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            with self._sync_context(last=i == n - 1):
                with autocast(self.device, self.precision):
                    out = step_fn(self.to_device(batch))
                loss = out["loss"].float()
                # A non-finite loss still runs backward so DDP ranks stay in lock-step; the step is skipped.
                self.scaler.scale(loss / n).backward()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / n
        keys = sorted(sums)
        local = torch.stack([sums[k] for k in keys])
        finite = torch.isfinite(local[keys.index("loss")]).float()
        reduced = all_reduce_mean(torch.cat([local.nan_to_num(0.0, 0.0, 0.0), finite[None]]))
        values = {k: float(v) for k, v in zip(keys, reduced[:-1])}
        if reduced[-1].item() < 1.0:  # some rank saw a non-finite loss
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= self.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} consecutive optimizer steps had a non-finite loss "
                    f"({self.nonfinite_total} in total); stopping (config key max_nonfinite_steps). "
                    "Lower optim.blr, enable optim.clip_grad, or check the data for NaN/inf."
                )
            values["loss"] = float("nan")
            return StepOutput(values, float("nan"), skipped=True)
        self.nonfinite_in_row = 0
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.clip_grad if self.clip_grad is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(values, float(grad_norm))

    def state_dict(self) -> dict:
        """Optimizer and scaler states and the non-finite counters (plain types)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "nonfinite_in_row": self.nonfinite_in_row, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict) -> bool:
        """Restore what ``state_dict`` saved (optimizer parameters matched by name, see
        :func:`utils.checkpoint.load_optimizer_state`).

        Returns:
            False, leaving optimizer, scaler and counters as they are, when ``state`` holds no optimizer state (a
            weights-only checkpoint, e.g. one imported from another code base); True otherwise.
        """
        if state.get("optimizer") is None:
            return False
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        return True


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, cfg: dict, info: DistInfo, *,
                 ddp: bool = True) -> Engine:
    """The engine of a run from config keys ``precision``, ``optim.clip_grad`` and ``max_nonfinite_steps``.

    With several processes (and ``ddp``) ``module`` is wrapped in DDP. ``find_unused_parameters`` stays off:
    every trainable parameter of the objectives and fine-tuning models takes part in every step (an objective
    whose step leaves parameters unused must say so with a ``find_unused_parameters = True`` attribute).
    """
    model = module
    if ddp and info.world_size > 1:
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=device_ids,
                                        find_unused_parameters=bool(getattr(module, "find_unused_parameters", False)))
    return Engine(model, optimizer, device=info.device, precision=resolve_precision(cfg["precision"], info.device),
                  clip_grad=cfg["optim"]["clip_grad"], max_nonfinite_steps=cfg["max_nonfinite_steps"])


@torch.no_grad()
def evaluate(engine: Engine, step_fn: StepFn, batches: Iterable[dict]) -> dict[str, float]:
    """Mean of every value ``step_fn`` returns over ``batches`` (weighted by batch), across ranks.

    Runs in eval mode under the engine's autocast and restores train mode afterwards. ``step_fn``
    should call the unwrapped model, not its DDP wrapper: ranks may hold different numbers of
    batches, and DDP's forward would wait for the others.

    Returns:
        ``{key: mean}``; empty when there are no batches.
    """
    engine.model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=engine.device)
    for batch in batches:
        batch = engine.to_device(batch)
        with autocast(engine.device, engine.precision):
            out = step_fn(batch)
        size = _batch_size(batch)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() * size
        count += size
    engine.model.train()
    if not sums:
        return {}
    keys = sorted(sums)
    total = all_reduce_mean(torch.stack([sums[k] for k in keys] + [count]))
    if float(total[-1]) == 0:
        return {}
    return {k: float(v / total[-1]) for k, v in zip(keys, total[:-1])}


def _batch_size(batch) -> int:
    """Number of samples in a nested batch (first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])
