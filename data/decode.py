"""Turn an image cell (JPEG bytes, a file path, or a hub-style dict) into a decoded RGB image."""

import io
import os

from PIL import Image


class UnreadableImage(OSError):
    """An image that is missing or does not decode; datasets skip such rows instead of failing."""


def load_rgb(source: bytes | str | os.PathLike | dict | Image.Image | None) -> Image.Image:
    """Open and fully decode an image, converted to RGB.

    ``source`` is encoded bytes, a path, a ``{"bytes": ..., "path": ...}`` dict (how hub mirrors
    that use an ``Image`` feature store it) or an already decoded image. Decoding happens here,
    not lazily, so a truncated JPEG fails now, where the caller can skip the row; the returned
    image owns its pixels and holds no open file. Raises UnreadableImage whatever PIL raised (it
    raises OSError, ValueError, SyntaxError, DecompressionBombError, ...).
    """
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if source is None:
        raise UnreadableImage("no image data (null cell)")
    try:
        if isinstance(source, Image.Image):
            return source.convert("RGB")
        handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
        with Image.open(handle) as image:
            return image.convert("RGB")
    except Exception as exc:
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
