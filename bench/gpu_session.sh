#!/usr/bin/env bash
# One device call on a bare GPU machine (issue 22): install the carried wheels, check, run the GPU tests, then
# the measurements at blip2-opt-2.7b's shapes; JSON to $OUT after every step (bench/gpu_kit.py says what).
# The whole stays under 9 minutes (540 s; the steps' own limits add up to 530 s), inside a 10-minute command.
#
#   bash bench/gpu_wheels.sh                 # first, on a machine with PyPI: the wheels into wheels/
#   bash bench/gpu_session.sh                # on the device: run(command="bash bench/gpu_session.sh",
#                                            #   carry=["wheels"], timeout_s=600)
#   SMALL=1 bash bench/gpu_session.sh        # the same pipeline on the CPU (installed packages, tiny widths)
#   GPU_KIT_WITHOUT_BNB=1 bash bench/gpu_session.sh   # wheels fetched without bitsandbytes: its steps skipped
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
small=()
[ -n "${SMALL:-}" ] && small=(--small)
timeout 540 "${PYTHON:-python3}" bench/gpu_kit.py "${small[@]}" --out "$OUT"
rc=$?
[ "$rc" = 124 ] && echo "gpu_session: stopped at 540 s; the steps' JSON so far is in $OUT" >&2
exit "$rc"
