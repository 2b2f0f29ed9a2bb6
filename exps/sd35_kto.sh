#!/usr/bin/env bash
# Diffusion-KTO on SD3.5. No published recipe trains KTO on a flow model: this is Diffusion-KTO's
# SD1.5 schedule (Li et al. 2024, arXiv 2404.04465: 8 images per step, 1000 warm-up steps, 10k
# steps, gamma = 0.8 desirable draws, Kahneman-Tversky utility, caption dropout 0.2) with what
# the SD3 DPO recipe (exps/sd35_dpo.sh, Linear-DPO) sets for the model: beta 1000 instead of
# SD1.5's 5000 (betas do not transfer across families: README "Betas for flow models"), lr 5e-6,
# uniform timesteps over the scheduler's shifted sigmas, fp16, 1024 px, gradient checkpointing.
# Untested at scale: treat BETA and LR as the first things to sweep.
#   MODEL=stabilityai/stable-diffusion-3.5-medium CSV=/data/pickapic/train_processed_v3.csv \
#   IMAGES=/data/pickapic bash exps/sd35_kto.sh
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
CSV=${CSV:?set CSV to train_processed_v3.csv}
IMAGES=${IMAGES:?set IMAGES to the Pick-a-Pic root that the CSV file_name entries are relative to}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sd35_kto}
NUM_PROCESSES=${NUM_PROCESSES:-4}
BATCH=${BATCH:-2}                                      # images per GPU
ACCUM=${ACCUM:-$((8 / (NUM_PROCESSES * BATCH)))}       # keeps 8 images per optimizer step
LR=${LR:-5e-6}
WARMUP=${WARMUP:-1000}
STEPS=${STEPS:-10000}
LOSS=${LOSS:-kto}                  # kto, or sft (desirable images only)
BETA=${BETA:-1000}
GAMMA=${GAMMA:-0.8}
UTILITY=${UTILITY:-}               # empty: kahneman_tversky (the paper's best)
SAMPLING=${SAMPLING:-uniform}      # uniform | logit_normal | mode
RESOLUTION=${RESOLUTION:-1024}
PRECISION=${PRECISION:-fp16}
GRAD_CKPT=${GRAD_CKPT:-true}
LORA_RANK=${LORA_RANK:-0}
WORKERS=${WORKERS:-4}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1000}
REPORT_TO=${REPORT_TO:-wandb}

setup_project
launch_train --loss "$LOSS" $([ "$LOSS" = sft ] || echo --beta "$BETA") --timestep_sampling "$SAMPLING" --pretrained_model "$MODEL" --csv "$CSV" --images "$IMAGES" --output_dir "$OUTPUT_DIR" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler constant_with_warmup --lr_warmup_steps "$WARMUP" --max_train_steps "$STEPS" --kto_desirable_prob "$GAMMA" ${UTILITY:+--kto_utility "$UTILITY"} --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" --caption_dropout 0.2 --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --report_to "$REPORT_TO"
