"""Caption decoding options: a plain dataclass (no torch), so the config schema imports it cheaply.

Used by models/caption_decoding.py and as the config node `caption.decoding` /
`evaluate_captioner.decoding`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DecodingOptions:
    """How to pick caption tokens; lengths count SOT and EOT like open_clip's ``seq_len``."""

    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    max_length: int = 30
    # 2: at least one token after SOT. Not open_clip's generate default (min_seq_len=5): that forbids
    # EOT after "SOT a red circle" (4 tokens), so short captions got a fourth word ("a brown cross brown").
    min_length: int = 2
    temperature: float = 1.0  # sampling only; greedy and beam ignore it
    top_k: int = 0  # sampling: keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # sampling: keep the smallest head with mass >= top_p; 1.0 = off
    repetition_penalty: float = 1.0  # HF semantics; 1.0 = off
    num_beams: int = 4
    length_penalty: float = 1.0  # beam: hypothesis score = sum logprob / length ** length_penalty
    seed: int = 0  # sampling: seeds a private torch.Generator

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = (
            ("strategy", self.strategy in ("greedy", "sample", "beam"), "must be 'greedy', 'sample' or 'beam'"),
            ("max_length", self.max_length >= 2, "must be >= 2 (it counts SOT and EOT)"),
            ("min_length", self.min_length >= 0, "must be >= 0"),
            ("max_length", self.max_length > self.min_length, f"must be > min_length ({self.min_length})"),
            ("temperature", self.temperature > 0 and math.isfinite(self.temperature), "must be finite and > 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1.0 turns it off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1.0 turns it off)"),
            ("num_beams", self.num_beams >= 1, "must be >= 1"),
            ("length_penalty", math.isfinite(self.length_penalty), "must be finite"),
            ("seed", isinstance(self.seed, int) and self.seed >= 0, "must be an int >= 0"),
        )
        for field, ok, requirement in checks:
            if not ok:
                raise ValueError(f"DecodingOptions.{field}={getattr(self, field)!r}: {requirement}")
