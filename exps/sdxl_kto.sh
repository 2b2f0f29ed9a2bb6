#!/usr/bin/env bash
# Diffusion-KTO on SDXL. The paper (Li et al. 2024, arXiv 2404.04465) published SD1.5 settings
# only; this applies them to SDXL: 8 images per step, lr 1e-7 after 1000 warm-up steps, beta
# 5000, 10k steps, 8-bit AdamW, gamma = 0.8 desirable draws, Kahneman-Tversky utility, caption
# dropout 0.2, fp16; plus what SDXL needs (Diffusion-DPO's SDXL recipe): 1024 px, the fp16-fix
# VAE, gradient checkpointing, constant time_ids.
#   MODEL=stabilityai/stable-diffusion-xl-base-1.0 CSV=/data/pickapic/train_processed_v3.csv \
#   IMAGES=/data/pickapic bash exps/sdxl_kto.sh
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
VAE=${VAE:-madebyollin/sdxl-vae-fp16-fix}              # "none": the model's own VAE
CSV=${CSV:?set CSV to train_processed_v3.csv}
IMAGES=${IMAGES:?set IMAGES to the Pick-a-Pic root that the CSV file_name entries are relative to}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sdxl_kto}
NUM_PROCESSES=${NUM_PROCESSES:-4}
BATCH=${BATCH:-2}                                      # images per GPU
ACCUM=${ACCUM:-$((8 / (NUM_PROCESSES * BATCH)))}       # keeps 8 images per optimizer step
LR=${LR:-1e-7}
WARMUP=${WARMUP:-1000}
STEPS=${STEPS:-10000}
LOSS=${LOSS:-kto}                  # kto, or sft (desirable images only)
BETA=${BETA:-}                     # empty: kto's paper value 5000
GAMMA=${GAMMA:-0.8}
UTILITY=${UTILITY:-}               # empty: kahneman_tversky (the paper's best)
OPTIMIZER=${OPTIMIZER:-adamw8bit}
RESOLUTION=${RESOLUTION:-1024}
TIME_IDS=${TIME_IDS:-constant}
PRECISION=${PRECISION:-fp16}
GRAD_CKPT=${GRAD_CKPT:-true}
LORA_RANK=${LORA_RANK:-0}
WORKERS=${WORKERS:-4}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1000}
REPORT_TO=${REPORT_TO:-wandb}

setup_project
launch_train --loss "$LOSS" ${BETA:+--beta "$BETA"} --pretrained_model "$MODEL" --pretrained_vae "$VAE" --csv "$CSV" --images "$IMAGES" --output_dir "$OUTPUT_DIR" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler constant_with_warmup --lr_warmup_steps "$WARMUP" --max_train_steps "$STEPS" --kto_desirable_prob "$GAMMA" ${UTILITY:+--kto_utility "$UTILITY"} --optimizer "$OPTIMIZER" --resolution "$RESOLUTION" --time_ids "$TIME_IDS" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" --caption_dropout 0.2 --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --report_to "$REPORT_TO"
