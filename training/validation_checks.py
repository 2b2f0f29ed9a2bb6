"""Start-up checks of ``train.py``'s validation flags (``validation.py`` samples the images).

Apart from the sampling code and free of diffusers, so that a mistake in these flags is
answered with every other flag mistake, before the heavy imports (``TrainConfig.validate``);
that includes a ``--validation_scorer`` that cannot read a validation prompt, which would
otherwise stop the run at step 0, after the models load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.scorers import SCORERS, unreadable_prompt
from evaluation.suites import read_prompts


def validation_prompts(config: Any) -> list[str]:
    """The file's prompts, then the repeated flags'."""
    path = config.validation_prompts
    return (read_prompts(path) if path else []) + list(config.validation_prompt)


def validation_problems(config: Any) -> list[str]:
    """One line per problem with the validation flags (``TrainConfig.validate`` calls this)."""
    problems = [
        f"--{name} must be >= 1"
        for name in ("validation_steps", "validation_images", "validation_inference_steps")
        if getattr(config, name) < 1
    ]
    prompts: list[str] | None = None  # None: the prompts cannot be read
    path = config.validation_prompts
    if path and not Path(path).is_file():
        problems.append(f"--validation_prompts {path}: no such file")
    else:
        try:
            prompts = validation_prompts(config)
        except ValueError as exc:  # a file with no prompts
            problems.append(f"--validation_prompts {exc}")
    if config.validation_scorer:
        name = config.validation_scorer.split("=", 1)[0]
        found = unreadable_prompt(name, prompts) if name in SCORERS and prompts else None
        if name not in SCORERS:
            problems.append(f"--validation_scorer {name!r}: choose from {sorted(SCORERS)}")
        elif not (path or config.validation_prompt):
            problems.append("--validation_scorer needs --validation_prompts or --validation_prompt")
        elif found is not None:
            index, reason = found
            problems.append(
                f"--validation_scorer {name} cannot score validation prompt {index + 1}: {reason}"
            )
    return problems
