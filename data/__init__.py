"""Training data: rows in, pixels and captions out (no models, no accelerate).

- ``PickapicPairs``: Pick-a-Pic v2 parquet pairs, chosen first (Diffusion-DPO; SFT with
  ``PairOptions(winners_only=True)``).
- ``LabeledImages``: the per-image CSV with desirable/undesirable labels (Diffusion-KTO).
- ``TablePairs`` (data/table_pairs.py): your own pairs, a manifest or two folders
  (data/pair_table.py), chosen first; ``python -m evaluation.relabel`` relabels any pairs
  with scorers.
- ``collate_pairs`` / ``collate_images``: examples -> ``PairBatch`` / ``ImageBatch``.

Every stream takes a ``StreamSettings`` (transform, caption dropout, seed, rank / world size /
DataLoader workers); the pair streams also take ``PairOptions`` (winners only, shuffle, soft
labels).

Both datasets are infinite and exactly resumable: every example carries its stream's ``role``
and ``state``, batches gather them in ``positions``, and ``resume_from(positions)`` continues
each stream right after its last consumed example (see ``data/roles.py``).
"""

from data.batches import ImageBatch, PairBatch, collate_images, collate_pairs
from data.errors import DataError
from data.examples import Example, PairOptions
from data.kto_csv import DEFAULT_SPLIT_LABELS, LabeledImages, parse_split_labels
from data.pickapic import PickapicPairs
from data.roles import StreamSettings
from data.transforms import ImageTransform, TransformedImages

__all__ = [
    "DEFAULT_SPLIT_LABELS",
    "DataError",
    "Example",
    "ImageBatch",
    "ImageTransform",
    "LabeledImages",
    "PairBatch",
    "PairOptions",
    "PickapicPairs",
    "StreamSettings",
    "TransformedImages",
    "collate_images",
    "collate_pairs",
    "parse_split_labels",
]
