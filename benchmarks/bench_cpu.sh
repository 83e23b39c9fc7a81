#!/usr/bin/env bash
# CPU results of `poolformer bench` on this machine (2 shared cores): our s12 next to timm's, NCHW vs
# channels_last, fp32 vs bf16 autocast. One thread, so a neighbour process stalls us less (see
# benchmarks/results/regression_check_cpu.md for how noisy this machine is); ratios within one run are the
# claim, not absolute img/s. Run from the repository root:
#   flock /tmp/poolformer-bench.lock benchmarks/bench_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
poolformer bench s12 --device cpu --threads 1 --impl ours,timm --batch-sizes 1,8 --resolutions 224 \
  --precision fp32 --warmup 5 --iters 20 --normalised \
  --output $out/bench_cpu_s12_fp32.json --csv $out/bench_cpu_s12_fp32.csv
poolformer bench s12 --device cpu --threads 1 --impl ours,timm --batch-sizes 8 --resolutions 224 \
  --precision fp32,bf16 --channels-last --warmup 5 --iters 20 --normalised \
  --output $out/bench_cpu_s12_channels_last.json --csv $out/bench_cpu_s12_channels_last.csv
