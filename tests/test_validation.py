"""Validation during training, the model card and the hub push, on tiny models (CPU, in-process).

Three 3-step DPO runs share a module fixture: two with validation (every 2 steps: steps 0, 2 and
3), one without; they must give identical validation images and identical training.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import debug_launcher
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

import train
from common.cli import UsageError
from models import generation
from tests.support import end_wandb_session, one_thread_per_rank, reset_accelerate
from training import hub
from training.checkpointing import MANIFEST_FILE
from training.config import TrainConfig, build_parser

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
VALIDATION = [
    "--validation_prompt", PROMPTS[0], "--validation_prompt", PROMPTS[1],
    "--validation_steps", "2", "--validation_images", "2", "--validation_inference_steps", "2",
    "--validation_scorer", "toy_warm",
]  # fmt: skip


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model", str(model), "--output_dir", str(out), "--loss", "dpo",
        "--data", str(data / "pickapic"), "--resolution", "64", "--train_batch_size", "2",
        "--max_train_steps", "3", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--dataloader_num_workers", "0", "--checkpointing_steps", "2", "--beta", "500",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def run(*args: str) -> train.TrainResult:
    reset_accelerate()
    return train.main(list(args))


@pytest.fixture(scope="module")
def runs(tiny_sd15_dir, toy_data_dir, tmp_path_factory):
    """(with validation and tensorboard, the same again, without validation): out dirs, results."""
    base = tmp_path_factory.mktemp("validation")
    out = {name: base / name for name in ("a", "b", "none")}
    tb = ("--report_to", "tensorboard")
    results = {
        "a": run(*argv(tiny_sd15_dir, toy_data_dir, out["a"], *VALIDATION, *tb)),
        "b": run(*argv(tiny_sd15_dir, toy_data_dir, out["b"], *VALIDATION)),
        "none": run(*argv(tiny_sd15_dir, toy_data_dir, out["none"])),
    }
    reset_accelerate()
    return out, results


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_images_at_the_right_steps_with_fixed_seeds_identical_across_runs(runs):
    out, results = runs
    grids = sorted(p.name for p in (out["a"] / "validation").glob("*.png"))
    assert grids == ["step-0.png", "step-2.png", "step-3.png"]
    assert [v.step for v in results["a"].validation] == [0, 2, 3]
    for step in (0, 2, 3):
        record = json.loads((out["a"] / "validation" / f"step-{step}.json").read_text())
        assert record["prompts"] == PROMPTS
        assert record["seeds"] == [[0, 1], [2, 3]]  # image j of prompt i: seed 2i + j
        a, b = (pixels(out[r] / "validation" / f"step-{step}.png") for r in ("a", "b"))
        assert np.array_equal(a, b), f"step {step} differs between two identical runs"
    first, last = (pixels(out["a"] / "validation" / f"step-{s}.png") for s in (0, 3))
    assert not np.array_equal(first, last)  # the policy moved and its images with it


def test_final_grid_is_the_exported_models_images_at_those_seeds(runs, tiny_sd15_dir):
    out, _ = runs
    pipe = generation.load_pipeline(str(tiny_sd15_dir), unet=out["a"])
    images = generation.generate(pipe, PROMPTS, [0, 1], steps=2, resolution=64,
                               progress=False, distinct_seeds=True)  # fmt: skip
    assert [g.seed for g in images] == [0, 1, 2, 3]
    expected = np.asarray(generation.labelled_grid(images, cell=64).convert("RGB"))
    assert np.array_equal(expected, pixels(out["a"] / "validation" / "step-3.png"))


def test_validation_does_not_change_training(runs):
    _, results = runs
    with_val, without = results["a"], results["none"]
    assert [h["loss"] for h in with_val.history] == [h["loss"] for h in without.history]
    assert [h["err/policy"] for h in with_val.history] == [h["err/policy"] for h in without.history]
    for (name, a), b in zip(
        with_val.models.policy.named_parameters(), without.models.policy.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert with_val.models.policy.training  # put back in train mode
    assert not without.validation


def test_scorer_curve_and_grids_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = runs
    # The run's own events file (accelerate writes the hparams into a subfolder).
    acc = EventAccumulator(str(out["a"] / "logs" / "prefdiff"), {"images": 0, "scalars": 0})
    acc.Reload()
    curve = acc.Scalars("validation/toy_warm")
    assert [e.step for e in curve] == [0, 2, 3]
    means = [v.mean_score for v in results["a"].validation]
    assert [e.value for e in curve] == pytest.approx(means)
    scores = json.loads((out["a"] / "validation" / "step-3.json").read_text())["scores"]
    assert np.mean(scores) == pytest.approx(means[-1]) and set(np.ravel(scores)) <= {0.0, 1.0}
    (tag,) = acc.Tags()["images"]
    assert [e.step for e in acc.Images(tag)] == [0, 2, 3]
    # ... and into metrics.jsonl beside the step's other metrics (step 0: a line of its own).
    lines = [json.loads(line) for line in (out["a"] / train.METRICS_FILE).read_text().splitlines()]
    name = "validation/toy_warm"
    scored = {line["step"]: line[name] for line in lines if name in line}
    assert scored == pytest.approx(dict(zip([0, 2, 3], means, strict=True)))
    assert [line["step"] for line in lines] == [0, 1, 2, 3] and "loss" in lines[2]


def test_health_metrics_are_logged(runs):
    _, results = runs
    first = results["a"].history[0]
    quarters = [f"health/{m}_q{q}" for m in ("margin", "accuracy") for q in (1, 2, 3, 4)]
    assert {"health/negative_margins", *quarters} <= set(first)
    assert first["health/negative_margins"] == 0.0  # policy == reference: every margin is 0


def test_model_card_parses_and_names_the_settings(runs, tiny_sd15_dir):
    out, _ = runs
    card = ModelCard.load(out["a"] / "README.md")
    assert card.data.base_model == str(tiny_sd15_dir)
    assert card.data.library_name == "diffusers"
    assert card.data.license == "other"  # the placeholder
    assert {"prefdiff", "prefdiff-dpo", "text-to-image"} <= set(card.data.tags)
    assert card.data.datasets is None  # local data: no hub dataset to name
    expected = [
        "| `--beta` | 500 |",
        "| steps | 3 of 3 |",
        "## Metrics at step 3",
        "`rewards/accuracies`",
        "Mean `toy_warm` score",
        "(validation/step-3.png)",
    ]
    for text in expected:
        assert text in card.text, text
    # Each checkpoint carries its own card and grid, sealed by its manifest.
    checkpoint = out["a"] / "checkpoint-2"
    card2 = ModelCard.load(checkpoint / "README.md")
    assert "| steps | 2 of 3 |" in card2.text and "(validation/step-2.png)" in card2.text
    assert (checkpoint / "validation" / "step-2.png").is_file()
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    assert {"README.md", "validation/step-2.png"} <= set(manifest)


def test_model_card_lists_hub_datasets(tmp_path):
    from training.model_card import card_datasets

    config = TrainConfig().to_dict()
    assert card_datasets({**config, "data": "yuvalkirstain/pickapic_v2"}) == [
        "yuvalkirstain/pickapic_v2"
    ]
    assert card_datasets({**config, "data": str(tmp_path)}) == []  # a local directory
    assert card_datasets({**config, "model_card_datasets": "a/b, c/d"}) == ["a/b", "c/d"]
    own = {**config, "data": "yuvalkirstain/pickapic_v2", "pairs": "m.jsonl", "images": "i"}
    assert card_datasets(own) == []  # trained on own pairs: --data was not used


class RecordingApi:
    """Stands in for huggingface_hub.HfApi at the network boundary (the hub is unreachable
    here): records the calls a push makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit-url"


