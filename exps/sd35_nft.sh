#!/usr/bin/env bash
# DiffusionNFT on SD3.5-medium with LoRA, online and CFG-free: an old copy of the adapters samples
# 24 images per prompt, PickScore scores them, and the policy is trained on the clean images
# with the negative-aware loss; the old adapters follow the policy by a soft update.
# Source: NVlabs/DiffusionNFT config/nft.py:sd3_pickscore (commit 24af555), its defaults in
# config/base.py and scripts/train_nft_sd3.py (same commit); reward flow_grpo/pickscore_scorer.py
# there (PickScore / 26). Released settings kept here: 512 px; 10 deterministic sampler steps,
# guidance 1 (sampling, training and evaluation); 24 images per prompt, 48 prompts per epoch, 1
# optimizer step per epoch; NFT beta 1.0; KL to the base (adapters off) 1e-4; old-policy decay
# type 1 (min(0.001 step, 0.5)); advantages (r - prompt mean) / (std of the whole epoch + 1e-4),
# clipped to 5; each image trained at int(10 x 0.99) = 9 of the sampler's timesteps in its own
# random order, fresh noise each; LoRA r 32, alpha 64, gaussian init, on
# attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out}; AdamW lr 3e-4, wd
# 1e-4, grad clip 1.0, no schedule; fp16; evaluation 40 Euler steps, guidance 1. The released
# prompts are DiffusionNFT dataset/pickscore/train.txt (Pick-a-Pic captions), not shipped here:
# give PROMPTS (one prompt per line, or JSONL with a "prompt" key).
# Differs from the release (not expressible with train.py's flags):
# - collection samples with the Euler ODE step (noise level 0); the release uses its
#   second-order DPM-Solver (sample.solver "dpm2"), so the collected images differ;
# - a prompt's 24 images are one micro-batch of 24 on one GPU (BATCH prompts x 24); the release
#   trains micro-batches of 9 images that mix prompts (8 GPUs x 9 x 16 batches); 48 groups need
#   NUM_PROCESSES x BATCH to divide 48 (8 GPUs by default);
# - no EMA of the adapters (released: decay 0.9 every step, for evaluation and checkpoints);
# - the frozen transformer is stored in fp16 (prefdiff's LoRA base in the compute dtype); the
#   release keeps it in fp32 under fp16 autocast with a grad scaler;
# - no step limit was released (num_epochs 100000): STEPS is ours.
# Other released configs: sd3_ocr (NFT_BETA=0.1 DECAY=2 UPDATES_PER_EPOCH=2, an OCR reward) and
# sd3_geneval (a GenEval reward) need rewards evaluation/scorers.py does not have; sd3_hpsv2 and
# sd3_multi_reward (pickscore + hpsv2 + clip score, 25 steps, NFT_BETA=0.1) use scorers whose
# released scales were not checked against ours.
#   PROMPTS=/data/pickscore/train.txt bash exps/sd35_nft.sh
source "$(dirname "$0")/common.sh"

PROMPTS=${PROMPTS:?set PROMPTS to a prompt file (DiffusionNFT: its dataset/pickscore/train.txt)}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sd35_nft}
UPDATES_PER_EPOCH=${UPDATES_PER_EPOCH:-1}              # optimizer steps per collection
NFT_BETA=${NFT_BETA:-1.0}
DECAY=${DECAY:-1}                                      # old-policy decay schedule (0, 1, 2)
KL=${KL:-1e-4}
LR=${LR:-3e-4}
STEPS=${STEPS:-1000}
GRAD_CKPT=${GRAD_CKPT:-true}                           # ours: 24 images per micro-batch
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-30}               # released: every 30 epochs = 30 steps

source "$(dirname "$0")/settings/sd35_online.sh"
split_collection
setup_project
launch_train --loss nft --pretrained_model "$MODEL" --prompts "$PROMPTS" --reward "$REWARD" --reward_weights "$REWARD_WEIGHTS" ${REWARD_URL:+--reward_url "$REWARD_URL"} --output_dir "$OUTPUT_DIR" --group_size "$GROUP" --train_batch_size "$BATCH" --collect_batches "$COLLECT" --gradient_accumulation_steps "$ACCUM" --inner_epochs 1 --sampling_steps "$SAMPLING_STEPS" --noise_level 0 --trained_steps_fraction 0.99 --guidance_scale 1 --share_initial_noise false --advantage_std global --adv_clip_max 5 --nft_beta "$NFT_BETA" --nft_decay "$DECAY" --kl_coef "$KL" --learning_rate "$LR" --lr_scheduler constant --lr_warmup_steps 0 --adam_beta1 0.9 --adam_beta2 0.999 --adam_epsilon 1e-8 --weight_decay 1e-4 --max_grad_norm 1.0 --max_train_steps "$STEPS" --resolution "$RESOLUTION" --mixed_precision "$PRECISION" --gradient_checkpointing "$GRAD_CKPT" --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_target_modules "$LORA_TARGETS" ${VALIDATION_PROMPTS:+--validation_prompts "$VALIDATION_PROMPTS"} --validation_inference_steps "$EVAL_STEPS" --validation_guidance_scale 1 --checkpointing_steps "$CHECKPOINT_EVERY" --dataloader_num_workers 1 --report_to "$REPORT_TO"
