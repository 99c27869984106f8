#!/usr/bin/env bash
# One GPU check of train-t2i's speed switches and the captioner (benchmarks/gpu_check.py says what
# it measures; docs/real-run.md, "GPU speed switches", how to read it). Prints markdown tables.
#
#   bash benchmarks/gpu_check.sh              # one H100, under 8 minutes
#   bash benchmarks/gpu_check.sh --smoke      # tiny models on the CPU, under a minute (the test suite runs it)
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_check.sh --peak-tflops 756   # H100 PCIe
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
