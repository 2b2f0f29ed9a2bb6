"""A latent and text-embedding cache: VAE posterior moments per image and text features per
caption, precomputed once (``scripts/build_cache.py``) and read instead of running the VAE and
the text encoders at every step.

Layout of a cache directory::

    manifest.json              what it was built from: model, VAE, family, resolution, flips
    latents-00000.safetensors  "<image key>.<flip>.mean" / ".std": [C, h, w] fp32
    text-00000.safetensors     "<caption key>.<feature name>": [...] fp32

The image key is a hash of the decoded RGB pixels and size, the caption key a hash of the
caption's text, so duplicate images and captions are stored once. Per image the cache keeps the
posterior's mean and std, not a sample: the trainer draws the sample noise per pair exactly as
without the cache (``diffusion.scaled_latents``), so cached and uncached runs see the same
latents. Only the centre crop can be cached (a random crop is a new image every time); both flip
orientations are stored when the cache is built with flips.

A prompt set's cache (``build_cache.py --prompts FILE``, for the online losses) holds only the
text shards: every prompt's features and the empty prompt's (classifier-free guidance), and a
manifest with ``"contents": "text"`` and the model but no VAE or resolution (text features do
not depend on them). ``check_prompt_cache`` checks it against the prompt file at start-up.

Shards are written whole under a temporary name and renamed, so an interrupted build leaves only
complete shards, and a rebuild skips every key they already hold.
"""

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from data.columns import parse_columns
from data.errors import DataError
from data.hub_chunks import HubChunks, pair_chunk
from data.kto_table import load_labeled_csv
from data.pair_table import PairTable
from data.parquet_index import REQUIRED_COLUMNS, local_parquet_files, missing_column
from data.pickapic_hub import open_hub_pairs
from data.prompts import PromptTable
from data.transforms import ImageTransform, TransformedImages

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATENT_PREFIX = "latents-"
TEXT_PREFIX = "text-"
TEXT_ONLY = "text"  # manifest "contents" of a prompt set's cache (text features, no latents)
HUB_CHUNK_ROWS = 256  # rows of a hub dataset read at a time
CACHE_FORMAT = 2  # 2: crops and resize rounding as torchvision computes them


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image (mode, size and pixels): equal images share a key."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()[:32]


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def cache_identity(
    pretrained_model: str,
    pretrained_vae: str | None,
    revision: str | None,
    variant: str | None,
    resolution: int,
) -> dict:
    """What a cache's content depends on (besides the data): checked when a run opens it."""
    return {
        "format": CACHE_FORMAT,
        "pretrained_model": pretrained_model,
        "pretrained_vae": pretrained_vae,
        "revision": revision,
        "variant": variant,
        "resolution": resolution,
    }


def text_cache_identity(pretrained_model: str, revision: str | None, variant: str | None) -> dict:
    """What text features depend on: the model's text encoders (no VAE, no resolution)."""
    return {
        "format": CACHE_FORMAT,
        "pretrained_model": pretrained_model,
        "revision": revision,
        "variant": variant,
    }


def default_prompt_cache_dir(prompts: str) -> Path:
    """Beside the prompt file: ``prefdiff-text-cache-<file stem>``."""
    path = Path(prompts)
    return path.parent / f"prefdiff-text-cache-{path.stem}"


def default_cache_dir(data: str | None, csv: str | None, resolution: int) -> Path:
    """Next to the data: inside the parquet directory (or beside the file / the CSV)."""
    source = Path(csv or data or ".")
    base = source if source.is_dir() else source.parent
    return base / f"prefdiff-cache-{resolution}px"


