#!/usr/bin/env bash
# Every GPU acceptance figure of issue 18 in one command; see benchmarks/gpu_acceptance.py.
#
#   bash benchmarks/gpu_acceptance.sh                  # one H100 / H200, under 8 minutes
#   bash benchmarks/gpu_acceptance.sh --tiny           # the same code paths on the CPU, under 2 minutes
#   bash benchmarks/gpu_acceptance.sh --out DIR        # JSON + log into DIR (default benchmarks/results)
#
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_acceptance "$@"
