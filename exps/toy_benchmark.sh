#!/usr/bin/env bash
# The toy benchmark (scripts/toy_benchmark.py): every registered loss fine-tunes the toy base
# (assets/toy-sd15) on on-policy pairs of two tasks, `colour` (prompt alignment: the image shows
# the caption's colour) and `warm` (a global warm-filter taste), with several training seeds; every
# run is scored on held-out prompts for reward, shape agreement, diversity and drift (README, "Toy
# benchmark"): the test split (SPLIT=test, reported) or the validation split (SPLIT=validation,
# for choosing settings; results then go to outputs/, not assets/). Plus a reward-vs-drift
# frontier over beta for DPO and KTO, and a noisy-label column (the colour task with NOISE of the
# pair labels flipped). Writes assets/toy_results.md and plots. The online losses (grpo, nft),
# which sample from the training prompts rewarded by the rule that labelled the pairs, run in
# COMPARE=1 (or when MAIN names them), at budgets matched to DPO's and KTO's.
# COMPARE=1: offline against online (issue 27): dpo, kto, grpo and nft only, both tasks, seeds
# 0-2, online budgets matched by images scored and by CPU seconds; run it once per toy base
# (MODEL=assets/toy-sd3 GUIDANCE=1 for the flow base); writes assets/toy_online_vs_offline/BASE/
# (toy_results.md and toy_online_vs_offline.png, reward against images scored). On 2026-12-05,
# each alone on the quiet 2 cores, the SD1.5 base's took 31.8 min and the flow base's 80.8 min
# (both 112.6 min). QUICK=1 COMPARE=1 (SD1.5 base, colour, seed 0) took 8.6 min, loaded.
# An empty FRONTIER or NOISY leaves that part out. Two runs at a time, one thread each: 91 runs
# took 64.0 min on the quiet 2-core machine on 2026-12-05 (README, "Toy benchmark");
# QUICK=1 (dpo, kto, sft; one seed; colour task; no frontier or noisy column) 3.8 min.
#
# DPO's and KTO's betas were tuned on the earlier toy bases' warm task, their learning rate x
# steps, KTO's batch and the caption dropout on this base's colour task, first on all 12 held-out
# prompts (assets/toy_results_base4_trials.md), then re-checked on the validation split alone
# (the tuning arms below; assets/toy_offline_tuning/toy_results.md; docs/toy-benchmark.md,
# "Tuning"). Rule: the most colour gain with shape agreement within 10 points of the base's.
# DPO's 400 steps stand (300 and 500 broke the shape bar); no KTO batch kept shapes on the
# validation prompts (8, 16, 24: 75-78%), 24 gained most and stays; IPO's beta moved from 10
# (shape 71%) to 100 (83%; at 1000 it does not move). Not the papers'
# values: learning rates large enough for a 1M-parameter UNet to move in a few hundred steps, and
# betas in our convention (u = beta/2 (g_chosen - g_rejected), README "Losses") rescaled for 8x8
# latents of a tiny UNet, where the per-image error gaps are not SD1.5's at 512 px. The other
# losses take their released beta or DPO's toy beta and DPO's budget (lr 4e-5 x 400 steps), not
# tuned further. Any variable can be overridden from the environment.
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-assets/toy-sd15}
COMPARE=${COMPARE:-0}
SPLIT=${SPLIT:-test}  # held-out prompts scored: test (reported) or validation (choosing settings)
NAME=toy_benchmark; [ "$COMPARE" = 1 ] && NAME=toy_online_vs_offline/$(basename "$MODEL")
OUT=${OUT:-outputs/$NAME}
DEFAULT_RESULTS=assets; [ "$COMPARE" = 1 ] && DEFAULT_RESULTS=assets/$NAME
[ "$SPLIT" = validation ] && DEFAULT_RESULTS=outputs/${NAME}_validation
RESULTS=${RESULTS:-$DEFAULT_RESULTS}
QUICK=${QUICK:-0}
# KTO's beta: 300 on every toy base (chosen on the second). At 1000 (the first toy base's
# tuning) KTO's per-image sigmoid terms saturate and most steps carry no gradient ("stalled
# steps" in the report); the seeds then end wherever their first steps left them (README, "Toy
# benchmark": KTO's spread).
KTO_BETA=${KTO_BETA:-300}
# Online runs: ONLINE_STEPS of 8 images x 4 prompts = 32 images scored a step; 21 steps score the
# 672 images of the offline data (42 training prompts x 16), so 42 steps are twice the offline
# budget; a checkpoint every 7 steps (224 images) for the matched budgets. ONLINE_STEPS=168 (8x
# the offline images, colour): assets/toy_online_vs_offline/toy-sd15-168/ (docs/toy-benchmark.md). GRPO samples and trains
# with the toy protocol's guidance, as DDPO does (guidance 5 there); NFT is CFG-free as released.
ONLINE_STEPS=${ONLINE_STEPS:-42}
GRPO_GUIDANCE=${GRPO_GUIDANCE:-${GUIDANCE:-3.0}}
# One line per setting: NAME [loss=LOSS] train.py-flag=value ... (NAME is the loss unless loss=).
# Every registered loss needs a line; extra lines are variants (the noisy-label column's).
VARIANTS=${VARIANTS:-"
dpo           beta=1000 learning_rate=4e-5 max_train_steps=400   # released 5000
kto           beta=$KTO_BETA learning_rate=3e-5 max_train_steps=600 kto_desirable_prob=0.5 caption_dropout=0.2 train_batch_size=24  # paper 5000, gamma 0.8; released dropout; batch 24: a steadier reference point
sft           learning_rate=4e-5 max_train_steps=400
ipo           beta=100 learning_rate=4e-5 max_train_steps=400    # released 5000; chosen on the validation split over 10 and 1000 (below)
hinge         beta=1000 learning_rate=4e-5 max_train_steps=400   # released 5000
dmpo          beta=1000 learning_rate=4e-5 max_train_steps=400 dmpo_alpha=0.01  # released 2000
dspo          beta=0.001 learning_rate=4e-5 max_train_steps=400  # released 0.001 (SD1.5)
mapo          beta=0.1 learning_rate=4e-5 max_train_steps=400 snr_value=0.5  # released 0.1, 0.5
dpo_smoothed  loss=dpo beta=1000 label_smoothing=0.3 learning_rate=4e-5 max_train_steps=400  # cDPO, eps = the flip rate
dpo_safeguard loss=dpo beta=1000 winner_preserving_mu=0.9 learning_rate=4e-5 max_train_steps=400  # released mu 0.9
kto_batch8    loss=kto tasks=warm beta=$KTO_BETA learning_rate=3e-5 max_train_steps=600 kto_desirable_prob=0.5 caption_dropout=0.2 train_batch_size=8  # KTO's spread (README): the third base's batch
grpo          group_size=8 train_batch_size=4 sampling_steps=10 guidance_scale=$GRPO_GUIDANCE kl_coef=0.04 learning_rate=3e-4 lr_warmup_steps=0 max_train_steps=$ONLINE_STEPS eval_every=7  # the family's noise (DDPO's eta 1; the flow base: Flow-GRPO's a 0.7), Flow-GRPO's 10 steps and KL 0.04; lr 3e-4 kept: the validation split's best GRPO arm (below; assets/toy_online_vs_offline/tuning)
nft           group_size=8 train_batch_size=4 sampling_steps=10 learning_rate=1e-4 lr_warmup_steps=0 max_train_steps=$ONLINE_STEPS eval_every=7  # released: ODE sampling without CFG, beta 1, KL 1e-4, old-policy decay 1; lr 1e-4: the validation split's best NFT arm (3e-4 lost shape agreement)
# Tuning arms, run on the validation split (SD1.5 base, colour, seed 0; rule: the most reward at
# the offline data's images with shape agreement within 10 points of the base; the table is
# assets/toy_online_vs_offline/tuning/toy_results.md):
grpo_lr1e3    loss=grpo group_size=8 train_batch_size=4 sampling_steps=10 guidance_scale=$GRPO_GUIDANCE kl_coef=0.04 learning_rate=1e-3 lr_warmup_steps=0 max_train_steps=$ONLINE_STEPS eval_every=7  # tuning arm (SPLIT=validation)
grpo_multi    loss=grpo group_size=8 train_batch_size=1 collect_batches=4 sampling_steps=10 guidance_scale=$GRPO_GUIDANCE kl_coef=0.04 learning_rate=3e-4 lr_warmup_steps=0 max_train_steps=$((ONLINE_STEPS * 4)) eval_every=28  # tuning arm: the same images, 4 optimizer steps per collection (one per prompt group)
nft_lr1e4     loss=nft group_size=8 train_batch_size=4 sampling_steps=10 learning_rate=1e-4 lr_warmup_steps=0 max_train_steps=$ONLINE_STEPS eval_every=7  # tuning arm
nft_lr3e5     loss=nft group_size=8 train_batch_size=4 sampling_steps=10 learning_rate=3e-5 lr_warmup_steps=0 max_train_steps=$ONLINE_STEPS eval_every=7  # tuning arm
nft_multi     loss=nft group_size=8 train_batch_size=1 collect_batches=4 sampling_steps=10 learning_rate=1e-4 lr_warmup_steps=0 max_train_steps=$((ONLINE_STEPS * 4)) eval_every=28  # tuning arm
# Offline tuning arms, re-checked on the validation split (colour; KTO's batch on seeds 0-4, the
# rest on seeds 0 and 4, as first tuned on all 12 held-out prompts; docs/toy-benchmark.md, "Tuning"):
kto_b16       loss=kto tasks=colour beta=$KTO_BETA learning_rate=3e-5 max_train_steps=600 kto_desirable_prob=0.5 caption_dropout=0.2 train_batch_size=16  # tuning arm: the first choice
kto_b8        loss=kto tasks=colour beta=$KTO_BETA learning_rate=3e-5 max_train_steps=600 kto_desirable_prob=0.5 caption_dropout=0.2 train_batch_size=8  # tuning arm
dpo_300       loss=dpo tasks=colour beta=1000 learning_rate=4e-5 max_train_steps=300  # tuning arm
dpo_500       loss=dpo tasks=colour beta=1000 learning_rate=4e-5 max_train_steps=500  # tuning arm
ipo_b10       loss=ipo tasks=colour beta=10 learning_rate=4e-5 max_train_steps=400  # tuning arm: the choice on all 12 held-out prompts
ipo_b1000     loss=ipo tasks=colour beta=1000 learning_rate=4e-5 max_train_steps=400  # tuning arm: DPO's toy beta
"}
TASKS=${TASKS:-colour warm}
TRAIN_SEEDS=${TRAIN_SEEDS:-0 1 2}
WIDE=${WIDE-dpo kto kto_batch8}    # these get WIDE_SEEDS (their seed spread is the question)
WIDE_SEEDS=${WIDE_SEEDS:-0 1 2 3 4}
# VARIANT:betas, on FRONTIER_TASK: the warm task, where DPO trades shapes for reward (README)
FRONTIER=${FRONTIER-dpo:1000,3000,10000,30000,100000 kto:100,300,1000}
FRONTIER_TASK=${FRONTIER_TASK:-warm}
FRONTIER_SEEDS=${FRONTIER_SEEDS:-0 1}
NOISY=${NOISY-dpo dpo_smoothed ipo dpo_safeguard}
NOISE=${NOISE:-0.3}                 # share of the colour task's training pair labels flipped
NOISY_SEEDS=${NOISY_SEEDS:-0 1 2}
IMAGES_PER_PROMPT=${IMAGES_PER_PROMPT:-16}  # on-policy generations per training prompt
PAIRS_PER_PROMPT=${PAIRS_PER_PROMPT:-8}
EVAL_SEEDS=${EVAL_SEEDS:-32}        # 6 prompts of a split x 32 = 192 images per run
SAMPLE_STEPS=${SAMPLE_STEPS:-20}    # DDIM
GUIDANCE=${GUIDANCE:-3.0}           # evaluation/suites.py TOY_GUIDANCE: data and evaluation alike
RESOLUTION=${RESOLUTION:-32}
BATCH=${BATCH:-8}
WARMUP=${WARMUP:-10}
# The released DPO and KTO trainers drop 20% of captions. On the second toy base the colour task
# needed it; on the third, dropping none gained DPO more colour in 5 of 6 paired trials (+3.6
# points on average; assets/toy_results_base3_trials.md), so no caption is dropped here, except by
# KTO, which keeps the released 0.2: on the fourth base dropping none cost it colour (+13.0 and
# +14.1 against +26.0 and +17.2; assets/toy_results_base4_trials.md).
CAPTION_DROPOUT=${CAPTION_DROPOUT:-0}
PARALLEL=${PARALLEL:-2}
RESUME=${RESUME:-0}                 # 1: keep OUT's data and finished runs whose settings match
MAIN=${MAIN:-}                      # empty: every registered offline loss, and the WIDE variants
if [ "$COMPARE" = 1 ]; then
  MAIN=${MAIN:-dpo kto grpo nft}; WIDE=""; FRONTIER=""; NOISY=""
fi
if [ "$QUICK" = 1 ]; then
  MAIN="dpo kto sft"; [ "$COMPARE" = 1 ] && MAIN="dpo kto grpo nft"
  TASKS=colour; TRAIN_SEEDS=0; WIDE_SEEDS=0; FRONTIER=""; NOISY=""
  OUT=${OUT}_quick; RESULTS=${RESULTS_QUICK:-outputs/${NAME}_quick}
fi
export OMP_NUM_THREADS=1

setup_project
mkdir -p "$OUT"
printf '%s\n' "$VARIANTS" > "$OUT/variants.txt"
"$PYTHON" scripts/toy_benchmark.py --model "$MODEL" --out "$OUT" --results "$RESULTS" --variants "$OUT/variants.txt" --tasks $TASKS ${MAIN:+--main $MAIN} --train_seeds $TRAIN_SEEDS --wide $WIDE --wide_seeds $WIDE_SEEDS --frontier $FRONTIER --frontier_task "$FRONTIER_TASK" --frontier_seeds $FRONTIER_SEEDS --noisy $NOISY --noisy_seeds $NOISY_SEEDS --noise "$NOISE" --images_per_prompt "$IMAGES_PER_PROMPT" --pairs_per_prompt "$PAIRS_PER_PROMPT" --split "$SPLIT" --eval_seeds "$EVAL_SEEDS" --sample_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" --resolution "$RESOLUTION" --batch "$BATCH" --warmup "$WARMUP" --caption_dropout "$CAPTION_DROPOUT" --parallel "$PARALLEL" $([ "$RESUME" = 1 ] && echo --resume)
