"""End-to-end train.py runs on the tiny SD1.5-shaped model and toy data (CPU, in-process)."""

import functools
import json
import math
from importlib import metadata
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import train
from losses import get_spec, loss_names
from tests.support import end_wandb_session, reset_accelerate
from training.checkpointing import CONFIG_FILE, STATE_FILE, checkpoint_dirs


def data_args(loss: str, toy: Path) -> list[str]:
    if get_spec(loss).pairwise:
        return ["--data", str(toy / "pickapic")]
    return ["--csv", str(toy / "kto" / "train_processed_v3.csv"), "--images", str(toy / "kto")]


def beta_args(loss: str) -> list[str]:
    """beta 500 for the losses released with beta in the thousands (the tiny model's errors
    differ little); the others keep their released default (dspo 0.001, mapo 0.1; sft none)."""
    return ["--beta", "500"] if get_spec(loss).hyperparameters.get("beta", 0) >= 500 else []


def run(model: Path, toy: Path, out: Path, loss: str = "dpo", *extra: str) -> train.TrainResult:
    args = [
        "--pretrained_model", str(model), "--output_dir", str(out), "--loss", loss,
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--dataloader_num_workers", "0",
        "--checkpointing_steps", "100", "--report_to", "none", *beta_args(loss),
        *data_args(loss, toy), *extra,
    ]  # fmt: skip
    return train.main(args)


def base_unet(model: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(model, subfolder="unet")


@pytest.mark.parametrize("loss", loss_names(online=False))
def test_end_to_end(loss, tiny_sd15_dir, toy_data_dir, tmp_path):
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", loss)
    assert len(result.history) == 2
    assert all(math.isfinite(step["loss"]) for step in result.history)

    base = dict(base_unet(tiny_sd15_dir).named_parameters())
    trained = UNet2DConditionModel.from_pretrained(result.unet_dir.parent, subfolder="unet")
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, base[n])]
    assert not unchanged, f"parameters that did not move: {unchanged[:5]}"
    for name, param in result.models.policy.named_parameters():
        assert torch.equal(param.detach(), dict(trained.named_parameters())[name])

    if get_spec(loss).needs_reference:
        for name, param in result.models.reference.named_parameters():
            assert torch.equal(param, base[name]), f"reference parameter {name} moved"
    else:
        assert result.models.reference is None  # SFT never loads a reference UNet


def test_safeguard_end_to_end_logs_its_lambda(tiny_sd15_dir, toy_data_dir, tmp_path):
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dspo",
                 "--winner_preserving_mu", "0.2")  # fmt: skip
    lambdas = [step["safeguard/lambda"] for step in result.history]
    assert all(0.0 <= lam <= 1.0 for lam in lambdas)
    assert {"rewards/margins", "rewards/accuracies"} <= set(result.history[0])
    base = dict(base_unet(tiny_sd15_dir).named_parameters())
    moved = [n for n, p in result.models.policy.named_parameters() if not torch.equal(p, base[n])]
    assert len(moved) == len(base)


def test_mapo_loads_and_runs_no_reference_unet(tiny_sd15_dir, toy_data_dir, tmp_path,
                                                monkeypatch, caplog):  # fmt: skip
    """One UNet object is built (the policy) and runs once per micro-batch; a flag the loss
    does not use is reported at start-up."""
    created, forwards = [], []
    init = UNet2DConditionModel.__init__

    @functools.wraps(init)  # diffusers reads the config's fields from __init__'s signature
    def counting_init(self, *args, **kwargs):
        created.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "__init__", counting_init)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, _: forwards.append(1) if isinstance(module, UNet2DConditionModel) else None
    )
    try:
        extra = ("--gradient_accumulation_steps", "2", "--winner_preserving_mu", "0.9")
        result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "mapo", *extra)
    finally:
        hook.remove()
    assert len(created) == 1 and created[0] is result.models.policy
    assert result.models.reference is None
    assert len(forwards) == 2 * 2  # 2 steps x 2 micro-batches, policy only
    assert {"mapo/margins", "rewards/accuracies", "err/chosen"} <= set(result.history[0])
    assert not [k for k in result.history[0] if k.startswith("health/")]  # no implicit reward
    assert "--winner_preserving_mu is not used by --loss mapo" in caplog.text


def test_dpo_starts_at_log2_and_logs_the_metric_vocabulary(tiny_sd15_dir, toy_data_dir, tmp_path):
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", "--max_train_steps", "1")
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert first["rewards/accuracies"] == 0.5
    expected = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "err/policy", "err/ref", "loss", "lr", "data/skipped_rows"}  # fmt: skip
    assert expected <= set(first)


