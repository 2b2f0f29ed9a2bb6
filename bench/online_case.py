"""One online case of the device check, in its own process (its peak memory is its own): the
online trainer collecting and updating on a random-init model; prints one JSON line.

    python -m bench.online_case --size sd35m --loss grpo --resolution 512 --group_size 24 \
        --guidance_scale 4.5 --precision fp16 --lora_alpha 64 --gradient_checkpointing

What runs is the trainer's own code, called as train.py calls it: ``OnlineTrainer.collect``
(G images per prompt from the stochastic sampler under no_grad, decoded by the VAE, scored,
group advantages) and ``OnlineTrainer.accumulate`` (the GRPO or NFT loss over every trained
step of an optimizer step's micro-batches), then the optimizer step train.py takes (gradient
clipping, AdamW). Unlike a train.py run:

- weights are random, of the real configs (``bench.models``), LoRA on the frozen base in the
  compute dtype; text features are random tensors of the real shapes (no text encoder runs, so
  the collection's text encoding is not timed);
- the reward is a stand-in costing next to nothing (an image's mean pixel value): a learned
  reward's own time (PickScore: a CLIP ViT-H/14 over every image) is not in the collection's;
- nothing is warmed up: the first collection and update are the ones timed.

Measured: seconds to collect (images per second), seconds per optimizer step, peak memory while
collecting and while updating, and the ratio of recomputed to stored probabilities at the
collection's first update (``online/ratio_at_first_step``: 1 when sampling and training agree).
A run that runs out of memory prints ``"fits": false`` instead of failing.
"""

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from bench.case import CAPTION, PRECISIONS, out_of_memory, peak_memory_gib
from bench.models import FLOW_SIZES, SIZES, build_random_model, random_vae, text_shapes
from bench.phases import sync
from data.prompts import PromptBatch
from diffusion.denoising import VaeEncoder
from evaluation.rewards import RewardScores
from losses import build_loss, requirements
from models.families import family_for
from models.loading import Components
from models.lora import DEFAULT_LORA_TARGETS, AdaptersDisabled, add_lora
from training.build import make_optimizer
from training.checkpointing import TrainerState
from training.config import TrainConfig
from training.online import TRAJECTORY, OnlineTrainer, trained_count

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # accelerate's names
# Flow-GRPO's and DiffusionNFT's optimizer (flow_grpo config/base.py, DiffusionNFT config/base.py).
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-4, 1e-4, 1.0


class MeanPixelReward:
    """Stand-in reward: an image's mean pixel value in [0, 1], continuous (groups have spread,
    so the update has advantages to train on) and nearly free."""

    def score(self, images: list[Image.Image], prompts: list[str],
              metadata: list[dict] | None = None) -> RewardScores:  # fmt: skip
        pixels = [np.asarray(image.convert("RGB"), dtype=np.float64) for image in images]
        total = torch.tensor([p.mean() / 255 for p in pixels], dtype=torch.float32)
        return RewardScores(total, {"mean_pixel": total})

    def check_prompts(self, prompts: list[str]) -> None:
        """Reads nothing from a prompt."""


def random_text(shapes: dict[str, tuple[int, ...]], device: torch.device) -> Callable:
    """A text source (``ModelFamily.text_source``): features of the real shapes, random, one set
    per distinct caption (so the empty caption of guidance differs from the prompts)."""
    known: dict[str, dict[str, torch.Tensor]] = {}

    def source(captions: list[str]) -> dict[str, torch.Tensor]:
        for caption in captions:
            if caption not in known:
                known[caption] = {name: torch.randn(shape) for name, shape in shapes.items()}
        rows = [known[caption] for caption in captions]
        return {name: torch.stack([row[name] for row in rows]).to(device) for name in shapes}

    return source


def feature_shapes(size: str, denoiser: torch.nn.Module, names: tuple[str, ...]) -> dict:
    """Per-caption text feature shapes the family reads: the flow sizes' (``text_shapes``), or
    77 CLIP tokens at the UNet's cross-attention width (and SDXL's pooled 1280)."""
    if size in FLOW_SIZES:
        return text_shapes(size)
    shapes = {"encoder_hidden_states": (77, denoiser.config.cross_attention_dim)}
    if "text_embeds" in names:
        shapes["text_embeds"] = (1280,)
    return shapes


def prompt_batches(prompts: int) -> Iterator[PromptBatch]:
    """Distinct prompts, ``prompts`` per micro-batch, numbered as the prompt stream's draws."""
    draw = 0
    while True:
        draws = list(range(draw, draw + prompts))
        yield PromptBatch([f"{CAPTION}, variant {d}" for d in draws], [{}] * prompts, draws, {},
                          [(d,) for d in draws])  # fmt: skip
        draw += prompts


