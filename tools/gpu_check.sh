#!/usr/bin/env bash
# The prepared check for a session lent one GPU (issue 10, item 7). On the device machine, in the
# repo root, with the bundle from `make gpu-bundle` carried along:
#     run(command="bash tools/gpu_check.sh", carry=["gpu_bundle"], timeout_s=540)
# Here, on a CPU box (no nvcc build, no bundle install, the local .venv, micro sizes):
#     bash tools/gpu_check.sh --dry-run [--out DIR]
#
# Phases, each under `timeout`, each logging to its own file, none able to lose another's results:
#   a env.log     nvidia-smi, torch/CUDA/nvcc versions
#   b build.log   stm_dist._C rebuilt against the machine's torch for sm_90   } run side by side:
#   c bundle.log  DeepSpeed + deps installed offline, FusedAdam JIT-built     } both CPU-bound
#   d tests.log   GPU-marked tests and the op's argument checks (the crash seen on the GPU)
#   e bench.log   stm_dist.bench.gpu_train -> gpu_train.json (rewritten after every model)
#   d tests.log   the rest of tests/ops, with whatever time is left
#   f gpu_check.md / gpu_check.json: phase table + benchmark table (also printed last)
# That is 8 files: the device tool returns at most 8 from $OUT, so scratch goes to $WORK.
# The whole stays inside GPU_CHECK_TOTAL_S (default 470 s, 8 minutes with margin).
# GPU_CHECK_PHASES=env,bench (say) runs only those; the others show as "not selected".
# GPU_CHECK_BENCH_ARGS is appended to the benchmark's arguments (e.g. "--models unified_swin_tiny").
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run, --out DIR)"; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then
  [ $DRY = 1 ] && OUT_DIR=bench_out/gpu_check_dry || { echo "gpu_check.sh: \$OUT is unset; pass --out DIR"; exit 2; }
fi
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$WORK"
TOTAL="${GPU_CHECK_TOTAL_S:-470}"
T0=$(date +%s)
PHASES="$WORK/phases.tsv"
: > "$PHASES"

export PYTHONUNBUFFERED=1
# Caches out of $OUT (8-file limit) and out of $HOME; one folder so the JIT build in phase c is
# the one the benchmark loads.
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
if [ $DRY = 1 ]; then
  PY="${GPU_CHECK_PY:-$PWD/.venv/bin/python}"
  # Keep the venv's ninja first (PLATFORM.md: mixing ninjas rebuilds DeepSpeed ops every run).
  export PATH="$(dirname "$PY"):$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  PY="${GPU_CHECK_PY:-python3}"
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  # The image defaults to 9.0a; plain sm_90 is what the wheel users' cards run (PLATFORM.md).
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  # Nothing outside that machine answers: a pip that tries (self-update check, an index) would
  # sit in its retries until the phase's limit.
  export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
fi
[ -x "$(command -v "$PY")" ] || { echo "gpu_check.sh: no python at '$PY'"; exit 2; }

left() { echo $(( TOTAL - ($(date +%s) - T0) )); }

# phase NAME LOG LIMIT_S COMMAND: run COMMAND under timeout, append its output to LOG, record
# name / exit status / seconds. Exit 124 or 137 in the table means it hit its limit.
phase() {
  local name=$1 log=$2 limit=$3 cmd=$4 start rc
  start=$(date +%s)
  if [ -n "${GPU_CHECK_PHASES:-}" ] && ! [[ ",$GPU_CHECK_PHASES," == *",$name,"* ]]; then
    echo "== $name: not run (GPU_CHECK_PHASES=$GPU_CHECK_PHASES)" | tee -a "$OUT_DIR/$log"
    printf '%s\t%s\t%s\t%s\n' "$name" "not selected" 0 "$log" >> "$PHASES"
    return 0
  fi
  if [ "$limit" -lt 5 ]; then
    echo "== $name: not started, ${limit}s left of the ${TOTAL}s budget" | tee -a "$OUT_DIR/$log"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$log" >> "$PHASES"
    return 0
  fi
  echo "== $name (limit ${limit}s): $cmd" >> "$OUT_DIR/$log"
  timeout -k 10 "$limit" bash -c "$cmd" >> "$OUT_DIR/$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(( $(date +%s) - start )) "$log" >> "$PHASES"
  echo "== $name: exit $rc after $(( $(date +%s) - start ))s (log $log)" | tee -a "$OUT_DIR/$log"
}

