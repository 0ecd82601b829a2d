"""Throughput facts of a training run: time waiting for data, peak memory, FLOPs and model FLOPs utilisation.

A user reads them to know whether the accelerators wait for the data loader (add ``num_workers``) or the model
is the bottleneck. FLOPs are counted once with torch's flop counter (``torch.utils.flop_counter``) on one real
step; MFU divides achieved FLOPs per second by the accelerator's dense bf16 peak.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch

__all__ = ["BF16_PEAK_TFLOPS", "count_flops", "peak_memory_mb", "peak_tflops"]

#: Dense bf16 peak of the accelerators this project is measured on (TFLOPS, vendor data sheets, no sparsity).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (e.g. forward + backward of one step), from torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device from :data:`BF16_PEAK_TFLOPS`, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in BF16_PEAK_TFLOPS.items() if key in name), None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: max allocated on a CUDA device, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
