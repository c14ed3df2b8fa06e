#!/usr/bin/env bash
# The GPU check of issue 40 (<= 8 minutes on one GPU): the demo pipeline, Lite0 W4A8 at the quick budget and
# Lite0 W4A4 at 10x its iterations, each in fp32 and bf16 on --device, with times, peak GPU memory and top-1
# written to benchmarks/results/gpu/ (see benchmarks/gpu_check.py for the steps; docs/compute.md for what it
# measures). Usage: benchmarks/gpu_check.sh [--device cuda|cuda:N|cpu] [--out DIR] [--tiny] [--max-seconds S]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-python}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$py" "$here/gpu_check.py" "$@"
