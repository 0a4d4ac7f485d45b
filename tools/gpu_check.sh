#!/usr/bin/env bash
# The prepared check for a session lent one GPU (issues 10 and 23). On the device machine, in the
# repo root, with the bundle from `make gpu-bundle` carried along:
#     run(command="bash tools/gpu_check.sh", carry=["gpu_bundle"], timeout_s=540)
# Here, on a CPU box (no nvcc build, no install, the local .venv, micro sizes, pytest --collect-only):
#     bash tools/gpu_check.sh --dry-run [--out DIR]
#
# Phases, in order; each under `timeout`, started only while its minimum fits in what is left of
# GPU_CHECK_TOTAL_S (default 470 s), else reported as skipped with the reason:
#   env            the card and its arch (-> TORCH_CUDA_ARCH_LIST for every later phase), torch, nvcc
#   build_C        stm_dist._C for that arch: setup.py build_ext --inplace (no pip)   } side by side
#   bundle         DeepSpeed from gpu_bundle/, offline (the only pip install); FusedAdam JIT }
#   tests_gpu      the CUDA op tests (fp32/fp16/bf16 vs the CPU kernel, autocast vs the reference),
#                  the cubin check, the op's argument checks
#   tests_ops      the rest of tests/ops (CPU), beside tests_gpu, stopped when the bench starts
#   bench          eager pairs (plain AMP loop vs engine): DCNv3, ConvNeXt, Swin, PVT, Halo tiny
#   zero3          one bf16 step of unified_dcn_v3_tiny under ZeRO 3 (ds_configs/zero3_bf16.json)
#   bench_compile  engine_compile cases (ConvNeXt, Swin first) with the time left
#   compile_zero3  tests/engine/test_compile_zero3.py, only if ~150 s are left
# tests_ops, bench_compile and compile_zero3 are "soft": cut short for time, they still pass when
# nothing in them failed. Exit 0 when every phase that ran passed.
# Files in $OUT (the device tool brings back at most 8): gpu_check.md + gpu_check.json (the report,
# rewritten at every phase start and end: a kill at any moment leaves one naming the phases done,
# the one running and those not reached), gpu_check.log (all output, lines prefixed [phase]),
# gpu_train.json + gpu_train.md (rewritten at every number measured), zero3.json.
# GPU_CHECK_PHASES=env,bench (say) runs only those; GPU_CHECK_BENCH_ARGS is added to the bench
# phases; GPU_CHECK_WORK holds the scratch (default: a new /tmp folder); GPU_CHECK_KILL_AT=
# PHASE:start|end kills the whole run there (tests/test_gpu_check.py; run it in its own session).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run, --out DIR)"; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then
  [ $DRY = 1 ] && OUT_DIR=bench_out/gpu_check_dry || { echo "gpu_check.sh: \$OUT is unset; pass --out DIR"; exit 2; }
fi
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
rm -f "$WORK"/pid.* "$WORK"/lane.* "$WORK"/stop.* "$WORK/arch"
TOTAL="${GPU_CHECK_TOTAL_S:-470}"
T0=$(date +%s)
PLAN=env,build_C,bundle,tests_gpu,tests_ops,bench,zero3,bench_compile,compile_zero3
EVENTS="$WORK/events.tsv"
LOG="$OUT_DIR/gpu_check.log"
: > "$EVENTS"; : > "$LOG"
# A rerun into the same folder must not report an earlier run's numbers.
rm -f "$OUT_DIR"/gpu_check.md "$OUT_DIR"/gpu_check.json "$OUT_DIR"/gpu_train.json "$OUT_DIR"/gpu_train.md "$OUT_DIR"/zero3.json