def source_images(
    data: str | None,
    csv: str | None,
    images: str | None,
    split_labels: dict[str, int],
    pair_table: PairTable | None = None,
    columns: dict[str, str] | None = None,
    hub_split: str = "train",
) -> Iterator[tuple[str, object, str]]:
    """(where, image cell, caption) for every image a run over this data can draw: both images
    of every untied Pick-a-Pic pair (its columns named by ``columns``, data/columns.py; local
    shards or a hub dataset streamed in chunks), every CSV row, or both images of every row of
    your own pairs (``pair_table``, data/pair_table.py)."""
    if pair_table is not None:
        for row in range(len(pair_table)):
            caption = _caption(pair_table.captions[row].as_py())
            for side, path in zip(("chosen", "rejected"), pair_table.paths(row), strict=True):
                yield f"{pair_table.source} row {row + 1} {side}", path, caption
        return
    if csv:
        table = load_labeled_csv(csv, images, split_labels)
        for row, (name, caption) in enumerate(
            zip(table.file_names.to_pylist(), table.captions.to_pylist(), strict=True)
        ):
            yield f"{csv} row {row + 1}", os.path.join(images, name), _caption(caption)
        return
    columns = columns or parse_columns(None)
    files = local_parquet_files(data)
    if files is None:  # a hub dataset, in its stored order
        stream = open_hub_pairs(data, hub_split, None, [columns[c] for c in REQUIRED_COLUMNS])
        chunks = HubChunks(stream, HUB_CHUNK_ROWS)
        first = 0
        for index in itertools.count():
            table = pair_chunk(chunks, index, columns)
            if table is None:
                return
            yield from _pair_images(data, first, table)
            first += table.num_rows
    for path in files:
        shard = pq.ParquetFile(path)
        missing = missing_column(path, set(shard.schema_arrow.names), columns, REQUIRED_COLUMNS)
        if missing:
            raise DataError(missing)
        first = 0
        for group in range(shard.num_row_groups):
            table = shard.read_row_group(group, columns=[columns[c] for c in REQUIRED_COLUMNS])
            yield from _pair_images(path, first, table.rename_columns(list(REQUIRED_COLUMNS)))
            first += table.num_rows


def _pair_images(source: str, first: int, table: pa.Table) -> Iterator[tuple[str, object, str]]:
    """Both images of every untied row of a table in Pick-a-Pic's names (row ``first`` on)."""
    label_0 = table.column("label_0").to_pylist()
    label_1 = table.column("label_1").to_pylist()
    captions = table.column("caption").to_pylist()
    for i in range(table.num_rows):
        if label_0[i] == label_1[i]:
            continue  # ties are never drawn
        for column in ("jpg_0", "jpg_1"):
            cell = table.column(column)[i]
            if isinstance(cell, pa.Scalar):
                cell = cell.as_py()
            yield f"{source} row {first + i} {column}", cell, _caption(captions[i])


def _caption(value: object) -> str:
    return value if isinstance(value, str) else ""  # as the datasets treat missing captions


def centre_crop_pixels(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: what ``ImageTransform`` gives with centre crop and this flip."""
    pixels, _ = ImageTransform(resolution, center_crop=True)._one(image, flip, 0.0, 0.0)
    return pixels


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"--cache {directory}: no {MANIFEST}; build it with scripts/build_cache.py")
    return json.loads(path.read_text())


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / MANIFEST)


def check_manifest(directory: str | Path, expected: dict, needs_flips: bool) -> dict:
    """Stop at start-up when the cache was built for another model, resolution or flips."""
    manifest = read_manifest(directory)
    if manifest.get("contents") == TEXT_ONLY:
        raise DataError(
            f"--cache {directory} holds text features only (built with --prompts, for an online "
            "run): build a cache of this data with scripts/build_cache.py and the run's flags"
        )
    wrong = [
        f"{name}: cache has {manifest.get(name)!r}, run wants {value!r}"
        for name, value in expected.items()
        if manifest.get(name) != value
    ]
    if needs_flips and not manifest.get("flips"):
        wrong.append("flips: the cache has no flipped images, the run uses --random_flip true")
    if wrong:
        raise DataError(f"--cache {directory} does not match this run:\n  " + "\n  ".join(wrong))
    return manifest


def check_prompt_cache(
    directory: str | Path, expected: dict, table: PromptTable, needs_empty: bool
) -> None:
    """Stop at start-up unless the cache holds this model's text features (``expected``:
    ``text_cache_identity``) for every prompt of ``table`` and, when ``needs_empty`` (guidance's
    unconditional branch), for the empty prompt. One line naming the cache and the prompt file."""
    manifest = read_manifest(directory)
    rebuild = (
        f"rebuild it: python scripts/build_cache.py --prompts {table.source} --pretrained_model "
        f"{expected['pretrained_model']} --cache {directory}"
    )
    wrong = [
        f"{name} {manifest.get(name)!r} where this run has {value!r}"
        for name, value in expected.items()
        if manifest.get(name) != value
    ]
    if wrong:
        raise DataError(f"--cache {directory} was built for another model ({'; '.join(wrong)}): "
                        "use the cache of this model or a new --cache DIR")  # fmt: skip
    cached = {name.split(".", 1)[0] for name in _index(Path(directory), TEXT_PREFIX)}
    missing = [(line, p) for line, p in zip(table.lines, table.prompts, strict=True)
               if caption_key(p) not in cached]  # fmt: skip
    if missing:
        (line, prompt), more = missing[0], len(missing) - 1
        others = f" and {more} other prompt(s)" if more else ""
        raise DataError(f"--cache {directory} has no text features for {table.source} line {line} "
                        f"({prompt!r}){others}: {rebuild}")  # fmt: skip
    if needs_empty and caption_key("") not in cached:
        raise DataError(f"--cache {directory} has no text features for the empty prompt (the "
                        f"unconditional branch of --guidance_scale): {rebuild}")  # fmt: skip


def _shards(directory: Path, prefix: str) -> list[Path]:
    return sorted(directory.glob(f"{prefix}*.safetensors"))


def _index(directory: Path, prefix: str) -> dict[str, Path]:
    """Tensor name -> shard file, from the shards' headers (no tensor is read)."""
    index = {}
    for shard in _shards(directory, prefix):
        with safe_open(str(shard), framework="pt") as handle:
            index.update(dict.fromkeys(handle.keys(), shard))
    return index


