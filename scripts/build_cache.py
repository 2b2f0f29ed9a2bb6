"""Precompute the latent and text-embedding cache that ``train.py --cache DIR`` trains from.

Takes train.py's own flags (model, VAE, data and ``--columns``, resolution, flips), so the cache
matches the run:

    python scripts/build_cache.py --pretrained_model M --data PARQUET_DIR --resolution 512
    python train.py --pretrained_model M --data PARQUET_DIR --resolution 512 --cache \
        PARQUET_DIR/prefdiff-cache-512px

For an online run (``--loss grpo|nft``), ``--prompts FILE`` caches the prompt set's text features
instead (and the empty prompt's, for classifier-free guidance); no data, VAE or resolution:

    python scripts/build_cache.py --pretrained_model M --prompts prompts.txt --cache CACHE
    python train.py --loss grpo --pretrained_model M --prompts prompts.txt --cache CACHE ...

``--cache`` names the output directory (default: ``prefdiff-cache-<R>px`` next to the data,
``prefdiff-text-cache-<stem>`` next to the prompt file).
Per image: the VAE posterior mean and std of the centre crop, both flip orientations when
``--random_flip`` is on; per caption (and the empty caption of caption dropout): the family's
text features. Images and captions are deduplicated by content. A hub dataset ``--data owner/name``
is streamed in its stored order (``--cache`` is then required). Interrupted? Run the same
command again: finished shards are kept and their entries skipped.
"""

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as a script, the repo root is not on sys.path.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cli
from common.cli import UsageError
from data.cache import (
    LATENT_PREFIX,
    MANIFEST,
    TEXT_ONLY,
    TEXT_PREFIX,
    ShardWriter,
    cache_identity,
    caption_key,
    centre_crop_pixels,
    default_cache_dir,
    default_prompt_cache_dir,
    image_key,
    read_manifest,
    source_images,
    text_cache_identity,
    write_manifest,
)
from data.columns import parse_columns
from data.decode import UnreadableImage, load_rgb
from data.kto_table import parse_split_labels
from data.parquet_index import local_parquet_files
from data.prompts import load_prompts
from diffusion.denoising import posterior_moments
from models.families import denoiser_config, family_for
from models.family import ModelFamily
from models.loading import load_family, load_vae
from training.build import load_pair_table
from training.config import TrainConfig, build_parser
from training.startup import check_models

logger = logging.getLogger("build_cache")


@dataclass
class CacheStats:
    images_encoded: int = 0
    images_already_cached: int = 0  # found in shards of an earlier, interrupted build
    duplicate_images: int = 0  # the same pixels seen earlier in this build
    unreadable_images: int = 0
    captions_encoded: int = 0


def _encode_images(
    pending: list[tuple[str, object]],
    vae: torch.nn.Module,
    resolution: int,
    flips: tuple[bool, ...],
    writer: ShardWriter,
) -> None:
    """One VAE batch per flip orientation; one cache entry (all orientations) per image."""
    entries: list[dict[str, torch.Tensor]] = [{} for _ in pending]
    for flip in flips:
        pixels = torch.stack([centre_crop_pixels(img, resolution, flip) for _, img in pending])
        mean, std = posterior_moments(vae, pixels)
        for entry, (key, _), m, s in zip(entries, pending, mean, std, strict=True):
            entry[f"{key}.{int(flip)}.mean"] = m
            entry[f"{key}.{int(flip)}.std"] = s
    for entry in entries:
        writer.add(entry)


def _encode_captions(
    captions: list[str], family: ModelFamily, batch_size: int, writer: ShardWriter
) -> int:
    first = family.text_feature_names[0]
    todo = [c for c in captions if f"{caption_key(c)}.{first}" not in writer.done]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        features = family.encode_text(batch)
        for i, caption in enumerate(batch):
            key = caption_key(caption)
            writer.add({f"{key}.{name}": features[name][i] for name in family.text_feature_names})
    return len(todo)


