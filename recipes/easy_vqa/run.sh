#!/usr/bin/env bash
# The easy-VQA recipe, from nothing to the server's default model (see MODEL_CARD.md and docs/RESULTS.md).
#
#   bash recipes/easy_vqa/run.sh [OUT]        (default OUT=runs/easy_vqa; SHIP=0 to not ship)
#
# Steps: import easy-VQA; unimodal pretraining (vision tower CLIP-style on the train captions, OPT LLM
# on the train text alone, a small BERT for the Q-Former); `blip2-train init` from those parts; frozen
# ViT features cached once; stage 1 (ITC+ITM+ITG) on the captions; stage 2 from the stage-1 Q-Former and,
# for comparison, from a fresh Q-Former (same steps and data); VQA fine-tuning (InstructBLIP format,
# with caption rows so /caption works too); evaluation on the full test split; the frozen-weights check;
# then the two folders are copied into service/default_model/. Every step logs into OUT/; the step
# timings go to OUT/timings.jsonl and the whole console log to OUT/run.log.
set -euo pipefail
# One thread per process: on 2 shared cores, torch's default of 2 threads that spin-wait for each other
# was 20x slower (measured: 2.45 s vs 0.12 s per step of the LLM). Independent steps run two at a time.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-runs/easy_vqa}
DATA=$OUT/data
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # `python -m recipes.easy_vqa...` from any folder
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

# Sizes and steps: sized for about an hour on 2 CPU cores (see the model card).
VISION_STEPS=${VISION_STEPS:-2500}
LLM_STEPS=${LLM_STEPS:-2000}
BERT_STEPS=${BERT_STEPS:-300}
STAGE1_STEPS=${STAGE1_STEPS:-600}
STAGE2_STEPS=${STAGE2_STEPS:-600}
FINETUNE_STEPS=${FINETUNE_STEPS:-1500}
WIDTH=${WIDTH:-96}
QUERIES=8
LIMIT=${EVAL_LIMIT:-0}  # evaluate only the first N rows (0: the full test split); for smoke runs
COMMON=(--no-progress --log-every 20 --save-every 100000 --batch-size 64 --warmup-steps 50 --seed 0)

step() {  # step NAME COMMAND...: run, time, and record
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  echo "{\"step\": \"$name\", \"seconds\": $((SECONDS - start))}" >> "$OUT/timings.jsonl"
}

UNI="python -m recipes.easy_vqa.unimodal"
TOOLS="python -m recipes.easy_vqa.tools"
: > "$OUT/timings.jsonl"
START=$(date -u +%FT%TZ)
echo "recipe start $START on $(nproc --all) CPU cores, torch threads $(python -c 'import torch; print(torch.get_num_threads())')"

step data blip2-train data easy-vqa --output "$DATA"
# The two unimodal branches are independent: the vision tower on one core, LLM + BERT on the other.
step vision $UNI vision --data "$DATA" --output "$OUT/parts/vision" --steps "$VISION_STEPS" --batch-size 64 \
  --lr 2e-3 --width "$WIDTH" --layers 4 --heads 4 --patch-size 16 --eval-every 500 > "$OUT/vision.log" 2>&1 &
VISION_PID=$!
step llm $UNI llm --data "$DATA" --output "$OUT/parts/llm" --steps "$LLM_STEPS" --batch-size 64 --lr 2e-3 \
  --width "$WIDTH" --layers 2 --heads 4 --context-length "$QUERIES" --loss-on target
step bert $UNI bert --data "$DATA" --output "$OUT/parts/bert" --steps "$BERT_STEPS" --batch-size 64 --lr 2e-3 \
  --width "$WIDTH" --layers 2 --heads 4
wait "$VISION_PID"
cat "$OUT/vision.log"
step init blip2-train init --vision "$OUT/parts/vision" --qformer-bert "$OUT/parts/bert" --llm "$OUT/parts/llm" \
  --num-query-tokens "$QUERIES" --cross-attention-frequency 1 --output "$OUT/init"
step features blip2-train data cache-features --manifest "$DATA/vqa_train.jsonl" --model "$OUT/init/stage1" \
  --output "$OUT/features" --dtype float32

step stage1 blip2-train stage1 --init "$OUT/init/stage1" --train-manifest "$DATA/captions_train.jsonl" \
  --features "$OUT/features" --steps "$STAGE1_STEPS" --lr 1e-3 --min-lr 1e-4 --output "$OUT/stage1" "${COMMON[@]}"
S2=(--init "$OUT/init/generation" --train-manifest "$DATA/captions_train.jsonl" --features "$OUT/features"
  --prompt "A short image description:" --steps "$STAGE2_STEPS" --lr 1e-3 --min-lr 1e-4 "${COMMON[@]}")
# same steps, data and seed; run side by side, one core each
step stage2_fresh blip2-train stage2 "${S2[@]}" --output "$OUT/stage2_fresh" > "$OUT/stage2_fresh.log" 2>&1 &
FRESH_PID=$!
step stage2 blip2-train stage2 "${S2[@]}" --stage1 "$OUT/stage1/model" --output "$OUT/stage2"
wait "$FRESH_PID"

