#!/usr/bin/env bash
# Everything a GPU session measures, in one call (about 8 minutes on an H100):
#   1. the GPU tests (kernels at full SD shapes, triton backend vs torch, CUDA-graph replay),
#   2. the kernel benchmarks (GroupNorm, attention) against torch,
#   3. python -m runtime.bench (SD 1.5 architecture, 512x512, guided, fp16) with diffusers as a baseline row.
# Raw JSON and logs go to $OUT (default ./out). Runs on a machine with only torch, triton, numpy and no
# network: pure-Python extras (diffusers, open_clip_torch for the CLIP vocabulary) come as wheels in .whl/
# (see benchmarks/README.md for how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

status=0
# The GPU tests live in these files; the rest of the suite needs packages that machine lacks (onnxslim,
# a current huggingface_hub), and one collection error would stop every test, so each file runs alone.
for tests in tests/kernels/test_group_norm.py tests/kernels/test_attention.py tests/backends \
             tests/test_graphs.py tests/test_weights.py; do
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider "$tests" 2>&1 | tee -a "$OUT/gpu_tests.log" || status=1
done
timeout 100 python3 -m benchmarks.bench_group_norm --no-compile --json "$OUT/bench_group_norm.json" 2>&1 | tee "$OUT/bench_group_norm.log" || status=1
timeout 90 python3 -m benchmarks.bench_attention --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.log" || status=1
timeout 150 python3 -m runtime.bench --json "$OUT/runtime_bench.json" 2>&1 | tee "$OUT/runtime_bench.log" || status=1
exit $status
