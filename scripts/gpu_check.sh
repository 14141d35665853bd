#!/usr/bin/env bash
# GPU check for a lent CUDA machine (torch + Triton, no vLLM, nothing installed): runs from a plain checkout.
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run]
#
# Stages, each bounded by a timeout, the whole run by GPU_CHECK_TOTAL_S (default 450 s, under 8 minutes):
#   1. environment: nvidia-smi, python / torch / triton versions, the device      -> env.txt
#   2. correctness: every Triton kernel the runtime can select vs the torch reference at the benchmark shapes
#      (scripts/gpu_check.py; parallel workers so Triton's compilations overlap)  -> correctness.{md,json,log}
#   3. benchmark: kernels/bench.py's table (QE W4A16/W4A8 +adapters vs cuBLAS bf16, torch's int4 tinygemm,
#      torch._int_mm; vLLM columns n/a without vLLM), models $GPU_CHECK_BENCH_MODELS (default 2b)
#                                                                                  -> bench.md, bench.log
#   4. summary                                                                     -> summary.md
# --dry-run (CPU, no GPU needed): the same stages under TRITON_INTERPRET=1 at tiny shapes, the GPU run's plan in
# gpu-plan.md, and bench.py --smoke. Default DIR: runs/gpu-check-<date>. Python: $PYTHON, else python3.
# Exit status: 0 all passed; 1 a correctness row failed (or a stage crashed / timed out); 3 correctness skipped
# cases for time; 4 only the benchmark failed; 2 usage.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT=""
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || OUT="$ROOT/runs/gpu-check-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # plain checkout: vllm_qe/__init__.py maps the sub-packages
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 VLLM_QE_FORCE_TRITON=1  # set before any process imports Triton
    MODE_ARGS=(--dry-run)
else
    unset TRITON_INTERPRET VLLM_QE_FORCE_TRITON
    MODE_ARGS=()
fi

TOTAL="${GPU_CHECK_TOTAL_S:-450}"
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
STAGES=()
have_timeout=0
command -v timeout >/dev/null 2>&1 && have_timeout=1

# run_stage NAME SECONDS LOG CMD...: CMD's output to the terminal and LOG, killed after SECONDS.
run_stage() {
    local name="$1" secs="$2" log="$3"
    shift 3
    [ "$secs" -lt 10 ] && secs=10
    echo "== $name (limit ${secs}s): $*"
    local t0 rc
    t0=$(date +%s)
    if [ "$have_timeout" = 1 ]; then
        timeout --kill-after=15 "$secs" "$@" 2>&1 | tee "$log"
    else
        "$@" 2>&1 | tee "$log"
    fi
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "== $name: timed out after ${secs}s" | tee -a "$log"
    STAGES+=("--stage" "$name=$rc:$(( $(date +%s) - t0 ))")
    echo "== $name: exit $rc"
    return "$rc"
}

env_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "cpus: $(nproc 2>/dev/null || echo ?)"
    echo "checkout: $ROOT"
    if command -v git >/dev/null 2>&1 && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
        echo "commit: $(git -C "$ROOT" rev-parse HEAD) ($(git -C "$ROOT" status --porcelain | wc -l) changed files)"
    fi
    echo "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU, TRITON_INTERPRET=1)' || echo CUDA)"
    echo "python: $PY"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import importlib.util, platform, sys
import torch
import triton
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
print("vllm installed:", importlib.util.find_spec("vllm") is not None, "(not needed, not imported)")
import vllm_qe
print("vllm_qe from", vllm_qe.__file__, "| vllm imported by `import vllm_qe`:", sys.modules.get("vllm") is not None)
EOF
}

export ROOT DRY PY
export -f env_info
run_stage environment 60 "$OUT/env.txt" bash -c env_info
ENV_RC=$?

# correctness: the driver's own budget ends before the stage's timeout, leaving the benchmark its share
if [ "$DRY" = 1 ]; then
    C_BUDGET=240
else
    C_BUDGET=$(( $(left) - 190 ))
    [ "$C_BUDGET" -gt 270 ] && C_BUDGET=270
    [ "$C_BUDGET" -lt 60 ] && C_BUDGET=60
fi
run_stage correctness $(( C_BUDGET + 60 )) "$OUT/correctness.log" \
    "$PY" scripts/gpu_check.py ${MODE_ARGS[@]+"${MODE_ARGS[@]}"} --out "$OUT" --budget-s "$C_BUDGET"
C_RC=$?

if [ "$DRY" = 1 ]; then
    echo "(the GPU run benchmarks: $PY -m vllm_qe.kernels.bench --models ${GPU_CHECK_BENCH_MODELS:-2b}" \
         "--m 1 16 64 256 2048 --out DIR/bench.md)"
    run_stage benchmark 120 "$OUT/bench.log" "$PY" -m vllm_qe.kernels.bench --smoke --out "$OUT/bench.md"
else
    B_LIMIT=$(( $(left) - 20 ))
    [ "$B_LIMIT" -gt 180 ] && B_LIMIT=180
    # shellcheck disable=SC2086
    run_stage benchmark "$B_LIMIT" "$OUT/bench.log" "$PY" -m vllm_qe.kernels.bench \
        --models ${GPU_CHECK_BENCH_MODELS:-2b} --m 1 16 64 256 2048 --out "$OUT/bench.md"
fi
B_RC=$?

"$PY" scripts/gpu_check.py --summarize "$OUT" ${STAGES[@]+"${STAGES[@]}"}
echo "== results in $OUT ($(( $(date +%s) - START ))s)"
if [ "$C_RC" != 0 ]; then
    [ "$C_RC" = 3 ] && exit 3
    exit 1
fi
[ "$ENV_RC" != 0 ] && exit 1
[ "$B_RC" != 0 ] && exit 4
exit 0
