"""The online losses under FSDP and DeepSpeed ZeRO-2 update the policy as DDP does.

Two gloo processes on the CPU per run, the tiny SD1.5, each process reading its own prompts:
- DDP: accelerate's, as ``configs/multi_gpu.yaml`` (the reference the others must equal);
- FSDP version 1 as ``configs/fsdp.yaml`` (SHARD_GRAD_OP, one unit per ``BasicTransformerBlock``
  and ``ResnetBlock2D``), with ``use_orig_params`` on (the shipped configs) and off. accelerate's
  FSDP needs a GPU, so torch's FSDP wraps the policy where ``accelerator.prepare`` would, and
  clips with the FSDP module's global norm as accelerate does;
- DeepSpeed ZeRO-2 through accelerate with ``configs/deepspeed_zero2.yaml``'s settings (skipped
  where the optional ``deepspeed`` is not installed: ``requirements-deepspeed.txt``).

Accumulation 2 and two optimizer steps per collection: the first step is on-policy (GRPO's
ratio exactly 1), the second trains the same collection after an update (GRPO's ratios move;
NFT trains against an old policy that now differs from the policy). A backend that stepped at
the wrong backward, scaled gradients otherwise, or sampled or trained against anything but the
old policy would update differently from DDP. ``--adam_epsilon 1`` keeps Adam's update nearly
linear in the gradient, so a difference in the gradient shows in the weights.
"""

import functools
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType, patch_environment
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.multiprocessing import start_processes

import train
from tests.support import one_thread_per_rank, reset_accelerate
from tests.test_online_trainer import PROMPTS, BrightnessReward, online_args, setup_run
from training.config import TrainConfig
from training.distributed import LaunchConfigError, check_backend
from training.online import OLD_POLICY_FILE, OLD_POLICY_SHARD, STATE_DIR

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 2


# --------------------------------------------------------------------------- the runs


def state_vector(run: train.Run) -> torch.Tensor:
    """Every weight of the policy, flattened in name order (FSDP: gathered; collective)."""
    if isinstance(run.policy, FSDP):
        full = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(run.policy, StateDictType.FULL_STATE_DICT, full):
            state = run.policy.state_dict()
    else:
        state = run.models.policy.state_dict()
    return torch.cat([state[k].detach().float().flatten() for k in sorted(state)])


def drive(args: list[str], report: Path) -> None:
    """train.main's loop for STEPS optimizer steps; rank 0 reports the logs and the weights
    before and after every step."""
    train.build_reward = lambda config, device, prompts: BrightnessReward()
    run = setup_run(args)
    weights, history = [state_vector(run)], []
    for _ in range(STEPS):
        micro_metrics, skipped, grad_norm = train.online_gradients(run)
        train.optimizer_step(run.accelerator, run.optimizer, run.lr_scheduler,
                             [m["loss"] for m in micro_metrics], grad_norm)  # fmt: skip
        run.state.global_step += 1
        history.append(train.log_step(run, micro_metrics, skipped, grad_norm))
        weights.append(state_vector(run))
    old = run.online.old
    if old is not None:  # NFT's old policy saves and loads back (FSDP: each rank its shards)
        saved = [w.clone() for w in old.weights]
        run.online.save(report / "state")
        run.accelerator.wait_for_everyone()  # the main process's file, under DDP
        for w in old.weights:
            w.zero_()
        run.online.load(report / "state")
        assert all(torch.equal(a, b) for a, b in zip(saved, old.weights, strict=True))
    if run.accelerator.is_main_process:
        torch.save(torch.stack(weights), report / "weights.pt")
        (report / "history.json").write_text(json.dumps(history))


def ddp_rank(args: list[str], report: str) -> None:
    reset_accelerate()
    drive(args, Path(report))


