#!/usr/bin/env bash
# Diffusion-KTO on SD1.5, the paper's settings (Li et al. 2024, arXiv 2404.04465): 8 images per
# step (paper: 4 GPUs x 2), lr 1e-7 after 1000 warm-up steps, beta 5000, 10k steps, fp16,
# gamma = 0.8 desirable draws, Kahneman-Tversky utility, caption dropout 0.2 (released code).
# The paper's 8-bit AdamW needs the optional bitsandbytes extra (installed below when missing).
#   MODEL=runwayml/stable-diffusion-v1-5 CSV=/data/pickapic/train_processed_v3.csv \
#   IMAGES=/data/pickapic bash exps/sd15_kto.sh
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-runwayml/stable-diffusion-v1-5}
CSV=${CSV:?set CSV to train_processed_v3.csv}
IMAGES=${IMAGES:?set IMAGES to the Pick-a-Pic root that the CSV file_name entries are relative to}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sd15_kto}
NUM_PROCESSES=${NUM_PROCESSES:-4}
BATCH=${BATCH:-2}                                    # images per GPU
ACCUM=${ACCUM:-$((8 / (NUM_PROCESSES * BATCH)))}     # keeps 8 images per optimizer step
LR=${LR:-1e-7}
WARMUP=${WARMUP:-1000}
STEPS=${STEPS:-10000}
LOSS=${LOSS:-kto}                  # kto, or sft (desirable images only)
BETA=${BETA:-}                     # empty: kto's paper value 5000
GAMMA=${GAMMA:-0.8}
UTILITY=${UTILITY:-}               # empty: kahneman_tversky (the paper's best)
OPTIMIZER=${OPTIMIZER:-adamw8bit}
RESOLUTION=${RESOLUTION:-512}
PRECISION=${PRECISION:-fp16}
WORKERS=${WORKERS:-4}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1000}
REPORT_TO=${REPORT_TO:-wandb}

setup_project
launch_train --loss "$LOSS" ${BETA:+--beta "$BETA"} --pretrained_model "$MODEL" --csv "$CSV" --images "$IMAGES" --output_dir "$OUTPUT_DIR" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler constant_with_warmup --lr_warmup_steps "$WARMUP" --max_train_steps "$STEPS" --kto_desirable_prob "$GAMMA" ${UTILITY:+--kto_utility "$UTILITY"} --optimizer "$OPTIMIZER" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --caption_dropout 0.2 --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --report_to "$REPORT_TO"
