"""One benchmark case in its own process (so its peak memory is its own); prints one JSON line.

    python -m bench.case --size sd15 --mode full --cache on --resolution 128

Modes:
- ``baseline``: the released Diffusion-DPO trainer's per-step work: text encoder(s) and VAE
  encode every step, a second full reference UNet, torch's default AdamW; on GPU the SDXL
  reference is moved to the GPU and back to the CPU every micro-step, as the released SDXL code
  did.
- ``full`` / ``lora``: this project's step (``diffusion/denoising.batch_errors``, the model
  family, the DPO loss, ``training/build.make_optimizer``), full fine-tuning with a frozen
  reference UNet, or LoRA with the reference = the same UNet with adapters disabled.
  ``--cache on`` replaces the VAE and
  text encoders by precomputed posterior moments and text features (random tensors of the
  cache's shapes; the VAE and text encoders are never built).

Options for the device check (``bench/device_check.py``): ``--precision fp16`` (autocast with
torch's grad scaler), ``--optimizer`` (adamw, adamw8bit, adafactor), ``--compile`` (inductor on
policy and reference), ``--randomise_norms`` (norm weights like a real checkpoint's, so the
step-0 loss shows whether policy and reference agree in half precision). The JSON line carries
``step0_loss``: the DPO loss of the first step, before any update (log 2 when they agree).

Where the time goes (issue 25 item 10): ``--profile`` adds ``breakdown``, one step timed per
phase (``bench.phases``: the step marks data, latents and noise, policy forward, reference
forward, errors and loss, policy backward, grad clip, optimizer step, logging), with FLOPs and
MFU per phase under ``--flops``; ``--sweep 1 4 16`` measures each pairs-per-step size in turn
(one JSON line holding ``sweep``: a list of points), a size that runs out of memory reported
as ``"fits": false`` instead of ending the run. The phases are marked here, in the benchmark's
own step, not in train.py: the benchmark builds its step from the same pieces
(``diffusion/denoising.batch_errors``, the family, the loss,
``training/build.make_optimizer``) but does not call
train.py's loop, so the trainer's hot loop stays free of profiling code.
"""

import argparse
import contextlib
import copy
import gc
import json
import math
import resource
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTokenizer

from bench.models import FLOW_SIZES, SIZES, build_random_model, text_shapes, vae_config
from bench.phases import FlopPhases, Phases, breakdown, profile_step, sync
from data.cache import CachedLatentEncoder
from diffusion.denoising import VaeEncoder, batch_errors
from losses import build_loss
from losses.dpo import DPO_BETA
from models.families import family_for
from models.loading import FP32_NORMS, to_dtype_keeping_norms_fp32
from models.lora import DEFAULT_LORA_TARGETS, AdaptersDisabled, add_lora
from models.speed import compile_unet
from scripts.clip_tokenizer import default_tokenizer_cache, ensure_clip_tokenizer
from training.build import make_optimizer
from training.config import TrainConfig

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_PHASES = Phases()
CAPTION = "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k"


def tokenizers(count: int) -> list[CLIPTokenizer]:
    path = ensure_clip_tokenizer(default_tokenizer_cache())
    # SDXL's second tokenizer pads with "!" (id 0), as the released SDXL pipelines do.
    first = CLIPTokenizer.from_pretrained(path)
    return [first, CLIPTokenizer.from_pretrained(path, pad_token="!")][:count]


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


