"""What a new user meets first: defaults that fit the model, mistakes stopped at start-up in one
line (exit code 2, no traceback), no silent overwrites, the paths of what each command wrote."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import UsageError, one_line, run
from data import DataError
from tests.support import reset_accelerate
from training import startup
from training.config import HELP_GROUPS, TrainConfig, build_parser, field_groups, parse_config

REPO = Path(__file__).resolve().parents[1]
TOY_MODEL = REPO / "assets" / "toy-sd15"
UNREAD = ["--data", "unread"]  # a config names its data; these checks read none


def train_args(model: Path, toy: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model", str(model), "--data", str(toy / "pickapic"),
        "--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps", "2",
        "--dataloader_num_workers", "0", "--checkpointing_steps", "100", "--report_to", "none",
        *extra,
    ]  # fmt: skip


# --- 1. defaults that fit the model ---


def test_native_resolution_is_the_default_and_a_far_one_is_announced(tiny_sd15_dir, tmp_path):
    out = ["--output_dir", str(tmp_path / "out"), *UNREAD]
    config, checks = startup.prepare(parse_config(["--pretrained_model", str(TOY_MODEL), *out]))
    assert config.resolution == checks.native_resolution == 32  # UNet 8 x VAE 2**2
    assert "resolution: 32 px (the model's native size)" in checks.notes
    config, _ = startup.prepare(parse_config(["--pretrained_model", str(tiny_sd15_dir), *out]))
    assert config.resolution == 64  # UNet 8 x VAE 2**3
    config, checks = startup.prepare(
        parse_config(["--pretrained_model", str(TOY_MODEL), "--resolution", "512", *out])
    )
    assert config.resolution == 512  # allowed, but announced
    assert any("native size is 32 px" in note for note in checks.notes)
    assert any("--resolution 512 is 16x" in warning for warning in checks.warnings)


def test_warmup_longer_than_the_run_is_a_warning(tmp_path):
    args = ["--pretrained_model", str(TOY_MODEL), "--output_dir", str(tmp_path), *UNREAD]
    _, checks = startup.prepare(parse_config([*args, "--max_train_steps", "200"]))
    (warning,) = [w for w in checks.warnings if "lr_warmup_steps" in w]
    assert "--lr_warmup_steps 500 >= --max_train_steps 200" in warning
    assert "never reaches its peak" in warning
    _, checks = startup.prepare(parse_config([*args, "--max_train_steps", "501"]))
    assert not checks.warnings
    _, checks = startup.prepare(parse_config([*args, "--max_train_steps", "2",
                                              "--lr_scheduler", "constant"]))  # fmt: skip
    assert not checks.warnings  # a constant schedule has no warm-up


# --- 4. resume and overwrite; 7. the paths at the end ---


def test_a_finished_run_is_not_overwritten_and_each_command_says_what_it_did(
    tiny_sd15_dir, toy_data_dir, tmp_path, caplog, capsys, monkeypatch
):
    import train

    out = tmp_path / "run"
    train.main(train_args(tiny_sd15_dir, toy_data_dir, out))  # warm-up 500 > 2 steps
    reset_accelerate()
    assert "the learning rate never reaches its peak" in caplog.text
    assert "resolution: 64 px (the model's native size)" in caplog.text
    printed = capsys.readouterr().out
    assert f"UNet: {out / 'unet'}" in printed and str(out / startup.METRICS_FILE) in printed
    assert str(out / "checkpoint-2") in printed
    assert len((out / startup.METRICS_FILE).read_text().splitlines()) == 2

    monkeypatch.setattr(train, "load_components", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(UsageError, match=r"holds a finished run.*--overwrite_output_dir"):
        train.main(train_args(tiny_sd15_dir, toy_data_dir, out))
    monkeypatch.undo()
    reset_accelerate()

    train.main(train_args(tiny_sd15_dir, toy_data_dir, out, "--overwrite_output_dir", "true",
                          "--max_train_steps", "1"))  # fmt: skip
    reset_accelerate()
    lines = (out / startup.METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]  # one run per file
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-1").is_dir()

    fresh = tmp_path / "fresh"
    caplog.clear()
    train.main(train_args(tiny_sd15_dir, toy_data_dir, fresh, "--max_train_steps", "1",
                          "--resume_from_checkpoint", "latest"))  # fmt: skip
    reset_accelerate()
    assert f"no checkpoint found in {fresh}, starting fresh" in caplog.text


def test_a_resumed_run_keeps_the_metrics_up_to_its_checkpoint(tmp_path):
    path = tmp_path / startup.METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)))
    startup.start_metrics(path, resumed_step=2)  # steps 3 and 4 are redone
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    startup.start_metrics(path, resumed_step=0)
    assert not path.exists()


# --- 3. a small parquet file: one row group, two DataLoader workers ---


def test_a_one_row_group_parquet_trains_with_two_workers(tiny_sd15_dir, tmp_path):
    import train
    from scripts.build_toy_data import make_pair_rows, write_pairs_parquet

    rows = make_pair_rows(16, seed=5)
    write_pairs_parquet(tmp_path / "pairs" / "small.parquet", rows, rows_per_group=len(rows))
    result = train.main([
        "--pretrained_model", str(tiny_sd15_dir), "--data", str(tmp_path / "pairs"),
        "--output_dir", str(tmp_path / "out"), "--train_batch_size", "2",
        "--max_train_steps", "2", "--lr_warmup_steps", "0", "--dataloader_num_workers", "2",
        "--report_to", "none",
    ])  # fmt: skip
    assert len(result.history) == 2
    assert result.history[-1]["data/skipped_rows"] == 0


# --- 2. and 5. mistakes: one line naming the flag, exit code 2 ---


def test_the_data_check_counts_missing_files_and_rejects_an_empty_csv(toy_data_dir, tmp_path):
    from data import check

    csv = toy_data_dir / "kto" / "train_processed_v3.csv"
    report, code = check.run(["--csv", str(csv), "--images", str(tmp_path), "--tokenizer", "none"])
    assert code == 1 and report.usable == 0  # every image missing: nothing usable
    assert report.missing_files.count == report.rows
    assert any(problem.startswith(f"--images {tmp_path}:") for problem in report.fatal)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=f"--csv {empty}: empty file"):
        check.run(["--csv", str(empty), "--images", str(tmp_path), "--tokenizer", "none"])


def test_a_wrong_image_root_stops_training_before_models_load(toy_data_dir, tmp_path, monkeypatch):
    import train

    monkeypatch.setattr(train, "load_components", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(DataError, match=rf"^--images {tmp_path}: \d+ of \d+ sampled image files"):
        train.main(["--loss", "kto", "--csv", str(toy_data_dir / "kto" / "train_processed_v3.csv"),
                    "--images", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                    "--report_to", "none"])  # fmt: skip


def _launch(*args: str, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=environ, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_user_errors_are_one_line_with_exit_code_2(toy_data_dir, tmp_path, capsys):
    import evaluate
    import generate
    import train
    from data import check

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    csv = str(toy_data_dir / "kto" / "train_processed_v3.csv")
    out = ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    cases = [  # (main, its arguments, what its one line must say)
        (train.main, ["--learning_rat", "1"], "unrecognized arguments: --learning_rat 1"),
        (train.main, ["--loss", "kto"], "invalid config: --loss kto needs per-image labels"),
        (train.main, ["--pretrained_model", str(tmp_path / "nowhere"), *UNREAD, *out],
         f"--pretrained_model {tmp_path / 'nowhere'}: no such directory"),
        (train.main, ["--pretrained_model", "nobody/no-such-model", *UNREAD, *out],
         "--pretrained_model nobody/no-such-model: not in the local hub cache, and "
         "HF_HUB_OFFLINE=1"),
        (train.main, ["--loss", "kto", "--csv", csv, "--images", str(tmp_path), *out],
         f"--images {tmp_path}: "),
        (check.main, ["--csv", str(empty), "--images", str(tmp_path)],
         f"--csv {empty}: empty file"),
        (generate.main, ["--model", str(tmp_path / "nowhere"), "--prompt", "a cat",
                         "--out", str(tmp_path / "gen")],
         f"--model {tmp_path / 'nowhere'}: no such directory"),
        (evaluate.main, ["--run", f"x={tmp_path}", "--scorer", "toy_warm",
                         "--out", str(tmp_path / "eval")], "generations.csv not found"),
    ]  # fmt: skip
    for main, argv, expected in cases:
        reset_accelerate()
        with pytest.raises(SystemExit) as exit_:
            run(main, argv, prog="prog")
        assert exit_.value.code == 2, expected
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: " in last and expected in last, (expected, last)


def _launch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_a_command_with_a_mistake_prints_one_line_and_no_traceback(tmp_path):
    """As a user runs them: everything the process prints to stderr is that one line (no
    third-party warnings on import either, no hub retries offline), exit code 2."""
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases = {
        # gets past the early checks, so torch, diffusers and transformers load first
        "train.py: error: --pretrained_model nobody/no-such-model: not in the local hub cache": [
            "train.py", "--pretrained_model", "nobody/no-such-model", *UNREAD],
        f"python -m data.check: error: --csv {empty}: empty file": [
            "-m", "data.check", "--csv", str(empty), "--images", str(tmp_path)],
    }  # fmt: skip
    running = {expected: _launch(*argv) for expected, argv in cases.items()}  # in parallel
    for expected, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr
        assert stderr.splitlines() == [stderr.strip()] and stderr.startswith(expected), stderr
        assert "Traceback" not in stdout


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run(buggy)
    with pytest.raises(SystemExit) as exit_:
        run(lambda argv: (_ for _ in ()).throw(UsageError("invalid config:\n  a\n  b")))
    assert exit_.value.code == 2
    assert one_line(UsageError("invalid config:\n  --x bad\n  --y bad")) == (
        "invalid config: --x bad; --y bad"
    )


# --- 7. evaluation of a LoRA run; shared seeds; the paths at the end ---


def test_a_lora_run_evaluates_like_a_full_one(tiny_sd15_dir, toy_data_dir, tmp_path, capsys,
                                              caplog):  # fmt: skip
    import evaluate
    import train

    run_dir = tmp_path / "lora-run"
    train.main(train_args(tiny_sd15_dir, toy_data_dir, run_dir, "--lora_rank", "4",
                          "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
                          "--max_train_steps", "1"))  # fmt: skip
    reset_accelerate()
    assert f"LoRA adapters: {run_dir / 'lora'}" in capsys.readouterr().out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "eval"
    scores, _, _ = evaluate.main([
        "--model", str(tiny_sd15_dir), "--generate", "base", "--generate", f"lora={run_dir}",
        "--prompts", str(prompts), "--num_seeds", "2", "--steps", "2", "--resolution", "32",
        "--scorer", "toy_warm", "--out", str(out),
    ])  # fmt: skip
    assert sorted(scores["model"].unique()) == ["base", "lora"] and len(scores) == 8
    assert "seeds are shared across prompts" in caplog.text  # no --distinct_seeds
    base, lora = (out / name / "images" / "p0000_s0.png" for name in ("base", "lora"))
    assert base.read_bytes() != lora.read_bytes()  # the adapters were loaded
    printed = capsys.readouterr().out
    for name in (evaluate.SCORES_CSV, evaluate.SUMMARY_MD, evaluate.SUMMARY_PNG):
        assert str(out / name) in printed and (out / name).is_file()
    with pytest.raises(SystemExit):  # no silent default scorer
        evaluate.main(["--run", f"x={out / 'base'}", "--out", str(out)])


# --- 8. the command line ---


def test_abbreviations_are_refused_and_negative_numbers_parse(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--learning_rat", "1e-4"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --learning_rat" in capsys.readouterr().err
    config = parse_config(["--adam_beta1", "-0.5", "--learning_rate=3e-4", "--seed", "3", *UNREAD])
    assert (config.adam_beta1, config.learning_rate, config.seed) == (-0.5, 3e-4, 3)
    with pytest.raises(UsageError, match="--learning_rate must be > 0"):
        parse_config(["--learning_rate", "-1e-4"])  # parsed as a number, then refused


def test_every_flag_is_in_one_help_group_with_its_default_once():
    groups = field_groups()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(n for members in groups.values() for n in members) == sorted(names)
    assert all(groups.values()), "an empty --help group"
    for group, first in HELP_GROUPS.items():
        assert groups[group][0] == first
    assert groups["model"][:2] == ["pretrained_model", "revision"]
    assert "lora_rank" in groups["model"] and "mixed_precision" in groups["precision and speed"]
    assert "learning_rate" in groups["optimisation"] and "seed" in groups["optimisation"]
    assert "resume_from_checkpoint" in groups["checkpoints and output"]
    help_text = build_parser().format_help()
    for group in groups:
        assert f"\n{group}:\n" in help_text
    assert "(default: None)" not in help_text
    # a help text that gives its default gets no second "(default: ...)"
    entry = help_text[help_text.index("--lora_alpha") : help_text.index("--lora_target_modules")]
    assert entry.count("default") == 1


def test_help_answers_before_diffusers_loads():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "\nmodel:\n" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "diffusers" not in imported and "transformers" not in imported


# --- 9. a new user's first hours (issue 25, item 9) ---


def test_no_data_flag_is_a_one_line_error(tmp_path):
    """A research run names its data: no silent fallback to the toy pairs."""
    with pytest.raises(UsageError, match="no training data: give --data") as info:
        parse_config(["--pretrained_model", str(TOY_MODEL), "--output_dir", str(tmp_path)])
    assert "\n" not in one_line(info.value)
    for source in (UNREAD, ["--pairs_dirs", "a,b"]):
        parse_config(["--pretrained_model", str(TOY_MODEL), *source])  # each is enough
    prompts = tmp_path / "prompts.txt"  # the online losses' data is their prompt file
    prompts.write_text("a red circle on a white background\n")
    online = ["--prompts", str(prompts), "--reward", "toy_colour"]
    for loss in ("grpo", "nft"):
        parse_config(["--pretrained_model", str(TOY_MODEL), "--loss", loss, *online])


def test_a_data_error_comes_before_the_config_dump(tmp_path, caplog, monkeypatch):
    import train

    monkeypatch.setattr(train, "load_components", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(DataError, match="--data"):
        train.main(["--pretrained_model", str(TOY_MODEL), "--data", str(tmp_path / "none"),
                    "--output_dir", str(tmp_path / "out"), "--report_to", "none"])  # fmt: skip
    assert "config:" not in caplog.text  # the dump is for runs that start
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_local_model_is_answered_before_the_heavy_imports():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--pretrained_model", "assets/nowhere"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--pretrained_model assets/nowhere: no such directory" in done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "diffusers" not in imported and "transformers" not in imported


def test_overwrite_clears_the_old_runs_grids_and_events_and_the_refusal_is_runnable(tmp_path):
    out = tmp_path / "run"
    for path in ("unet/config.json", startup.METRICS_FILE, "validation/step-0.png",
                 "logs/prefdiff/events.out.tfevents.1", "checkpoint-2/x", "keep.txt"):  # fmt: skip
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text("old")
    args = ["--pretrained_model", str(TOY_MODEL), *UNREAD, "--output_dir", str(out)]
    with pytest.raises(UsageError) as refused:
        startup.prepare(parse_config(args))
    suggested = str(refused.value).split("pass ", 1)[1].split(" to replace", 1)[0]
    assert suggested == "--overwrite_output_dir true"
    startup.prepare(parse_config([*args, *suggested.split()]))  # the suggestion parses
    assert (out / "validation").is_dir()  # the checks alone remove nothing
    removed = startup.clear_previous_run(out)
    assert {"validation", "logs", "unet", "checkpoint-2", startup.METRICS_FILE} <= set(removed)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_wandb_without_credentials_stops_at_start_up(tmp_path, monkeypatch):
    import train
    from tests.support import end_wandb_session

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no settings file
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)  # no workspace settings either
    monkeypatch.setattr(train, "load_components", lambda *a, **k: pytest.fail("models loaded"))
    args = ["--pretrained_model", str(TOY_MODEL), "--data", str(REPO / "build/toy-prefs/pickapic"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "wandb"]  # fmt: skip
    end_wandb_session()
    try:
        with pytest.raises(UsageError, match=r"^--report_to wandb: no W&B API key"):
            train.main(args)
        monkeypatch.setenv("WANDB_MODE", "offline")  # offline needs no key
        end_wandb_session()
        startup.prepare(parse_config(args))
    finally:
        end_wandb_session()


def test_the_start_up_block_names_the_familys_denoiser(tiny_sd3_dir):
    import train
    from models.families import denoiser_config, family_for

    config = parse_config(["--pretrained_model", str(tiny_sd3_dir), *UNREAD])
    denoiser = family_for(denoiser_config(str(tiny_sd3_dir))).denoiser_class
    assert train.describe_policy(config, denoiser) == "full SD3Transformer2DModel"
    lora = dataclasses.replace(config, lora_rank=4)
    assert train.describe_policy(lora, denoiser) == "LoRA rank 4 on SD3Transformer2DModel"


def test_a_single_process_launch_is_told_from_the_launchers_environment():
    """What accelerate 1.16's launchers export: the single-process one sets MASTER_ADDR (and
    MASTER_PORT) only when asked for more than one process or machine, and no WORLD_SIZE;
    torchrun (--multi_gpu, DeepSpeed, FSDP) sets WORLD_SIZE. A MASTER_ADDR that the launcher
    itself inherited (a cluster's job script) says nothing."""
    launched = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1"}
    assert startup.launched_alone(launched, {})
    assert not startup.launched_alone({**launched, "WORLD_SIZE": "2"}, {})  # torchrun
    assert not startup.launched_alone(launched, {"MASTER_ADDR": "10.0.0.1"})  # inherited
    assert not startup.launched_alone({"ACCELERATE_MIXED_PRECISION": "no"}, {})  # 1 process
    assert not startup.launched_alone({"MASTER_ADDR": "127.0.0.1"}, {})  # not accelerate's


def test_a_launch_asked_for_two_processes_that_runs_one_says_so(tiny_sd15_dir, toy_data_dir,
                                                                tmp_path):  # fmt: skip
    """`accelerate launch --num_processes 2` without --multi_gpu starts one process (the simple
    launcher): the run stops at start-up instead of training at half the global batch."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        env.pop(name, None)
    done = subprocess.run(
        [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet", "train.py",
         *train_args(tiny_sd15_dir, toy_data_dir, tmp_path / "out", "--max_train_steps", "1")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0, done.stderr[-2000:]
    assert "accelerate launch was asked for more than one process" in done.stderr
    assert not (tmp_path / "out" / "unet").exists()
