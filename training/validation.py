"""Validation images while training: fixed prompts, one fixed seed per image, a labelled grid.

At step 0, every ``--validation_steps`` optimizer steps and at the end, the main process builds
the family's pipeline around the live policy (the training run's own VAE and text encoders, or,
with ``--cache``, the ones the cache stands in for, loaded once for this), samples every
validation prompt with ``--validation_images`` seeds and writes the labelled grid to
``OUTPUT_DIR/validation/step-<N>.png`` (and ``step-<N>.json``: prompts, seeds, scores), to
TensorBoard's image panel and to wandb. With ``--validation_scorer`` the images are scored by
any registered scorer and the mean is logged as ``validation/<scorer>``.

Validation never changes training: the images come from private generators (as in
generate.py), the global RNG is forked around sampling, the policy is put back in train mode,
and nothing is stepped or cached.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from common import cli
from models import generation
from training.checkpointing import full_model
from training.validation_checks import validation_prompts

VALIDATION_DIR = "validation"
GRID_CELL = (64, 256)  # grid tile size: the training resolution, clipped to this range
BATCH_SIZE = 8  # images per pipeline call (an image does not depend on its batch)


@dataclass
class ValidationResult:
    step: int
    grid: Path  # OUTPUT_DIR/validation/step-<N>.png
    prompts: list[str]
    seeds: list[list[int]]  # per prompt, its images' seeds
    scorer: str | None = None
    scores: list[list[float]] = field(default_factory=list)  # per prompt, per image
    mean_score: float | None = None


def grid_path(output_dir: Path, step: int) -> Path:
    return output_dir / VALIDATION_DIR / f"step-{step}.png"


class Validator:
    """Samples the validation prompts with the live policy; call ``run`` on every process."""

    def __init__(self, config: Any, models: Any, accelerator: Accelerator, dtype: torch.dtype):
        self.config, self.models, self.accelerator, self.dtype = config, models, accelerator, dtype
        self.prompts = validation_prompts(config)
        self.output_dir = Path(config.output_dir)
        self.scorer = None
        if config.validation_scorer and accelerator.is_main_process:
            from evaluation.scorers import build_scorer

            ((name, path),) = cli.parse_named([config.validation_scorer], "--validation_scorer")
            self.scorer = build_scorer(name, path, str(accelerator.device))
        self._frozen: dict[str, Any] | None = None

    @classmethod
    def build(
        cls, config: Any, models: Any, accelerator: Accelerator, dtype: torch.dtype
    ) -> Validator | None:
        """A validator, or None when no validation prompt is given."""
        if not (config.validation_prompts or config.validation_prompt):
            return None
        return cls(config, models, accelerator, dtype)

    def due(self, step: int, final: bool) -> bool:
        return final or step % self.config.validation_steps == 0

    def seeds(self) -> list[list[int]]:
        """Image j of prompt i has seed i * images + j: fixed for the run, none shared."""
        images = list(range(self.config.validation_images))
        return [generation.prompt_seeds(i, images, distinct=True) for i in range(len(self.prompts))]

    def frozen_parts(self) -> dict[str, Any]:
        """The pipeline's VAE, tokenizers and text encoders: the run's own, or those a --cache
        stands in for (all of them offline; the text encoders online) loaded once here in the
        compute dtype."""
        if self._frozen is None:
            from diffusion.denoising import VaeEncoder
            from models.loading import load_family, load_vae

            family, encoder = self.models.family, self.models.latent_encoder
            device = self.accelerator.device
            if not family.text_encoders:
                family = load_family(self.config, type(family), self.dtype, device)
            if isinstance(encoder, VaeEncoder):
                vae = encoder.vae
            else:
                vae = load_vae(self.config, self.dtype, device)
            parts: dict[str, Any] = {"vae": vae}
            for (tok, enc), tokenizer, text_encoder in zip(
                family.text_subfolders, family.tokenizers, family.text_encoders, strict=True
            ):
                parts[tok], parts[enc] = tokenizer, text_encoder
            self._frozen = parts
        return self._frozen

    def pipeline(self, unet: torch.nn.Module) -> Any:
        """The family's pipeline around ``unet`` (no safety checker: images must not be blanked)."""
        family = self.models.family
        cls = family.pipeline_class
        name = self.config.validation_scheduler
        # SD3 / Flux sample only with their flow sampler, whatever the (SD) default names.
        scheduler_cls = generation.SCHEDULERS[
            name if name in family.samplers else family.samplers[0]
        ]
        parts = {
            **self.frozen_parts(),
            family.denoiser_folder: unet,
            "scheduler": scheduler_cls.from_config(self.models.noise_scheduler.config),
            "requires_safety_checker": False,
        }
        params = inspect.signature(cls.__init__).parameters
        required = [n for n, p in params.items() if n != "self" and p.default is p.empty]
        kwargs = {n: parts.get(n) for n in required}  # optional components absent: None
        kwargs.update({n: v for n, v in parts.items() if n in params})
        pipe = cls(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def images(self, unet: torch.nn.Module) -> list[generation.Generation]:
        """The validation images from ``unet``, which is left in the mode it was in."""
        was_training = unet.training
        unet.eval()  # dropout (e.g. LoRA's) off while sampling
        device = self.accelerator.device
        devices = [device] if device.type == "cuda" else []
        # Autocast in the compute dtype on every backend (accelerate's is off under DeepSpeed),
        # so a gathered copy samples what the fp32 policy of a plain run samples.
        autocast = torch.autocast(device.type, self.dtype, enabled=self.dtype != torch.float32)
        try:
            with torch.random.fork_rng(devices=devices), autocast:
                return generation.generate(
                    self.pipeline(unet),
                    self.prompts,
                    list(range(self.config.validation_images)),
                    self.config.validation_inference_steps,
                    self.config.validation_guidance_scale,
                    self.config.resolution,
                    BATCH_SIZE,
                    progress=False,
                    distinct_seeds=True,
                )
        finally:
            unet.train(was_training)

    def run(self, step: int, policy: torch.nn.Module) -> ValidationResult | None:
        """Validate at ``step``: the result on the main process, None on the others."""
        # Collective under FSDP and DeepSpeed (every rank calls it); their gathered copy is built
        # beside the pipeline's other parts, in the compute dtype (norms fp32).
        unet = full_model(self.accelerator, policy, self.accelerator.device, self.dtype)
        result = None
        if self.accelerator.is_main_process:
            result = self._validate(step, unet)
        self.accelerator.wait_for_everyone()
        return result

    def _validate(self, step: int, unet: torch.nn.Module) -> ValidationResult:
        generations = self.images(unet)
        cell = min(max(self.config.resolution, GRID_CELL[0]), GRID_CELL[1])
        grid = generation.labelled_grid(generations, cell=cell)
        path = grid_path(self.output_dir, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        result = ValidationResult(step, path, self.prompts, self.seeds())
        logs: dict[str, float] = {}
        if self.scorer is not None:
            images, prompts = [g.image for g in generations], [g.prompt for g in generations]
            flat = self.scorer.score(images, prompts)
            k = self.config.validation_images
            result.scorer = self.scorer.name
            result.scores = [flat[i : i + k] for i in range(0, len(flat), k)]
            result.mean_score = float(np.mean(flat))
            logs[f"validation/{self.scorer.name}"] = result.mean_score
        record = {k: v for k, v in asdict(result).items() if k != "grid"}
        path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        self.log(step, grid, logs)
        return result

    def log(self, step: int, grid: Any, scalars: dict[str, float]) -> None:
        """The grid into each tracker's image panel, the score as a curve."""
        caption = f"step {step}: rows are prompts, columns seeds"
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": np.asarray(grid)[None]}, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(grid, caption=caption)]}, step=step)
        if scalars:
            self.accelerator.log(scalars, step=step)
