# The SD3.5-Medium online settings that Flow-GRPO's pickscore_sd3 and DiffusionNFT's sd3_pickscore
# release alike (DiffusionNFT's code builds on flow_grpo's): the model, PickScore / 26 as the
# reward, 24 images per prompt and 48 prompts per collection, 10 sampler steps, 512 px, fp16, LoRA
# r 32 / alpha 64 on the joint attention's projections, 40-step evaluation. Sourced by
# exps/sd35_flow_grpo.sh and exps/sd35_nft.sh (their headers cite the releases), after their own
# settings; any variable can be set from the environment.
MODEL=${MODEL:-stabilityai/stable-diffusion-3.5-medium}
REWARD=${REWARD:-pickscore}                            # NAME or NAME=DIR (evaluation/scorers.py)
REWARD_WEIGHTS=${REWARD_WEIGHTS:-0.0384615384615}      # 1/26: the released PickScore / 26 (both)
REWARD_URL=${REWARD_URL:-}                             # a reward server's URL instead
NUM_PROCESSES=${NUM_PROCESSES:-8}
GROUP=${GROUP:-24}                                     # images per prompt
GROUPS_PER_EPOCH=${GROUPS_PER_EPOCH:-48}               # prompts sampled per collection, all GPUs
BATCH=${BATCH:-1}                                      # prompts per micro-batch (x GROUP images)
SAMPLING_STEPS=${SAMPLING_STEPS:-10}
RESOLUTION=${RESOLUTION:-512}
PRECISION=${PRECISION:-fp16}
LORA_RANK=${LORA_RANK:-32}
LORA_ALPHA=${LORA_ALPHA:-64}
LORA_TARGETS=${LORA_TARGETS:-attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out}
VALIDATION_PROMPTS=${VALIDATION_PROMPTS:-}             # a prompt file; empty: no validation
EVAL_STEPS=${EVAL_STEPS:-40}
REPORT_TO=${REPORT_TO:-wandb}
