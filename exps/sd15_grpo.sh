#!/usr/bin/env bash
# GRPO on SD1.5 with LoRA, online, DDPO-style: DDIM with eta 1 as the stochastic sampler, the
# clipped-ratio loss on every sampler step, no KL term.
# Source: kvablack/ddpo-pytorch config/dgx.py:aesthetic (commit 1958463), its defaults in
# config/base.py, scripts/train.py (LoRA) and ddpo_pytorch/diffusers_patch/ddim_with_logprob.py
# (same commit). Released settings kept here: 512 px; 50 DDIM steps with eta 1.0 for sampling and
# training, all 50 trained; guidance 5.0 in sampling and training (the guided output is
# trained); 256 images per epoch (8 GPUs x 8 x 4) and 2 optimizer steps per epoch (128 images
# each), 1 inner epoch, 200 epochs = 400 steps; clip range 1e-4, advantages clipped to 5, no KL;
# LoRA rank 4 (diffusers' LoRAAttnProcessor default, scale 1: alpha = rank) on to_q, to_k, to_v,
# to_out.0 of every attention; AdamW lr 3e-4, wd 1e-4, betas 0.9 / 0.999, eps 1e-8, no
# schedule, grad clip 1.0; fp16. Reward: the LAION aesthetic predictor on CLIP ViT-L/14
# (REWARD=aesthetic=DIR, scripts/convert_aesthetic_head.py). The released prompts are
# ddpo-pytorch's ddpo_pytorch/assets/simple_animals.txt (45 animal names), not shipped here:
# give PROMPTS. DDPO's aesthetic run used CompVis/stable-diffusion-v1-4 (MODEL= that to match).
# Differs from the release (not expressible with train.py's flags):
# - advantages are normalised within groups of GROUP = 16 images of one prompt sampled together
#   (mean and std of the group; ours: 16 is the tracker's min_count and DanceGRPO's SD images
#   per prompt); DDPO draws a prompt per image and normalises by a per-prompt buffer of the last
#   32 rewards (batch statistics below 16), kept across epochs;
# - a micro-batch is BATCH prompts x 16 images on one GPU (16 by default); DDPO trains
#   micro-batches of 4 (8 samples per GPU x 4 batches, 4 per train batch x accumulation 4);
# - steps are trained in order (the gradient is summed over them before the optimizer step);
#   DDPO shuffles each sample's step order.
# exps/sdxl_grpo.sh runs this recipe with SDXL's defaults.
#   PROMPTS=simple_animals.txt REWARD=aesthetic=/models/aesthetic bash exps/sd15_grpo.sh
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-runwayml/stable-diffusion-v1-5}
VAE=${VAE:-none}                                       # "none": the model's own VAE
PROMPTS=${PROMPTS:?set PROMPTS to a prompt file (DDPO: its assets/simple_animals.txt)}
REWARD=${REWARD:?set REWARD, e.g. aesthetic=DIR (DDPO: the LAION aesthetic predictor)}
REWARD_WEIGHTS=${REWARD_WEIGHTS:-1}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sd15_grpo}
NUM_PROCESSES=${NUM_PROCESSES:-8}
GROUP=${GROUP:-16}                                     # images per prompt
GROUPS_PER_EPOCH=${GROUPS_PER_EPOCH:-16}               # 16 x 16 = DDPO's 256 images per epoch
UPDATES_PER_EPOCH=${UPDATES_PER_EPOCH:-2}              # optimizer steps per collection
BATCH=${BATCH:-1}                                      # prompts per micro-batch (x GROUP images)
SAMPLING_STEPS=${SAMPLING_STEPS:-50}
ETA=${ETA:-1.0}
GUIDANCE=${GUIDANCE:-5.0}
CLIP_RANGE=${CLIP_RANGE:-1e-4}
LR=${LR:-3e-4}
STEPS=${STEPS:-400}
RESOLUTION=${RESOLUTION:-512}
PRECISION=${PRECISION:-fp16}
GRAD_CKPT=${GRAD_CKPT:-false}
LORA_RANK=${LORA_RANK:-4}
VALIDATION_PROMPTS=${VALIDATION_PROMPTS:-}             # a prompt file; empty: no validation
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-40}
REPORT_TO=${REPORT_TO:-wandb}

split_collection
setup_project
launch_train --loss grpo --pretrained_model "$MODEL" --pretrained_vae "$VAE" --prompts "$PROMPTS" --reward "$REWARD" --reward_weights "$REWARD_WEIGHTS" --output_dir "$OUTPUT_DIR" --group_size "$GROUP" --train_batch_size "$BATCH" --collect_batches "$COLLECT" --gradient_accumulation_steps "$ACCUM" --inner_epochs 1 --sampling_steps "$SAMPLING_STEPS" --noise_level "$ETA" --trained_steps_fraction 1.0 --guidance_scale "$GUIDANCE" --share_initial_noise false --advantage_std group --clip_range "$CLIP_RANGE" --adv_clip_max 5 --kl_coef 0 --learning_rate "$LR" --lr_scheduler constant --lr_warmup_steps 0 --adam_beta1 0.9 --adam_beta2 0.999 --adam_epsilon 1e-8 --weight_decay 1e-4 --max_grad_norm 1.0 --max_train_steps "$STEPS" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" ${VALIDATION_PROMPTS:+--validation_prompts "$VALIDATION_PROMPTS"} --validation_guidance_scale "$GUIDANCE" --checkpointing_steps "$CHECKPOINT_EVERY" --dataloader_num_workers 1 --report_to "$REPORT_TO"