def fsdp_prepare(accelerator, model, optimizer, use_orig_params: bool):
    """What accelerate's prepare does under configs/fsdp.yaml, on the CPU."""
    blocks = {BasicTransformerBlock, ResnetBlock2D}
    wrap = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=blocks)
    policy = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=wrap,
                  use_orig_params=use_orig_params,
                  sharding_strategy=ShardingStrategy.SHARD_GRAD_OP)  # fmt: skip
    # The optimizer (not stepped yet) takes the FSDP module's parameters, as prepare does.
    (group,) = optimizer.param_groups
    group["params"] = [p for p in policy.parameters() if p.requires_grad]
    accelerator.clip_grad_norm_ = lambda parameters, max_norm: policy.clip_grad_norm_(max_norm)
    return policy, optimizer


def fsdp_rank(args: list[str], report: str, use_orig_params: bool) -> None:
    reset_accelerate()
    build = train.build_accelerator

    def build_fsdp(config):
        accelerator = build(config)
        accelerator.prepare = functools.partial(fsdp_prepare, accelerator,
                                                use_orig_params=use_orig_params)  # fmt: skip
        return accelerator

    train.build_accelerator = build_fsdp
    drive(args, Path(report))


def deepspeed_rank(index: int, args: list[str], report: str) -> None:
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(index)
    reset_accelerate()
    drive(args, Path(report))


def launch_deepspeed(args: list[str], report: Path) -> None:
    """One process with what `accelerate launch --config_file configs/deepspeed_zero2.yaml`
    exports (accelerate's debug launcher forces its CPU backend, which excludes DeepSpeed)."""
    ds = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    env = {
        "accelerate_use_deepspeed": "true",
        "accelerate_deepspeed_zero_stage": str(ds["zero_stage"]),
        "accelerate_gradient_accumulation_steps": str(ds["gradient_accumulation_steps"]),
        "accelerate_gradient_clipping": str(ds["gradient_clipping"]),
        "accelerate_deepspeed_offload_optimizer_device": ds["offload_optimizer_device"],
        "accelerate_deepspeed_offload_param_device": ds["offload_param_device"],
        "accelerate_deepspeed_zero3_init": str(ds["zero3_init_flag"]).lower(),
        "accelerate_mixed_precision": "no",
    }
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with patch_environment(world_size=1, local_world_size=1, master_addr="127.0.0.1",
                           master_port=port, **env):  # fmt: skip
        start_processes(deepspeed_rank, args=(args, str(report)), nprocs=1, start_method="fork")


# Processes per run: DeepSpeed's ZeRO-2 step all-gathers with all_gather_into_tensor, which
# fails on gloo with 2 processes ("Output 0 of Split is a view and is being modified inplace",
# offline training too), so DeepSpeed runs one process against one plain process.
PROCESSES = {"deepspeed": 1, "fsdp": 2, "fsdp-flat": 2}


def run_backend(backend: str, loss: str, processes: int, model: Path, prompts: Path, root: Path):
    """(weights [STEPS + 1, n], logs per step) of one run; backend "ddp" with one process is a
    plain run."""
    out, report = root / backend / "out", root / backend / "report"
    report.mkdir(parents=True)
    args = online_args(model, prompts, out, loss, "--train_batch_size", "1",
                       "--gradient_accumulation_steps", "2", "--collect_batches", "4",
                       "--adam_epsilon", "1", "--learning_rate", "0.1",
                       "--max_train_steps", str(STEPS))  # fmt: skip
    if backend == "ddp":
        debug_launcher(ddp_rank, args=(args, str(report)), num_processes=processes)
    elif backend.startswith("fsdp"):
        use_orig = backend == "fsdp"
        debug_launcher(fsdp_rank, args=(args, str(report), use_orig), num_processes=processes)
    else:
        launch_deepspeed(args, report)
    history = json.loads((report / "history.json").read_text())
    return torch.load(report / "weights.pt"), history


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def ddp_runs(tiny_sd15_dir, prompts, tmp_path_factory):
    """The DDP (or plain, one process) run of each loss and process count, made once."""
    runs: dict = {}
    root = tmp_path_factory.mktemp("ddp")

    def get(loss: str, processes: int, monkeypatch):
        key = (loss, processes)
        if key not in runs:
            with one_thread_per_rank(monkeypatch):
                where = root / f"{loss}-{processes}"
                runs[key] = run_backend("ddp", loss, processes, tiny_sd15_dir, prompts, where)
        return runs[key]

    return get


