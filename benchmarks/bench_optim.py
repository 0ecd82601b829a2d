"""Time one AdamW step on ViT-B-sized parameters: fused, foreach and the per-tensor loop, in one process.

The parameters are those of a timm ``VisionTransformer`` of the pretraining geometry (56 px input,
patch 8, width 768, 12 blocks, 12 heads: 85.2 M parameters in 150 tensors), each with a random
gradient; only ``optimizer.step()`` is timed. The three implementations of ``torch.optim.AdamW``
(``fused=True``; ``foreach=True``; ``foreach=False``, the per-tensor loop that torch picks by default
for CPU tensors) take turns step by step, so all see the same machine state; the median over
``--steps`` timed steps is reported::

    python benchmarks/bench_optim.py [--steps 10 --threads 0 --dim 768 --depth 12 --heads 12]

prints ``<impl>_step_s`` per implementation and ``<impl>_vs_fused``: that implementation's median
step time divided by the fused one's (> 1: slower than fused), plus the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from timm.models.vision_transformer import VisionTransformer

IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=56, patch_size=8, in_chans=3, embed_dim=args.dim, depth=args.depth,
                              num_heads=args.heads, num_classes=0)
    template = [p.detach().to(args.device) for p in model.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in template]
    setups = {}
    for name, kw in IMPLS.items():
        params = [torch.nn.Parameter(p.clone()) for p in template]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        setups[name] = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, **kw)
    numel = sum(p.numel() for p in template)
    print(f"AdamW on {numel / 1e6:.1f} M parameters in {len(template)} tensors, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    times = {name: [] for name in IMPLS}
    for step in range(args.warmup + args.steps):
        order = list(IMPLS) if step % 2 == 0 else list(reversed(IMPLS))
        for name in order:
            opt = setups[name]
            if args.device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if args.device != "cpu":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ref = setups["fused"].param_groups[0]["params"]
    for name in IMPLS:  # the three implementations compute the same update
        other = setups[name].param_groups[0]["params"]
        err = max(float((a - b).detach().abs().max()) for a, b in zip(ref, other))
        print(f"{name}: max |param - fused param| after {args.warmup + args.steps} steps: {err:.2e}")
    fused = statistics.median(times["fused"])
    for name in IMPLS:
        print(f"{name}_step_s: {statistics.median(times[name]):.4f}")
    for name in IMPLS:
        if name != "fused":
            print(f"{name}_vs_fused: {statistics.median(times[name]) / fused:.2f}")
    print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
