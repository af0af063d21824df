"""Captions for the benchmarks: distinct per index, of realistic lengths, made offline.

`short_caption(i)` is one clause (≤ 16 tokens with start and end); `mixed_caption(i)`
draws its length class from CAPTION_MIX. Distinct per index, so callers that number
their calls never hit a cache or single-flight by accident.
"""

from __future__ import annotations

import numpy as np

_OPENERS = ("a photo of", "a picture of", "an image of", "a close-up of", "a blurry photo of")
_ADJS = (
    "small", "big", "old", "young", "happy", "sleepy", "wet", "shiny", "tiny", "large",
    "dirty", "clean", "fast", "slow", "wooden", "tall", "short", "fluffy", "broken", "new",
    "angry", "quiet", "bright", "dark",
)  # fmt: skip
_COLORS = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "grey",
    "purple", "golden",
)  # fmt: skip
_NOUNS = (
    "dog", "cat", "horse", "car", "bus", "train", "boat", "bird", "man", "woman", "child",
    "bike", "truck", "cow", "sheep", "bear", "plane", "chair", "table", "house", "tree",
    "flower", "bottle", "cup", "pizza", "cake", "phone", "laptop", "book", "clock", "kite",
    "ball", "umbrella", "bag", "hat", "shoe", "lamp", "door", "window", "bridge", "tower",
    "river", "road", "fence", "bench", "sign", "boy", "girl",
)  # fmt: skip
_VERBS = (
    "sitting", "standing", "running", "lying", "waiting", "parked", "walking", "sleeping",
    "jumping", "playing", "resting", "floating", "hanging", "flying", "eating", "looking",
    "moving", "stopped", "shown", "seen",
)  # fmt: skip
_PREPS = ("on", "in", "near", "behind", "under", "beside", "at", "by")
_PLACES = (
    "beach", "street", "park", "kitchen", "table", "grass", "snow", "road", "field", "lake",
    "city", "forest", "garden", "room", "station", "airport", "desert", "hill", "bed",
    "sofa", "market", "river", "shop", "farm", "bridge", "wall", "sand", "water", "floor",
    "window", "roof", "mountain",
)  # fmt: skip
_JOINERS = (", while", " and", ", next to", ", with", ", behind")
_RADIX = (len(_OPENERS), len(_ADJS), len(_COLORS), len(_NOUNS), len(_VERBS), len(_PREPS))
_SPACE = int(np.prod(_RADIX)) * len(_PLACES)
_SCRAMBLE = 1_000_003  # a prime that divides no radix: i → i·P mod N is a bijection


def _clause(index: int, *, opener: bool) -> str:
    j = (index * _SCRAMBLE) % _SPACE
    digits = []
    for radix in (*_RADIX, len(_PLACES)):
        digits.append(j % radix)
        j //= radix
    o, a, c, n, v, p, pl = digits
    head = f"{_OPENERS[o]} a" if opener else "a"
    return f"{head} {_ADJS[a]} {_COLORS[c]} {_NOUNS[n]} {_VERBS[v]} {_PREPS[p]} the {_PLACES[pl]}"


# How many clauses a caption of each class has, and the share of each class in the mix:
# mostly one-line captions and queries, some descriptive ones, a few alt-texts, and a
# few past the 77-token context (truncated).
CAPTION_MIX: tuple[tuple[str, int, int], ...] = (
    ("short", 1, 55),
    ("medium", 2, 25),
    ("long", 4, 15),
    ("over 77", 11, 5),
)


def short_caption(index: int) -> str:
    """Caption `index` of a set of distinct ones, each ≤ 16 tokens with start and end."""
    return _clause(index, opener=True)


def mixed_caption(index: int) -> str:
    """Caption `index` of a realistic mix of lengths (see CAPTION_MIX); distinct per index."""
    pick = (index * 2654435761) % 100
    clauses = CAPTION_MIX[-1][1]
    for _, n, share in CAPTION_MIX:
        if pick < share:
            clauses = n
            break
        pick -= share
    parts = [_clause(index, opener=True)]
    for k in range(1, clauses):
        joiner = _JOINERS[(index + k) % len(_JOINERS)]
        parts.append(f"{joiner} {_clause(index * 7919 + k * 104729, opener=False)}")
    return "".join(parts)
