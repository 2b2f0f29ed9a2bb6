"""Stream Pick-a-Pic pairs from a hub dataset (``owner/name``) instead of local parquet shards.

Kept deliberately small: users normally have the shards locally (the original hub repository went
offline in 2025). A role's share comes from ``datasets.distributed.split_dataset_by_node`` with
one "node" per role. Resuming re-reads, without decoding, the rows the role already consumed in
the epoch: ``IterableDataset.skip`` would skip before the per-node split, not after it.
"""

from collections.abc import Iterator
from itertools import islice
from typing import Any

from data.errors import DataError
from data.parquet_index import REQUIRED_COLUMNS

SHUFFLE_BUFFER = 1000  # rows; the hub stream's shard order is shuffled too


def open_hub_pairs(
    name: str, split: str, revision: str | None, needed: list[str] | None = None
) -> Any:
    """``datasets.load_dataset(name, streaming=True)``; DataError naming ``name`` on failure."""
    import datasets  # imported here: only this path needs it and it costs ~1.5 s to import

    try:
        stream = datasets.load_dataset(name, split=split, revision=revision, streaming=True)
    except Exception as exc:  # hub, network and builder errors have no common base class
        raise DataError(
            f"{name}: not a local path, and opening it as a hub dataset failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    columns = stream.column_names  # None when the builder cannot tell without reading
    needed = list(REQUIRED_COLUMNS) if needed is None else needed
    missing = [c for c in needed if columns is not None and c not in columns]
    if missing:
        raise DataError(f"{name} (split {split}): missing column {missing[0]}")
    return stream


def hub_rows(
    stream: Any, seed: int, shuffle: bool, epoch: int, role: int, num_roles: int, start: int
) -> Iterator[dict]:
    """Rows of ``role``'s share of one epoch, from row ``start`` of that share on."""
    from datasets.distributed import split_dataset_by_node

    if shuffle:
        stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        stream.set_epoch(epoch)
    share = split_dataset_by_node(stream, rank=role, world_size=num_roles)
    # .iter() rather than iter(): the latter would split the share again by DataLoader worker.
    batches = share.iter(batch_size=1)
    for batch in islice(batches, start, None):
        yield {key: values[0] for key, values in batch.items()}