# The paper's claim at small scale: zero-shot VQA (no VQA training at all) after stage 2, both starts.
step eval_stage2_fresh_vqa blip2-train eval --task vqa --model "$OUT/stage2_fresh/model" \
  --manifest "$DATA/vqa_test.jsonl" --num-beams 1 --batch-size 128 --no-progress \
  --output "$OUT/eval/stage2_fresh_vqa" > "$OUT/eval_stage2_fresh.log" 2>&1 &
EVAL_FRESH_PID=$!
step manifest $TOOLS manifest --data "$DATA" --output "$DATA/finetune_train.jsonl"
step finetune blip2-train finetune --task vqa --init "$OUT/stage2/model" --stage1 "$OUT/stage1/model" \
  --train-manifest "$DATA/finetune_train.jsonl" --features "$OUT/features" \
  --steps "$FINETUNE_STEPS" --lr 1e-3 --min-lr 1e-5 --output "$OUT/finetune" "${COMMON[@]}"

wait "$EVAL_FRESH_PID"
step eval_stage2_vqa blip2-train eval --task vqa --model "$OUT/stage2/model" --manifest "$DATA/vqa_test.jsonl" \
  --num-beams 1 --batch-size 128 --limit "$LIMIT" --no-progress --output "$OUT/eval/stage2_vqa" > "$OUT/eval_stage2.log" 2>&1 &
EVAL_S2_PID=$!

# Figures on the full test split (1,000 images, 9,673 questions), greedy as the server decodes.
step eval_vqa blip2-train eval --task vqa --model "$OUT/finetune/model" --manifest "$DATA/vqa_test.jsonl" \
  --num-beams 1 --batch-size 128 --limit "$LIMIT" --no-progress --output "$OUT/eval/vqa"
step eval_vqa_bs1 blip2-train eval --task vqa --model "$OUT/finetune/model" --manifest "$DATA/vqa_test.jsonl" \
  --num-beams 1 --batch-size 1 --limit "$LIMIT" --no-progress --output "$OUT/eval/vqa_bs1" > "$OUT/eval_vqa_bs1.log" 2>&1 &
BS1_PID=$!
step eval_vqa_beam5 blip2-train eval --task vqa --model "$OUT/finetune/model" --manifest "$DATA/vqa_test.jsonl" \
  --batch-size 8 --limit "$LIMIT" --no-progress --output "$OUT/eval/vqa_beam5_bs8"
step eval_caption blip2-train eval --task caption --model "$OUT/finetune/model" \
  --manifest "$DATA/captions_test.jsonl" --prompt "A short image description:" --num-beams 1 \
  --min-new-tokens 1 --max-new-tokens 10 --batch-size 128 --no-java-metrics --limit "$LIMIT" --no-progress --output "$OUT/eval/caption"
$TOOLS captions --predictions "$OUT/eval/caption/predictions.jsonl" --output "$OUT/eval/caption/named.json"
wait "$EVAL_S2_PID"
step eval_retrieval blip2-train eval --task retrieval --model "$OUT/stage1/model" \
  --manifest "$DATA/captions_test.jsonl" --k-test 16 --batch-size 128 --limit "$LIMIT" --no-progress --output "$OUT/eval/retrieval"
# easy-VQA's 24 captions repeat across images: the same ranking, scored with identical captions as hits
step eval_retrieval_same_caption blip2-train eval --task retrieval --model "$OUT/stage1/model" \
  --manifest "$DATA/captions_test.jsonl" --k-test 16 --batch-size 128 --limit "$LIMIT" --same-caption-positives \
  --no-progress --output "$OUT/eval/retrieval_same_caption"

wait "$BS1_PID"
step identity $TOOLS identity --vision "$OUT/parts/vision" --llm "$OUT/parts/llm" \
  --model "stage1=$OUT/stage1/model" --model "stage2=$OUT/stage2/model" --model "finetune=$OUT/finetune/model" \
  --output "$OUT/identity.json"
$TOOLS curves --run "stage 2 from stage-1 Q-Former=$OUT/stage2" --run "stage 2 from fresh Q-Former=$OUT/stage2_fresh" \
  --output "$OUT/stage2_curves.png"
echo "{\"wall_s\": $SECONDS, \"start\": \"$START\", \"cpu_cores\": $(nproc --all)}" > "$OUT/wall.json"
$TOOLS results --out "$OUT" --output "$OUT/results.json"
if [ "${SHIP:-1}" = 1 ]; then
  cp "$OUT/results.json" "$ROOT/docs/easy_vqa_results.json"
  cp "$OUT/stage2_curves.png" "$ROOT/docs/easy_vqa_stage2_curves.png"
  step ship $TOOLS ship --generation "$OUT/finetune/model" --stage1 "$OUT/stage1/model" \
    --dest "$ROOT/service/default_model"
  python -m recipes.easy_vqa.report --out "$OUT" --shipped "$ROOT/service/default_model" \
    --card "$ROOT/service/default_model/MODEL_CARD.md" --results-md "$ROOT/docs/RESULTS.md"
fi
echo "recipe end $(date -u +%FT%TZ); total $SECONDS s"
