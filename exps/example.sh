#!/usr/bin/env bash
# Offline demo: Diffusion-DPO on the embedded tiny SD1.5-shaped model and toy Pick-a-Pic pairs,
# a few minutes on 2 CPU cores. Any variable below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-build/tiny-sd15}
DATA=${DATA:-build/toy-data/pickapic}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/example}
LOSS=${LOSS:-dpo}
BETA=${BETA:-5000}            # released Diffusion-DPO value
RESOLUTION=${RESOLUTION:-64}  # the tiny VAE maps 64 px to 8x8 latents, as SD maps 512 to 64
BATCH=${BATCH:-4}
ACCUM=${ACCUM:-1}
STEPS=${STEPS:-200}
LR=${LR:-1e-4}                # large: the tiny random model needs it to move within minutes
WARMUP=${WARMUP:-10}
WORKERS=${WORKERS:-1}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-100}
REPORT_TO=${REPORT_TO:-tensorboard}
LAUNCH=${LAUNCH:-.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no}

bash scripts/setup.sh
$LAUNCH train.py --pretrained_model "$MODEL" --data "$DATA" --output_dir "$OUTPUT_DIR" --loss "$LOSS" --beta "$BETA" --resolution "$RESOLUTION" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --max_train_steps "$STEPS" --learning_rate "$LR" --lr_warmup_steps "$WARMUP" --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --checkpoints_total_limit 2 --report_to "$REPORT_TO"
