"""Helpers shared by the test modules."""

from accelerate.state import AcceleratorState, GradientState


def reset_accelerate() -> None:
    """Each in-process training run builds its own Accelerator; accelerate keeps singletons."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def end_wandb_session() -> None:
    """wandb keeps one session per process and then ignores changed WANDB_* variables."""
    import wandb

    wandb.teardown()
