#!/usr/bin/env bash
# Diffusion-DPO on SD3.5 (flow matching: prefdiff's SD3 family, README "Flow-matching models").
# Settings of Linear-DPO's released SD3-medium DPO script (github.com/WhynotChen0105/Linear-DPO,
# run_sd3_pickapic.sh and train/train_sd3_dpo.py at 71b7f73): beta 1000 on the same
# -logsigmoid(-beta/2 * ...) as prefdiff's dpo, lr 5e-6 constant with no warm-up, 128 pairs per
# step (8 GPUs x 1 x accumulation 16), 1000 steps, fp16, full fine-tuning, timesteps uniform over
# the scheduler's shifted sigmas. Not from that script: 1024 px (SD3.5-medium's native size;
# flow_grpo's SD3.5-medium DPO trains at 512: RESOLUTION=512), gradient checkpointing.
# flow_grpo's SD3.5-medium DPO (config/dpo.py, scripts/train_sd3_dpo.py) uses beta 100 with the
# same 1/2 and logit-normal(0, 1) sigmas: BETA=100 SAMPLING=logit_normal.
#   MODEL=stabilityai/stable-diffusion-3.5-medium DATA=/data/pickapic_v2 bash exps/sd35_dpo.sh
# LOSS=<name> trains another pairwise loss on this recipe: give its BETA (BETA= empty takes the
# loss's released value, tuned on SD1.5 / SDXL: README "Betas for flow models").
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
DATA=${DATA:?set DATA to the Pick-a-Pic v2 parquet directory (or a hub dataset name)}
CACHE=${CACHE:-none}                                   # scripts/build_cache.py output (T5 included)
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sd35_dpo}
NUM_PROCESSES=${NUM_PROCESSES:-8}
BATCH=${BATCH:-1}                                      # pairs per GPU
ACCUM=${ACCUM:-$((128 / (NUM_PROCESSES * BATCH)))}     # keeps 128 pairs per optimizer step
LR=${LR:-5e-6}
WARMUP=${WARMUP:-0}
STEPS=${STEPS:-1000}
LOSS=${LOSS:-dpo}
BETA=${BETA-1000}                                      # Linear-DPO's SD3 value
SAMPLING=${SAMPLING:-uniform}                          # uniform | logit_normal | mode
RESOLUTION=${RESOLUTION:-1024}
PRECISION=${PRECISION:-fp16}
GRAD_CKPT=${GRAD_CKPT:-true}
LORA_RANK=${LORA_RANK:-0}
WORKERS=${WORKERS:-4}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-100}
REPORT_TO=${REPORT_TO:-wandb}

setup_project
launch_train --loss "$LOSS" ${BETA:+--beta "$BETA"} --timestep_sampling "$SAMPLING" --pretrained_model "$MODEL" --data "$DATA" --cache "$CACHE" --output_dir "$OUTPUT_DIR" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler constant_with_warmup --lr_warmup_steps "$WARMUP" --max_train_steps "$STEPS" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" --max_grad_norm 1.0 --caption_dropout 0.2 --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --report_to "$REPORT_TO"
