#!/usr/bin/env bash
# Offline demo: Diffusion-DPO on the shipped toy base (assets/toy-sd15, a tiny SD1.5-shaped model
# that draws the caption's coloured shape, but often in the shape's typical colour instead) with
# on-policy toy preference pairs labelled by the `colour` rule (evaluation/toy_reward.py: the image
# shows the colour its caption names; prompt alignment), then before and after on held-out
# prompts: the colour reward, shape agreement, and diversity and drift against the base's images.
# A few minutes on 2 CPU cores. Any variable below can be overridden from the environment
# (RULE=warm: the warm-filter taste instead, with its own pairs; LOSS=kto: Diffusion-KTO on the
# per-image labels built from the same pairs, with the toy benchmark's KTO settings).
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-assets/toy-sd15}
RULE=${RULE:-colour}          # the toy reward rule that labels the pairs and scores the result
LOSS=${LOSS:-dpo}             # any pairwise loss or sft (on the pairs), or kto (on CSV): README, "Losses"
PREFS=${PREFS:-build/toy-prefs-$RULE}  # on-policy pairs from MODEL, built below unless the loss's data is given
GIVEN_DATA=$([ "$LOSS" = kto ] && echo "${CSV:-}" || echo "${DATA:-}")
DATA=${DATA:-$PREFS/pickapic}
CSV=${CSV:-$PREFS/kto/train_processed_v3.csv}  # kto: each image of the pairs, desirable if it won its comparisons
IMAGES=${IMAGES:-$PREFS/kto}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/example}
# The toy benchmark's settings (exps/toy_benchmark.sh): DPO's budget for every loss but KTO,
# which has its own line there (batch 24, lr 3e-5 x 600 steps, gamma 0.5, released dropout 0.2).
DPO_TOY_BETA=1000             # dpo's beta tuned on the toy task (released Diffusion-DPO value: 5000)
KTO_TOY_BETA=300              # kto's (paper: 5000, where its sigmoid terms saturate on the toy UNet)
BETA=${BETA:-$(case "$LOSS" in dpo) echo "$DPO_TOY_BETA" ;; kto) echo "$KTO_TOY_BETA" ;; esac)}  # empty: the loss's released value
RESOLUTION=${RESOLUTION:-32}  # the toy base's size: its VAE maps 32 px to 8x8 latents
BATCH=${BATCH:-$([ "$LOSS" = kto ] && echo 24 || echo 8)}  # pairs (images for kto) per step
ACCUM=${ACCUM:-1}
STEPS=${STEPS:-$([ "$LOSS" = kto ] && echo 600 || echo 400)}
LR=${LR:-$([ "$LOSS" = kto ] && echo 3e-5 || echo 4e-5)}
GAMMA=${GAMMA:-0.5}           # kto: share of desirable images drawn (paper 0.8; the toy benchmark's 0.5)
CAPTION_DROPOUT=${CAPTION_DROPOUT:-$([ "$LOSS" = kto ] && echo 0.2 || echo 0)}  # the released trainers drop 0.2
WARMUP=${WARMUP:-10}
WORKERS=${WORKERS:-1}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-100}
REPORT_TO=${REPORT_TO:-tensorboard}
OVERWRITE=${OVERWRITE:-true}  # a demo: re-running it replaces the last run in OUTPUT_DIR
EVAL_PROMPTS=${EVAL_PROMPTS:-assets/toy_prompts_heldout.txt}  # never in the preference pairs
# Validation while training (training/validation.py): the held-out prompts, the toy reward as a curve.
VALIDATION_PROMPTS=${VALIDATION_PROMPTS:-$EVAL_PROMPTS}
VALIDATION_STEPS=${VALIDATION_STEPS:-25}
VALIDATION_IMAGES=${VALIDATION_IMAGES:-4}
VALIDATION_SCORER=${VALIDATION_SCORER:-toy_$RULE}
GUIDANCE=${GUIDANCE:-3.0}     # the toy protocol's (evaluation/suites.py TOY_GUIDANCE), as the pairs were drawn
EVAL_SEEDS=${EVAL_SEEDS:-8}
NUM_PROCESSES=${NUM_PROCESSES:-1}
PRECISION=${PRECISION:-no}
if [ "$LOSS" = kto ]; then
  SOURCE=(--csv "$CSV" --images "$IMAGES" --kto_desirable_prob "$GAMMA")
else
  SOURCE=(--data "$DATA")
fi

setup_project
# Built once (1-2 min; rebuilt if from another builder version); another MODEL needs its own PREFS.
if [ -z "$GIVEN_DATA" ] && ! grep -qs '"version": 6,' "$PREFS/stats.json"; then
  "$PYTHON" scripts/build_toy_prefs.py --model "$MODEL" --out "$PREFS" --rule "$RULE"
fi
launch_train --pretrained_model "$MODEL" "${SOURCE[@]}" --output_dir "$OUTPUT_DIR" --loss "$LOSS" ${BETA:+--beta "$BETA"} --resolution "$RESOLUTION" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --max_train_steps "$STEPS" --learning_rate "$LR" --caption_dropout "$CAPTION_DROPOUT" --lr_warmup_steps "$WARMUP" --mixed_precision "$PRECISION" --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --checkpoints_total_limit 2 --report_to "$REPORT_TO" --overwrite_output_dir "$OVERWRITE" --validation_prompts "$VALIDATION_PROMPTS" --validation_steps "$VALIDATION_STEPS" --validation_images "$VALIDATION_IMAGES" --validation_scorer "$VALIDATION_SCORER" --validation_guidance_scale "$GUIDANCE"
# Before (base) and after (the trained UNet swapped in), same prompts and seeds: the reward,
# shape agreement, and diversity and drift against the base (evaluation/distribution.py).
"$PYTHON" evaluate.py --model "$MODEL" --generate base --generate "$LOSS=$OUTPUT_DIR" --prompts "$EVAL_PROMPTS" --num_seeds "$EVAL_SEEDS" --distinct_seeds --resolution "$RESOLUTION" --guidance_scale "$GUIDANCE" --scorer "toy_$RULE" --scorer toy_shape --out "$OUTPUT_DIR/eval"
echo "model: $OUTPUT_DIR/unet; validation grids: $OUTPUT_DIR/validation; evaluation: $OUTPUT_DIR/eval/summary.md, chart $OUTPUT_DIR/eval/summary.png, per-image scores $OUTPUT_DIR/eval/scores.csv"