# --------------------------------------------------------------------------- the tests

CASES = [("grpo", "deepspeed"), ("nft", "deepspeed"), ("nft", "fsdp"), ("nft", "fsdp-flat"),
         ("grpo", "fsdp")]  # fmt: skip


@pytest.mark.parametrize(("loss", "backend"), CASES)
def test_online_update_under_backend_equals_ddp(loss, backend, ddp_runs, tiny_sd15_dir,
                                                prompts, tmp_path, monkeypatch):  # fmt: skip
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    processes = PROCESSES[backend]
    ddp_weights, ddp_logs = ddp_runs(loss, processes, monkeypatch)
    with one_thread_per_rank(monkeypatch):
        weights, logs = run_backend(backend, loss, processes, tiny_sd15_dir, prompts, tmp_path)
    assert torch.equal(weights[0], ddp_weights[0])  # the same base
    for step in range(1, STEPS + 1):
        update = ddp_weights[step] - ddp_weights[step - 1]
        assert update.abs().max() > 0
        moved = weights[step] - weights[step - 1]
        assert (moved != 0).sum() > 0.5 * moved.numel(), f"step {step}: the weights did not move"
        gap = (weights[step] - ddp_weights[step]).abs().max()
        assert gap <= 1e-4 * update.abs().max(), f"step {step}: {gap} from DDP's weights"
    first, second = logs
    for name, value in first.items():  # the first step: the same images, the same update
        if not (math.isnan(value) and math.isnan(ddp_logs[0][name])) and name != "grad_norm":
            assert value == pytest.approx(ddp_logs[0][name], rel=1e-5, abs=1e-8), name
    assert first["grad_norm"] == pytest.approx(ddp_logs[0]["grad_norm"], rel=1e-4)
    assert second["loss"] == pytest.approx(ddp_logs[1]["loss"], rel=1e-3, abs=1e-8)
    if loss == "grpo":
        assert first["online/ratio_at_first_step"] == 1.0
        assert first["online/ratio_min"] == first["online/ratio_max"] == 1.0
        assert second["online/ratio_max"] > 1.0 or second["online/ratio_min"] < 1.0
    else:  # the second step trains against the old policy, which the first moved away from
        files = sorted(
            f.name for f in (tmp_path / backend / "report" / "state" / STATE_DIR).glob("old_*")
        )
        sharded = [OLD_POLICY_SHARD.format(rank=r) for r in range(processes)]
        assert files == (sharded if backend.startswith("fsdp") else [OLD_POLICY_FILE])
        assert second["online/old_deviate"] > 0
        assert second["online/old_deviate"] == pytest.approx(ddp_logs[1]["online/old_deviate"],
                                                             rel=1e-3)  # fmt: skip


def test_nft_is_refused_where_the_old_policy_cannot_reach_the_weights():
    """ZeRO-3 partitions parameters and FSDP version 2 gathers from buffers of its own: one
    line each, before any model loads; GRPO, which keeps no old policy, and NFT under ZeRO-2 and
    FSDP version 1 start."""
    nft, grpo = TrainConfig(loss="nft"), TrainConfig(loss="grpo")
    deepspeed, fsdp = DistributedType.DEEPSPEED, DistributedType.FSDP
    with pytest.raises(LaunchConfigError, match="--loss nft does not run under DeepSpeed ZeRO-3"):
        check_backend(deepspeed, nft, zero_stage=3)
    with pytest.raises(LaunchConfigError, match="--loss nft does not run under FSDP version 2"):
        check_backend(fsdp, nft, fsdp_version=2)
    check_backend(deepspeed, nft, zero_stage=2)
    check_backend(fsdp, nft, fsdp_version=1)
    check_backend(deepspeed, grpo, zero_stage=3)
    check_backend(fsdp, grpo, fsdp_version=2)
