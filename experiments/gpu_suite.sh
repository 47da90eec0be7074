#!/usr/bin/env bash
# Issue 7's GPU checks in one prepared run (docs/performance.md, "GPU" section): the benchmark scripts of
# experiments/ at GPU sizes, each under its own time limit so that one slow step cannot eat the others.
#
#   OUT=DIR bash experiments/gpu_suite.sh          # on a GPU machine, from the repository root
#   SUITE_SMALL=1 OUT=/tmp/s bash experiments/gpu_suite.sh   # the same steps at toy sizes (a CPU smoke test)
#   SUITE_ORDER=first ...   # the order of the first run (default: what that run left unmeasured goes first)
#
# Needs jax with a GPU backend, flax, optax, orbax-checkpoint, chex; torch (CUDA build) and diffusers for the
# torch reference columns. If a folder .whl/ holds wheels (diffusers and its missing needs), they are
# installed into /tmp/site first; fetch them on a machine with PyPI (the GPU machine has none):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# (the device tool carries .whl; its image had torch 2.11, jax 0.11.2, flax, optax, orbax, chex, not diffusers). pdjax itself is used from the checkout (PYTHONPATH), not installed.
# Writes OUT/log.txt and one JSON per benchmark; the numbers quoted in docs/performance.md come from them.
set -u
OUT=${OUT:-/tmp/pdjax-gpu-suite}
mkdir -p "$OUT"
log=$OUT/log.txt
: > "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# JAX would take 75% of the GPU at start; the torch reference runs in a worker process beside it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name rc=${PIPESTATUS[0]} ($(date +%T))" | tee -a "$log"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

if [ -n "${SUITE_SMALL:-}" ]; then
  BIG=tiny SMALL=tiny UNET_BATCH=4 BIG_BATCH=8 ITERS=2 INV_STEPS=2,2 INV_BATCH=4 COUNTS=1,2 AUDIT_STEPS=2
else
  BIG=ddpm-cifar10-32 SMALL=digits-16 UNET_BATCH=128 BIG_BATCH=512 ITERS=20 INV_STEPS=10,20 INV_BATCH=32
  COUNTS=1,4,16,32 AUDIT_STEPS=10
fi

step environment 60 bash -c "nvidia-smi -L 2>/dev/null; nproc; $PY -c '
import importlib.metadata as m, jax
for p in (\"jax\", \"jaxlib\", \"flax\", \"optax\", \"orbax-checkpoint\", \"chex\", \"numpy\", \"torch\", \"diffusers\"):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, \"missing\")
print(jax.devices())
import pdjax; print(\"pdjax imports\")
'"
# The 2026-12-04 run (experiments/results/gpu_h200/, 590 s on an H200) measured steps 1-4 but stopped in the
# audit's N = 64 compile and before the bf16 check; SUITE_ORDER=next runs first what it left unmeasured.
UNMEASURED="bf16 audit precision"
MEASURED="unet inversion unet_big scan"
if [ "${SUITE_ORDER:-next}" = next ]; then ORDER="$UNMEASURED $MEASURED"; else ORDER="$MEASURED $UNMEASURED"; fi
for s in $ORDER; do
  case $s in
  # UNet throughput and MFU at the google/ddpm-cifar10-32 size, float32 and bfloat16, torch eager beside.
  unet) step unet 170 $PY experiments/bench_unet.py --size $BIG --batch $UNET_BATCH --iters $ITERS \
          --json "$OUT/bench_unet_gpu.json" ;;
  # One inversion, pdjax vs torch eager on the same weights, noise and steps.
  inversion) step inversion 220 $PY experiments/bench_inversion.py --sizes $BIG,$SMALL --steps $INV_STEPS \
          --batch $INV_BATCH --K 10 --json "$OUT/bench_inversion_gpu.json" ;;
  # The same at full float32 on both sides: are the trigger differences of the default (TF32) run rounding?
  precision) step precision 150 $PY experiments/bench_inversion.py --sizes $BIG --steps ${INV_STEPS%%,*} \
          --batch $INV_BATCH --K 10 --precision highest --json "$OUT/bench_inversion_gpu_highest.json" ;;
  # Audit throughput against stacked models (the JSON is rewritten after every stack).
  audit) step audit 150 $PY experiments/bench_audit.py --preset $SMALL --counts $COUNTS --steps $AUDIT_STEPS \
          --json "$OUT/bench_audit_gpu.json" ;;
  # bf16 forward+backward at a larger batch (MFU as the batch fills the chip).
  unet_big) step unet_big 80 $PY experiments/bench_unet.py --size $BIG --batch $BIG_BATCH --iters $ITERS \
          --dtypes bfloat16 --no-torch --json "$OUT/bench_unet_gpu_big.json" ;;
  # The README's main job, timed (the demo models, default settings).
  scan) step scan 90 bash -c "time TQDM_DISABLE=1 $PY -m pdjax.cli scan --out /tmp/pdjax-scan > /tmp/pdjax-scan.log 2>&1; \
          grep -E 'CLEAN|BACKDOORED|flagged' /tmp/pdjax-scan.log; cp /tmp/pdjax-scan/scan.json '$OUT/scan_gpu.json'" ;;
  # bf16 inversion: the scan's verdicts and triggers float32 vs bfloat16.
  bf16) step bf16 120 $PY experiments/bench_bf16.py --out "$OUT/bench_bf16_gpu.json" ;;
  esac
done
echo "suite done ($(date +%T))" | tee -a "$log"
