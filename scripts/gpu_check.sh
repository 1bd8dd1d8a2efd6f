#!/usr/bin/env bash
# The GPU machine's check, in at most 9 minutes of wall time:
#   bash scripts/gpu_check.sh [OUT_DIR] [--dry-run]
# Steps in priority order (a short window still yields the first ones), each under its own
# `timeout` (a hang or a slow step cannot eat the rest; a failing step is reported and the
# next one runs); its cap in seconds (and what an H200 machine should take):
#   facts         30 (~5)      nvidia-smi, driver, python/torch/triton/CUDA versions, commit
#   setup        240 (~90-150) scripts/setup.sh (no registry: PIP_NO_INDEX; nvcc in parallel)
#   maxsim       150 (~60-120) issue 14: bench --gpu-check --part maxsim (bench/gpu_parts.py): the
#                              bf16 GEMM floor, COCO 5K MrSw all pairs on triton / cuda, the ColBERT
#                              shape vs the einsum, flash-maxsim / late-interaction-kernels rows
#   rcar-bwd-256 200 (~60-180) issue 15: --part rcar-backward --sim-dim 256 (the recipe's): the
#                              fused Triton RCAR backward vs the reference's autograd, B = 128 bf16
#                              (a step of its own: its three launches compile in ~1-2 min offline)
#   maxsim-tests  90 (~30-60)  pytest -m gpu tests/test_maxsim_cuda.py -x -k "fp32 and every_setting",
#                              then -k vsa
#   correctness  120 (~60-120) scripts/gpu_correctness.py: every GPU backend vs the float64 reference
#   coco         150 (~100+)   --part coco: ceilings, every registered head at the COCO 5K shape
#                              through all_pairs vs the references, SCAN's training step
#   rcar-fwd      90 (~40-80)  issue 15: --part rcar-forward: the Triton RCAR forward per GPU tile
#                              (128 / 64-row work items) at COCO 5K, sim_dim 256, t2i and i2t, bf16
#   gpu-tests    150 (rest)    pytest -m gpu: the SCAN / RCAR / maxsim GPU files first, then the
#                              rest (less what maxsim-tests ran and the sim_dim 256 backward test)
#   rcar-bwd-64  rest          --part rcar-backward --sim-dim 64 with what is left (a second point)
# OUT_DIR (default gpu_check_out/<UTC time>) gets facts.json, a log per step (logs/), the
# correctness JSON/CSV, the bench output (bench/: CSV rows appended as measured), the
# pytest-*.xml, a copy of bench/results/ and summary.tsv; the summary table is printed last.
# Exit status 0 only if every step passed.
# --dry-run: a CPU machine's rehearsal (CI runs it): GPUs hidden, Triton in its interpreter on
# CPU tensors at tiny sizes, set-up only probed (nothing installed), CUDA cases skipped.
# RCAR_FAST_AUTOTUNE=quick (1-2 autotune configs) unless set; GPU_CHECK_TOTAL_S=540 the budget.
set -uo pipefail  # no -e: a failing step is recorded, the script goes on
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (expected [OUT_DIR] [--dry-run])" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUT_DIR only, got $OUT and $arg" >&2; exit 2; }; OUT=$arg ;;
  esac
done
OUT=${OUT:-$ROOT/gpu_check_out/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/logs" || { echo "gpu_check.sh: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)

TOTAL=${GPU_CHECK_TOTAL_S:-540}
START=$SECONDS
export RCAR_FAST_AUTOTUNE=${RCAR_FAST_AUTOTUNE:-quick}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever else is installed
DRY_FLAG=()
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  DRY_FLAG=(--dry-run)
else
  unset TRITON_INTERPRET  # on the GPU the kernels are compiled, never interpreted
fi
VENV=${RCAR_FAST_VENV:-$ROOT/.venv}
if [ -z "${PYTHON:-}" ]; then  # the machine's python that has torch (the GPU image: /opt/torch/.venv)
  for candidate in python3 python; do
    if "$candidate" -c "import torch" 2>/dev/null; then export PYTHON=$candidate; break; fi
  done