class _ShardReader:
    """Reads single tensors by name; shard handles are opened lazily, per process (workers)."""

    def __init__(self, directory: str | Path, prefix: str):
        self.directory = Path(directory)
        self.index = _index(self.directory, prefix)
        self._handles: dict[tuple[int, Path], object] = {}

    def get(self, name: str, what: str) -> torch.Tensor:
        shard = self.index.get(name)
        if shard is None:
            raise DataError(
                f"--cache {self.directory}: no entry for {what}; the cache was built from other "
                "data: rebuild it with scripts/build_cache.py"
            )
        key = (os.getpid(), shard)
        if key not in self._handles:
            self._handles[key] = safe_open(str(shard), framework="pt")
        return self._handles[key].get_tensor(name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # handles do not cross process boundaries


class CachedImageTransform(ImageTransform):
    """Stands in for ``ImageTransform``: the same random draws and geometry, but the images'
    cached posterior moments instead of their pixels: ``pixels`` is [n, 2C, h, w] (mean, std)."""

    def __init__(self, directory: str | Path, resolution: int, random_flip: bool = True):
        super().__init__(resolution, center_crop=True, random_flip=random_flip)
        self.reader = _ShardReader(directory, LATENT_PREFIX)

    def __call__(self, images: list[Image.Image], rng: np.random.Generator) -> TransformedImages:
        if not images:
            raise ValueError("CachedImageTransform needs at least one image")
        coin, u, v = rng.random(3)  # the same three draws as ImageTransform
        flip = self.random_flip and bool(coin < 0.5)
        moments, sizes, corners = [], [], []
        for image in images:
            (_, width), (top, left) = self.crop_corner(image.height, image.width, flip, u, v)
            if flip:
                left = width - self.resolution - left
            key = f"{image_key(image)}.{int(flip)}"
            what = f"an image of size {image.size} (flip {flip})"
            mean = self.reader.get(f"{key}.mean", what)
            std = self.reader.get(f"{key}.std", what)
            moments.append(torch.cat([mean, std]))
            sizes.append((image.height, image.width))
            corners.append((top, left))
        return TransformedImages(torch.stack(moments), sizes, corners)


class TextCache:
    """captions [B] -> the family's text features [B, ...] read from the cache, on ``device``."""

    def __init__(self, directory: str | Path, names: Iterable[str], device: torch.device):
        self.reader = _ShardReader(directory, TEXT_PREFIX)
        self.names = tuple(names)
        self.device = device

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        features = {}
        for name in self.names:
            rows = [self.reader.get(f"{caption_key(c)}.{name}", f"caption {c!r}") for c in captions]
            features[name] = torch.stack(rows).to(self.device)
        return features


class CachedLatentEncoder:
    """A ``diffusion.LatentEncoder`` over cached moments [N, 2C, h, w]: splits mean and std."""

    def __init__(self, vae_config: dict, device: torch.device):
        self.config = _Config(vae_config)
        self.device = device

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = images.to(self.device, torch.float32).chunk(2, dim=1)
        return mean, std


class _Config(dict):
    """Attribute access to the VAE config dict, like diffusers' FrozenDict."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class ShardWriter:
    """Buffers named tensors and writes them as numbered shards, each atomically."""

    def __init__(self, directory: Path, prefix: str, entries_per_shard: int):
        self.directory = directory
        self.prefix = prefix
        self.entries_per_shard = entries_per_shard
        self.done = set(_index(directory, prefix))
        self.next_shard = len(_shards(directory, prefix))
        self.buffer: dict[str, torch.Tensor] = {}
        self.entries = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """One entry (an image's or a caption's tensors); flushes a full shard."""
        self.buffer.update({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()})
        self.done.update(tensors)
        self.entries += 1
        if self.entries >= self.entries_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        final = self.directory / f"{self.prefix}{self.next_shard:05d}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(self.buffer, str(tmp))
        tmp.replace(final)
        self.next_shard += 1
        self.buffer, self.entries = {}, 0
