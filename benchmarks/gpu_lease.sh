#!/bin/bash
# One GPU lease's measurements, step by step, each under its own timeout, packed after every step into
# $OUT/results.tgz (the device tool brings back at most 8 files; one archive holds them all).
#
#   bash benchmarks/gpu_lease.sh STEP [STEP ...]     (on the GPU machine, from the repository root)
#
# Steps (seconds each at most; the order given is the order run):
#   mat     320  timm at its fastest (bf16 weights, torch.compile max-autotune) against fast, s12: the 1.3x target
#   fast    180  fast against timm eager, s12 and v2_s12: throughput, kernel by kernel, batch-1 latency
#                (autotuning times every MLP form, the GEMM form's tiles included)
#   gemm    150  A/B: fast s12 and v2_s12 with every MLP on the GEMM form (POOLFORMER_TRITON_MLP=gemm), kernels
#                (after `fast` in the same call, whose autotuning compiled the same kernels: Triton's cache)
#   gelu    100  A/B: fast s12 with POOLFORMER_TRITON_GELU=poly (run after `fast`, which is the other side)
#   m36     150  the same for poolformer_m36 (throughput, kernels)
#   exact    90  fast fp32 against our fp32 model over 1,024 images; bf16 top-1 agreement (s12, v2_s12)
#   suite   120  gpu_suite: oom, timing, profile, predict/eval, memory
#   sweep   240  gpu_suite's bench sweep for s12 (compiled rows and --max-batch included)
#   train   240  gpu_suite: bench --mode train, s12 and m36 at 224/512 px, checkpointing and --max-batch
# Autotuned tiles: every step shares one tile cache, $RESULTS_DIR/triton_tiles.json, packed with the results.
# Extract it here as .lease_cache/triton_tiles.json (.git/info/exclude it) and name .lease_cache in the next
# call's carry: the steps then start from those tiles and skip autotuning (fast_gpu.py --no-autotune), which
# took most of a first run in the second lease.
# Results: benchmarks/results/gpu/README.md says how the earlier leases' files were named and committed.
set -u
for name in "$@"; do
    case $name in mat|fast|gemm|gelu|m36|exact|suite|sweep|train) ;; *) echo "unknown step '$name' (mat, fast, gemm, gelu, m36, exact, suite, sweep, train)" >&2; exit 2 ;; esac
done
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_lease.sh STEP [STEP ...] (mat, fast, gemm, gelu, m36, exact, suite, sweep, train)" >&2; exit 2; }
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
OUT=${OUT:?run this through the device tool, which sets OUT}
R=${RESULTS_DIR:-/tmp/lease_results}
mkdir -p "$R"
export POOLFORMER_TRITON_TILE_CACHE="$R/triton_tiles.json"
AUTOTUNE=()
if [ -s "${LEASE_TILES:-.lease_cache/triton_tiles.json}" ]; then
    cp "${LEASE_TILES:-.lease_cache/triton_tiles.json}" "$POOLFORMER_TRITON_TILE_CACHE"
    AUTOTUNE=(--no-autotune)  # the carried tiles, untimed
fi
pack() { tar czf "$OUT/results.tgz" -C "$R" . ; }
nvidia-smi > "$R/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__)" > "$R/versions.txt" 2>&1
git rev-parse HEAD > "$R/commit.txt" 2>/dev/null || true
step() {  # name, seconds, command...
    local name=$1 seconds=$2; shift 2
    echo "== $name ($(date -u +%H:%M:%S), at most ${seconds}s): $*" | tee -a "$R/steps.txt"
    timeout "$seconds" "$@" > "$R/$name.log" 2>&1
    echo "   rc=$?" | tee -a "$R/steps.txt"
    pack
}
for name in "$@"; do
    case $name in
        mat) step mat 320 "$PY" benchmarks/fast_gpu.py --out "$R/mat" --models s12 --sections throughput \
                --candidates "fast,timm eager NCHW,timm max-autotune" ${AUTOTUNE[@]+"${AUTOTUNE[@]}"} ;;
        fast) step fast 180 "$PY" benchmarks/fast_gpu.py --out "$R/fast" --models s12,v2_s12 \
                --sections throughput,kernels,latency --candidates "fast,timm eager,timm eager NCHW" ${AUTOTUNE[@]+"${AUTOTUNE[@]}"} ;;
        gemm) step gemm 150 env POOLFORMER_TRITON_MLP=gemm POOLFORMER_TRITON_TILE_CACHE=0 "$PY" \
                benchmarks/fast_gpu.py --out "$R/gemm" --models s12,v2_s12 --sections throughput,kernels --candidates fast ;;
        gelu) step gelu 100 env POOLFORMER_TRITON_GELU=poly POOLFORMER_TRITON_TILE_CACHE=0 "$PY" \
                benchmarks/fast_gpu.py --out "$R/gelu" --models s12 --sections throughput,kernels --candidates fast ;;
        m36) step m36 150 "$PY" benchmarks/fast_gpu.py --out "$R/m36" --models m36 --sections throughput,kernels \
                --candidates "fast,timm eager,timm eager NCHW" ${AUTOTUNE[@]+"${AUTOTUNE[@]}"} ;;
        exact) step exact 90 "$PY" benchmarks/fast_gpu.py --out "$R/exact" --models s12,v2_s12 --sections exactness \
                ${AUTOTUNE[@]+"${AUTOTUNE[@]}"} ;;
        suite) step suite 120 "$PY" benchmarks/gpu_suite.py --out "$R/suite" \
                --sections oom,timing,profile,predict_eval,memory ;;
        sweep) step sweep 240 "$PY" benchmarks/gpu_suite.py --out "$R/sweep" --sections sweep --models s12 ;;
        train) step train 240 "$PY" benchmarks/gpu_suite.py --out "$R/train" --sections train ;;
    esac
done
cat "$R/steps.txt"