# ---- a: the machine ------------------------------------------------------------------------
phase env env.log 30 "
  date -u; uname -m; nproc
  nvidia-smi -L || echo 'no nvidia-smi / no GPU'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo 'no nvcc on PATH'
  echo \"TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-unset}\"
  '$PY' -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'
  [ $DRY = 1 ] || '$PY' -m pip list 2>/dev/null | grep -i -E '^(torch|deepspeed|pydantic|hjson|setuptools|ninja|typing.extensions|timm) ' || true
"

# ---- b + c, side by side -------------------------------------------------------------------
CHECK_C="'$PY' -c 'import stm_dist.ops as o; import torch; print(\"_C loaded:\", o.extension_available(), \"CPU kernel:\", o.kernel_available(\"ms_deform_attn\", \"CPU\"), \"CUDA kernel:\", o.kernel_available(\"ms_deform_attn\", \"CUDA\"), \"torch\", torch.__version__)'"
if [ $DRY = 1 ]; then
  BUILD="echo 'dry run: no nvcc build; the local _C:'; $CHECK_C"
  BUNDLE="if [ -f gpu_bundle/MANIFEST.txt ]; then (cd gpu_bundle && sha256sum -c --quiet MANIFEST.txt && echo 'bundle checksums ok:' && ls); else echo 'no gpu_bundle/ (make gpu-bundle): the GPU run would stop here'; fi
    echo 'dry run: no offline install; DeepSpeed from the venv, FusedAdam through the accelerator:'"
else
  # No leftovers from the CPU box: a _C built for another torch can crash instead of raising.
  BUILD="rm -rf build stm_dist/_C*.so; T=\$(date +%s)
    STM_DIST_CUDA=1 '$PY' -m pip install --no-build-isolation --no-deps -e . && echo \"_C build: \$(( \$(date +%s) - T ))s\" && $CHECK_C"
  BUNDLE="set -e; test -f gpu_bundle/MANIFEST.txt || { echo 'gpu_bundle/ missing: run make gpu-bundle here and carry [\"gpu_bundle\"]'; exit 3; }
    (cd gpu_bundle && sha256sum -c --quiet MANIFEST.txt)
    DSV=\$(ls gpu_bundle/deepspeed-*.tar.gz | sed 's/.*deepspeed-\\(.*\\)\\.tar\\.gz/\\1/'); T=\$(date +%s)
    DS_BUILD_OPS=0 '$PY' -m pip install --no-index --find-links gpu_bundle --no-build-isolation \"deepspeed==\$DSV\"
    echo \"deepspeed install: \$(( \$(date +%s) - T ))s\""
fi
# ds_setup turns config AdamW into DeepSpeed's FusedAdam: build it now (JIT, timed) so the
# first engine case in the benchmark doesn't pay for it inside its time.
BUNDLE="$BUNDLE
  '$PY' -c 'import time; t = time.time(); from deepspeed.accelerator import get_accelerator as g; g().create_op_builder(\"FusedAdamBuilder\").load(); print(\"FusedAdam JIT build+load: %.1fs\" % (time.time() - t))'"
BC_LIMIT=$(( $(left) - 200 )); [ $BC_LIMIT -gt 240 ] && BC_LIMIT=240
phase build_C build.log "$BC_LIMIT" "$BUILD" &
phase bundle bundle.log "$BC_LIMIT" "$BUNDLE" &
wait

