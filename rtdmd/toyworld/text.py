"""The toy world's words: a closed vocabulary and a word-level tokenizer shared by the toy teacher's
text encoder and toy-clip.

Token ids: 0 = padding, 1 = unknown word, then the vocabulary in a fixed order. A prompt is lower-
cased and split on anything that is not a letter; words beyond ``max_length`` are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from rtdmd.toyworld.world import PALETTE, PLURALS, SHAPES

PAD, UNK = 0, 1
FUNCTION_WORDS = ("a", "an", "photo", "of", "and", "two", "three", "four", "left", "right", "above", "below")
VOCAB: tuple[str, ...] = FUNCTION_WORDS + tuple(PALETTE) + SHAPES + tuple(PLURALS[s] for s in SHAPES)
VOCAB_SIZE = len(VOCAB) + 2
MAX_WORDS = 16  # the longest template ("a photo of an orange pentagon and a yellow hexagon") has 10
_IDS = {word: i + 2 for i, word in enumerate(VOCAB)}
_SPLIT = re.compile(r"[a-z]+")


def words(prompt: str) -> list[str]:
    return _SPLIT.findall(prompt.lower())


def token_ids(prompts: Sequence[str], max_length: int = MAX_WORDS) -> Tensor:
    """``[B, max_length]`` int64 ids (0-padded on the right)."""
    ids = torch.full((len(prompts), max_length), PAD, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens = [_IDS.get(w, UNK) for w in words(prompt)][:max_length]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


def unknown_words(prompts: Sequence[str]) -> list[str]:
    """Words outside the vocabulary (the toy models read them as one 'unknown' token)."""
    return sorted({w for p in prompts for w in words(p) if w not in _IDS})