def open_cache_dir(out_dir: Path, manifest: dict) -> None:
    """Create ``out_dir`` with ``manifest``, or continue a build of the same manifest there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).is_file():
        previous = read_manifest(out_dir)
        if previous != manifest:
            raise UsageError(
                f"--cache {out_dir} holds a cache built with {previous}; this build is "
                f"{manifest}: use another --cache directory"
            )
    write_manifest(out_dir, manifest)


def build_cache(
    config: TrainConfig, out_dir: Path, batch_size: int = 16, entries_per_shard: int = 256
) -> CacheStats:
    """Build (or finish) the cache of ``config``'s model and data in ``out_dir``."""
    identity = cache_identity(
        config.pretrained_model,
        config.pretrained_vae,
        config.revision,
        config.variant,
        config.resolution,
    )
    family_cls = family_for(denoiser_config(config.pretrained_model, config.revision))
    open_cache_dir(out_dir, {**identity, "family": family_cls.name, "flips": config.random_flip})

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(config, torch.float32, device)
    family = load_family(config, family_cls, torch.float32, device)
    flips = (False, True) if config.random_flip else (False,)
    latents = ShardWriter(out_dir, LATENT_PREFIX, entries_per_shard)
    texts = ShardWriter(out_dir, TEXT_PREFIX, entries_per_shard)
    stats = CacheStats()
    captions, seen, pending = {""}, set(), []  # "" : caption dropout's empty caption
    split_labels = parse_split_labels(config.split_labels)
    own = load_pair_table(config) if config.pairs or config.pairs_dirs else None
    columns = parse_columns(config.columns)  # validated with the config
    rows = source_images(
        config.data, config.csv, config.images, split_labels, own, columns, config.hub_split
    )
    for where, cell, caption in rows:
        captions.add(caption)
        try:
            image = load_rgb(cell)
        except UnreadableImage as exc:
            logger.warning("skipping %s: %s", where, exc)
            stats.unreadable_images += 1
            continue
        key = image_key(image)
        if key in seen:
            stats.duplicate_images += 1
            continue
        seen.add(key)
        if f"{key}.0.mean" in latents.done:
            stats.images_already_cached += 1
            continue
        pending.append((key, image))
        if len(pending) == batch_size:
            _encode_images(pending, vae, config.resolution, flips, latents)
            stats.images_encoded += len(pending)
            pending = []
    if pending:
        _encode_images(pending, vae, config.resolution, flips, latents)
        stats.images_encoded += len(pending)
    latents.flush()
    stats.captions_encoded = _encode_captions(sorted(captions), family, batch_size, texts)
    texts.flush()
    return stats


def build_prompt_cache(
    config: TrainConfig, out_dir: Path, batch_size: int = 16, entries_per_shard: int = 256
) -> CacheStats:
    """Build (or extend) the text cache of ``config.prompts`` in ``out_dir``: every prompt's
    features and the empty prompt's (classifier-free guidance's unconditional branch). Another
    prompt file of the same model may be added to the same directory."""
    table = load_prompts(config.prompts)
    family_cls = family_for(denoiser_config(config.pretrained_model, config.revision))
    identity = text_cache_identity(config.pretrained_model, config.revision, config.variant)
    open_cache_dir(out_dir, {**identity, "family": family_cls.name, "contents": TEXT_ONLY})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family = load_family(config, family_cls, torch.float32, device)
    texts = ShardWriter(out_dir, TEXT_PREFIX, entries_per_shard)
    captions = sorted({"", *table.prompts})
    stats = CacheStats(captions_encoded=_encode_captions(captions, family, batch_size, texts))
    texts.flush()
    return stats


def prompt_cache_dir(config: TrainConfig) -> Path:
    """``--prompts``: the output directory; data flags beside it are refused."""
    data = [f"--{name}" for name in ("data", "csv", "pairs", "pairs_dirs") if getattr(config, name)]
    if data:
        raise UsageError(f"--prompts builds a prompt set's text cache: drop {' and '.join(data)}")
    return Path(config.cache or default_prompt_cache_dir(config.prompts))


def main(argv: list[str] | None = None) -> CacheStats:
    parser = build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--encode_batch_size", type=int, default=16, help="images per VAE call")
    parser.add_argument("--entries_per_shard", type=int, default=256, help="images per shard")
    args = vars(parser.parse_args(argv))
    batch_size, per_shard = args.pop("encode_batch_size"), args.pop("entries_per_shard")
    config = TrainConfig(**args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level="INFO")
    if config.prompts:  # an online run's prompt set: text features only
        out_dir = prompt_cache_dir(config)
        config = dataclasses.replace(config, resolution=config.resolution or check_models(config))
        stats = build_prompt_cache(config, out_dir, batch_size, per_shard)
        print(f"prompt cache {out_dir}: {stats.captions_encoded} new texts encoded (prompts and "
              "the empty prompt)")  # fmt: skip
        return stats
    config.validate()
    if config.resolution is None:  # as train.py: the model's native size
        config = dataclasses.replace(config, resolution=check_models(config))
    # Beside the CSV or manifest, or inside the parquet directory or the chosen folder.
    beside = config.csv or config.pairs or (config.pairs_dirs or "").split(",")[0] or None
    if not (beside or config.cache) and local_parquet_files(config.data) is None:
        raise UsageError(f"--data {config.data} is a hub dataset: give the cache a --cache DIR")
    out_dir = Path(config.cache or default_cache_dir(config.data, beside, config.resolution))
    stats = build_cache(config, out_dir, batch_size, per_shard)
    print(f"cache {out_dir}: {stats}")  # the CLI's summary line
    return stats


if __name__ == "__main__":
    cli.run(main)  # a user error (a flag, the data, a cache of another build): one line
