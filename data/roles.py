"""Split one infinite stream into disjoint roles, one per (rank, DataLoader worker).

``num_roles = world_size * W`` with ``W = max(1, num_workers)``, and the process at ``rank`` in
DataLoader worker ``worker_id`` plays role ``rank * W + (worker_id + role_offset) % W``. Each
role reads only its own share, so no example is seen twice per epoch across ranks and workers.

``role_offset`` exists for exact resume: a DataLoader hands out batches round-robin starting at
worker 0, so after N consumed batches the next one would have come from worker ``N % W``. A
restarted loader starts again at worker 0, so worker 0 must play that worker's role.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from data.transforms import ImageTransform


def check_topology(rank: int, world_size: int, num_workers: int) -> None:
    """Raise ValueError unless ``0 <= rank < world_size`` and ``num_workers >= 0``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def count_roles(world_size: int, num_workers: int) -> int:
    """Number of disjoint streams: one per worker of every process (one per process without)."""
    return world_size * max(1, num_workers)


def current_role(rank: int, num_workers: int, role_offset: int) -> int:
    """The role this process/worker plays; call it inside ``__iter__`` (in the worker)."""
    slots = max(1, num_workers)
    info = get_worker_info()
    if info is None:
        # Main-process iteration plays the role of worker 0 (shifted by the offset).
        return rank * slots + role_offset % slots
    if info.num_workers != slots:
        raise RuntimeError(
            f"the dataset was built for num_workers={num_workers} but the DataLoader runs "
            f"{info.num_workers} workers; pass the same number to both, or workers would read "
            "overlapping or missing shares"
        )
    return rank * slots + (info.id + role_offset) % slots


def check_positions(
    positions: Mapping[int | str, list], num_roles: int, state_len: int
) -> dict[int, list]:
    """Validate saved resume states; keys may be strings after a JSON round trip.

    Returns ``{role: state}`` with int roles in ``[0, num_roles)`` and states of ``state_len``
    non-negative ints. Raises ValueError otherwise (a checkpoint from another topology).
    """
    checked = {}
    for key, state in positions.items():
        role = int(key)
        if not 0 <= role < num_roles:
            raise ValueError(
                f"resume position for role {role}, but this run has {num_roles} roles "
                "(world_size x num_workers must match the run that saved it)"
            )
        state = [int(v) for v in state]
        if len(state) != state_len or min(state) < 0:
            raise ValueError(f"resume state for role {role} must be {state_len} ints >= 0: {state}")
        checked[role] = state
    return checked


@dataclass(frozen=True)
class StreamSettings:
    """What every role-split stream takes, checked on creation: the image transform, the share
    of captions dropped, the seed of its generators, and the topology it is split over (process
    ``rank`` of ``world_size``, each with ``num_workers`` DataLoader workers)."""

    transform: ImageTransform
    caption_dropout: float = 0.2
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_topology(self.rank, self.world_size, self.num_workers)
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy generators), got {self.seed}")


class RoleStream(IterableDataset):
    """An infinite dataset split into roles: iterating it (in a process or DataLoader worker)
    yields the stream of the role that process/worker plays. Holds what every stream shares
    (its ``StreamSettings``, the resume state); subclasses implement ``_stream(role)``."""

    def __init__(self, settings: StreamSettings):
        super().__init__()
        self.transform = settings.transform
        self.caption_dropout = settings.caption_dropout
        self.seed = settings.seed
        self.rank = settings.rank
        self.num_workers = settings.num_workers
        self.num_roles = count_roles(settings.world_size, settings.num_workers)
        self._positions: dict[int, list] = {}
        self._role_offset = 0

    def __iter__(self) -> Iterator[dict]:
        return self.iter_role(current_role(self.rank, self.num_workers, self._role_offset))

    def iter_role(self, role: int) -> Iterator[dict]:
        """The stream of one role, from its resume position (``__iter__`` picks the role from
        rank and worker; tests and tools can read any role directly)."""
        if not 0 <= role < self.num_roles:
            raise ValueError(f"role must be in [0, {self.num_roles}), got {role}")
        return self._stream(role)

    def _stream(self, role: int) -> Iterator[dict]:
        raise NotImplementedError