def test_push_uploads_the_export_card_and_last_grid_only(runs):
    out, _ = runs
    folder = out["a"]
    grid = Path("validation/step-3.png")
    expected = sorted(["README.md", "train_config.json", str(grid),
                       "unet/config.json", "unet/diffusion_pytorch_model.safetensors"])  # fmt: skip
    assert hub.upload_files(folder, "unet", grid) == expected
    api = RecordingApi()
    assert hub.push(folder, "someone/toy-dpo", "unet", grid, api=api) == "commit-url"
    (create, upload) = api.calls
    assert create[:2] == ("create_repo", "someone/toy-dpo") and create[2]["exist_ok"]
    kwargs = upload[2]
    assert kwargs["folder_path"] == str(folder) and kwargs["repo_type"] == "model"
    # What huggingface_hub's upload_folder would select from the folder with those patterns.
    everything = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    chosen = sorted(filter_repo_objects(everything, allow_patterns=kwargs["allow_patterns"]))
    assert chosen == expected  # no checkpoints, logs, metrics or older grids


def test_a_push_without_its_export_is_refused(runs):
    out, _ = runs
    with pytest.raises(UsageError, match="transformer/ not written"):
        hub.upload_files(out["a"], "transformer")


def test_the_run_files_name_every_familys_export_folder():
    """startup.EXPORT_DIRS (read before torch loads) is what the families export under."""
    from models.families import FAMILIES
    from models.lora import LoraIO
    from training import startup

    exports = {family.denoiser_folder for family in FAMILIES} | {LoraIO.subfolder}
    assert set(startup.EXPORT_DIRS) == exports