if [ $DRY = 1 ]; then PY="${GPU_CHECK_PY:-$ROOT/.venv/bin/python}"; else PY="${GPU_CHECK_PY:-python3}"; fi
PY="$(command -v "$PY")" || { echo "gpu_check.sh: no python at '${GPU_CHECK_PY:-python3}'"; exit 2; }
# Its bin first: its ninja builds the ops (PLATFORM.md: mixing two ninjas rebuilds every run).
# PYTHONPATH: _C is built in place, nothing installs stm_dist; workers started by path need it.
export PATH="$(dirname "$PY"):$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PY WORK OUT_DIR DRY ROOT
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"  # bundle's FusedAdam build is the one the bench loads
[ $DRY = 1 ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# CUDA_HOME from the nvcc that is there: $CUDA_HOME if it holds one, else nvcc on PATH, else the
# usual folders and pip's nvidia-*-nvcc. nvcc may be a wrapper script (/usr/local/bin/nvcc here
# execs /usr/local/cuda-13.0/bin/nvcc): its --dryrun names the folder it really runs from.
cuda_home() {
  local nvcc here c
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME"; return 0; fi
  nvcc=$(command -v nvcc 2>/dev/null) || nvcc=""
  if [ -z "$nvcc" ]; then
    for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc $("$PY" -c 'import glob, site
for d in site.getsitepackages(): print(*sorted(glob.glob(d + "/nvidia/*/bin/nvcc")))' 2>/dev/null); do
      [ -x "$c" ] && { nvcc=$c; break; }
    done
  fi
  [ -n "$nvcc" ] || return 1
  : > "$WORK/probe.cu"
  here=$("$nvcc" --dryrun -c "$WORK/probe.cu" -o "$WORK/probe.o" 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)
  [ -d "$here" ] || here=$(dirname "$(readlink -f "$nvcc")")
  (cd "$here/.." && pwd)
}
FOUND_CUDA_HOME=$(cuda_home) || FOUND_CUDA_HOME=""
if [ $DRY = 0 ] && [ -n "$FOUND_CUDA_HOME" ]; then
  export CUDA_HOME="$FOUND_CUDA_HOME" PATH="$FOUND_CUDA_HOME/bin:$PATH"
fi
export FOUND_CUDA_HOME MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ $DRY = 0 ]; then
  # Nothing outside that machine answers: a pip that tries would sit in its retries.
  export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
fi

left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
need() { [ $DRY = 1 ] && echo 3 || echo "$1"; }  # a phase's minimum on the GPU (the dry run: any)
event() {  # NAME EVENT RC SECONDS SOFT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" $(( $(date +%s) - T0 )) "$3" "$4" "$5" "$6" >> "$EVENTS"
}
report() {
  local lock=()
  command -v flock >/dev/null && lock=(flock "$WORK/report.lock")
  "${lock[@]}" "$PY" -S "$ROOT/tools/gpu_check_report.py" --events "$EVENTS" --out "$OUT_DIR" --plan "$PLAN" \
    --t0 "$T0" --total "$TOTAL" $([ $DRY = 1 ] && echo --dry) "$@"
}
ended() {  # NAME: its exit status, or "none" when it did not run to an end
  awk -F'\t' -v n="$1" '$1 == n && $2 == "end" { rc = $4 } END { print (rc == "" ? "none" : rc) }' "$EVENTS"
}
kill_all() {  # what the device tool's limit does: everything at once (this shell last)
  local f p
  for f in "$WORK"/pid.*; do [ -s "$f" ] && kill -KILL -- "-$(cat "$f")" 2>/dev/null; done
  for p in $(cat "$WORK"/lane.* 2>/dev/null) $$; do [ "$p" = "$BASHPID" ] || kill -KILL "$p" 2>/dev/null; done
  kill -KILL $BASHPID
}
hook() { [ "${GPU_CHECK_KILL_AT:-}" = "$1:$2" ] && { echo "[$1] GPU_CHECK_KILL_AT=$1:$2: killing the run" >> "$LOG"; kill_all; }; return 0; }

# phase NAME NEED LIMIT SOFT CMD: CMD (bash) under timeout, its output into the log prefixed
# [NAME]. At the limit pytest gets SIGINT (it prints its summary), everything KILL 15 s later.
phase() {
  local name=$1 need=$2 limit=$3 soft=$4 cmd=$5 start rc note=""
  if [ -n "${GPU_CHECK_PHASES:-}" ] && ! [[ ",$GPU_CHECK_PHASES," == *",$name,"* ]]; then
    event "$name" unselected 0 0 "$soft" "GPU_CHECK_PHASES=$GPU_CHECK_PHASES"; report; hook "$name" end; return 0
  fi
  if [ -n "${SKIP_WHY:-}" ] || [ -e "$WORK/stop.$name" ] || [ "$limit" -lt "$need" ]; then
    note="${limit}s left of the ${TOTAL}s budget, it needs ~${need}s"
    [ -e "$WORK/stop.$name" ] && note="the benchmark started first"
    [ -n "${SKIP_WHY:-}" ] && note="$SKIP_WHY"
    echo "[$name] skipped: $note" >> "$LOG"
    event "$name" skip 0 0 "$soft" "$note"; report; hook "$name" end; return 0
  fi
  event "$name" start 0 0 "$soft" ""; report; hook "$name" start
  printf '[%s] == limit %ss%s: %s\n' "$name" "$limit" "$([ "$soft" = 1 ] && echo ', soft')" "$(printf '%s' "$cmd" | tr -s ' \n' ' ' | head -c 400)" >> "$LOG"
  start=$(date +%s)
  { TORCHINDUCTOR_CACHE_DIR="$WORK/inductor/$name" timeout -s INT -k 15 "$limit" bash -c "$cmd" 2>&1 &
    echo $! > "$WORK/pid.$name"; wait $!; } | sed -u "s/^/[$name] /" >> "$LOG"
  rc=${PIPESTATUS[0]}
  rm -f "$WORK/pid.$name"
  [ -e "$WORK/stop.$name" ] && [ "$rc" != 0 ] && note=stopped
  echo "[$name] == exit $rc after $(( $(date +%s) - start ))s${note:+ ($note)}" >> "$LOG"
  event "$name" end "$rc" $(( $(date +%s) - start )) "$soft" "$note"; report; hook "$name" end
}
stop_phase() {  # NAME LANE_PID: SIGINT to a running phase (pytest prints its summary), KILL after 20 s
  local i
  touch "$WORK/stop.$1"
  [ -s "$WORK/pid.$1" ] && kill -INT "$(cat "$WORK/pid.$1")" 2>/dev/null
  for i in $(seq 20); do kill -0 "$2" 2>/dev/null || return 0; sleep 1; done
  [ -s "$WORK/pid.$1" ] && kill -KILL -- "-$(cat "$WORK/pid.$1")" 2>/dev/null
}

# ---- env ---------------------------------------------------------------------------------
export ENV_PY='import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)
if torch.cuda.is_available():
    cap = torch.cuda.get_device_capability(0)
    print(f"card: {torch.cuda.get_device_name(0)}, sm_{cap[0]}{cap[1]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    open(sys.argv[1], "w").write(f"{cap[0]}.{cap[1]}")
else:
    print(f"card: none visible to torch {torch.__version__}")'
phase env "$(need 10)" 60 0 '
  date -u; uname -m; echo "cores: $(nproc)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi / no GPU"
  echo "CUDA_HOME: ${FOUND_CUDA_HOME:-no nvcc found}$([ "$DRY" = 1 ] && echo " (dry run: found, not used)")"
  [ -n "$FOUND_CUDA_HOME" ] && "$FOUND_CUDA_HOME/bin/nvcc" --version | tail -2
  "$PY" -c "$ENV_PY" "$WORK/arch"'
# The card's own arch for _C, the FusedAdam JIT and the cubin test alike.
if [ $DRY = 0 ] && [ -s "$WORK/arch" ]; then export TORCH_CUDA_ARCH_LIST="$(cat "$WORK/arch")"; fi
echo "[env] TORCH_CUDA_ARCH_LIST: ${TORCH_CUDA_ARCH_LIST:-unset (no card read: the setup.py default)}" >> "$LOG"

# ---- build_C and bundle, side by side ------------------------------------------------------
export CHECK_C='import stm_dist.ops as o
print("_C loaded:", o.extension_available(), "CPU kernel:", o.kernel_available("ms_deform_attn", "CPU"),
      "CUDA kernel:", o.kernel_available("ms_deform_attn", "CUDA"))'
export FUSED_ADAM='import time; t = time.time()
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("FusedAdamBuilder").load()
print("FusedAdam JIT build+load: %.1fs" % (time.time() - t))'
if [ $DRY = 1 ]; then
  BUILD='echo "dry run: no build; on the GPU: STM_DIST_CUDA=1 $PY setup.py build_ext --inplace"; "$PY" -c "$CHECK_C"'
  BUNDLE='if [ -f gpu_bundle/MANIFEST.txt ]; then (cd gpu_bundle && sha256sum -c --quiet MANIFEST.txt) && echo "bundle checksums ok"
    else echo "no gpu_bundle/ (make gpu-bundle): the GPU run would fail here"; fi
    echo "dry run: no install; DeepSpeed from the venv"; "$PY" -c "$FUSED_ADAM"'
else
  # No leftovers from the CPU box (a _C built for another torch can crash instead of raising).
  # build_ext, not pip: the bundle's pip install runs meanwhile and must be the only one.
  BUILD='set -e; rm -rf build stm_dist/_C*.so stm_dist/_C_build.json; T=$(date +%s)
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} CUDA_HOME=${CUDA_HOME:-unset} MAX_JOBS=$MAX_JOBS"
    STM_DIST_CUDA=1 "$PY" setup.py build_ext --inplace
    echo "_C build: $(( $(date +%s) - T ))s"; "$PY" -c "$CHECK_C"'
  BUNDLE='set -e
    test -f gpu_bundle/MANIFEST.txt || { echo "gpu_bundle/ missing: run make gpu-bundle here and carry [\"gpu_bundle\"]"; exit 3; }
    (cd gpu_bundle && sha256sum -c --quiet MANIFEST.txt)
    DSV=$(ls gpu_bundle/deepspeed-*.tar.gz | sed "s/.*deepspeed-\(.*\)\.tar\.gz/\1/"); T=$(date +%s)
    DS_BUILD_OPS=0 "$PY" -m pip install --no-index --find-links gpu_bundle --no-build-isolation "deepspeed==$DSV"
    echo "deepspeed install: $(( $(date +%s) - T ))s"; "$PY" -c "$FUSED_ADAM"'
fi
BC_LIMIT=$(min 240 $(( $(left) - 200 )))
phase build_C "$(need 60)" "$BC_LIMIT" 0 "$BUILD" & BUILD_PID=$!; echo $BUILD_PID > "$WORK/lane.build_C"
phase bundle "$(need 30)" "$BC_LIMIT" 0 "$BUNDLE" & BUNDLE_PID=$!; echo $BUNDLE_PID > "$WORK/lane.bundle"
wait $BUILD_PID

# ---- tests_gpu, with tests_ops beside it ----------------------------------------------------
PYTEST='"$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors'
[ $DRY = 1 ] && PYTEST="$PYTEST --collect-only"
C_FAILED=""; [[ "$(ended build_C)" =~ ^(0|none)$ ]] || C_FAILED="build_C failed (exit $(ended build_C)): no _C to test"
OWN_CUDA_TESTS="tests/ops/test_ms_deform_attn_cuda.py tests/ops/test_input_checks.py"
SKIP_WHY="$C_FAILED" phase tests_ops "$(need 30)" $(( $(left) - 60 )) 1 \
  "$PYTEST tests/ops -m 'not gpu' $(printf -- '--ignore=%s ' $OWN_CUDA_TESTS)" & OPS_PID=$!
echo $OPS_PID > "$WORK/lane.tests_ops"
SKIP_WHY="$C_FAILED" phase tests_gpu "$(need 20)" $(min 120 $(( $(left) - 150 ))) 0 \
  'DALI_TEST=tests/data/test_loaders.py::test_dali_gpu_decode_matches_cpu
   "$PY" -c "import nvidia.dali" 2>/dev/null || { DALI_TEST=; echo "no DALI here (no wheel for this machine): its mixed-decode GPU test is left out"; }
   OTHER=$(grep -rlE --include="test_*.py" "mark\.gpu" tests | grep -vxE "tests/(ops/test_ms_deform_attn_cuda|engine/test_compile_zero3|data/test_loaders)\.py")
   [ -z "$OTHER" ] || echo "gpu-marked tests this check does not run (give them a phase): $OTHER"
   exec '"$PYTEST $OWN_CUDA_TESTS"' $DALI_TEST' 
wait $BUNDLE_PID
# A JIT build killed at its limit leaves a lock that every later load waits on forever.
[ "$(ended bundle)" = 0 ] || find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null
stop_phase tests_ops $OPS_PID  # the CPU tests would skew the benchmark's timings
wait $OPS_PID

# ---- the benchmark: eager pairs, the ZeRO 3 step, compile with the time left ----------------
DS_FAILED=""; [[ "$(ended bundle)" =~ ^(0|none)$ ]] || DS_FAILED="bundle failed (exit $(ended bundle)): no DeepSpeed"
GT='"$PY" -m stm_dist.bench.gpu_train'
BENCH_ARGS="--json \"\$OUT_DIR/gpu_train.json\" --md \"\$OUT_DIR/gpu_train.md\""
ZERO3_ARGS="--models unified_dcn_v3_tiny"
COMPILE_BUDGET=""
if [ $DRY = 1 ]; then
  MICRO="--img-size 32 --batch 4 --num-classes 10 --steps 2 --rounds 1 --warmup 1 --threads 1"
  BENCH_ARGS="$BENCH_ARGS --models unified_convnext_micro $MICRO --compile-models unified_convnext_micro"
  ZERO3_ARGS="--models unified_dcn_v3_micro --img-size 32 --batch 2 --num-classes 10 --threads 1"
  # A cold inductor compile of even the micro model takes minutes on 2 cores: by default the dry
  # run shows the budget skip instead (GPU_CHECK_DRY_COMPILE_S=600 compiles).
  COMPILE_BUDGET="${GPU_CHECK_DRY_COMPILE_S:-1}"
fi
B_LIMIT=$(( $(left) - 80 ))  # 70 s kept for the ZeRO 3 step
phase bench "$(need 60)" "$B_LIMIT" 0 \
  "$GT --modes plain,engine $BENCH_ARGS --budget-s $(( B_LIMIT - 10 )) ${GPU_CHECK_BENCH_ARGS:-}"
Z_LIMIT=$(min 180 $(( $(left) - 10 )))
SKIP_WHY="$DS_FAILED" phase zero3 "$(need 30)" "$Z_LIMIT" 0 \
  "$GT --modes engine --zero-stage 3 --precision bf16 --ds-config ds_configs/zero3_bf16.json --warmup 1 --steps 3 --rounds 1 \
   $ZERO3_ARGS --json \"\$OUT_DIR/zero3.json\""
C_LIMIT=$(( $(left) - 10 ))
SKIP_WHY="$DS_FAILED" phase bench_compile "$(need 100)" "$C_LIMIT" 1 \
  "$GT --modes engine_compile --append $BENCH_ARGS --budget-s ${COMPILE_BUDGET:-$(( C_LIMIT - 10 ))} ${GPU_CHECK_BENCH_ARGS:-}"
SKIP_WHY="$DS_FAILED" phase compile_zero3 "$(need 150)" $(min 400 $(( $(left) - 10 ))) 1 \
  "$PYTEST tests/engine/test_compile_zero3.py"

# ---- the report ------------------------------------------------------------------------------
report --final; RC=$?
cat "$OUT_DIR/gpu_check.md"
echo "gpu_check.sh: $(( $(date +%s) - T0 ))s in all, exit $RC; results in $OUT_DIR"
exit $RC
