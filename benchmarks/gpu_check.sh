#!/usr/bin/env bash
# Everything a GPU session measures, in one call, within GPU_CHECK_SECONDS (default 540):
#   1. the GPU tests (kernels at full SD shapes, triton backend vs torch, CUDA-graph replay, loading),
#   2. python -m runtime.bench (SD 1.5 architecture, 512x512, guided, fp16; diffusers as a baseline row),
#   3. the kernel benchmarks (GroupNorm, attention) against torch.
# Raw JSON and logs go to $OUT (default ./out): 8 files at most. Runs on a machine with only torch,
# triton, numpy and no network; diffusers (the baseline row) and open_clip_torch (the real CLIP
# vocabulary) are optional and come as wheels in .whl/ (benchmarks/README.md says how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
DEADLINE=${GPU_CHECK_SECONDS:-540}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

status=0
# step LIMIT LOG CMD...: run CMD for at most LIMIT seconds and never past the deadline, appending to LOG.
step() {
  local limit=$1 log=$2 left=$((DEADLINE - SECONDS))
  shift 2
  if ((left < 10)); then echo "skipped (deadline): $*" | tee -a "$log"; status=1; return; fi
  timeout $((limit < left ? limit : left)) "$@" 2>&1 | tee -a "$log" || status=1
}

# The rest of the suite needs packages that machine lacks (onnxslim, a current huggingface_hub), and one
# collection error would stop every test, so each GPU test file runs on its own.
for tests in tests/kernels/test_group_norm.py tests/kernels/test_attention.py tests/backends \
             tests/test_graphs.py tests/test_weights.py; do
  step 120 "$OUT/gpu_tests.log" python3 -m pytest -q -m gpu -p no:cacheprovider "$tests"
done
step 200 "$OUT/runtime_bench.log" python3 -m runtime.bench --json "$OUT/runtime_bench.json"
step 100 "$OUT/bench_group_norm.log" python3 -m benchmarks.bench_group_norm --no-compile --json "$OUT/bench_group_norm.json"
step 90 "$OUT/bench_attention.log" python3 -m benchmarks.bench_attention --json "$OUT/bench_attention.json"
echo "gpu_check: ${SECONDS}s, status $status"
exit $status
