"""Build the real CLIP BPE tokenizer offline, from the vocabulary file inside the open_clip wheel.

There is no model hub here, but SD's tokenizer is fully determined by OpenAI's BPE merges file,
which ships in the `open_clip_torch` wheel. We download the wheel (no install: open_clip needs
torchvision), rebuild vocab.json / merges.txt the way CLIP does, and save a `CLIPTokenizer`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer

# Run as a script, the repo root is not on sys.path, and `scripts.*` needs it.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.atomic_dir import atomic_directory

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

OPEN_CLIP_REQUIREMENT = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps a 49408-token vocabulary: 2 x 256 byte symbols + 48894 merges + 2 special tokens.
NUM_MERGES = 49408 - 2 * 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# Ids SD's tokenizer gives this prompt; a cheap end-to-end check of vocabulary and merges.
CHECK_PROMPT = "a photo of a cat"
CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def default_tokenizer_cache() -> Path:
    """Where the tokenizer is cached unless told otherwise: $PREFDIFF_TOKENIZER_CACHE or build/."""
    env = os.environ.get("PREFDIFF_TOKENIZER_CACHE")
    return Path(env) if env else REPO_ROOT / "build" / "clip-tokenizer"


def byte_symbols() -> list[str]:
    """One printable unicode character per byte value (GPT-2 / CLIP's byte table), in vocab order.

    Printable Latin-1 bytes stand for themselves; the others are shifted to 256 + n so that no
    symbol is whitespace or a control character. CLIP lists the printable bytes first, then the
    shifted ones; that order fixes token ids 0-255.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    # CLIP orders the vocabulary as the printable bytes first, then the shifted ones.
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


def vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's token -> id map and merge list from the text of its BPE file.

    The first line of the file is a version header; CLIP uses the next NUM_MERGES lines.
    """
    lines = bpe_text.split("\n")[1 : NUM_MERGES + 1]
    pairs = [line.split() for line in lines]
    if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError("unexpected BPE file: wrong number or shape of merges")
    merges = [(a, b) for a, b in pairs]
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def fetch_bpe_text(workdir: Path) -> str:
    """Download the open_clip wheel into workdir (no deps, no install) and read the BPE file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    done = subprocess.run(
        [*cmd, OPEN_CLIP_REQUIREMENT, "-d", str(workdir)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip download {OPEN_CLIP_REQUIREMENT} failed:\n{done.stderr}")
    (wheel,) = workdir.glob("open_clip_torch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8")


def write_vocab_files(bpe_text: str, out_dir: Path) -> None:
    """Write vocab.json and merges.txt in the layout HF's CLIP tokenizer files use."""
    vocab, merges = vocab_and_merges(bpe_text)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "\n".join(f"{a} {b}" for a, b in merges)
    (out_dir / "merges.txt").write_text(f"#version: 0.2\n{merge_lines}\n", encoding="utf-8")


def is_built(cache_dir: Path) -> bool:
    return (cache_dir / "tokenizer_config.json").is_file()


def check_tokenizer(tokenizer: CLIPTokenizer) -> None:
    """Fail loudly if the rebuilt tokenizer does not reproduce SD's ids and padding."""
    ids = tokenizer(CHECK_PROMPT).input_ids
    if ids != CHECK_IDS:
        raise RuntimeError(f"CLIP tokenizer mismatch: {ids} != {CHECK_IDS}")
    if len(tokenizer) != 49408 or tokenizer.model_max_length != MODEL_MAX_LENGTH:
        raise RuntimeError("CLIP tokenizer has the wrong size or model_max_length")


def ensure_clip_tokenizer(cache_dir: Path) -> Path:
    """Return a directory holding the real CLIP tokenizer, building it there on first use.

    The build is atomic (temp dir + rename), so concurrent callers never see half a tokenizer;
    if two build at once, the first to finish wins.
    """
    cache_dir = Path(cache_dir)
    if is_built(cache_dir):
        return cache_dir
    with tempfile.TemporaryDirectory() as work, atomic_directory(cache_dir, True) as out_dir:
        files_dir = Path(work) / "files"
        files_dir.mkdir()
        write_vocab_files(fetch_bpe_text(Path(work)), files_dir)
        tokenizer = CLIPTokenizer.from_pretrained(files_dir, model_max_length=MODEL_MAX_LENGTH)
        check_tokenizer(tokenizer)
        tokenizer.save_pretrained(out_dir)
        # Keep the plain vocab/merges too: other tools (and humans) read those.
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(files_dir / name, out_dir / name)
    logger.info("built CLIP tokenizer in %s", cache_dir)
    return cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=default_tokenizer_cache(),
        help="directory to hold the tokenizer (default: $PREFDIFF_TOKENIZER_CACHE or build/)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = ensure_clip_tokenizer(args.out)
    print(f"CLIP tokenizer ready in {out}")


if __name__ == "__main__":
    main()
