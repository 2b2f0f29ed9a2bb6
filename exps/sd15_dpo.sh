#!/usr/bin/env bash
# Diffusion-DPO on SD1.5, the released recipe (Wallace et al. 2023, arXiv 2311.12908, and the
# released training script): 2048 pairs per step (released: 16 GPUs x 1 x accumulation 128),
# lr 1e-8 scaled by the batch = 2.048e-5 constant after 500 warm-up steps, AdamW (weight decay
# 1e-2, clip 1.0), 2000 steps, beta 5000, fp16, 512 px, caption dropout 0.2.
#   MODEL=runwayml/stable-diffusion-v1-5 DATA=/data/pickapic_v2 bash exps/sd15_dpo.sh
# LOSS=<name> trains another loss on this recipe (data, batch, steps, optimizer), with that
# loss's released hyperparameters; MU=0.9 adds the Diffusion-SDPO safeguard.
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-runwayml/stable-diffusion-v1-5}
DATA=${DATA:?set DATA to the Pick-a-Pic v2 parquet directory (or a hub dataset name)}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sd15_dpo}
NUM_PROCESSES=${NUM_PROCESSES:-8}
BATCH=${BATCH:-1}                                        # pairs per GPU
ACCUM=${ACCUM:-$((2048 / (NUM_PROCESSES * BATCH)))}      # keeps 2048 pairs per optimizer step
LR=${LR:-2.048e-5}
WARMUP=${WARMUP:-500}
STEPS=${STEPS:-2000}
LOSS=${LOSS:-dpo}        # dpo, ipo, hinge, dmpo, dspo, mapo (pairwise) or sft: README, "Losses"
# Empty loss hyperparameters take the chosen loss's released value (README's loss table):
BETA=${BETA:-}                        # dpo, ipo, hinge 5000; dmpo 2000; dspo 0.001; mapo 0.1
LABEL_SMOOTHING=${LABEL_SMOOTHING:-}  # dpo: conservative DPO's eps (0: plain DPO)
DMPO_ALPHA=${DMPO_ALPHA:-}            # dmpo: target probability 1 - alpha (released 0.01)
SNR_VALUE=${SNR_VALUE:-}              # mapo: gamma (released 0.5)
MU=${MU:-}                            # the safeguard; empty: off (released 0.9 dpo, dmpo; 0.2 dspo)
RESOLUTION=${RESOLUTION:-512}
PRECISION=${PRECISION:-fp16}
WORKERS=${WORKERS:-4}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-100}
REPORT_TO=${REPORT_TO:-wandb}

setup_project
launch_train --loss "$LOSS" ${BETA:+--beta "$BETA"} ${LABEL_SMOOTHING:+--label_smoothing "$LABEL_SMOOTHING"} ${DMPO_ALPHA:+--dmpo_alpha "$DMPO_ALPHA"} ${SNR_VALUE:+--snr_value "$SNR_VALUE"} ${MU:+--winner_preserving_mu "$MU"} --pretrained_model "$MODEL" --data "$DATA" --output_dir "$OUTPUT_DIR" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler constant_with_warmup --lr_warmup_steps "$WARMUP" --max_train_steps "$STEPS" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --weight_decay 1e-2 --max_grad_norm 1.0 --caption_dropout 0.2 --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --report_to "$REPORT_TO"
