"""A registry of image scorers: the toy reward and the learned preference / quality models.

Every scorer maps (images, prompts) to one float per image; higher is better. The learned ones
load from a local directory or a hub name in transformers format (safetensors only):

- ``toy_colour``, ``toy_shape``, ``toy_warm``: the rules of evaluation/toy_reward.py (1.0 / 0.0);
  no model.
- ``clip_score``: a CLIPModel (e.g. openai/clip-vit-large-patch14); 100 * max(cos(img, txt), 0).
- ``pickscore``: PickScore_v1, a CLIP-H/14 CLIPModel; logit_scale.exp() * cos(img, txt).
- ``hpsv2``: HPS v2 converted to a transformers CLIPModel (CLIP-H/14); cos(img, txt).
- ``aesthetic``: CLIP ViT-L/14 plus the LAION aesthetic MLP (aesthetic_head.safetensors in the
  same directory) on the normalised image embedding.
- ``imagereward``: ImageReward converted to BlipForImageTextRetrieval plus its MLP
  (imagereward_head.safetensors); (head(image-grounded text [CLS]) - mean) / std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from evaluation.toy_reward import CAPTION_READERS, toy_reward, unreadable_caption

AESTHETIC_HEAD = "aesthetic_head.safetensors"
IMAGEREWARD_HEAD = "imagereward_head.safetensors"
# ImageReward's released normalisation of the raw head output (ImageReward.py, mean and std of
# the head on its training set), so scores are in standard deviations around 0.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# CLIPScore (Hessel et al. 2021) with torchmetrics' weight w = 100.
CLIP_SCORE_WEIGHT = 100.0

Images = Sequence[Image.Image]
Prompts = Sequence[str]  # prompts[i]: the caption image i was generated for


class Scorer(Protocol):
    """A scorer that reads structure from the caption (a toy rule's colour word) also has
    ``check_prompt(prompt)``, raising ValueError on a caption it cannot read."""

    name: str

    def score(self, images: Images, prompts: Prompts) -> list[float]:
        """One score per image; prompts[i] is the caption image i was generated for."""
        ...


class ToyRewardScorer:
    """A toy reward rule (evaluation/toy_reward.py); needs no model."""

    def __init__(self, rule: str):
        self.name = f"toy_{rule}"
        self.rule = toy_reward(rule)
        self.read_caption = CAPTION_READERS[rule]

    def score(self, images: Images, prompts: Prompts) -> list[float]:
        return [self.rule(image, prompt) for image, prompt in zip(images, prompts, strict=True)]

    def check_prompt(self, prompt: str) -> None:
        """ValueError if the rule cannot read what it needs from the prompt (a colour word)."""
        if self.read_caption is not None:
            self.read_caption(prompt)


class PreferenceMLP(nn.Module):
    """The MLP head shared by the LAION aesthetic predictor (v2) and ImageReward: 5 linear layers
    with dropout, keys ``layers.{0,2,4,6,7}.{weight,bias}`` as in both released checkpoints."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_head(path: Path, input_size: int, device: str) -> PreferenceMLP:
    """A PreferenceMLP from a safetensors file; a missing file is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"scorer head {path} not found (see docs/evaluation.md: Scorers)")
    head = PreferenceMLP(input_size)
    state = load_file(str(path))
    state = {k.removeprefix("mlp."): v for k, v in state.items()}  # ImageReward prefixes "mlp."
    head.load_state_dict(state)
    return head.to(device).eval()


@torch.no_grad()
def score_in_batches(
    images: Images,
    prompts: Prompts,
    batch_size: int,
    score_batch: Callable[[Images, Prompts], torch.Tensor],
) -> list[float]:
    """score_batch (scores [n]) on consecutive batches of batch_size images and their prompts."""
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        scores += score_batch(images[batch], prompts[batch]).tolist()
    return scores


class ClipScorer:
    """A CLIPModel scoring image-caption agreement; the three CLIP scorers differ in the map
    from cosine similarity to score."""

    def __init__(
        self,
        name: str,
        path: str,
        to_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: str = "cpu",
        batch_size: int = 32,
    ):
        from transformers import CLIPModel, CLIPProcessor

        self.name, self.to_score, self.device, self.batch_size = name, to_score, device, batch_size
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    def image_embeddings(self, images: Images) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        features = self.model.get_image_features(**inputs)
        features = getattr(features, "pooler_output", features)
        return nn.functional.normalize(features.float(), dim=-1)

    def text_embeddings(self, prompts: Prompts) -> torch.Tensor:
        inputs = self.processor(
            text=list(prompts), padding=True, truncation=True, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(**inputs)
        features = getattr(features, "pooler_output", features)
        return nn.functional.normalize(features.float(), dim=-1)

    def score(self, images: Images, prompts: Prompts) -> list[float]:
        return score_in_batches(images, prompts, self.batch_size, self.score_batch)

    def score_batch(self, images: Images, prompts: Prompts) -> torch.Tensor:
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return self.to_score(cosine, self.model.logit_scale.exp().float())


class AestheticScorer(ClipScorer):
    """LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding;
    the caption is ignored."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32):
        super().__init__("aesthetic", path, lambda c, s: c, device, batch_size)
        head_path = Path(path) / AESTHETIC_HEAD
        self.head = load_head(head_path, self.model.config.projection_dim, device)

    def score_batch(self, images: Images, prompts: Prompts) -> torch.Tensor:
        return self.head(self.image_embeddings(images))


class ImageRewardScorer:
    """ImageReward: BLIP's image-grounded text encoder (the caption attends to the ViT's patch
    features), its [CLS] state through an MLP head, normalised by the released mean and std."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.name, self.device, self.batch_size = "imagereward", device, batch_size
        model = BlipForImageTextRetrieval.from_pretrained(path, use_safetensors=True)
        self.model = model.to(device).eval()
        self.processor = BlipProcessor.from_pretrained(path)
        head_path = Path(path) / IMAGEREWARD_HEAD
        self.head = load_head(head_path, model.config.text_config.hidden_size, device)

    def score(self, images: Images, prompts: Prompts) -> list[float]:
        return score_in_batches(images, prompts, self.batch_size, self.score_batch)

    def score_batch(self, images: Images, prompts: Prompts) -> torch.Tensor:
        inputs = self.processor(
            images=list(images),
            text=list(prompts),
            padding="max_length",
            truncation=True,
            max_length=35,  # ImageReward's text length
            return_tensors="pt",
        ).to(self.device)
        image_states = self.model.vision_model(pixel_values=inputs.pixel_values)[0]
        text = self.model.text_encoder(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            encoder_hidden_states=image_states,
            encoder_attention_mask=torch.ones(image_states.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]
        raw = self.head(text.float())
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _clip_score(cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return CLIP_SCORE_WEIGHT * cosine.clamp(min=0)


def _pickscore(cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale * cosine


def _hpsv2(cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return cosine


# name -> (builder(path, device), default hub name or None when the weights need a conversion)
SCORERS: dict[str, tuple[Callable[[str | None, str], Scorer], str | None]] = {
    "toy_colour": (lambda path, device: ToyRewardScorer("colour"), None),
    "toy_shape": (lambda path, device: ToyRewardScorer("shape"), None),
    "toy_warm": (lambda path, device: ToyRewardScorer("warm"), None),
    "clip_score": (
        lambda path, device: ClipScorer("clip_score", path, _clip_score, device),
        "openai/clip-vit-large-patch14",
    ),
    "pickscore": (
        lambda path, device: ClipScorer("pickscore", path, _pickscore, device),
        "yuvalkirstain/PickScore_v1",
    ),
    "hpsv2": (lambda path, device: ClipScorer("hpsv2", path, _hpsv2, device), None),
    "aesthetic": (lambda path, device: AestheticScorer(path, device), None),
    "imagereward": (lambda path, device: ImageRewardScorer(path, device), None),
}
NEEDS_NO_MODEL = ("toy_colour", "toy_shape", "toy_warm")


# The files a learned scorer's directory needs beside the transformers model.
HEADS = {"aesthetic": AESTHETIC_HEAD, "imagereward": IMAGEREWARD_HEAD}


def scorer_problem(name: str, path: str | None) -> str | None:
    """What stops ``build_scorer(name, path)`` that can be told without loading a model: an
    unknown name, no model path where the weights need a conversion, a local path that is not
    there (``owner/name`` counts as a hub name), a missing head file; None when none of these."""
    if name not in SCORERS:
        return f"unknown scorer {name!r}; choose from {sorted(SCORERS)}"
    if name in NEEDS_NO_MODEL:
        return None
    path = path or SCORERS[name][1]
    if path is None:
        return f"{name} needs a model path: {name}=DIR (see docs/evaluation.md: Scorers)"
    local = Path(path).expanduser()
    if not local.exists():
        hub_name = path.count("/") == 1 and not Path(path.split("/")[0]).is_dir()
        return None if hub_name else f"{name}={path}: no such directory"
    head = HEADS.get(name)
    if head and not (local / head).is_file():
        return f"{name}={path}: no {head} in that directory (see docs/evaluation.md: Scorers)"
    return None


def unreadable_prompt(name: str, prompts: Sequence[str]) -> tuple[int, str] | None:
    """(index, reason) of the first prompt scorer ``name`` cannot score, or None. Only the toy
    rules read the caption (its colour or shape word); the learned scorers take any text."""
    if name not in NEEDS_NO_MODEL:
        return None
    return unreadable_caption(name.removeprefix("toy_"), prompts)


def build_scorer(name: str, path: str | None = None, device: str = "cpu") -> Scorer:
    """The scorer registered as name, its model loaded from path (or its default hub name)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)}")
    builder, default = SCORERS[name]
    path = path or default
    if path is None and name not in NEEDS_NO_MODEL:
        raise ValueError(
            f"scorer {name!r} needs a model path: --scorer {name}=DIR "
            "(see docs/evaluation.md: Scorers)"
        )
    return builder(path, device)
