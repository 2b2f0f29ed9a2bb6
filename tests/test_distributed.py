"""Two synchronised training processes (gloo on CPU) against one process with the same global
batch: disjoint data, identical parameters on both ranks, the same loss trajectory.

The equivalence uses DPO (on SD1.5 and on the tiny SD3: flow matching draws each pair's sigma
from the same per-group generator), and DSPO with the Diffusion-SDPO safeguard (per-pixel
predictions and a per-micro-batch lambda, which with batch 1 sees the same pair in both
layouts): the KTO reference point is a mean over each micro-batch (across processes), so 2
processes x 1 image and 1 process x 2 accumulated images of 1 differ by design.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate import debug_launcher

import train
from tests.support import one_thread_per_rank, reset_accelerate

STEPS = 4


LOSSES = {
    "dpo": ("--loss", "dpo", "--beta", "500"),
    "dspo-safeguard": ("--loss", "dspo", "--winner_preserving_mu", "0.2"),
}
# The ~1e-7 rounding difference between an all-reduce and an accumulation, after one update at
# lr 0.1: the tiny MMDiT's loss moves more with it (4e-5 measured at step 1) than the UNet's.
LOSS_RTOL = {"tiny_sd15_dir": 1e-5, "tiny_sd3_dir": 2e-4}
CASES = {  # name: (model fixture, loss)
    "dpo": ("tiny_sd15_dir", "dpo"),
    "dspo-safeguard": ("tiny_sd15_dir", "dspo-safeguard"),
    "sd3-dpo": ("tiny_sd3_dir", "dpo"),
}


def argv(model: Path, toy: Path, out: Path, *extra: str) -> list[str]:
    # Adam with epsilon >> |g| steps like SGD, so the ~1e-7 rounding difference between an
    # all-reduce and an accumulation is not normalised into full-size updates of random sign.
    return [
        "--pretrained_model", str(model), "--data", str(toy / "pickapic"),
        "--output_dir", str(out), "--resolution", "64",
        "--train_batch_size", "1", "--max_train_steps", str(STEPS), "--learning_rate", "0.1",
        "--adam_epsilon", "1", "--lr_warmup_steps", "0", "--checkpointing_steps", "100",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def train_recording_rows(args: list[str]) -> tuple[train.TrainResult, list[list[int]]]:
    """Run train.main and record the source row of every example it consumed."""
    rows: list[list[int]] = []
    build = train.build_dataloader

    def recording(config, dataset):
        for batch in build(config, dataset):
            rows.extend(list(r) for r in batch.rows)
            yield batch

    train.build_dataloader = recording
    try:
        return train.main(args), rows
    finally:
        train.build_dataloader = build


def rank_main(args: list[str], report_dir: str) -> None:
    """Body of each launched process: train, then write what the parent checks."""
    reset_accelerate()
    result, rows = train_recording_rows(args)
    rank = dist.get_rank()
    params = torch.cat([p.detach().flatten() for p in result.models.policy.parameters()])
    torch.save(params, Path(report_dir) / f"params-{rank}.pt")
    losses = [step["loss"] for step in result.history]
    (Path(report_dir) / f"rank-{rank}.json").write_text(
        json.dumps({"rows": rows, "losses": losses})
    )


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_process_with_the_same_global_batch(
    case, request, toy_data_dir, tmp_path, monkeypatch
):
    fixture, loss = CASES[case]
    model = request.getfixturevalue(fixture)
    with one_thread_per_rank(monkeypatch):
        report = tmp_path / "report"
        report.mkdir()
        two = argv(model, toy_data_dir, tmp_path / "two", *LOSSES[loss],
                   "--dataloader_num_workers", "0")  # fmt: skip
        debug_launcher(rank_main, args=(two, str(report)), num_processes=2)
        reset_accelerate()
        # One process, accumulation 2, 2 DataLoader workers: micro-batch m comes from worker
        # (= stream role) m % 2, as rank r reads role r in the 2-process run.
        accumulate = ("--dataloader_num_workers", "2", "--gradient_accumulation_steps", "2")
        one = argv(model, toy_data_dir, tmp_path / "one", *LOSSES[loss], *accumulate)
        single, single_rows = train_recording_rows(one)

    ranks = [json.loads((report / f"rank-{r}.json").read_text()) for r in range(2)]
    rows = [{tuple(x) for x in r["rows"]} for r in ranks]
    assert len(rows[0]) == len(rows[1]) == STEPS  # no row twice within a rank
    assert not rows[0] & rows[1], "the two ranks read the same rows"
    assert rows[0] | rows[1] == {tuple(x) for x in single_rows}

    params = [torch.load(report / f"params-{r}.pt") for r in range(2)]
    assert torch.equal(params[0], params[1]), "ranks diverged"
    single_params = torch.cat([p.detach().flatten() for p in single.models.policy.parameters()])
    update = single_params - torch.cat([p.detach().flatten() for p in train_base_params(model)])
    assert (single_params - params[0]).abs().max() < 1e-3 * update.abs().max()

    assert ranks[0]["losses"] == ranks[1]["losses"]  # metrics are reduced across ranks
    single_losses = [step["loss"] for step in single.history]
    assert abs(single_losses[-1] - single_losses[0]) > 1e-3  # training moved the loss
    for a, b in zip(ranks[0]["losses"], single_losses, strict=True):
        assert a == pytest.approx(b, rel=LOSS_RTOL[fixture])


def train_base_params(model: Path) -> list[torch.Tensor]:
    from models.families import denoiser_config, family_for

    family = family_for(denoiser_config(str(model)))
    denoiser = family.denoiser_class.from_pretrained(model, subfolder=family.denoiser_folder)
    return list(denoiser.parameters())
