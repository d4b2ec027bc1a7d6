#!/usr/bin/env bash
# Every benchmark unit on one CUDA GPU (an H200, or any), float32 and bfloat16, one command.
#
#   benchmarks/gpu.sh [OUT_DIR] [--quick]
#
# Runs, in this order (most informative first), each under what is left of a time budget
# (MTKD_GPU_BUDGET_S, default 450 s, so the whole script stays under 8 minutes):
#   gpu_f32, gpu_bf16         benchmarks/run.py --workload gpu: batch 1024, 3 ResNet-14-like
#                             teachers (GroupNorm), small ResNet student, every unit
#   lm                        benchmarks/lm.py: the language-model distill step (tiny
#                             student, 3 small teachers, V = 8192, L = 128) online, cached,
#                             unchunked, bare JAX; XLA memory at V = 128k on the device
#   standard_f32, standard_bf16  benchmarks/run.py --workload standard (batch 256, ConvNets)
#   strategy_f32              benchmarks/strategy_bench.py --preset gpu: vmap vs loop vs auto
#   shard_gpu                 benchmarks/shard_bench.py over the GPUs (mesh 1 x D): replicated
#                             vs FSDP / one-per-group teachers; with one GPU nothing is split
#   shard_cpu8                the same on 8 fake CPU devices (mesh 2 x 4), for comparison
# then prints one table (run.py --summarize) and writes OUT_DIR/summary.json next to each
# run's JSON, stdout and log. The PyTorch unit is CPU-only and is left out here. Needs a
# CUDA build of jaxlib (pip install -U "jax[cuda12]") and `pip install -e .` of this repo.
#
# --quick runs the same script path with tiny sizes; it works on a CPU-only machine, which is
# how this script was tested (no GPU was available when it was written).
set -uo pipefail
cd "$(dirname "$0")/.."

# Results go to OUT_DIR, else $OUT (the folder a remote runner sends back), else /tmp.
OUT=${OUT:-/tmp/mtkd_jax_gpu}
QUICK=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=(--quick) ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
mkdir -p "$OUT"
BUDGET=${MTKD_GPU_BUDGET_S:-450}
START=$(date +%s)

python - <<'EOF' || exit 1
import jax
backend = jax.default_backend()
print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
if backend != "gpu":
    print("WARNING: no GPU backend; the numbers below are for this CPU (fine for --quick).")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$OUT/nvidia_smi.txt" || true

run() {  # run NAME SCRIPT ARGS...: one benchmark, JSON to $OUT/NAME.json, within the budget
  local name=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 30 )); then
    echo "skipped $name: time budget spent" | tee -a "$OUT/skipped.txt"
    return
  fi
  echo "== $name (budget left ${left}s)"
  if timeout "$left" python "$@" "${QUICK[@]}" --json "$OUT/$name.json" \
      >"$OUT/$name.txt" 2>"$OUT/$name.log"; then
    cat "$OUT/$name.txt"
  else
    echo "FAILED or timed out: $name (see $OUT/$name.log)" | tee -a "$OUT/skipped.txt"
    rm -f "$OUT/$name.json"
    tail -5 "$OUT/$name.log"
  fi
}

rm -f "$OUT"/*.json "$OUT/skipped.txt"
COMMON=(--no-torch)
(( ${#QUICK[@]} )) || COMMON+=(--repeats 5 --target-seconds 0.3)
run gpu_f32 benchmarks/run.py --workload gpu --dtype float32 "${COMMON[@]}"
run gpu_bf16 benchmarks/run.py --workload gpu --dtype bfloat16 "${COMMON[@]}"
run lm benchmarks/lm.py "${COMMON[@]}"
run standard_f32 benchmarks/run.py --workload standard --dtype float32 "${COMMON[@]}"
run standard_bf16 benchmarks/run.py --workload standard --dtype bfloat16 "${COMMON[@]}"
run strategy_f32 benchmarks/strategy_bench.py --preset gpu --rounds 5
# Sharded teachers (mtkd_jax.parallel); COMMON holds run.py flags, which do not apply here.
run shard_gpu benchmarks/shard_bench.py
JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  run shard_cpu8 benchmarks/shard_bench.py --mesh 2x4 --repeats 5

shopt -s nullglob
files=("$OUT"/gpu_*.json "$OUT"/standard_*.json "$OUT"/strategy_*.json)
if [[ -f "$OUT/lm.json" ]]; then  # its own goals (not run.py's format)
  echo "== lm.json"; python -c "import json,sys; d=json.load(open(sys.argv[1])); \
[print(k, json.dumps(d[k])) for k in ('lib_vs_bare', 'memory_ratio_128k', 'cached_vs_online') \
 if k in d]" "$OUT/lm.json"
fi
for f in "$OUT"/shard_*.json; do  # its own table (not run.py's format)
  echo "== $(basename "$f")"; python -c "import json,sys; d=json.load(open(sys.argv[1])); \
[print(k, {m: round(v, 3) for m, v in r.items() if m.endswith('ratio')}) \
 for k, r in d['variants'].items()]" "$f"
done
echo
echo "== summary ($(( $(date +%s) - START )) s)"
if (( ${#files[@]} )); then
  python benchmarks/run.py --summarize "${files[@]}" --json "$OUT/summary.json"
else
  echo "no results"; exit 1
fi
[[ -f "$OUT/skipped.txt" ]] && { echo; cat "$OUT/skipped.txt"; }
exit 0
