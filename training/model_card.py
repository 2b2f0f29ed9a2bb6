"""The model card: ``README.md`` in the hub's format, written at the end and with each checkpoint.

YAML front matter (``base_model``, ``library_name``, ``license``, ``tags``, ``datasets``) as the
hub reads it (``huggingface_hub.ModelCard``), then what a reader needs to judge the model: the
loss and every setting it used (the Diffusion-SDPO safeguard included), the data actually trained
on (and the relabelling that made it), hard or soft labels, the steps, every other setting that
can change the weights and is not at its default, the last logged metrics, the validation protocol
and score, and the last validation grid (copied next to the card, so a checkpoint's card shows its
own grid).
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from evaluation.relabel import relabelling_record
from losses import get_spec
from losses.registry import SAFEGUARD_OPTION, loss_options, safeguard_mu
from training.config import TrainConfig
from training.hub import CARD_FILE

# The licence is the user's call (it follows the base model's and the data's): a placeholder.
LICENSE_PLACEHOLDER = "other"
# The hub tag of a run trained with the Diffusion-SDPO safeguard (losses/safeguard.py).
SAFEGUARD_TAG = "prefdiff-sdpo-safeguard"

# The flags that name where the training data comes from (``data_source``): the ones in use are
# on the card, the others did not change the result.
DATA_FLAGS = ("data", "csv", "images", "pairs", "pairs_dirs", "captions", "columns", "hub_split",
              "cache")  # fmt: skip
# Settings the card's own rows show (besides the loss's options and the data flags).
SHOWN = frozenset({
    "pretrained_model", "loss", "soft_labels", "lora_rank", "max_train_steps", "train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "optimizer", "mixed_precision", "resolution", "seed",
})  # fmt: skip
OTHERS_ROW = "other settings (not at their defaults)"
# Settings that cannot change the trained weights: where files go, what is logged, validation
# (tested not to change training: tests/test_validation.py), sharing, and resuming (exact:
# tests/test_faults.py). Any other setting that is not at its default is on the card.
NO_EFFECT = frozenset({
    "output_dir", "overwrite_output_dir", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "report_to", "tracker_project", "validation_prompts",
    "validation_prompt", "validation_steps", "validation_images", "validation_inference_steps",
    "validation_guidance_scale", "validation_scheduler", "validation_scorer",
    "model_card_datasets", "push_to_hub", "hub_model_id",
})  # fmt: skip


def _is_hub_name(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1


def _source_flag(config: Mapping[str, Any]) -> str:
    """The flag that names the data trained on: csv, pairs, pairs_dirs, else data."""
    return next((f for f in ("csv", "pairs", "pairs_dirs") if config.get(f)), "data")


def card_datasets(config: dict[str, Any]) -> list[str]:
    """--model_card_datasets, else --data when it is the data trained on and a hub dataset name,
    else none."""
    if config.get("model_card_datasets"):
        return [d.strip() for d in config["model_card_datasets"].split(",") if d.strip()]
    name = config.get("data")
    return [name] if _source_flag(config) == "data" and _is_hub_name(name) else []


def _code(text: Any) -> str:
    return f"`{text}`"


def data_source(config: Mapping[str, Any], code: Callable[[Any], str] = _code) -> str:
    """The data the run trained on, as the flags that name it (``code`` formats a flag and its
    value: markdown code on the card, plain text in the start-up block), with the relabelling
    that wrote it when its folder holds one (``python -m evaluation.relabel``). An online run
    trains on images it samples from its prompts, scored by its reward."""
    if get_spec(config["loss"]).online is not None:
        rewards = ", ".join(config.get("reward") or []) or config.get("reward_url")
        return f"{code('--prompts ' + str(config['prompts']))}, reward {code(rewards)}"
    flag = _source_flag(config)
    value = config.get(flag)
    text = code(f"--{flag} {value}")
    if flag in ("csv", "pairs"):
        text += f" with images under {code(config['images'])}"
    elif flag == "pairs_dirs":
        text += " (chosen, rejected folders)"
        if config.get("captions"):
            text += f", captions {code(config['captions'])}"
    elif _is_hub_name(value) and config.get("hub_split") not in (None, "train"):
        text += f", split {code(config['hub_split'])}"
    if flag == "data" and config.get("columns"):
        text += f", columns {code(config['columns'])}"
    record = relabelling_record(_folder(value)) if flag in ("csv", "data") and value else None
    if record is not None:
        text += "; " + _relabelling(record, code)
    if config.get("cache"):
        text += f"; latents and text features from {code('--cache ' + str(config['cache']))}"
    return text


def _folder(path: str) -> Path:
    """The folder a data flag's value lives in (a directory of shards, or a file or glob)."""
    return Path(path) if Path(path).is_dir() else Path(path).parent


