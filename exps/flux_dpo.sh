#!/usr/bin/env bash
# Diffusion-DPO on Flux.1-dev with LoRA (the default here: a 12B transformer and its frozen copy do
# not fit full fine-tuning on one node; the LoRA reference is the base, adapters off, so no
# second transformer is held). No published Flux DPO recipe was verified; the settings combine
# the SD3 flow DPO recipe (exps/sd35_dpo.sh, Linear-DPO: beta 1000 with the 1/2, 128 pairs per
# step, 1000 steps, no warm-up, uniform timesteps over the shifted sigmas) with diffusers'
# Flux LoRA script (examples/dreambooth/train_dreambooth_lora_flux.py at 0050dea: lr 1e-4, guidance
# 3.5 fed to the guidance-distilled embedding, 512 px, bf16; its default rank 4, raised to 16 here).
# The sigma shift is Flux-dev's resolution-dependent one (FLOW_SHIFT overrides it).
#   MODEL=black-forest-labs/FLUX.1-dev DATA=/data/pickapic_v2 bash exps/flux_dpo.sh
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-black-forest-labs/FLUX.1-dev}
DATA=${DATA:?set DATA to the Pick-a-Pic v2 parquet directory (or a hub dataset name)}
CACHE=${CACHE:-none}                                   # scripts/build_cache.py output (T5 included)
OUTPUT_DIR=${OUTPUT_DIR:-outputs/flux_dpo}
NUM_PROCESSES=${NUM_PROCESSES:-8}
BATCH=${BATCH:-1}                                      # pairs per GPU
ACCUM=${ACCUM:-$((128 / (NUM_PROCESSES * BATCH)))}     # keeps 128 pairs per optimizer step
LR=${LR:-1e-4}
WARMUP=${WARMUP:-0}
STEPS=${STEPS:-1000}
LOSS=${LOSS:-dpo}
BETA=${BETA-1000}
SAMPLING=${SAMPLING:-uniform}                          # uniform | logit_normal | mode
FLOW_SHIFT=${FLOW_SHIFT:-}                             # empty: the scheduler's, at RESOLUTION
GUIDANCE=${GUIDANCE:-3.5}
RESOLUTION=${RESOLUTION:-512}
PRECISION=${PRECISION:-bf16}
GRAD_CKPT=${GRAD_CKPT:-true}
LORA_RANK=${LORA_RANK:-16}                             # 0: full fine-tuning
LORA_TARGETS=${LORA_TARGETS:-to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out}
WORKERS=${WORKERS:-4}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-100}
REPORT_TO=${REPORT_TO:-wandb}

setup_project
launch_train --loss "$LOSS" ${BETA:+--beta "$BETA"} --timestep_sampling "$SAMPLING" ${FLOW_SHIFT:+--flow_shift "$FLOW_SHIFT"} --flux_guidance "$GUIDANCE" --pretrained_model "$MODEL" --data "$DATA" --cache "$CACHE" --output_dir "$OUTPUT_DIR" --train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler constant_with_warmup --lr_warmup_steps "$WARMUP" --max_train_steps "$STEPS" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" --lora_target_modules "$LORA_TARGETS" --max_grad_norm 1.0 --caption_dropout 0.2 --dataloader_num_workers "$WORKERS" --checkpointing_steps "$CHECKPOINT_EVERY" --report_to "$REPORT_TO"
