"""Convert the LAION improved aesthetic predictor head (a torch pickle) to safetensors.

    python scripts/convert_aesthetic_head.py --out /models/aesthetic
    # then put openai/clip-vit-large-patch14 (transformers format) in the same directory and
    python evaluate.py ... --scorer aesthetic=/models/aesthetic

The input (default: the copy shipped in assets/scorers/, see its README for provenance) is a
state dict of the 768 -> 1024 -> 128 -> 64 -> 16 -> 1 linear stack, keys
``layers.{0,2,4,6,7}.{weight,bias}``. It is read with ``torch.load(weights_only=True)``, which
refuses arbitrary pickled objects; keys and shapes are checked before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# Run as a script, the repo root is not on sys.path.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.scorers import AESTHETIC_HEAD, PreferenceMLP

SHIPPED = Path(__file__).resolve().parent.parent / "assets/scorers/sac+logos+ava1-l14-linearMSE.pth"
CLIP_L14_EMBEDDING = 768  # CLIP ViT-L/14's projection dimension, the head's input


def expected_shapes(input_size: int = CLIP_L14_EMBEDDING) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in PreferenceMLP(input_size).state_dict().items()}


def load_head_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (fp32), checked against the head's keys and shapes."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    expected = expected_shapes()
    if set(state) != set(expected):
        raise ValueError(
            f"{path}: keys {sorted(state)} are not the aesthetic head's {sorted(expected)}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
    return {k: state[k].float().contiguous() for k in expected}


def convert(pth: Path, out_dir: Path) -> Path:
    """Write ``out_dir/aesthetic_head.safetensors`` (the name the aesthetic scorer reads)."""
    state = load_head_state(pth)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / AESTHETIC_HEAD
    save_file(state, str(target), metadata={"source_sha256": sha256(pth), "source": pth.name})
    return target


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pth", type=Path, default=SHIPPED, help="the .pth state dict")
    parser.add_argument("--out", type=Path, required=True, help="directory for the safetensors")
    args = parser.parse_args(argv)
    target = convert(args.pth, args.out)
    print(f"wrote {target} (from {args.pth}, sha256 {sha256(args.pth)})")
    return target


if __name__ == "__main__":
    main()
