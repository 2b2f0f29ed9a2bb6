"""An online run's prompt cache (``scripts/build_cache.py --prompts``): built once beside the
prompt file, read instead of the text encoders (which never load), the same first step as a run
with the encoders on tiny SD1.5 and SD3, and checked against the prompt file and the model at
start-up. The reward is tests/test_online_trainer.py's model-free brightness."""

import pytest
import torch

import train
from common import cli
from common.cli import UsageError
from data import DataError
from data.cache import TEXT_PREFIX, TextCache, check_manifest, default_prompt_cache_dir
from losses import get_spec
from models import loading
from scripts.build_cache import main as build_cache_main
from tests import test_online_trainer as online_tests
from tests.support import reset_accelerate
from tests.test_online_trainer import MODELS, PROMPTS, base_params, online_args, setup_run
from training.build import build_dataset
from training.config import parse_config

# The fixtures: the model-free brightness reward, the prompt file.
brightness, prompt_file = online_tests.brightness, online_tests.prompt_file
FIRST_STEP = ("--guidance_scale", "2", "--max_train_steps", "1")  # CFG: "" is read too


def build_prompt_cache(model, prompts, *extra):
    return build_cache_main(["--pretrained_model", str(model), "--prompts", str(prompts), *extra])


def first_step(run: train.Run) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One collection and optimizer step: (the stored log-probs, the loss, trained weights)."""
    micro_metrics, _, grad_norm = train.online_gradients(run)
    log_probs = torch.cat([record.log_probs for record in run.online.current.batches])
    train.optimizer_step(run.accelerator, run.optimizer, run.lr_scheduler,
                         [m["loss"] for m in micro_metrics], grad_norm)  # fmt: skip
    trained = [p.detach().flatten() for p in run.models.policy.parameters() if p.requires_grad]
    return log_probs, micro_metrics[0]["loss"], torch.cat(trained)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_a_run_from_the_prompt_cache_equals_one_with_the_text_encoders(
    family, request, brightness, prompt_file, tmp_path, monkeypatch
):
    model = request.getfixturevalue(MODELS[family])
    stats = build_prompt_cache(model, prompt_file)  # default: beside the prompt file
    cache = prompt_file.parent / "prefdiff-text-cache-prompts"
    assert default_prompt_cache_dir(str(prompt_file)) == cache
    assert stats.captions_encoded == len(PROMPTS) + 1  # and "", the unconditional branch
    assert list(cache.glob(f"{TEXT_PREFIX}*.safetensors"))
    plain = first_step(setup_run(online_args(model, prompt_file, tmp_path / "plain", "grpo",
                                             *FIRST_STEP)))  # fmt: skip
    reset_accelerate()

    def no_text_encoders(*args, **kwargs):
        raise AssertionError("the text encoders were loaded")

    monkeypatch.setattr(loading, "load_family", no_text_encoders)
    run = setup_run(online_args(model, prompt_file, tmp_path / "cached", "grpo", *FIRST_STEP,
                                "--cache", str(cache)))  # fmt: skip
    assert run.models.family.text_encoders == [] and run.models.family.tokenizers == []
    assert isinstance(run.models.family.text_source, TextCache)
    cached = first_step(run)
    assert torch.equal(cached[0], plain[0])  # every stored log-prob
    assert cached[1] == plain[1]  # the loss
    assert torch.equal(cached[2], plain[2])  # the updated weights
    base = base_params(model)
    assert not torch.equal(plain[2], torch.cat([base[n].flatten() for n, _ in
                                                run.models.policy.named_parameters()]))  # fmt: skip


def test_the_prompt_cache_is_checked_against_the_prompt_file_and_the_model(
    tiny_sd15_dir, tiny_sd3_dir, prompt_file, tmp_path, capsys
):
    """A prompt the cache lacks, or a cache of another model: one line at start-up, before any
    weights load, naming the cache and the prompt file (line); adding the prompt file to the
    cache encodes only its new prompt."""
    cache = tmp_path / "cache"
    build_prompt_cache(tiny_sd15_dir, prompt_file, "--cache", str(cache))
    more = tmp_path / "more.txt"
    more.write_text("\n".join([*PROMPTS, "", "a white star on a blue background"]) + "\n")
    args = online_args(tiny_sd15_dir, more, tmp_path / "out", "grpo", "--cache", str(cache))
    with pytest.raises(SystemExit):
        cli.run(train.main, args)
    error = capsys.readouterr().err.strip().splitlines()[-1]  # cli.run's one line
    assert error.startswith("train.py: error: ") or ": error: " in error
    assert f"--cache {cache} has no text features for {more} line 6 ('a white star on a blue " \
        "background'): rebuild it: python scripts/build_cache.py --prompts" in error  # fmt: skip
    other = online_args(tiny_sd3_dir, prompt_file, tmp_path / "sd3", "grpo", "--cache", str(cache))
    with pytest.raises(
        DataError,
        match=f"--cache {cache} was built for another model "
        r"\(pretrained_model '.*tiny-sd15.*' where this run has .*tiny-sd3",
    ):
        train.main(other)  # fmt: skip

    added = build_prompt_cache(tiny_sd15_dir, more, "--cache", str(cache))
    assert added.captions_encoded == 1
    config = parse_config(args)
    assert build_dataset(config, get_spec("grpo"), 0, 1).num_prompts == len(PROMPTS) + 1
    with pytest.raises(DataError, match="holds text features only"):  # not for offline runs
        check_manifest(cache, {}, needs_flips=False)
    with pytest.raises(UsageError, match="--prompts builds a prompt set's text cache: drop --data"):
        build_prompt_cache(tiny_sd15_dir, prompt_file, "--data", str(tmp_path))


def test_validation_with_the_prompt_cache_loads_the_text_encoders_and_reuses_the_vae(
    tiny_sd15_dir, brightness, prompt_file, tmp_path
):
    cache = tmp_path / "cache"
    build_prompt_cache(tiny_sd15_dir, prompt_file, "--cache", str(cache))
    run = setup_run(online_args(tiny_sd15_dir, prompt_file, tmp_path / "out", "grpo",
                                "--cache", str(cache), "--validation_prompt", PROMPTS[0],
                                "--validation_inference_steps", "2"))  # fmt: skip
    assert run.models.family.text_encoders == []  # training reads the cache
    frozen = run.validator.frozen_parts()  # step 0 has validated
    assert frozen["vae"] is run.models.latent_encoder.vae  # not a second VAE
    assert frozen["text_encoder"] is not None
    assert (tmp_path / "out" / "validation" / "step-0.png").is_file()
