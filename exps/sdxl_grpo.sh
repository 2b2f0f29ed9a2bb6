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
# REWARD=aesthetic=DIR (scripts/convert_aesthetic_head.py). It runs exps/sd15_grpo.sh (--loss grpo)
# with SDXL's defaults below; every variable there can be set too.
#   PROMPTS=simple_animals.txt REWARD=aesthetic=/models/aesthetic bash exps/sdxl_grpo.sh
MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
VAE=${VAE:-madebyollin/sdxl-vae-fp16-fix}              # "none": the model's own VAE
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sdxl_grpo}
RESOLUTION=${RESOLUTION:-1024}
GRAD_CKPT=${GRAD_CKPT:-true}
source "$(dirname "$0")/sd15_grpo.sh"
