#!/usr/bin/env bash
# Everything a GPU session measures, in one call that ends within GPU_CHECK_SECONDS (default 360):
#
#   step                                                   cap   H100/H200 estimate (see benchmarks/README.md)
#   0. git SHA recorded in benchmarks/.git_sha (where git works)       -
#   1. preflight: versions, compiler + Python.h, pytest, Pillow,   15 s   ~10 s
#      a tiny Triton kernel, diffusers, free GPU memory; NO-GO stops here with its reason
#   2. python -m runtime.bench: SD 1.5, 512x512, guided, fp16,    140 s   ~75 s
#      random weights built on the GPU; torch, triton, diffusers rows in interleaved rounds
#   3. GroupNorm kernel benchmark (SD 1.5 shapes first)             70 s   ~65 s
#   4. attention kernel benchmark (SD 1.5 shapes first)             40 s   ~25 s
#   5. fused-epilogue GEMM benchmark (vs cuBLAS + the separate pass) 30 s   ~20 s
#   6. the GPU tests, fp16 where the dtype sweep is not the point   the rest (~70 s)
#
# Every benchmark rewrites its JSON after every row or round, so a step cut by its cap keeps what it
# measured. Results go to $OUT (default ./out), seven files: preflight.json, runtime_bench.json,
# bench_group_norm.json, bench_attention.json, bench_fused_linear.json, gpu_tests.log, gpu_check.log.
#
#   bash benchmarks/gpu_check.sh --dry-run    the same steps on the CPU (tiny preset, TRITON_INTERPRET=1,
#                                             small kernel shapes), the same seven files; CI runs it.
#
# The GPU machine has torch, triton, numpy and no network; diffusers (the baseline row) and open_clip_torch
# come as wheels in .whl/ (benchmarks/README.md); .git does not travel: carry benchmarks/.git_sha.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$OUT/gpu_tests.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ((DRY_RUN)); then
  # The CPU rehearsal: slower than the GPU, so a deadline ten times as long.
  DEADLINE=${GPU_CHECK_SECONDS:-3600}
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  BENCH_ARGS=(--preset tiny --device cpu --dtype fp32 --width 32 --height 32 --steps 4 --rounds 2
              --backends torch,triton,diffusers)
  KERNEL_ARGS=(--dry-run)
  CAP_SCALE=10  # the interpreter and a shared CI CPU: every step's cap ten times its GPU cap
else
  DEADLINE=${GPU_CHECK_SECONDS:-360}
  BENCH_ARGS=()   # the GPU defaults: SD 1.5, 512x512, guided, fp16, every backend available there
  KERNEL_ARGS=()
  CAP_SCALE=1
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
say() { echo "$*" | tee -a "$LOG"; }

# 0. Where git works (this machine), record HEAD for the machine that gets the tree without .git.
if git rev-parse HEAD > /dev/null 2>&1; then
  say "git: $(python3 -m runtime.bench.provenance --write-sha) (recorded in benchmarks/.git_sha)"
elif [[ -f benchmarks/.git_sha ]]; then
  say "git: no .git here; benchmarks/.git_sha says $(cat benchmarks/.git_sha)"
else
  say "git: unknown (no .git and no benchmarks/.git_sha: run this script once where git works, carry the file)"
fi
((DRY_RUN)) || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

status=0
# step LIMIT CMD...: run CMD for at most LIMIT seconds and never past the deadline; output to the log.
step() {
  local limit=$(($1 * CAP_SCALE)) left=$((DEADLINE - SECONDS))
  shift
  if ((left < 5)); then say "skipped (deadline): $*"; status=1; return; fi
  say "== $* (cap $((limit < left ? limit : left)) s, at ${SECONDS} s)"
  timeout $((limit < left ? limit : left)) "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then say "-- exit $rc: $*"; status=1; fi
}

step 15 python3 -m benchmarks.preflight --json "$OUT/preflight.json" "${KERNEL_ARGS[@]}"
if ((status != 0)); then
  say "gpu_check: stopped after the preflight (${SECONDS}s): no numbers could come from this machine"
  exit 1
fi
step 140 python3 -m runtime.bench "${BENCH_ARGS[@]}" --json "$OUT/runtime_bench.json"
step 70 python3 -m benchmarks.bench_group_norm --no-compile "${KERNEL_ARGS[@]}" --json "$OUT/bench_group_norm.json"
step 40 python3 -m benchmarks.bench_attention "${KERNEL_ARGS[@]}" --json "$OUT/bench_attention.json"
step 30 python3 -m benchmarks.bench_fused_linear "${KERNEL_ARGS[@]}" --json "$OUT/bench_fused_linear.json"

# The GPU tests: each file on its own (one collection error would otherwise stop them all); the kernel
# files at fp16 only (their dtype sweeps are not what this window is for).
FP16_ONLY=(-k "not bfloat16 and not float32")
for tests in tests/kernels/test_group_norm.py tests/kernels/test_attention.py tests/kernels/test_fused_linear.py; do
  step "$DEADLINE" python3 -m pytest -q -m gpu -p no:cacheprovider "${FP16_ONLY[@]}" "$tests" >> "$OUT/gpu_tests.log"
done
for tests in tests/backends tests/test_graphs.py tests/test_weights.py; do
  step "$DEADLINE" python3 -m pytest -q -m gpu -p no:cacheprovider "$tests" >> "$OUT/gpu_tests.log"
done
say "gpu_check: ${SECONDS}s, status $status"
exit $status