def run_config(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig(
        loss=args.loss, resolution=args.resolution, group_size=args.group_size,
        sampling_steps=args.sampling_steps, noise_level=args.noise_level,
        guidance_scale=args.guidance_scale, train_batch_size=args.prompts,
        collect_batches=args.batches, gradient_accumulation_steps=args.accumulation,
        kl_coef=args.kl_coef, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_target_modules=args.lora_targets, mixed_precision=MIXED_PRECISION[args.precision],
        learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
    )  # fmt: skip
    config.resolve_loss_defaults()  # the loss's released KL weight when --kl_coef is not given
    return config


def build_trainer(args: argparse.Namespace, device: torch.device):
    """The trainer as train.py assembles it, on random weights: (trainer, prepared policy,
    optimizer, accelerator, trainable parameter count)."""
    torch.manual_seed(0)
    dtype = PRECISIONS[args.precision]
    config = run_config(args)
    model = build_random_model(args.size, with_vae_and_text=False, dtype=dtype)
    policy = model.unet.to(device, dtype)
    add_lora(policy, config.lora_rank, config.lora_alpha, config.lora_target_modules)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.train()
    timesteps = model.scheduler.config.num_train_timesteps  # as train.py hands the loss its T
    options = {**config.to_dict(), "num_train_timesteps": timesteps}
    # As models.loading: the reference is the base (adapters off) when the loss needs one (the
    # online losses: when their KL weight is > 0).
    reference = AdaptersDisabled(policy) if requirements(config.loss, options).reference else None
    family_cls = family_for(policy.config)
    process = family_cls.noise_process(model.scheduler, config, args.resolution)
    shapes = feature_shapes(args.size, policy, family_cls.text_feature_names)
    text_source = random_text(shapes, device)
    family = family_cls([], [], args.resolution, "constant", text_source=text_source)
    family.configure(policy.config, config)
    vae = random_vae(args.size).to(device, dtype).requires_grad_(False).eval()
    models = Components(policy=policy, reference=reference, latent_encoder=VaeEncoder(vae),
                        family=family, noise_scheduler=process, policy_io=None)  # fmt: skip
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=config.mixed_precision,
                              cpu=device.type == "cpu")  # fmt: skip
    trainable = [p for p in policy.parameters() if p.requires_grad]
    prepared, optimizer = accelerator.prepare(policy, make_optimizer(config, trainable))
    loss_fn = build_loss(config.loss, options)
    trainer = OnlineTrainer(config, accelerator, models, prepared, loss_fn, MeanPixelReward())
    return trainer, prepared, optimizer, accelerator, sum(p.numel() for p in trainable)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """One collection, timed, then every optimizer step it feeds, each timed."""
    trainer, policy, optimizer, accelerator, trainable = build_trainer(args, device)
    config, state = trainer.config, TrainerState()
    batches = prompt_batches(config.train_batch_size)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    trainer.collect(batches, state)
    sync(device)
    collect_seconds = time.perf_counter() - start
    peak_collect = peak_memory_gib(device)
    collection = trainer.current
    first = collection.batches[0]
    steps = first.log_probs.shape[0] if trainer.kind == TRAJECTORY else trained_count(
        config.sampling_steps, config.trained_steps_fraction)  # fmt: skip
    reset_peak(device)
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    update_seconds, metrics = [], []
    updates = len(collection.order) // config.gradient_accumulation_steps
    for _ in range(updates):
        sync(device)
        start = time.perf_counter()
        metrics += trainer.accumulate(batches, state)
        accelerator.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        update_seconds.append(time.perf_counter() - start)
        state.global_step += 1
    if trainer.current is not collection or trainer.collections != 1:
        raise RuntimeError("a second collection ran inside the timed updates")
    peak_update = peak_memory_gib(device)
    after = [p for p in policy.parameters() if p.requires_grad]
    moved = any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    images = len(collection.batches) * config.train_batch_size * config.group_size
    ratio = metrics[0].get("online/ratio_at_first_step")
    losses = [m["loss"] for m in metrics]
    return {
        "fits": True,
        "trainable_params": trainable,
        "images": images,
        "micro_batch_images": config.train_batch_size * config.group_size,
        "trained_steps": int(steps),
        "collect_seconds": collect_seconds,
        "images_per_second": images / collect_seconds,
        "update_seconds": update_seconds,
        "seconds_per_update": sum(update_seconds) / len(update_seconds),
        "micro_batches_per_update": config.gradient_accumulation_steps,
        "peak_collect_gib": peak_collect,
        "peak_update_gib": peak_update,
        "peak_memory_gib": max(peak_collect, peak_update),
        "ratio_at_first_step": None if ratio is None or math.isnan(ratio) else ratio,
        "losses": losses,
        "finite": all(map(math.isfinite, losses)),
        "moved": moved,  # the updates changed the adapters (a timed no-op would mislead)
    }


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), required=True)
    parser.add_argument("--loss", choices=["grpo", "nft"], required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--group_size", type=int, default=24, help="images per prompt")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per micro-batch")
    parser.add_argument("--batches", type=int, default=1, help="micro-batches per collection")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step")  # fmt: skip
    parser.add_argument("--sampling_steps", type=int, default=10)
    parser.add_argument("--noise_level", type=float, default=None,
                        help="default: the loss's (train.py's --noise_level)")  # fmt: skip
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--kl_coef", type=float, default=None,
                        help="default: the loss's released value; 0: no reference")  # fmt: skip
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--lora_alpha", type=float, default=None, help="default: the rank")
    parser.add_argument("--lora_targets", default=DEFAULT_LORA_TARGETS)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    return parser


def main() -> None:
    args = arguments().parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    common = {**vars(args), "device": device.type}
    try:
        result = measure(args, device)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not out_of_memory(error):
            raise
        result = {"fits": False, "error": str(error).splitlines()[0]}
    print(json.dumps({**common, **result}))


if __name__ == "__main__":
    main()
