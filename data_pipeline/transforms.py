"""Per-sample image transforms that run in reader workers (picklable, deterministic per sample).

Randomness comes only from ``sample["seed"]`` (see shard_reader), so a resumed or re-sharded
run crops exactly the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def random_square_crop(image: Image.Image, size: int, seed: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic, keeps aspect) and crop a ``size`` square at a
    position drawn from ``seed``."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    rng = np.random.default_rng(seed)
    x, y = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    return image.crop((x, y, x + size, y + size))


@dataclass(frozen=True)
class SquareCrops:
    """Reader transform: sample -> (3, size, size) tensor in [-1, 1] from a random square crop."""

    size: int

    def __call__(self, sample: dict[str, Any]) -> torch.Tensor:
        return to_tensor(random_square_crop(sample["image"], self.size, sample["seed"]))


@dataclass(frozen=True)
class CaptionPairs:
    """Reader transform for captioners: sample -> (image (3, S, S), token ids (context,)).

    ``image_transform`` is the model's preprocessing (a torchvision pipeline from open_clip)
    and ``tokenize`` its tokenizer (list of str -> (n, context) ids); both are passed in so
    this module stays free of model libraries. ``caption_source`` names the text: a member
    ("txt") or a metadata field ("json.gt_dsc"), as the reader's SampleSpec decoded it.
    """

    image_transform: Any
    tokenize: Any
    caption_source: str

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_transform(sample["image"]), self.tokenize([sample[self.caption_source]])[0]