fi
python_bin() {  # the set-up's venv once it exists, the machine's python before
  if [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; else echo "${PYTHON:-python3}"; fi
}

STEPS=()
STATUS=()
SECS=()
DETAIL=()
FAILED=0

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout min(CAP, what is left of
# the budget), its output in logs/NAME.log (the last lines echoed), and records the outcome.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((TOTAL - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  local log="$OUT/logs/$name.log"
  echo "=== $name (limit ${limit}s)"
  if [ "$limit" -lt 5 ]; then
    STEPS+=("$name"); STATUS+=("skipped"); SECS+=(0); DETAIL+=("out of time (budget ${TOTAL}s)")
    FAILED=1  # a step that did not run did not pass
    echo "skipped: out of time"
    return
  fi
  local t0=$SECONDS rc
  GPU_CHECK_STEP_LIMIT=$limit timeout -k 10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT"; FAILED=1
    echo "[gpu_check] $name stopped after its ${limit}s limit" >> "$log"
  elif [ "$rc" -ne 0 ]; then
    status="FAIL (exit $rc)"; FAILED=1
  fi
  tail -n "${GPU_CHECK_TAIL:-12}" "$log"
  local last
  last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | tr '\t' ' ' | cut -c1-200)
  STEPS+=("$name"); STATUS+=("$status"); SECS+=($((SECONDS - t0))); DETAIL+=("$last")
}

