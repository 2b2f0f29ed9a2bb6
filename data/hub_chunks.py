"""A hub dataset read in fixed chunks of rows, in stream order, as arrow tables.

For commands that walk a whole dataset once and resume by chunk (``python -m data.relabel``):
chunk ``i`` is rows ``[i * rows, (i + 1) * rows)`` of the unshuffled stream, so a chunk's
content depends only on its index. Reading chunk ``i`` after chunk ``i - 1`` continues the open
stream; any other order (the first chunk after a resume) reopens it with ``skip``, which re-reads
the earlier rows without decoding them. One chunk is in memory at a time. Image features stay in
their stored form (``{"bytes", "path"}`` structs, never decoded by ``datasets``); ``image_bytes``
turns such a column into plain bytes, as Pick-a-Pic stores its images.
"""

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


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
