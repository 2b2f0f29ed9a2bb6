"""The one exception type for bad training data, raised at start-up."""


class DataError(ValueError):
    """Bad input found while building a dataset.

    The message always names the file, and the row and column where they are known, e.g.
    ``"/d/train-0.parquet: row 17, column label_0: value 0.3 is not one of 0, 0.5, 1"``, so a
    user can fix the data without reading our code. Subclassing ``ValueError`` lets callers that
    only know "bad argument" catch it too.
    """
