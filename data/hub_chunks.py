"""A hub dataset read in fixed chunks of rows, in stream order, as arrow tables.

For the commands that walk a whole dataset once (relabelling and the KTO builder, which resume by
chunk; the data check; the latent cache): chunk ``i`` is rows ``[i * rows, (i + 1) * rows)`` of the
unshuffled stream, so a chunk's content depends only on its index. Reading chunk ``i`` after chunk
``i - 1`` continues the open stream; any other order (the first chunk after a resume) reopens it
with ``skip``, which re-reads the earlier rows without decoding them. One chunk is in memory at a
time. Image features stay in their stored form (``{"bytes", "path"}`` structs, never decoded by
``datasets``); ``image_bytes`` turns such a column into plain bytes, as Pick-a-Pic stores its
images, and ``pair_chunk`` gives a chunk of pairs with Pick-a-Pic's column names.
"""

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data.columns import PROB, STANDARD


class HubChunks:
    """``get(i)``: chunk ``i`` of ``stream`` (a ``datasets.IterableDataset``), or None past the
    end."""

    def __init__(self, stream: Any, rows: int):
        if rows < 1:
            raise ValueError(f"chunk rows must be >= 1, got {rows}")
        self.stream = stream.with_format("arrow")  # tables as stored: no image decoding
        self.rows = rows
        self._batches: Iterator[pa.Table] | None = None
        self._next = 0  # the chunk the open iterator yields next

    def get(self, index: int) -> pa.Table | None:
        if self._batches is None or index != self._next:
            stream = self.stream.skip(index * self.rows) if index else self.stream
            # .iter() rather than iter(): the latter would split the stream by DataLoader worker.
            self._batches = iter(stream.iter(batch_size=self.rows))
            self._next = index
        table = next(self._batches, None)
        self._next += 1
        if table is None or table.num_rows == 0:
            return None
        return table.replace_schema_metadata(None)  # drop datasets' feature metadata


def image_bytes(table: pa.Table, column: str) -> pa.Table:
    """``column`` as binary: the ``bytes`` field of a hub ``Image`` struct (null where the
    image is only a path, which readers report as an unreadable image); other types unchanged."""
    array = table.column(column)
    if not pa.types.is_struct(array.type) or array.type.get_field_index("bytes") < 0:
        return table
    index = table.column_names.index(column)
    return table.set_column(index, column, pc.struct_field(array, "bytes"))


UID_COLUMNS = ("image_0_uid", "image_1_uid")  # Pick-a-Pic's image ids, kept when present


def pair_chunk(
    chunks: HubChunks, index: int, columns: dict[str, str], prob: bool = False
) -> pa.Table | None:
    """Chunk ``index`` with Pick-a-Pic's names: the mapped caption, image and label columns
    (``columns``: standard name -> the dataset's, data/columns.py; with ``prob`` the soft label
    ``prob_0`` too) renamed to theirs, images as bytes, plus both uid columns when the dataset has
    them unmapped; None past the end."""
    table = chunks.get(index)
    if table is None:
        return None
    uids = [c for c in UID_COLUMNS if c in table.column_names and c not in columns.values()]
    uids = uids if len(uids) == len(UID_COLUMNS) else []
    standard = [*STANDARD, *([PROB] if prob else [])]
    table = table.select([columns[c] for c in standard] + uids)
    table = table.rename_columns([*standard, *uids])
    return image_bytes(image_bytes(table, "jpg_0"), "jpg_1")