facts() {
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
  echo "host: $(hostname)  cpus: $(nproc)  dry run: $DRY"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv || true
    nvidia-smi || true
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
  "$(python_bin)" - "$OUT/facts.json" <<'PY'
import json, platform, subprocess, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
facts = dict(python=platform.python_version(), python_path=sys.executable, torch=torch.__version__,
             cuda=torch.version.cuda, triton=triton_version, gpu=None)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    facts["gpu"] = dict(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                        memory_gib=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count())
    try:
        facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        facts["driver"] = None
facts["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump(facts, open(sys.argv[1], "w"), indent=1)
print(json.dumps(facts))
gpu = facts["gpu"]
print((f"{gpu['name']} (sm {gpu['capability']}), driver {facts.get('driver')}" if gpu else "no GPU")
      + f"; torch {facts['torch']}, CUDA {facts['cuda']}, triton {facts['triton']}, python {facts['python']}")
PY
}

setup_step() {
  if [ "$DRY" = 1 ]; then
    bash "$ROOT/scripts/setup.sh" --probe  # a dry run installs nothing
  else
    bash "$ROOT/scripts/setup.sh"
  fi
}

correctness() {  # starts no case in the last 30 s of its step, so its report is always written
  "$(python_bin)" "$ROOT/scripts/gpu_correctness.py" --out "$OUT/correctness" \
    --budget-s $((GPU_CHECK_STEP_LIMIT > 60 ? GPU_CHECK_STEP_LIMIT - 30 : GPU_CHECK_STEP_LIMIT / 2)) "${DRY_FLAG[@]}"
}

bench_part() {  # bench_part PART [ARGS...]: one part of `python -m bench --gpu-check`
  local rc minutes part=$1
  shift
  # its own budget: it skips (and says so) what would not finish 20 s before the step's timeout
  minutes=$(awk -v s="$GPU_CHECK_STEP_LIMIT" 'BEGIN { printf "%.2f", (s > 60 ? s - 20 : s / 2) / 60 }')
  local plots=(--no-plots)
  [ "$part" != coco ] || plots=()  # the COCO 5K time plot (<device>-gpu-check.png)
  "$(python_bin)" -m bench --gpu-check --part "$part" --max-minutes "$minutes" "${plots[@]}" \
    --out "$OUT/bench" "${DRY_FLAG[@]}" "$@"
  rc=$?
  [ "$DRY" = 1 ] || [ ! -d "$ROOT/bench/results" ] || { mkdir -p "$OUT/bench_results" && cp -r "$ROOT/bench/results/." "$OUT/bench_results"; }
  return $rc
}

# pytest_gpu NAME PYTEST-ARGS...: pytest -m gpu into $OUT/pytest-NAME.xml; tests that would
# start in the last 20 s of the step skip (conftest.py), so that the xml is written.
pytest_gpu() {
  local rc unrun name=$1
  shift
  RCAR_FAST_TEST_DEADLINE=$(($(date +%s) + (GPU_CHECK_STEP_LIMIT > 60 ? GPU_CHECK_STEP_LIMIT - 20 : GPU_CHECK_STEP_LIMIT / 2))) \
    "$(python_bin)" -m pytest -m gpu -q -rs --durations=10 -p no:cacheprovider --junitxml="$OUT/pytest-$name.xml" "$@"
  rc=$?
  unrun=$(grep -o 'message="out of time' "$OUT/pytest-$name.xml" 2>/dev/null | wc -l)
  if [ "$rc" -eq 0 ] && [ "$unrun" -gt 0 ]; then
    echo "[gpu_check] incomplete: $unrun GPU tests not started (out of time)"
    return 3
  fi
  return $rc
}

# ran_ids XML...: the node ids those junit files ran (not skipped), to deselect them later.
ran_ids() {
  "$(python_bin)" - "$@" <<'PY'
import sys
import xml.etree.ElementTree as ET
for path in sys.argv[1:]:
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        continue
    for case in cases:
        if case.find("skipped") is None:
            module, name = case.get("classname"), case.get("name")
            print(module.replace(".", "/") + ".py::" + name)
PY
}

maxsim_tests() {  # the cheapest, most telling GPU tests of issue 14 first
  local rc=0 second=0
  pytest_gpu maxsim-fp32 tests/test_maxsim_cuda.py -x -k "fp32 and every_setting" || rc=$?
  pytest_gpu maxsim-vsa tests/test_maxsim_cuda.py -k vsa || second=$?
  [ "$rc" -ne 0 ] || rc=$second
  return "$rc"
}

# Compiles kernels/rcar_backward.py's fp32 path at sim_dim 256 (three launches that spill ~900 B,
# minutes of compile): rcar-bwd-256 covers the recipe in bf16, the fp32 test runs outside the check.
SLOW_TEST=tests/test_rcar_triton.py::test_gpu_gradients_float32

gpu_tests() {  # the SCAN / RCAR / maxsim GPU files first (pytest drops the repeats of `tests`)
  local args=() id
  while read -r id; do args+=(--deselect "$id"); done < <(ran_ids "$OUT/pytest-maxsim-fp32.xml" "$OUT/pytest-maxsim-vsa.xml")
  echo "[gpu_check] deselected: $((${#args[@]} / 2)) tests that maxsim-tests ran; $SLOW_TEST (the fp32 sim_dim 256 backward compile)"
  pytest_gpu gpu "${args[@]}" --deselect "$SLOW_TEST" \
    tests/test_scan_cuda.py tests/test_scan_triton.py tests/test_rcar_triton.py tests/test_rcar_cuda.py \
    tests/test_maxsim_cuda.py tests/test_maxsim_triton.py tests
}

export -f facts setup_step correctness bench_part pytest_gpu ran_ids maxsim_tests gpu_tests python_bin
export SLOW_TEST
export ROOT OUT DRY VENV
# (arrays do not cross `export -f`; the one the steps need is rebuilt from DRY)
DRY_FLAG_DEF='DRY_FLAG=(); [ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)'

echo "gpu_check: out $OUT, budget ${TOTAL}s$([ "$DRY" = 1 ] && echo ', DRY RUN (CPU, interpreter, tiny sizes)')"
run_step facts 30 bash -c 'facts'
run_step setup 240 bash -c 'setup_step'
run_step maxsim 150 bash -c "$DRY_FLAG_DEF; bench_part maxsim"
run_step rcar-bwd-256 200 bash -c "$DRY_FLAG_DEF; bench_part rcar-backward --sim-dim 256"
run_step maxsim-tests 90 bash -c 'maxsim_tests'
run_step correctness 120 bash -c "$DRY_FLAG_DEF; correctness"
run_step coco 150 bash -c "$DRY_FLAG_DEF; bench_part coco"
run_step rcar-fwd 90 bash -c "$DRY_FLAG_DEF; bench_part rcar-forward"
run_step gpu-tests 150 bash -c 'gpu_tests'
# A second sim_dim with whatever is left (the dry run: its backward rows only, same code).
run_step rcar-bwd-64 600 bash -c "$DRY_FLAG_DEF; bench_part rcar-backward --sim-dim 64 $([ "$DRY" = 1 ] && echo '--modes backward')"

{
  printf 'step\tstatus\tseconds\tlast line of its log\n'
  for i in "${!STEPS[@]}"; do
    printf '%s\t%s\t%s\t%s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${DETAIL[$i]}"
  done
  printf 'total\t%s\t%s\t%s\n' "$([ "$FAILED" = 0 ] && echo ok || echo FAILED)" "$((SECONDS - START))" "$OUT"
} > "$OUT/summary.tsv"
echo
echo "=== gpu_check summary$([ "$DRY" = 1 ] && echo ' (dry run)')"
column -t -s $'\t' "$OUT/summary.tsv" 2>/dev/null || cat "$OUT/summary.tsv"
exit "$FAILED"