def _relabelling(record: Mapping[str, Any], code: Callable[[Any], str]) -> str:
    """What ``python -m evaluation.relabel`` read and scored with (its recorded arguments)."""
    source = _source_flag(record)
    scorers = ", ".join(code(s) for s in record.get("scorer") or [])
    text = (f"labels from {code('python -m evaluation.relabel')} on "
            f"{code(f'--{source} {record.get(source)}')} with {scorers}")  # fmt: skip
    if record.get("weights"):
        text += f", weights {record['weights']}"
    return text


def label_text(config: Mapping[str, Any], code: Callable[[Any], str] = _code) -> str | None:
    """Hard or soft labels of a pairwise loss (None for per-image losses)."""
    if not get_spec(config["loss"]).pairwise:
        return None
    if config.get("soft_labels"):
        return f"soft: each pair's preference probability ({code('--soft_labels')})"
    return "hard: the chosen image wins"


def _defaults() -> dict[str, Any]:
    return {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(TrainConfig)
    }


def other_settings(config: Mapping[str, Any]) -> list[str]:
    """``--name value`` of every setting not at its default that can change the weights and
    that the card's rows do not show already."""
    skip = SHOWN | NO_EFFECT | set(DATA_FLAGS) | loss_options()
    defaults = _defaults()
    return [
        f"--{k} {v}"
        for k, v in config.items()
        if k in defaults and k not in skip and v != defaults[k]
    ]


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value) if isinstance(value, int) else f"`{value}`"


def card_text(
    provenance: dict[str, Any],
    family: str,
    denoiser_folder: str,
    step: int,
    processes: int,
    metrics: dict[str, float] | None = None,
    validation: Any = None,
    grid: str | None = None,
) -> str:
    """The card as markdown; ``denoiser_folder``: the family's (``unet`` or ``transformer``);
    ``grid``: the validation image's path relative to the card."""
    config = provenance["config"]
    loss = config["loss"]
    lora = config["lora_rank"] > 0
    mu = safeguard_mu(loss, config)
    data = ModelCardData(
        base_model=config["pretrained_model"],
        library_name="diffusers",
        license=LICENSE_PLACEHOLDER,
        tags=[
            *("prefdiff", f"prefdiff-{loss}", "text-to-image", "diffusers"),
            *(f"prefdiff-{family}", *(["lora"] if lora else [])),
            *([SAFEGUARD_TAG] if mu is not None else []),
        ],
        datasets=card_datasets(config) or None,
        pipeline_tag="text-to-image",
    )
    title = config.get("hub_model_id") or Path(config["output_dir"]).name
    full = f"A fully fine-tuned {'UNet' if denoiser_folder == 'unet' else denoiser_folder}"
    what = f"LoRA adapters (rank {config['lora_rank']})" if lora else full
    # The loss's own settings: the config fields its registered builder accepts.
    accepted = inspect.signature(get_spec(loss).builder).parameters
    loss_rows = [(f"`--{k}`", _fmt(config[k])) for k in accepted if k in config]
    if mu is not None:
        loss_rows.append(("Diffusion-SDPO safeguard", f"`--{SAFEGUARD_OPTION} {mu}`"))
    labels = label_text(config)
    changed = other_settings(config)
    others = [(OTHERS_ROW, ", ".join(_code(o) for o in changed))] if changed else []
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
                ("data", data_source(config)),
                *([("labels", labels)] if labels else []),
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
                *others,
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
    folder, argument = ("lora", "lora_dir") if lora else (denoiser_folder, "unet_dir")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from models.pipeline import load_pipeline  # prefdiff",
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
