"""The model card: ``README.md`` in the hub's format, written at the end and with each checkpoint.

YAML front matter (``base_model``, ``library_name``, ``license``, ``tags``, ``datasets``) as the
hub reads it (``huggingface_hub.ModelCard``), then what a reader needs to judge the model: the
loss and every setting it used, the data, the steps, the last logged metrics, the validation
protocol and score, and the last validation grid (copied next to the card, so a checkpoint's
card shows its own grid).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hub import CARD_FILE
from losses import get_spec

# The licence is the user's call (it follows the base model's and the data's): a placeholder.
LICENSE_PLACEHOLDER = "other"


# Families whose export is a transformer/ (models/flow_families.py), not a unet/.
TRANSFORMER_FAMILIES = ("sd3", "flux")


def _is_hub_name(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1


def card_datasets(config: dict[str, Any]) -> list[str]:
    """--model_card_datasets, else --data when it is a hub dataset name, else none."""
    if config.get("model_card_datasets"):
        return [d.strip() for d in config["model_card_datasets"].split(",") if d.strip()]
    return [config["data"]] if not config.get("csv") and _is_hub_name(config["data"]) else []


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value) if isinstance(value, int) else f"`{value}`"


def card_text(
    provenance: dict[str, Any],
    family: str,
    step: int,
    processes: int,
    metrics: dict[str, float] | None = None,
    validation: Any = None,
    grid: str | None = None,
) -> str:
    """The card as markdown; ``grid`` is the validation image's path relative to the card."""
    config = provenance["config"]
    loss = config["loss"]
    lora = config["lora_rank"] > 0
    data = ModelCardData(
        base_model=config["pretrained_model"],
        library_name="diffusers",
        license=LICENSE_PLACEHOLDER,
        tags=[
            *("prefdiff", f"prefdiff-{loss}", "text-to-image", "diffusers"),
            *(f"prefdiff-{family}", *(["lora"] if lora else [])),
        ],
        datasets=card_datasets(config) or None,
        pipeline_tag="text-to-image",
    )
    title = config.get("hub_model_id") or Path(config["output_dir"]).name
    denoiser = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    full = f"A fully fine-tuned {'UNet' if denoiser == 'unet' else 'transformer'}"
    what = f"LoRA adapters (rank {config['lora_rank']})" if lora else full
    # The loss's own settings: the config fields its registered builder accepts.
    accepted = inspect.signature(get_spec(loss).builder).parameters
    loss_rows = [(f"`--{k}`", _fmt(config[k])) for k in accepted if k in config]
    source = (
        f"`--csv {config['csv']}` with images under `{config['images']}`"
        if config.get("csv")
        else f"`--data {config['data']}`"
    )
    if get_spec(loss).online is not None:  # online: sampled from prompts, scored by a reward
        rewards = ", ".join(config.get("reward") or []) or config.get("reward_url")
        source = f"`--prompts {config['prompts']}`, reward `{rewards}`"
    batch = config["train_batch_size"] * config["gradient_accumulation_steps"] * processes
    lines = [
        f"# {title}",
        "",
        f"{what} for `{config['pretrained_model']}` ({family}), trained with prefdiff's "
        f"`{loss}` preference loss "
        f"({get_spec(loss).help}).",
        "",
        "## Training",
        "",
        *_table(
            [
                ("loss", f"`{loss}`"),
                *loss_rows,
                ("data", source),
                ("steps", f"{step} of {config['max_train_steps']}"),
                (
                    "batch",
                    f"{config['train_batch_size']} per device x "
                    f"{config['gradient_accumulation_steps']} accumulation x {processes} "
                    f"processes = {batch}",
                ),
                (
                    "learning rate",
                    f"{config['learning_rate']} ({config['lr_scheduler']}, "
                    f"{config['lr_warmup_steps']} warm-up)",
                ),
                ("optimizer", f"`{config['optimizer']}`"),
                ("precision", f"`{config['mixed_precision']}`"),
                ("resolution", config["resolution"]),
                ("seed", config["seed"]),
                ("code", f"prefdiff `{provenance.get('git_sha', 'unknown')}`"),
            ]
        ),
        "",
        "Every setting, with library versions: `train_config.json`.",
    ]
    if metrics:
        lines += ["", f"## Metrics at step {step}", ""]
        lines += _table([(f"`{k}`", _fmt(v)) for k, v in sorted(metrics.items())])
    if validation is not None:
        lines += [
            "",
            f"## Validation at step {validation.step}",
            "",
            f"{len(validation.prompts)} prompts x {config['validation_images']} images, each "
            f"from its own fixed seed; `{config['validation_scheduler']}`, "
            f"{config['validation_inference_steps']} steps, guidance "
            f"{config['validation_guidance_scale']}, {config['resolution']} px.",
        ]
        if validation.mean_score is not None:
            lines += ["", f"Mean `{validation.scorer}` score: {validation.mean_score:.4g}."]
        if grid:
            lines += ["", f"![validation grid, rows are prompts]({grid})"]
    folder, argument = ("lora", "lora_dir") if lora else (denoiser, "unet_dir")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from models import load_pipeline  # prefdiff",
        "",
        f'pipe = load_pipeline("{config["pretrained_model"]}", {argument}="{folder}")',
        "```",
        "",
        "## Licence",
        "",
        f"Placeholder (`license: {LICENSE_PLACEHOLDER}`): set it to what the base model's and the "
        "training data's licences allow before sharing.",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(directory: Path, validation_grid: Path | None = None, **card: Any) -> Path:
    """Write ``directory/README.md`` (``card`` as for ``card_text``), copying the validation grid
    to ``directory/validation/`` when it is not there yet."""
    directory = Path(directory)
    grid = None
    if validation_grid is not None:
        grid = f"validation/{validation_grid.name}"
        target = directory / grid
        if target.resolve() != validation_grid.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(validation_grid, target)
    path = directory / CARD_FILE
    path.write_text(card_text(grid=grid, **card), encoding="utf-8")
    ModelCard.load(path)  # parses back (front matter and all), or fails here
    return path