def test_bf16_policy_and_reference_agree_at_start(tiny_sd15_dir, toy_data_dir, tmp_path):
    args = ("--max_train_steps", "1", "--mixed_precision", "bf16")
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", *args)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.models.reference.dtype == torch.bfloat16
    assert next(result.models.policy.parameters()).dtype == torch.float32


def test_kto_logs_its_metrics(tiny_sd15_dir, toy_data_dir, tmp_path):
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "kto", "--train_batch_size", "4")
    assert {"rewards/desirable", "rewards/undesirable", "kl", "err/policy"} <= set(
        result.history[0]
    )


def test_v_prediction_model_trains(tmp_path, toy_data_dir):
    from scripts.build_tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "v-model", prediction_type="v_prediction")
    result = run(model, toy_data_dir, tmp_path / "out", "dpo", "--max_train_steps", "1")
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(result.history[0]["err/policy"])


def test_export_plugs_into_a_pipeline(tiny_sd15_dir, toy_data_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_sd15_dir, toy_data_dir, out, "dpo", "--max_train_steps", "1")
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, unet=unet)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    provenance = json.loads((out / CONFIG_FILE).read_text())
    assert provenance["config"]["loss"] == "dpo"
    assert provenance["versions"]["torch"] == metadata.version("torch")


def test_checkpoints_rotate_and_hold_everything(tiny_sd15_dir, toy_data_dir, tmp_path):
    out = tmp_path / "out"
    args = (
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
    )
    run(tiny_sd15_dir, toy_data_dir, out, "dpo", *args)
    names = [p.name for p in checkpoint_dirs(out)]
    assert names == ["checkpoint-2", "checkpoint-3"]
    latest = out / "checkpoint-3"
    assert UNet2DConditionModel.from_pretrained(latest, subfolder="unet") is not None
    state = json.loads((latest / STATE_FILE).read_text())
    assert state["global_step"] == 3 and state["micro_batches"] == 3 and state["positions"]
    provenance = json.loads((latest / CONFIG_FILE).read_text())
    assert {"config", "versions", "git_sha"} <= set(provenance)
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_an_uninterrupted_run(tiny_sd15_dir, toy_data_dir, tmp_path, workers):
    common = ("--train_batch_size", "1", "--dataloader_num_workers", str(workers),
              "--lr_warmup_steps", "2", "--checkpointing_steps", "3")  # fmt: skip
    full = run(tiny_sd15_dir, toy_data_dir, tmp_path / "full", "dpo", *common,
               "--max_train_steps", "4")  # fmt: skip
    part = tmp_path / "part"
    run(tiny_sd15_dir, toy_data_dir, part, "dpo", *common, "--max_train_steps", "3")
    reset_accelerate()
    resumed = run(tiny_sd15_dir, toy_data_dir, part, "dpo", *common, "--max_train_steps", "4",
                  "--resume_from_checkpoint", "latest")  # fmt: skip
    assert len(resumed.history) == 1  # only step 4 was trained again
    assert resumed.history[0]["loss"] == full.history[3]["loss"]
    assert resumed.history[0]["lr"] == full.history[3]["lr"]
    for (name, a), b in zip(
        full.models.policy.named_parameters(), resumed.models.policy.parameters(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("loss", ["dpo", "dspo"])
def test_batch_two_equals_accumulation_two(loss, tiny_sd15_dir, toy_data_dir, tmp_path):
    # Same pairs and noise draws; only float summation order differs. Adam with epsilon >> |g|
    # (clipping bounds |g| by 1) steps along the gradient like SGD instead of normalising it,
    # so tiny gradients' rounding is not blown up to full-size updates of random sign.
    # dspo: the per-pixel predictions are kept per micro-batch.
    common = ("--learning_rate", "0.1", "--adam_epsilon", "1")
    big = run(tiny_sd15_dir, toy_data_dir, tmp_path / "big", loss, *common,
              "--train_batch_size", "2")  # fmt: skip
    reset_accelerate()
    small = run(tiny_sd15_dir, toy_data_dir, tmp_path / "small", loss, *common,
                "--train_batch_size", "1", "--gradient_accumulation_steps", "2")  # fmt: skip
    assert abs(big.history[1]["loss"] - big.history[0]["loss"]) > 1e-3  # step 1 moved the policy
    for a, b in zip(big.history, small.history, strict=True):
        assert a["err/policy"] == pytest.approx(b["err/policy"], rel=1e-6)
        # beta / 2 = 250 multiplies the ~1e-7 rounding of the errors in the margin.
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    base = torch.cat([p.flatten() for p in base_unet(tiny_sd15_dir).parameters()])
    big_update, small_update = (
        torch.cat([p.detach().flatten() for p in r.models.policy.parameters()]) - base
        for r in (big, small)
    )
    assert (big_update - small_update).abs().max() < 1e-2 * big_update.abs().mean()


def test_wandb_offline(tiny_sd15_dir, toy_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    end_wandb_session()  # an earlier test's session would ignore WANDB_DIR
    run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", "--max_train_steps", "1",
        "--report_to", "wandb")  # fmt: skip
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_tensorboard_writes_events(tiny_sd15_dir, toy_data_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_sd15_dir, toy_data_dir, out, "dpo", "--max_train_steps", "1", "--report_to",
        "tensorboard")  # fmt: skip
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def toy_rows(num: int) -> list[dict]:
    from scripts.build_toy_data import make_pair_rows

    return make_pair_rows(num, seed=1)


def test_missing_column_stops_before_models_load(tiny_sd15_dir, tmp_path, monkeypatch):
    from data import DataError
    from scripts.build_toy_data import write_pairs_parquet

    rows = [{k: v for k, v in row.items() if k != "label_1"} for row in toy_rows(8)]
    shard = tmp_path / "pairs" / "bad.parquet"
    write_pairs_parquet(shard, rows, rows_per_group=4)
    monkeypatch.setattr(train, "load_components", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(DataError, match=r"bad\.parquet.*label_1"):
        train.main(["--data", str(shard.parent), "--resolution", "64",
                    "--pretrained_model", str(tiny_sd15_dir), "--report_to", "none",
                    "--output_dir", str(tmp_path / "out")])  # fmt: skip


def test_corrupt_images_are_skipped_counted_and_reported(tiny_sd15_dir, tmp_path, caplog):
    from scripts.build_toy_data import write_pairs_parquet

    rows = [row for row in toy_rows(48) if row["label_0"] != 0.5]
    for row in rows[::2]:
        row["jpg_0"] = b"not a jpeg"  # every other pair cannot be decoded
    write_pairs_parquet(tmp_path / "pairs" / "train.parquet", rows, rows_per_group=8)
    args = ("--max_train_steps", "3", "--train_batch_size", "2")
    result = run(tiny_sd15_dir, tmp_path, tmp_path / "out", "dpo", *args,
                 "--data", str(tmp_path / "pairs"))  # fmt: skip
    assert len(result.history) == 3
    assert result.skipped_rows >= 3  # 6 good pairs consumed, interleaved with bad ones
    assert result.history[-1]["data/skipped_rows"] == result.skipped_rows
    assert f"skipped {result.skipped_rows} rows" in caplog.text


def test_invalid_config_fails_at_startup():
    with pytest.raises(ValueError, match="needs per-image labels"):
        train.main(["--loss", "kto"])
    with pytest.raises(ValueError, match="multiple of 8"):
        train.main(["--resolution", "100"])
    bad = [
        ("--dmpo_alpha", "1", r"\(0, 1\)"),
        ("--winner_preserving_mu", "1.5", r"\[0, 1\]"),
        ("--label_smoothing", "0.5", r"\[0, 0.5\)"),
        ("--beta", "0", "finite and > 0"),
    ]
    for flag, value, message in bad:
        with pytest.raises(ValueError, match=f"{flag}.*{message}"):
            train.main([flag, value])


def test_beta_defaults_to_the_losses_released_value_and_unused_flags_are_named():
    from training.config import given_flags, parse_config, unused_flag_notes

    data = ["--data", "unread"]  # a run names its data; parsing reads none
    assert parse_config(["--loss", "mapo", *data]).beta == 0.1
    assert parse_config(["--loss", "dmpo", *data]).beta == 2000.0
    assert parse_config(["--loss", "dspo", "--beta", "none", *data]).beta == 0.001
    argv = [
        "--loss",
        "ipo",
        "--label_smoothing",
        "0.1",
        "--winner_preserving_mu",
        "none",
        "--beta",
        "9",
    ]
    assert given_flags(argv) == {"loss", "label_smoothing", "beta"}
    assert unused_flag_notes(parse_config([*argv, *data]), given_flags(argv)) == [
        "--label_smoothing is not used by --loss ipo: ignored"
    ]


def test_every_config_field_is_a_flag_with_help():
    import dataclasses

    from training.config import TrainConfig, build_parser

    help_text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in help_text
        assert f.metadata["help"]


def test_reference_model_can_differ_from_the_policy(tiny_sd15_dir, toy_data_dir, tmp_path):
    from scripts.build_tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    args = ("--max_train_steps", "1", "--reference_model", str(other))
    result = run(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "dpo", *args)
    reference = dict(base_unet(other).named_parameters())
    for name, param in result.models.reference.named_parameters():
        assert torch.equal(param, reference[name])
    assert result.history[0]["err/policy"] != result.history[0]["err/ref"]
    assert result.history[0]["loss"] != pytest.approx(math.log(2), abs=1e-4)
