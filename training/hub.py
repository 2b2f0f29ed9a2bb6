"""Optional upload of a run's export and model card to the Hugging Face hub (``--push_to_hub``).

The arguments are checked at start-up (a run must not train for hours and then fail to upload):
a valid ``--hub_model_id``, the hub not switched off (``HF_HUB_OFFLINE``) and a token present.
At the end the main process uploads, in one commit, only what a user of the model needs: the
card (``README.md``), ``train_config.json``, the export folder the run wrote (the model family's
denoiser folder, ``unet/`` or ``transformer/``, or ``lora/``) and the last validation grid the
card shows; never checkpoints, logs or metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.cli import UsageError

CARD_FILE = "README.md"
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_problems(config: Any) -> list[str]:
    """Start-up checks of --push_to_hub / --hub_model_id (config.TrainConfig.validate)."""
    if not config.push_to_hub:
        if config.hub_model_id:
            return ["--hub_model_id is only used with --push_to_hub true"]
        return []
    if not config.hub_model_id:
        return ["--push_to_hub needs --hub_model_id (owner/name)"]
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problems = []
    try:
        validate_repo_id(config.hub_model_id)
    except HFValidationError as exc:
        problems.append(f"--hub_model_id {config.hub_model_id!r} is not a valid repo id: {exc}")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        problems.append("--push_to_hub: HF_HUB_OFFLINE is set, the hub cannot be reached")
    if get_token() is None:
        problems.append("--push_to_hub: no hub token (run `hf auth login` or set HF_TOKEN)")
    return problems


def upload_files(output_dir: Path, export: str, grid: Path | None = None) -> list[str]:
    """The files (relative to ``output_dir``) that a push uploads, sorted: the card, the config,
    every file under the export folder ``export`` (the name the run's policy was exported under:
    ``models.Components.policy_io.subfolder``) and the grid."""
    output_dir = Path(output_dir)
    card = [output_dir / CARD_FILE, output_dir / "train_config.json"]
    weights = [p for p in (output_dir / export).rglob("*") if p.is_file()]
    missing = [str(p) for p in card if not p.is_file()]
    if not weights:  # a repo with a card and no model is worse than no push
        missing.append(f"{output_dir / export}/")
    if missing:
        # One line for the user (cli.run), not a traceback at the end of a long run.
        raise UsageError(f"--push_to_hub: cannot push: {', '.join(missing)} not written")
    files = card + weights + ([output_dir / grid] if grid is not None else [])
    return sorted(str(p.relative_to(output_dir)) for p in files)


def push(
    output_dir: Path, repo_id: str, export: str, grid: Path | None = None, api: Any = None
) -> Any:
    """Create ``repo_id`` if needed and upload ``upload_files`` in one commit; ``api`` is a
    ``huggingface_hub.HfApi`` (default: a new one)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    files = upload_files(output_dir, export, grid)
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    return api.upload_folder(
        folder_path=str(output_dir),
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=files,
        commit_message="prefdiff: export and model card",
    )