# ---- d (first half): what only the GPU can show, and the op's argument checks ----------------
GPU_TESTS=$(grep -rl --include='test_*.py' -E 'mark\.gpu' tests | grep -v '^tests/ops/' | sort | tr '\n' ' ')
PYTEST="'$PY' -m pytest -q -p no:cacheprovider --continue-on-collection-errors"
[ $DRY = 1 ] && PYTEST="$PYTEST --collect-only"
# The loader's GPU tests need DALI, which the GPU image lacks and whose wheel cannot travel.
NO_DALI=$(echo "$GPU_TESTS" | tr ' ' '\n' | grep -v '^tests/data/' | tr '\n' ' ')
phase tests_gpu tests.log $(( $(left) - 150 > 90 ? 90 : $(left) - 150 )) \
  "if '$PY' -c 'import nvidia.dali' 2>/dev/null; then T='$GPU_TESTS'; else T='$NO_DALI'; echo 'no DALI here: tests/data left out'; fi
   $PYTEST -m gpu tests/ops; r1=\$?; $PYTEST tests/ops/test_input_checks.py; r2=\$?
   # Last: the engine's GPU tests compile models, so a phase timeout costs only them.
   r3=0; T=\$(echo \$T); [ -n \"\$T\" ] && { $PYTEST -m gpu \$T; r3=\$?; }
   exit \$(( r1 > r2 ? (r1 > r3 ? r1 : r3) : (r2 > r3 ? r2 : r3) ))"

# ---- e: the benchmark ----------------------------------------------------------------------
BENCH_ARGS="--json '$OUT_DIR/gpu_train.json' --md '$WORK/gpu_train.md'"
if [ $DRY = 1 ]; then
  BENCH_ARGS="$BENCH_ARGS --models unified_convnext_micro --img-size 32 --batch 4 --num-classes 10 --steps 2 --rounds 1 --warmup 1 --threads 1 --modes ${GPU_CHECK_DRY_MODES:-plain,engine}"
fi
B_LIMIT=$(( $(left) - 25 ))
phase bench bench.log "$B_LIMIT" "'$PY' -m stm_dist.bench.gpu_train $BENCH_ARGS --budget-s $(( B_LIMIT - 15 )) ${GPU_CHECK_BENCH_ARGS:-}"

# ---- d (second half): the rest of tests/ops in what remains ----------------------------------
phase tests_ops tests.log $(( $(left) - 10 )) "$PYTEST tests/ops -m 'not gpu' --ignore tests/ops/test_input_checks.py"

# ---- f: the report -------------------------------------------------------------------------
"$PY" - "$PHASES" "$OUT_DIR" "$WORK/gpu_train.md" "$DRY" <<'EOF'
import json, os, re, sys

phases_tsv, out, bench_md, dry = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
phases = []
for line in open(phases_tsv):
    name, rc, secs, log = line.rstrip("\n").split("\t")
    text = open(os.path.join(out, log), errors="replace").read() if os.path.exists(os.path.join(out, log)) else ""
    # Both test phases share tests.log: read only this phase's part of it.
    part = re.search(rf"(?ms)^== {name} \(limit.*?^== {name}: exit", text)
    text = part.group(0) if part else ""
    # The lines a reader wants from each log: pytest's summary, the build/JIT timings, the card.
    pytest_sum = r"^=*[ ]*\d+(/\d+)? (passed|failed|skipped|errors?|deselected|tests? collected).*$"
    pat = {"tests_gpu": pytest_sum, "tests_ops": pytest_sum, "build_C": r"^_C (build|loaded).*$",
           "bundle": r"^(deepspeed install|FusedAdam JIT).*$", "env": r"^GPU \d.*$|^\d+\.\d+\.\d+ \S+ cuda .*$"}.get(name)
    hits = [m.group(0) for m in re.finditer(pat, text, re.M)] if pat else []
    status = rc if rc in ("skipped", "not selected") else ("ok" if rc == "0" else ("TIMED OUT" if rc in ("124", "137") else f"FAILED ({rc})"))
    phases.append({"phase": name, "status": status, "exit": rc, "seconds": int(secs), "log": log,
                   "summary": "; ".join(h.strip("= ") for h in hits[-3:])})
bench = None
if os.path.exists(os.path.join(out, "gpu_train.json")):
    bench = json.load(open(os.path.join(out, "gpu_train.json")))
    rows = bench["rows"]
    for p in phases:
        if p["phase"] == "bench":
            p["summary"] = (f"{sum(1 for r in rows if r['img_per_s'])} cases measured, "
                            f"{sum(1 for r in rows if r.get('error'))} failed, "
                            f"{sum(1 for r in rows if r.get('skipped'))} skipped for time")
md = ["# GPU check" + (" (dry run on CPU: micro model, tiny sizes; numbers mean nothing)" if dry else ""), "",
      "| phase | status | s | summary | log |", "|---|---|---|---|---|"]
md += [f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['summary'].replace('|', '/')} | {p['log']} |" for p in phases]
md += ["", open(bench_md).read() if os.path.exists(bench_md) else "No benchmark table: see bench.log."]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(md) + "\n")
json.dump({"dry_run": dry, "phases": phases, "bench": bench}, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print("\n".join(md))
EOF
echo "gpu_check.sh: $(( $(date +%s) - T0 ))s in all; results in $OUT_DIR"
# Non-zero when any phase failed, so a caller sees it without reading the table.
! cut -f2 "$PHASES" | grep -v -x -E '0|skipped|not selected' -q
