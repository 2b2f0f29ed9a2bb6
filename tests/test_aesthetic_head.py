"""The real LAION improved aesthetic predictor head (assets/scorers/, converted to safetensors)
loaded by the aesthetic scorer, against its MLP computed by hand (float64 numpy)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evaluation.scorers import AESTHETIC_HEAD, AestheticScorer
from scripts.convert_aesthetic_head import SHIPPED, convert, expected_shapes
from tests.support import save_tiny_clip

SHAPES = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}  # fmt: skip


def hand_mlp(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """The released head: five linear layers, no activation between them (dropout is off at
    inference), so y = W7 (W6 (W4 (W2 (W0 x + b0) + b2) + b4) + b6) + b7."""
    for i in (0, 2, 4, 6, 7):
        x = (
            x @ state[f"layers.{i}.weight"].double().numpy().T
            + state[f"layers.{i}.bias"].double().numpy()
        )
    return x[:, 0]


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory) -> Path:
    """A CLIP model with the ViT-L/14 embedding size (768; tiny otherwise) and the real head."""
    out = save_tiny_clip(tmp_path_factory.mktemp("aesthetic") / "clip-l14-shaped", 768)
    convert(SHIPPED, out)
    return out


def test_converted_head_has_the_released_keys_shapes_and_values(head_dir):
    state = load_file(str(head_dir / AESTHETIC_HEAD))
    assert {k: tuple(v.shape) for k, v in state.items()} == SHAPES == expected_shapes()
    original = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    for key, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(value, original[key]), key


def test_scorer_loads_the_real_head_and_gives_the_hand_computed_output(head_dir):
    scorer = AestheticScorer(str(head_dir))
    state = load_file(str(head_dir / AESTHETIC_HEAD))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 768))
    x = np.concatenate([x / np.linalg.norm(x, axis=1, keepdims=True), np.eye(768)[[0, 767]]])
    with torch.no_grad():
        head = scorer.head(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(head, hand_mlp(state, x), rtol=1e-5, atol=1e-5)
    assert np.ptp(head) > 1e-3  # the inputs are told apart
    # Whole scorer: the head on the L2-normalised image embedding.
    images = [
        Image.new("RGB", (32, 32), (200, 40, 40)),
        Image.effect_noise((32, 32), 60).convert("RGB"),
    ]
    with torch.no_grad():
        emb = scorer.image_embeddings(images).double().numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    scores = scorer.score(images, ["", ""])
    np.testing.assert_allclose(scores, hand_mlp(state, emb), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_that_is_not_the_head_is_refused(tmp_path):
    original = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    missing = {k: v for k, v in original.items() if k != "layers.7.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth: keys"):
        convert(tmp_path / "missing.pth", tmp_path / "out")
    reshaped = {**original, "layers.6.weight": original["layers.6.weight"][:8]}
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match=r"layers\.6\.weight has shape \(8, 64\)"):
        convert(tmp_path / "reshaped.pth", tmp_path / "out")
    assert not (tmp_path / "out" / AESTHETIC_HEAD).exists()