@torch.no_grad()
def randomise_norms(unet: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights around 1 and biases around 0, as a trained checkpoint has (a fresh model's
    exact 1 and 0 survive any rounding, hiding precision mismatches)."""
    generator = torch.Generator().manual_seed(seed)
    for module in unet.modules():
        if isinstance(module, FP32_NORMS) and module.weight is not None:
            shape = module.weight.shape
            module.weight.copy_(1 + 0.3 * torch.randn(shape, generator=generator))
            if module.bias is not None:  # RMSNorm has none
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))


def our_step(args, device: torch.device, dtype: torch.dtype) -> tuple[Callable, int]:
    cached = args.cache == "on"
    base_dtype = dtype if args.mode == "lora" else torch.float32  # LoRA's frozen base
    model = build_random_model(args.size, with_vae_and_text=not cached, dtype=base_dtype)
    policy = model.unet
    if args.randomise_norms:
        randomise_norms(policy)
    if args.mode == "lora":
        policy.to(device, dtype)
        add_lora(policy, args.lora_rank, args.lora_rank, DEFAULT_LORA_TARGETS)
        reference = AdaptersDisabled(policy)
    else:
        policy.to(device).requires_grad_(True)
        reference = copy.deepcopy(policy)  # as models.loading builds it: norms stay fp32
        to_dtype_keeping_norms_fp32(reference, dtype)
        reference.requires_grad_(False).eval()
    policy.train()
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if args.compile:
        compile_unet(policy, "inductor")
        if args.mode != "lora":
            compile_unet(reference, "inductor")
    family_cls = family_for(policy.config)
    pairs, latent = args.pairs, args.resolution // 8
    captions = [CAPTION] * pairs
    flow = args.size in FLOW_SIZES
    run_config = TrainConfig(resolution=args.resolution)
    process = family_cls.noise_process(model.scheduler, run_config, args.resolution)
    if cached:
        encoder = CachedLatentEncoder(vae_config(args.size), device)
        mean = torch.randn(2 * pairs, 16 if flow else 4, latent, latent)
        images = torch.cat([mean, torch.rand_like(mean) * 0.1], dim=1)  # [2B, 2C, h, w]
        if flow:
            features = {name: torch.randn(pairs, *shape, device=device)
                        for name, shape in text_shapes(args.size).items()}  # fmt: skip
        else:
            hidden = policy.config.cross_attention_dim
            features = {"encoder_hidden_states": torch.randn(pairs, 77, hidden, device=device)}
        if "text_embeds" in family_cls.text_feature_names:
            features["text_embeds"] = torch.randn(pairs, 1280, device=device)
        family = family_cls([], [], args.resolution, "constant", text_source=lambda _: features)
        family.configure(policy.config, run_config)  # Flux: the guidance value
    else:
        encoder = VaeEncoder(model.vae.to(device, dtype).requires_grad_(False).eval())
        encoders = [e.to(device, dtype).requires_grad_(False).eval() for e in model.text_encoders]
        family = family_cls(tokenizers(len(encoders)), encoders, args.resolution, "constant")
        images = torch.rand(2 * pairs, 3, args.resolution, args.resolution) * 2 - 1
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-6, optimizer=args.optimizer), trainable)
    # fp16 needs loss scaling (its range is too narrow for small gradients); bf16 does not.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    loss_fn = build_loss("dpo", TrainConfig().to_dict())
    sizes = [(args.resolution, args.resolution)] * (2 * pairs)
    counter = iter(range(10**9))

    def step(phases: Phases = NO_PHASES) -> float:
        """One step; ``phases`` marks its phases (bench.phases.PHASES) for the breakdown."""

        def forward(model: torch.nn.Module, *inputs) -> torch.Tensor:
            # Inside batch_errors: the policy's forward, then the reference's.
            phases.start("reference forward" if model is reference else "policy forward")
            prediction = family.forward(model, *inputs)
            phases.start("errors and loss")
            return prediction

        phases.start("data")
        batch = images.to(device)
        condition = family.condition(captions, sizes, sizes)
        phases.start("latents and noise")
        policy_err, ref_err = batch_errors(
            policy, reference, encoder, process, condition, batch, 2,
            first_group=next(counter) * pairs, seed=0,
            autocast=lambda: autocast(device, dtype), forward=forward,
        )  # fmt: skip
        loss, _ = loss_fn(policy_err, ref_err)
        phases.start("policy backward")
        if scaler is None:
            loss.backward()
            phases.start("grad clip")
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            phases.start("optimizer step")
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            phases.start("grad clip")
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            phases.start("optimizer step")
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        phases.start("logging")
        value = loss.item()  # the trainer logs every step's loss, so it syncs there too
        phases.stop()
        return value

    return step, sum(p.numel() for p in trainable)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def baseline_step(args, device: torch.device, dtype: torch.dtype) -> tuple[Callable, int]:
    """The released trainer's per-step work, written out as it did it."""
    model = build_random_model(args.size)
    unet = model.unet.to(device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    offload = device.type == "cuda" and args.size == "sdxl"
    ref_unet = copy.deepcopy(unet).to(dtype).requires_grad_(False).eval()
    if offload:
        ref_unet.to("cpu")
    vae = model.vae.to(device, dtype).requires_grad_(False)
    encoders = [e.to(device, dtype).requires_grad_(False) for e in model.text_encoders]
    toks = tokenizers(len(encoders))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, weight_decay=1e-2)
    pairs, scheduler = args.pairs, model.scheduler
    pixels = torch.rand(2 * pairs, 3, args.resolution, args.resolution) * 2 - 1
    sdxl = len(encoders) == 2

    def step() -> None:
        with torch.no_grad():
            hidden, pooled = [], None
            for tok, enc in zip(toks, encoders, strict=True):
                ids = tok([CAPTION] * pairs, padding="max_length", max_length=77,
                          truncation=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2] if sdxl else out[0])
                pooled = out[0]
            text = torch.cat(hidden, dim=-1).repeat(2, 1, 1)
            latents = vae.encode(pixels.to(device, dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (pairs,), device=device).repeat(2)
        noisy = scheduler.add_noise(latents, noise, t)
        added = {}
        if sdxl:
            res = args.resolution
            ids = torch.tensor([[res, res, 0, 0, res, res]] * 2 * pairs, device=device)
            added = {"added_cond_kwargs": {"text_embeds": pooled.repeat(2, 1), "time_ids": ids}}
        with autocast(device, dtype):
            pred = unet(noisy, t, text, **added).sample
            if offload:
                ref_unet.to(device)
            with torch.no_grad():
                ref_pred = ref_unet(noisy, t, text, **added).sample
            if offload:
                ref_unet.to("cpu")
        model_losses = F.mse_loss(pred.float(), noise.float(), reduction="none").mean((1, 2, 3))
        ref_losses = F.mse_loss(ref_pred.float(), noise.float(), reduction="none").mean((1, 2, 3))
        model_diff = model_losses[:pairs] - model_losses[pairs:]
        ref_diff = ref_losses[:pairs] - ref_losses[pairs:]
        loss = -F.logsigmoid(-0.5 * DPO_BETA * (model_diff - ref_diff)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step, sum(p.numel() for p in unet.parameters())


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def out_of_memory(error: RuntimeError) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator refusing (a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            peak_flops: float | None) -> dict:  # fmt: skip
    """Build the step for ``args.pairs`` pairs and time it: warm-up, timed steps, then (with
    --flops) one step counting FLOPs and (with --profile) two under the profiler."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    build = baseline_step if args.mode == "baseline" else our_step
    step, trainable = build(args, device, dtype)
    losses = [step() for _ in range(args.warmup)]
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "pairs": args.pairs,
        "fits": True,
        "trainable_params": trainable,
        "seconds_per_step": seconds,
        "seconds_per_pair": seconds / args.pairs,
        "pairs_per_second": args.pairs / seconds,
        "peak_memory_gib": peak_memory_gib(device),
        "step0_loss": losses[0],
        "finite": all(map(math.isfinite, losses)),
    }
    by_phase = None
    if args.flops:
        with FlopCounterMode(display=False) as counter:
            if args.profile:  # the baseline's step has no phases (main refuses --profile)
                phases = FlopPhases(counter)
                step(phases)
                by_phase = phases.flops
            else:
                step()
        total = counter.get_total_flops()
        result.update(flops_per_step=total, mfu=total / seconds / peak_flops)
    if args.profile:
        events, step_seconds = profile_step(step, device)
        result["breakdown"] = breakdown(events, step_seconds, device, by_phase, peak_flops)
    return result


def sweep(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
          peak_flops: float | None) -> list[dict]:  # fmt: skip
    """``measure`` at each of ``args.sweep`` pairs per step, each with a freshly built step; a
    point that runs out of memory is reported as not fitting and the sweep goes on."""
    points = []
    for pairs in args.sweep:
        try:
            points.append(measure(argparse.Namespace(**{**vars(args), "pairs": pairs}),
                                  device, dtype, peak_flops))  # fmt: skip
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not out_of_memory(error):
                raise
            points.append({"pairs": pairs, "fits": False, "error": str(error).splitlines()[0]})
        # The point's models and optimizer (and an OOM's traceback) are gone: return the memory.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return points


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), required=True)
    parser.add_argument("--mode", choices=["baseline", "full", "lora"], required=True)
    parser.add_argument("--cache", choices=["on", "off"], default="off")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit", "adafactor"],
                        default="adamw")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor)")
    parser.add_argument("--randomise_norms", action="store_true")
    parser.add_argument("--flops", action="store_true", help="count FLOPs (one extra step)")
    parser.add_argument("--profile", action="store_true",
                        help="time each phase of one step (two more steps, profiled)")  # fmt: skip
    parser.add_argument("--sweep", type=int, nargs="+", default=None, metavar="PAIRS",
                        help="measure at each of these pairs per step instead of --pairs; "
                        "one that runs out of memory is reported as not fitting")  # fmt: skip
    return parser


def main() -> None:
    parser = arguments()
    args = parser.parse_args()
    if args.sweep and min(args.sweep) < 1:
        parser.error("--sweep: pairs per step must be positive")
    if args.profile and args.mode == "baseline":
        parser.error("--profile: the baseline's step has no phases (use --mode full or lora)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = PRECISIONS[args.precision]
    peak = None
    if args.flops:  # MFU's denominator: bf16 on a GPU, the case's own dtype on a CPU
        peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else dtype)
    common = {**vars(args), "device": device.type, "matmul_peak_flops": peak}
    if args.sweep:
        print(json.dumps({**common, "sweep": sweep(args, device, dtype, peak)}))
    else:
        print(json.dumps({**common, **measure(args, device, dtype, peak)}))


if __name__ == "__main__":
    main()
