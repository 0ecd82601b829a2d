"""Time one pretraining step of an objective against a baseline run in the same process.

One step = the objective's forward (masking, encoder, decoders / predictors, targets), loss, backward, AdamW
step, on random data of the shapes the config describes (passed through the objective's worker-side batch
transform, as the data loader would). Baselines (``--baseline``):

- ``vit`` (MultiMAE-EO only): a plain timm ``VisionTransformer`` with the same width, depth and heads on the
  same number of encoder tokens (K visible + G global: a 1 x K patch grid plus a class token and G - 1
  register tokens), trained with a trivial loss;
- ``multimae``: the MultiMAE-EO objective (``cfgs/defaults.yaml`` section ``multimae``) around the same
  encoder (same ``model.*``, ``in_domains``, input size), to compare the step cost of recipes; for another
  objective its ``out_domains`` are the domains that objective's batch carries (inputs and targets);
- ``dense``: the same objective and config with dense blocks of the same width, depth and heads: timm's MLP
  (``model.mlp_ratio``) and multi-head attention instead of mixture-of-experts feed-forwards and grouped-query
  attention, in the encoder and in the objective's decoder (``<objective>.decoder.ffn`` / ``kv_groups``).

Each model has its own AdamW. Steps of the two alternate (ABBA order), so both see the same machine state; the
median over ``--steps`` timed steps is reported::

    python benchmarks/bench_step.py --config cfgs/defaults.yaml --batch-size 8 --steps 10
    python benchmarks/bench_step.py --config cfgs/pretrain/demo.yaml --objective multimae --baseline vit

prints ``step_s``, ``baseline_step_s``, ``ratio``, ``samples_per_s`` and ``baseline_samples_per_s`` (and the 1-minute load average at the end:
on a shared machine, other processes inflate every parallel kernel launch, the MultiMAE step has
more of them than the bare ViT, so the ratio is only meaningful on an otherwise idle machine); on CUDA also
``tflops_per_step`` (counted with ``torch.utils.flop_counter``) and ``mfu`` against the bf16 dense
peak of the GPU (H100: 989 TFLOPS, H200: 989 TFLOPS).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import default_collate  # noqa: E402

from multimae.build import build_pretraining, data_domains, random_inputs, random_metadata, resolve_preset  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.throughput import count_flops, peak_tflops  # noqa: E402


def random_batch(cfg: dict, objective, batch_size: int, device: torch.device) -> dict:
    """A random batch of ``cfg``'s shapes, through the objective's batch transform (as the loader gives it)."""
    inputs, valid = random_inputs(cfg, batch_size)
    metadata = random_metadata(cfg, batch_size)
    samples = [{"inputs": {k: v[b] for k, v in inputs.items()}, "valid": {k: v[b] for k, v in valid.items()},
                "index": b, **({"metadata": {k: v[b] for k, v in metadata.items()}} if metadata else {})}
               for b in range(batch_size)]
    transform = objective.batch_transform()
    if transform is not None:
        samples = transform(samples, (torch.arange(batch_size, dtype=torch.int64) * 7919 + 13).numpy().astype("uint64"))
    batch = default_collate(samples)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else
                {kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in batch.items()}


def dense_config(cfg: dict) -> dict:
    """``cfg`` with dense blocks of the same width, depth and heads (the ``dense`` baseline)."""
    out = copy.deepcopy(cfg)
    size = resolve_preset(cfg["model"]["preset"])
    out["model"].update(preset={k: size[k] for k in ("dim", "depth", "heads")}, ffn="mlp", ffn_options={},
                        kv_groups=None)
    decoder = out[cfg["objective"]].get("decoder", {})
    if "ffn" in decoder:
        decoder.update(ffn="mlp", ffn_options={})
    if "kv_groups" in decoder:
        decoder["kv_groups"] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action="append",
                        help="cfgs/defaults.yaml or an experiment YAML (repeat to merge several)")
    parser.add_argument("--objective", default=None, help="override the config's objective")
    parser.add_argument("--baseline", default=None, choices=("vit", "multimae", "dense"),
                        help="vit (default for multimae), multimae (default for other objectives) or dense")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on cuda, fp32 on cpu), fp32, bf16")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, [f"objective={args.objective}"] if args.objective else [])
    baseline = args.baseline or ("vit" if cfg["objective"] == "multimae" else "multimae")
    if baseline == "vit" and cfg["objective"] != "multimae":
        parser.error("--baseline vit needs the multimae objective (its encoder token count K is the budget)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(0)

    def adamw(params):
        # fused AdamW (one kernel per tensor, CPU and CUDA) for both models, as the training loop uses
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

    model = build_pretraining(cfg).to(device)
    opt = adamw(model.parameters())
    batch = random_batch(cfg, model, args.batch_size, device)

    def fwd_bwd_objective() -> None:
        with amp:
            out = model(batch)
        out["loss"].backward()

    size = resolve_preset(cfg["model"]["preset"])
    g, p = cfg["model"]["num_global_tokens"], cfg["model"]["patch_size"]
    if baseline == "vit":
        k = cfg["multimae"]["masking"]["num_encoded_tokens"]
        vit = VisionTransformer(
            img_size=(p, k * p), patch_size=p, in_chans=3, num_classes=0, embed_dim=size["dim"],
            depth=size["depth"], num_heads=size["heads"], class_token=True, reg_tokens=g - 1,
        ).to(device)
        base_opt = adamw(vit.parameters())
        vit_x = torch.randn(args.batch_size, 3, p, k * p, device=device)

        def fwd_bwd_baseline() -> None:
            with amp:
                feats = vit.forward_features(vit_x)  # (B, K + G, D)
            feats.float().square().mean().backward()
        tokens = f"encoder_tokens: {k + g}"
    else:
        if baseline == "dense":
            base_cfg = dense_config(cfg)
        else:
            base_cfg = {**cfg, "objective": "multimae"}
            if cfg["objective"] != "multimae":  # reconstruct what the objective predicts: its inputs and targets
                base_cfg["multimae"] = {**cfg["multimae"], "out_domains": data_domains(cfg)}
        base_model = build_pretraining(base_cfg).to(device)
        base_opt = adamw(base_model.parameters())
        base_batch = random_batch(base_cfg, base_model, args.batch_size, device)

        def fwd_bwd_baseline() -> None:
            with amp:
                out = base_model(base_batch)
            out["loss"].backward()
        tokens = (f"baseline_params: {sum(x.numel() for x in base_model.parameters())}" if baseline == "dense" else
                  f"multimae_encoded_tokens: {cfg['multimae']['masking']['num_encoded_tokens'] + g}")

    def timed(fwd_bwd, optimizer) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        fwd_bwd()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    times, base_times = [], []
    for i in range(args.warmup + args.steps):
        if i % 2:  # alternate which model goes first, so neither profits from the order
            tb, t = timed(fwd_bwd_baseline, base_opt), timed(fwd_bwd_objective, opt)
        else:
            t, tb = timed(fwd_bwd_objective, opt), timed(fwd_bwd_baseline, base_opt)
        if i >= args.warmup:
            times.append(t)
            base_times.append(tb)
    step_s, base_s = (statistics.median(t[0] for t in ts) for ts in (times, base_times))
    cpu_s, base_cpu_s = (statistics.median(t[1] for t in ts) for ts in (times, base_times))
    print(f"device: {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"precision: {precision}, threads: {torch.get_num_threads()}")
    print(f"objective: {cfg['objective']}, baseline: {baseline}, params: {sum(x.numel() for x in model.parameters())}")
    print(f"batch_size: {args.batch_size}, steps: {args.steps}, {tokens}, load_avg_1min: {os.getloadavg()[0]:.2f}")
    print(f"step_s: {step_s:.4f}")
    print(f"baseline_step_s: {base_s:.4f}")
    print(f"ratio: {step_s / base_s:.3f}")
    print(f"samples_per_s: {args.batch_size / step_s:.1f}  baseline_samples_per_s: {args.batch_size / base_s:.1f}")
    print(f"step_cpu_s: {cpu_s:.4f}  baseline_step_cpu_s: {base_cpu_s:.4f}  cpu_ratio: {cpu_s / base_cpu_s:.3f}")
    if device.type == "cuda":
        peak = peak_tflops(device)
        flops = count_flops(fwd_bwd_objective)
        base_flops = count_flops(fwd_bwd_baseline)
        print(f"tflops_per_step: {flops / 1e12:.3f}")
        print(f"baseline_tflops_per_step: {base_flops / 1e12:.3f}")
        if peak is not None:
            print(f"mfu: {flops / step_s / (peak * 1e12):.3f}")
            print(f"baseline_mfu: {base_flops / base_s / (peak * 1e12):.3f}")


if __name__ == "__main__":
    main()
