#!/usr/bin/env bash
# One command for a GPU machine (fused LSH attention): correctness on CUDA, the
# attention table (4K..1M tokens) and the 12-layer LM, then the Triton tests on CUDA with the time left.
# Needs python3 with torch + triton (CUDA); installs nothing. Results go to $OUT (default ./gpu_out):
# env.json, correctness.json, results.jsonl, table.md, bench.log, pytest.log, nvidia-smi.txt.
# BUDGET (seconds, default 380) bounds the benchmark; the tests get at most 120 s after it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-380}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
timeout $((BUDGET + 30)) "$PY" benchmarks/gpu_lsh.py --out "$OUT" --budget-s "$BUDGET" 2>&1 | tee "$OUT/bench.log"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/attention/test_triton_lsh.py 2>&1 | tee "$OUT/pytest.log"
cat "$OUT/table.md"
