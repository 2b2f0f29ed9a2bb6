"""Prompts x seeds -> images, a metadata CSV and a labelled grid, from a diffusers SD model.

    python generate.py --model assets/toy-sd15 --unet outputs/example \
        --prompt "a red circle on a white background" --num_seeds 4 --out outputs/gen

Each image's randomness comes from its own generator seeded with its seed, so an image depends
on (prompt, seed, settings) only, never on the batch it was drawn in. By default every prompt
uses the same seeds (a grid's columns share noise); --distinct_seeds gives prompt i the seeds
shifted by i x (max seed + 1), so no two images share noise: for scoring, where a model whose
picture is mostly decided by the noise would otherwise give k independent draws, not prompts x k.

A trained UNet (the trainer's OUTPUT_DIR or its unet/ folder, full fine-tune; transformer/ for SD3
and Flux) replaces the base's with --unet; LoRA adapters (OUTPUT_DIR or its lora/ folder) are
loaded with --lora. SD1.5, SDXL, SD3 / SD3.5 and Flux.1 bases all work: the pipeline class comes
from the model family (models/pipeline.py).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from common import cli
from evaluation.suites import read_prompts
from models.generation import (
    DTYPES,
    GRID_PNG,
    IMAGE_DIR,
    METADATA_CSV,
    SCHEDULERS,
    Generation,
    default_guidance,
    generate,
    labelled_grid,
    load_pipeline,
    save_generations,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/toy-sd15", help="base model dir or hub name")
    parser.add_argument(
        "--unet", default=None, help="trained UNet: the trainer's OUTPUT_DIR or a unet/ folder"
    )
    parser.add_argument(
        "--lora", default=None, help="trained LoRA: the trainer's OUTPUT_DIR or a lora/ folder"
    )
    parser.add_argument("--prompts", default=None, help="file with one prompt per line")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="explicit seeds")
    parser.add_argument("--num_seeds", type=int, default=4, help="seeds 0..N-1 (without --seeds)")
    parser.add_argument(
        "--distinct_seeds", action="store_true", help="shift each prompt's seeds past the last's"
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="sampler (default: ddim; flow_euler for SD3 and Flux)",
    )
    parser.add_argument("--steps", type=int, default=20, help="inference steps")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="CFG scale (<=1: off; default 1, or 3.5 for guidance-distilled Flux.1-dev)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: native)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--grid_cell", type=int, default=96, help="grid tile size in pixels")
    args = parser.parse_args(argv)
    if not args.prompts and not args.prompt:
        parser.error("give --prompts FILE and/or --prompt TEXT")
    return args


def prompts_and_seeds(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    prompts = (read_prompts(args.prompts) if args.prompts else []) + list(args.prompt)
    seeds = list(args.seeds) if args.seeds is not None else list(range(args.num_seeds))
    return prompts, seeds


def main(argv: Sequence[str] | None = None) -> list[Generation]:
    args = parse_args(argv)
    cli.setup_logging("%(levelname)s %(name)s: %(message)s")
    prompts, seeds = prompts_and_seeds(args)
    pipe = load_pipeline(
        args.model, args.unet, args.scheduler, DTYPES[args.dtype], args.device, args.lora
    )
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(args.model)
    generations = generate(
        pipe,
        prompts,
        seeds,
        args.steps,
        args.guidance_scale,
        args.resolution,
        args.batch_size,
        distinct_seeds=args.distinct_seeds,
    )
    save_generations(args.out, generations)
    cells = math.prod((len(prompts), len(seeds)))
    grid = ""
    if cells <= 4096:
        labelled_grid(generations, args.grid_cell).save(args.out / GRID_PNG)
        grid = f", grid {args.out / GRID_PNG}"
    print(
        f"{len(generations)} images in {args.out / IMAGE_DIR}, list {args.out / METADATA_CSV}{grid}"
    )
    return generations


if __name__ == "__main__":
    cli.run(main)
