"""A small T5-style (Unigram, SentencePiece conventions) tokenizer built offline, for the tiny
SD3- and Flux-shaped test models.

The real T5 vocabulary (a 32k SentencePiece model) cannot be had offline, so the tiny models use
this stand-in: T5's special tokens and layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, "▁" word
starts, ``</s>`` appended), single characters so any text tokenizes, and one whole-word piece per
word of the toy prompts. It is a ``transformers.T5Tokenizer`` (the class the pipelines load), so
everything downstream runs the code paths the real one does; only the segmentation differs.
"""

import string
from pathlib import Path

from transformers import T5Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT_FILES = ("assets/toy_prompts_train.txt", "assets/toy_prompts_heldout.txt")
# Unigram log-probabilities: whole words beat spelling them out letter by letter.
WORD_SCORE, CHAR_SCORE = -2.0, -10.0


def toy_words() -> list[str]:
    words = set()
    for name in PROMPT_FILES:
        path = REPO_ROOT / name
        if path.is_file():
            words.update(path.read_text(encoding="utf-8").lower().split())
    return sorted(words)


def build_t5_tokenizer() -> T5Tokenizer:
    """Deterministic: the same vocabulary (and ids) on every machine."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab += [(c, CHAR_SCORE) for c in chars]
    vocab += [(f"▁{c}", CHAR_SCORE) for c in chars]
    known = {piece for piece, _ in vocab}
    vocab += [(f"▁{w}", WORD_SCORE) for w in toy_words() if f"▁{w}" not in known]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
