"""Which caption a diffusion training sample uses: the recipe's 95% descriptive / 5% alt-text mix.

Each sample draws its caption key from configured probabilities with its own seed (the reader's
per-sample ``seed``), so the choice is the same after a resume or on another worker count. When
the drawn key is missing or empty for that sample, the fallback order is tried. A counter
records what was drawn and what was used, for the logged realised ratio.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from data_pipeline.seeding import derive_seed

ALT_TEXT = "txt"  # img2dataset's alt-text member; other keys are recaption's KEY.<key>.txt
_STREAM = 0xCA7  # a seed stream of the sample's own, apart from crops and noise


def caption_member(key: str) -> str:
    """The tar member extension of a caption key: ``txt`` for alt-text, ``dsc.txt`` for ``dsc``."""
    return ALT_TEXT if key == ALT_TEXT else f"{key}.txt"


@dataclass(frozen=True)
class CaptionMix:
    """Probabilities per caption key (normalised; zero allowed) and the fallback order."""

    weights: Mapping[str, float]
    fallback: tuple[str, ...]

    def __post_init__(self) -> None:
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"caption mix weights must be >= 0 with a positive sum, got {dict(self.weights)}")
        unknown = [k for k in self.fallback if k not in self.weights]
        if unknown:
            raise ValueError(f"fallback key(s) {unknown} have no weight; keys: {sorted(self.weights)}")

    def draw(self, seed: int) -> str:
        """The key drawn for the sample with this seed (before any fallback)."""
        u = (derive_seed(seed, _STREAM) >> 10) / float(1 << 53)  # uniform in [0, 1), 53 bits
        total = sum(self.weights.values())
        edge = 0.0
        last = None
        for key, weight in self.weights.items():
            if weight <= 0:
                continue
            edge += weight / total
            last = key
            if u < edge:
                return key
        return last  # type: ignore[return-value]  # u within rounding of 1.0

    def choose(self, texts: Mapping[str, str | None], seed: int) -> tuple[str, str, str] | None:
        """(drawn key, used key, caption) for a sample's texts by key, or None when the drawn
        key and every fallback are missing or blank."""
        drawn = self.draw(seed)
        for key in (drawn, *(k for k in self.fallback if k != drawn)):
            text = texts.get(key)
            if text is not None and text.strip():
                return drawn, key, text
        return None


@dataclass
class MixCounter:
    """Counts of drawn and used keys; ``ratios`` is what the trainer logs."""

    drawn: Counter = field(default_factory=Counter)
    used: Counter = field(default_factory=Counter)
    fell_back: int = 0
    dropped: int = 0

    def add(self, choice: tuple[str, str, str] | None) -> None:
        if choice is None:
            self.dropped += 1
            return
        drawn, used, _ = choice
        self.drawn[drawn] += 1
        self.used[used] += 1
        self.fell_back += drawn != used

    def ratios(self) -> dict[str, float]:
        """Fraction of used samples per key (``caption_mix/<key>``), plus fallbacks and drops."""
        n = sum(self.used.values())
        out = {f"caption_mix/{k}": v / n for k, v in sorted(self.used.items())} if n else {}
        seen = n + self.dropped
        if seen:
            out["caption_mix/fallback"] = self.fell_back / seen
            out["caption_mix/dropped"] = self.dropped / seen
        return out
