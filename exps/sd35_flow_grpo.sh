#!/usr/bin/env bash
# Flow-GRPO on SD3.5-medium with LoRA, online: the policy samples 24 images per prompt, PickScore
# scores them, and the clipped-ratio GRPO loss with a KL to the base updates the adapters.
# Source: yifan123/flow_grpo config/grpo.py:pickscore_sd3 (commit ac4c86e, Jul 2025), its
# defaults in config/base.py, scripts/train_sd3.py and the reward flow_grpo/pickscore_scorer.py
# (PickScore / 26), same commit. Released settings kept here: 512 px; 10 sampler steps of the SDE
# step ("sde", noise level 0.7) on every step, the first int(10 x 0.99) = 9 trained; guidance
# 4.5 in sampling and training (the guided velocity is trained); 24 images per prompt, 48
# prompts per epoch, 2 optimizer steps per epoch, 1 inner epoch; clip range 1e-4, advantages
# clipped to 5; KL 0.01 (PickScore's; 0.04 in its GenEval and OCR configs); advantages
# (r - prompt mean) / (std of the whole epoch + 1e-4), samples whose advantage is exactly 0
# left out of training; distinct initial noise per image; LoRA r 32, alpha 64, gaussian init,
# on attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out} (not the
# second attention of SD3.5-M's dual-attention blocks); AdamW
# lr 3e-4, wd 1e-4, betas 0.9 / 0.999, eps 1e-8, no schedule, grad clip 1.0; fp16 mixed
# precision; evaluation 40 Euler steps, guidance 4.5. The released prompts are flow_grpo
# dataset/pickscore/train.txt (Pick-a-Pic captions), not shipped here: give PROMPTS (one prompt
# per line, or JSONL with a "prompt" key).
# Differs from the release (not expressible with train.py's flags):
# - a prompt's 24 images are sampled and trained on one GPU as one micro-batch of 24 (BATCH
#   prompts x 24); the release spreads each group over GPUs in micro-batches of 9 images (32 GPUs
#   x 9 x 4 batches), so per-GPU memory here is that of 24 images, and the group layout per
#   process differs (48 groups need NUM_PROCESSES x BATCH to divide 24: 8 GPUs by default);
# - no EMA of the adapters (released: decay min((1+s)/(10+s), 0.9) every 8 steps, used only for
#   evaluation and checkpoints): validation and the export use the trained adapters;
# - samples whose advantage is exactly 0 (groups with equal rewards) are left out of training, as
#   released, but none is put back: the release returns a few at random so that its filtered
#   epoch splits into equal micro-batches; here the micro-batches stay whole groups and each
#   optimizer step averages over the images it keeps on each GPU;
# - the frozen transformer is stored in fp16 (prefdiff's LoRA base in the compute dtype); the
#   release moves it to the GPU in fp32 and runs it under fp16 autocast;
# - no step limit was released (runs until stopped by hand): STEPS is ours.
# The GenEval configuration (geneval_sd3: KL 0.04, GenEval prompts with their tags) needs a
# GenEval reward (object detection checked against the tags), which evaluation/scorers.py does
# not have: not offered here.
#   PROMPTS=/data/pickscore/train.txt bash exps/sd35_flow_grpo.sh
source "$(dirname "$0")/common.sh"

PROMPTS=${PROMPTS:?set PROMPTS to a prompt file (Flow-GRPO: its dataset/pickscore/train.txt)}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sd35_flow_grpo}
UPDATES_PER_EPOCH=${UPDATES_PER_EPOCH:-2}              # optimizer steps per collection
NOISE_LEVEL=${NOISE_LEVEL:-0.7}
GUIDANCE=${GUIDANCE:-4.5}
CLIP_RANGE=${CLIP_RANGE:-1e-4}
KL=${KL:-0.01}
LR=${LR:-3e-4}
STEPS=${STEPS:-2000}
GRAD_CKPT=${GRAD_CKPT:-true}                           # ours: 24 images per micro-batch with CFG
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-120}              # released: every 60 epochs = 120 steps

source "$(dirname "$0")/settings/sd35_online.sh"
split_collection
setup_project
launch_train --loss grpo --pretrained_model "$MODEL" --prompts "$PROMPTS" --reward "$REWARD" --reward_weights "$REWARD_WEIGHTS" ${REWARD_URL:+--reward_url "$REWARD_URL"} --output_dir "$OUTPUT_DIR" --group_size "$GROUP" --train_batch_size "$BATCH" --collect_batches "$COLLECT" --gradient_accumulation_steps "$ACCUM" --inner_epochs 1 --sampling_steps "$SAMPLING_STEPS" --sde_type sde --noise_level "$NOISE_LEVEL" --trained_steps_fraction 0.99 --guidance_scale "$GUIDANCE" --share_initial_noise false --advantage_std global --filter_zero_advantages true --clip_range "$CLIP_RANGE" --adv_clip_max 5 --kl_coef "$KL" --learning_rate "$LR" --lr_scheduler constant --lr_warmup_steps 0 --adam_beta1 0.9 --adam_beta2 0.999 --adam_epsilon 1e-8 --weight_decay 1e-4 --max_grad_norm 1.0 --max_train_steps "$STEPS" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_target_modules "$LORA_TARGETS" ${VALIDATION_PROMPTS:+--validation_prompts "$VALIDATION_PROMPTS"} --validation_inference_steps "$EVAL_STEPS" --validation_guidance_scale "$GUIDANCE" --checkpointing_steps "$CHECKPOINT_EVERY" --dataloader_num_workers 1 --report_to "$REPORT_TO"
