#!/usr/bin/env bash
# One GPU slot's measurements for issue 13, in the order they matter, inside a ~10-minute command:
#   1. bench/gpu_blip2_opt27b_shapes.py: the decoders (fast, fast with --cuda-graphs, generate()) x every LLM
#      precision at blip2-opt-2.7b's shapes (captions/s, ms per decode step, % of bound, peak memory, 8-bit
#      answers against fp16's);
#   2. bench/gpu_compiled_decode.py: generate()'s dynamic cache vs a static cache compiled with CUDA graphs,
#      ms per decode step at 5/40/160 rows (how far graph capture takes a step), in the time left.
# Everything goes to $OUT (JSON after every cell, logs beside), so a run cut short still reports.
#
#   bash bench/gpu_session.sh            # on the device: run(command="bash bench/gpu_session.sh", timeout_s=600)
#   SMALL=1 bash bench/gpu_session.sh    # the same pipeline at tiny widths, on the CPU
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
small=()
[ -n "${SMALL:-}" ] && small=(--small)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# The GPU-only tests first (CUDA-graph steps against generate()): a minute at most.
timeout 120 "$PY" -m pytest -q -m gpu tests/service/test_decoding.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?" | tee -a "$OUT/session.txt"
# Each step has its own budget (new cells stop starting) and a hard limit, so both get their turn.
timeout 330 "$PY" bench/gpu_blip2_opt27b_shapes.py "${small[@]}" --rounds 2 --budget-s 190 --out "$OUT" \
    > "$OUT/shapes.log" 2>&1
echo "shapes: exit $?" | tee -a "$OUT/session.txt"
timeout 230 "$PY" bench/gpu_compiled_decode.py "${small[@]}" --budget-s 150 --out "$OUT" \
    > "$OUT/compiled_decode.log" 2>&1
echo "compiled_decode: exit $?" | tee -a "$OUT/session.txt"
tail -n 5 "$OUT/shapes.log" "$OUT/compiled_decode.log"
