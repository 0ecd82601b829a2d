#!/bin/bash
# The GPU check of a lent accelerator machine, in one run of under 10 minutes (H100 / H200):
#   1. the tests that need CUDA (pytest -m gpu and the CUDA-only skips of the default suite);
#   2. one bf16 pretraining step of the default ViT-B recipe (cfgs/pretrain/default.yaml): samples/s and MFU
#      (FLOPs counted with torch's flop counter), against a bare timm ViT-B of the same encoder tokens, and the
#      step cost of every other objective against MultiMAE-EO at the same encoder size;
#   3. loader samples/s with 8 and 16 workers on the real sample, replicated to 12,000 rows.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (prints every figure line; writes OUT_DIR/gpu_check.log)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-output/gpu_check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "== $(date)  $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name())"

echo "== 1. CUDA tests"
timeout 180 $PY -m pytest -q -x -m "gpu or not slow" tests/test_masking.py tests/test_engine.py tests/test_encoder.py \
    tests/test_objective_multimae.py 2>&1 | tail -3

echo "== 2. pretraining step, bf16, ViT-B (default recipe)"
timeout 150 $PY benchmarks/bench_step.py --config cfgs/pretrain/default.yaml --batch-size 128 --steps 10 --warmup 3
for objective in latent_mim jepa moe_mae; do
    if $PY -c "import sys; from multimae.objectives import OBJECTIVES; sys.exit('$objective' not in OBJECTIVES)"; then
        echo "-- $objective vs multimae at the same encoder size"
        timeout 90 $PY benchmarks/bench_step.py --config cfgs/pretrain/default.yaml --objective "$objective" \
            --baseline multimae --batch-size 64 --steps 6 --warmup 2 | grep -E "objective|step_s|ratio|mfu|samples"
    fi
done

echo "== 3. loader samples/s, 8 and 16 workers"
DATA="$OUT/data/terramesh64"
[ -f "$DATA/terramesh64.h5" ] || $PY tools/geotiff_to_mmearth.py --spec cfgs/data/terramesh_examples.yaml \
    --src ../shared/data/terramesh_examples --out "$DATA" --tile-size 64 > /dev/null
for workers in 8 16; do
    timeout 90 $PY benchmarks/bench_data.py --data "$DATA" --replicate 12000 --seconds 5 --workers "$workers" --no-cold \
        | grep -iE "workers|samples"
done
echo "== done $(date)"
