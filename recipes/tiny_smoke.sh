#!/usr/bin/env bash
# Smoke run of the two pre-training stages on the CPU, for both tiny presets (a few minutes):
#   bash recipes/tiny_smoke.sh [OUT]
# 256 synthetic coloured-shape images captioned "a red circle"..., then init -> stage1 (300 steps, the
# settings of tiny_stage1.yaml) -> stage2 from the stage-1 Q-Former (300 steps); each loss is logged per
# 25 steps in OUT/*/log.jsonl, and the outputs are loaded and run in plain transformers at the end.
# What those tiny random models generate after 300 steps is empty or repeated words: expected, and not
# what this run checks (that every stage runs and its outputs load).
set -euo pipefail
OUT=${1:-runs/tiny_smoke}
HERE=$(cd "$(dirname "$0")" && pwd)
# The checkout's environment (`make install`) when no other is active: runs from a fresh shell as written.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$HERE/../.venv/bin/blip2-train" ]; then
  PATH="$HERE/../.venv/bin:$PATH"
fi
export OMP_NUM_THREADS=1 PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
python -m recipes.shapes "$OUT/data" 256
F=(--batch-size 16 --warmup-steps 20 --log-every 25 --no-progress --lr 3e-4 --save-every 100)
for p in opt t5; do
  blip2-train init --preset "tiny-$p" --output "$OUT/$p/init"
  blip2-train stage1 --config "$HERE/tiny_stage1.yaml" --init "$OUT/$p/init/stage1" \
    --train-manifest "$OUT/data/train.jsonl" --output "$OUT/$p/s1"
  blip2-train stage2 --init "$OUT/$p/init/generation" --stage1 "$OUT/$p/s1/model" \
    --train-manifest "$OUT/data/train.jsonl" --output "$OUT/$p/s2" --steps 300 "${F[@]}"
  python - "$OUT/$p" <<'PY'
import sys
from PIL import Image
from blip2.logs import quiet_third_party_logs, quiet_transformers_progress_bars
quiet_third_party_logs()  # the CLIs' filters for torchao's import-time noise (see blip2/logs.py), no more
quiet_transformers_progress_bars()
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor
run = sys.argv[1]
Blip2ForImageTextRetrieval.from_pretrained(f"{run}/s1/model")
model = Blip2ForConditionalGeneration.from_pretrained(f"{run}/s2/model")
processor = Blip2Processor.from_pretrained(f"{run}/s2/model")
images = [Image.open(f"{run}/../data/images/{i}.png") for i in range(4)]
out = model.generate(**processor(images=images, return_tensors="pt"), max_new_tokens=6)
print(run, "generated:", processor.batch_decode(out, skip_special_tokens=True))
PY
done
echo "done: both presets trained, saved and loaded in plain transformers. What they generated above (often" \
  "empty strings or repeated words) is what a tiny random model says after 300 steps: expected, not a failure."