class FolderHub(RecordingApi):
    """A hub in a local folder: ``upload_folder`` stores what huggingface_hub's own pattern
    filter selects from the folder, under ``root/<repo_id>/``, as the hub would."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        everything = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(everything, allow_patterns=kwargs["allow_patterns"]):
            target = self.root / kwargs["repo_id"] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target)
        return super().upload_folder(**kwargs)


def test_push_of_a_full_sd3_fine_tune_uploads_its_transformer(
    tiny_sd3_dir, toy_data_dir, tmp_path, monkeypatch
):
    """train.py --push_to_hub on a flow model: the repo holds the trained transformer/, which
    loads back equal to the policy (before: a card and a config, no weights)."""
    import huggingface_hub
    from diffusers import SD3Transformer2DModel

    hub_root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: FolderHub(hub_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the start-up check reads it; nothing is fetched
    monkeypatch.setenv("HF_TOKEN", "hf_placeholder")
    push = ("--push_to_hub", "true", "--hub_model_id", "someone/toy-sd3")
    result = run(*argv(tiny_sd3_dir, toy_data_dir, tmp_path / "out", "--max_train_steps", "1",
                       *push))  # fmt: skip
    repo = hub_root / "someone" / "toy-sd3"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == [
        "README.md", "train_config.json", "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    pushed = SD3Transformer2DModel.from_pretrained(repo, subfolder="transformer")
    for (name, a), b in zip(
        pushed.named_parameters(), result.models.policy.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    card = ModelCard.load(repo / "README.md")
    assert "A fully fine-tuned transformer" in card.text and 'unet_dir="transformer"' in card.text


def config_error(*args: str) -> str:
    with pytest.raises(ValueError) as info:
        TrainConfig(**vars(build_parser().parse_args(list(args)))).validate()
    return str(info.value)


def test_hub_arguments_are_checked_at_start_up(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "needs --hub_model_id" in config_error("--push_to_hub", "true")
    assert "only used with --push_to_hub" in config_error("--hub_model_id", "a/b")
    error = config_error("--push_to_hub", "true", "--hub_model_id", "a/b/c")
    assert "not a valid repo id" in error
    assert "HF_HUB_OFFLINE" in error and "no hub token" in error
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_placeholder")
    args = ["--push_to_hub", "true", "--hub_model_id", "someone/toy-dpo", "--data", "unread"]
    config = TrainConfig(**vars(build_parser().parse_args(args)))
    config.validate()  # valid id, hub reachable in principle, a token: accepted


def test_validation_flags_are_checked_at_start_up(tmp_path):
    error = config_error("--validation_prompts", str(tmp_path / "missing.txt"))
    assert "missing.txt: no such file" in error
    assert "needs --validation_prompts" in config_error("--validation_scorer", "toy_warm")
    assert "choose from" in config_error("--validation_prompt", "x", "--validation_scorer", "nope")
    # A scorer that cannot read a validation prompt: at start-up, not at step 0.
    error = config_error("--validation_prompt", "a red circle", "--validation_prompt", "a cat",
                         "--validation_scorer", "toy_colour")  # fmt: skip
    assert "--validation_scorer toy_colour cannot score validation prompt 2" in error
    assert "'a cat'" in error
    assert "--validation_images must be >= 1" in config_error("--validation_images", "0")


def test_lora_sdxl_validation_keeps_training_unchanged(tiny_sdxl_dir, toy_data_dir, tmp_path):
    lora = ("--lora_rank", "4", "--lora_dropout", "0.1", "--max_train_steps", "2")
    val = ("--validation_prompt", PROMPTS[0], "--validation_images", "1",
           "--validation_inference_steps", "2", "--validation_steps", "1")  # fmt: skip
    # LoRA dropout draws from the global RNG, which train.py seeds from --seed: the two runs see
    # one dropout stream unless validation consumed from it.
    a = run(*argv(tiny_sdxl_dir, toy_data_dir, tmp_path / "a", *lora, *val))
    b = run(*argv(tiny_sdxl_dir, toy_data_dir, tmp_path / "b", *lora))
    assert [v.step for v in a.validation] == [0, 1, 2]
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert (tmp_path / "a" / "validation" / "step-2.png").is_file()
    assert "lora" in ModelCard.load(tmp_path / "a" / "README.md").data.tags
    reset_accelerate()


def rank_main(args: list[str], report: str) -> None:
    import torch.distributed as dist

    reset_accelerate()
    result = train.main(args)
    Path(report, f"rank-{dist.get_rank()}.json").write_text(
        json.dumps([v.step for v in result.validation])
    )


def test_two_processes_validate_on_the_main_process(
    tiny_sd15_dir, toy_data_dir, tmp_path, monkeypatch
):
    report = tmp_path / "report"
    report.mkdir()
    args = argv(tiny_sd15_dir, toy_data_dir, tmp_path / "out", *VALIDATION,
                "--max_train_steps", "2", "--train_batch_size", "1")  # fmt: skip
    with one_thread_per_rank(monkeypatch):
        try:
            debug_launcher(rank_main, args=(args, str(report)), num_processes=2)
        finally:
            reset_accelerate()
    assert json.loads((report / "rank-0.json").read_text()) == [0, 2]
    assert json.loads((report / "rank-1.json").read_text()) == []
    assert sorted(p.name for p in (tmp_path / "out" / "validation").glob("*.png")) == [
        "step-0.png",
        "step-2.png",
    ]


def test_validation_scheduler_choices_are_generate_pys():
    import dataclasses

    (field,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "validation_scheduler"]
    assert sorted(field.metadata["choices"]) == sorted(generation.SCHEDULERS)


def test_grids_reach_wandb(tiny_sd15_dir, toy_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    end_wandb_session()  # an earlier test's session would ignore WANDB_DIR
    val = ("--validation_prompt", PROMPTS[0], "--validation_images", "1",
           "--validation_inference_steps", "2", "--max_train_steps", "1")  # fmt: skip
    run(*argv(tiny_sd15_dir, toy_data_dir, tmp_path / "out", *val, "--report_to", "wandb"))
    reset_accelerate()
    images = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/validation_*.png"))
    assert len(images) == 2  # steps 0 and 1
