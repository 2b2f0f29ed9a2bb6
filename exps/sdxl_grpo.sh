#!/usr/bin/env bash
# GRPO on SDXL with LoRA, online, DDPO-style: DDIM with eta 1 as the stochastic sampler, the
# clipped-ratio loss on every sampler step, no KL term. No released online recipe for SDXL was
# read (DDPO trains SD1.x; Flow-GRPO and DiffusionNFT train SD3.5): these are DDPO's settings as
# exps/sd15_grpo.sh sets them, from kvablack/ddpo-pytorch config/dgx.py:aesthetic (commit
# 1958463) and config/base.py: 50 DDIM steps, eta 1.0, all trained; guidance 5.0 in sampling and
# training; 256 images per epoch, 2 optimizer steps per epoch, 400 steps; clip range 1e-4,
# advantages clipped to 5, no KL; LoRA rank 4 on to_q, to_k, to_v, to_out.0; AdamW lr 3e-4, wd
# 1e-4, grad clip 1.0; fp16. For SDXL, not from DDPO: 1024 px (SDXL's native size), the
# fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix, as exps/sdxl_dpo.sh: the SDXL VAE overflows in
# fp16 when decoding the sampled images), gradient checkpointing (a micro-batch is 16 images at
# 1024 px, each trained step running the UNet twice for guidance).
# Differs from DDPO as exps/sd15_grpo.sh says: groups of 16 images per prompt normalised by the
# group's mean and std (DDPO: a per-prompt buffer of 32 rewards), micro-batches of 16 (DDPO: 4),
# steps trained in order (DDPO: shuffled per sample). The released prompts are ddpo-pytorch's
# ddpo_pytorch/assets/simple_animals.txt, not shipped here: give PROMPTS; the reward, e.g.
# REWARD=aesthetic=DIR (scripts/convert_aesthetic_head.py).
#   PROMPTS=simple_animals.txt REWARD=aesthetic=/models/aesthetic bash exps/sdxl_grpo.sh
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
VAE=${VAE:-madebyollin/sdxl-vae-fp16-fix}              # "none": the model's own VAE
PROMPTS=${PROMPTS:?set PROMPTS to a prompt file (DDPO: its assets/simple_animals.txt)}
REWARD=${REWARD:?set REWARD, e.g. aesthetic=DIR (DDPO: the LAION aesthetic predictor)}
REWARD_WEIGHTS=${REWARD_WEIGHTS:-1}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sdxl_grpo}
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
RESOLUTION=${RESOLUTION:-1024}
PRECISION=${PRECISION:-fp16}
GRAD_CKPT=${GRAD_CKPT:-true}
LORA_RANK=${LORA_RANK:-4}
VALIDATION_PROMPTS=${VALIDATION_PROMPTS:-}             # a prompt file; empty: no validation
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-40}
REPORT_TO=${REPORT_TO:-wandb}

split_collection
setup_project
launch_train --loss grpo --pretrained_model "$MODEL" --pretrained_vae "$VAE" --prompts "$PROMPTS" --reward "$REWARD" --reward_weights "$REWARD_WEIGHTS" --output_dir "$OUTPUT_DIR" --group_size "$GROUP" --train_batch_size "$BATCH" --collect_batches "$COLLECT" --gradient_accumulation_steps "$ACCUM" --inner_epochs 1 --sampling_steps "$SAMPLING_STEPS" --noise_level "$ETA" --trained_steps_fraction 1.0 --guidance_scale "$GUIDANCE" --share_initial_noise false --advantage_std group --clip_range "$CLIP_RANGE" --adv_clip_max 5 --kl_coef 0 --learning_rate "$LR" --lr_scheduler constant --lr_warmup_steps 0 --adam_beta1 0.9 --adam_beta2 0.999 --adam_epsilon 1e-8 --weight_decay 1e-4 --max_grad_norm 1.0 --max_train_steps "$STEPS" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" ${VALIDATION_PROMPTS:+--validation_prompts "$VALIDATION_PROMPTS"} --validation_guidance_scale "$GUIDANCE" --checkpointing_steps "$CHECKPOINT_EVERY" --dataloader_num_workers 1 --report_to "$REPORT_TO"
