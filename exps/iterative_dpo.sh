#!/usr/bin/env bash
# Iterated on-policy Diffusion-DPO on the toy model: R rounds of generate -> score -> pair -> train.
# Round r generates k images per training prompt from the previous round's UNet (round 1: the base),
# scores them with SCORER (default the toy `warm` rule), pairs best vs worst per prompt
# (scripts/make_pairs.py), and trains DPO starting from the previous round's UNet, which is also
# the round's frozen reference (each round a DPO step away from the last). Round r draws seeds
# from r * 100000 on, so rounds never reuse noise. Then every round and the base are scored on
# the held-out prompts (evaluate.py). Any variable below can be overridden from the environment.
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-assets/toy-sd15}
OUT=${OUT:-outputs/iterative_dpo}
ROUNDS=${ROUNDS:-3}
PROMPTS=${PROMPTS:-assets/toy_prompts_train.txt}
EVAL_PROMPTS=${EVAL_PROMPTS:-assets/toy_prompts_heldout.txt}
IMAGES_PER_PROMPT=${IMAGES_PER_PROMPT:-8}
PAIRING=${PAIRING:-best_worst}    # or all (every two images of a prompt above MARGIN)
MARGIN=${MARGIN:-0}               # z units of the combined score
SCORER=${SCORER:-toy_warm}
SEED=${SEED:-0}                   # training seed (noise, timesteps, data order) of every round
EVAL_SCORER=${EVAL_SCORER:-toy_shape}  # a second scorer for the evaluation only (empty: none)
SAMPLE_STEPS=${SAMPLE_STEPS:-20}  # DDIM, as the toy benchmark samples
GUIDANCE=${GUIDANCE:-3.0}         # the toy protocol's (evaluation/suites.py TOY_GUIDANCE)
RESOLUTION=${RESOLUTION:-32}
STEPS_PER_ROUND=${STEPS_PER_ROUND:-100}
BATCH=${BATCH:-8}
LR=${LR:-1e-4}                    # the toy benchmark's DPO lr before the third toy base (now 4e-5 x 400 steps)
BETA=${BETA:-1000}
WARMUP=${WARMUP:-10}
EVAL_SEEDS=${EVAL_SEEDS:-8}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BASE=$MODEL
[ -d "$MODEL" ] && BASE=$(cd "$MODEL" && pwd)
EVAL_RUNS=()
for r in $(seq 1 "$ROUNDS"); do
  ROUND="$OUT/round$r"
  mkdir -p "$ROUND"
  START="$BASE"
  UNET_FLAG=()
  if [ "$r" -gt 1 ]; then
    PREV="$OUT/round$((r - 1))/train"
    UNET_FLAG=(--unet "$PREV")
    # The base with the previous round's UNet in place: the policy's start and the reference.
    START="$ROUND/model"
    rm -rf "$START" && mkdir -p "$START"
    for entry in "$BASE"/*; do
      [ "$(basename "$entry")" = unet ] || ln -s "$entry" "$START/$(basename "$entry")"
    done
    ln -s "$PREV/unet" "$START/unet"
  fi
  $PYTHON -m scripts.make_pairs --model "$BASE" "${UNET_FLAG[@]}" --prompts "$PROMPTS" \
    --images_per_prompt "$IMAGES_PER_PROMPT" --first_seed $((r * 100000)) --scorer "$SCORER" \
    --pairing "$PAIRING" --margin "$MARGIN" --steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" \
    --resolution "$RESOLUTION" \
    --out "$ROUND/pairs"
  # A saturated round (every prompt's images scored alike, or none above MARGIN) has nothing to
  # prefer: stop there and evaluate the rounds that trained.
  if grep -q '"pairs": 0[,}]' "$ROUND/pairs/make_pairs.json"; then
    echo "round $r: no pairs ($SCORER scored every prompt's images alike): stopping after round $((r - 1))"
    break
  fi
  $PYTHON train.py --pretrained_model "$START" --data "$ROUND/pairs/pickapic" \
    --output_dir "$ROUND/train" --loss dpo --beta "$BETA" --resolution "$RESOLUTION" \
    --train_batch_size "$BATCH" --max_train_steps "$STEPS_PER_ROUND" --learning_rate "$LR" \
    --lr_warmup_steps "$WARMUP" --dataloader_num_workers 0 --checkpointing_steps 1000000 \
    --report_to none --overwrite_output_dir true --seed "$SEED"
  echo "round $r: pairs $ROUND/pairs ($(grep -o '"pairs": [0-9]*' "$ROUND/pairs/make_pairs.json")), UNet $ROUND/train/unet"
  EVAL_RUNS+=(--generate "round$r=$ROUND/train")
done
$PYTHON evaluate.py --model "$BASE" --generate base "${EVAL_RUNS[@]}" --prompts "$EVAL_PROMPTS" \
  --num_seeds "$EVAL_SEEDS" --distinct_seeds --resolution "$RESOLUTION" --steps "$SAMPLE_STEPS" \
  --guidance_scale "$GUIDANCE" --scorer "$SCORER" \
  ${EVAL_SCORER:+--scorer "$EVAL_SCORER"} --out "$OUT/eval"
echo "rounds: $OUT/round*/train/unet; evaluation per round: $OUT/eval/summary.md"
