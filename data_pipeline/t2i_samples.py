"""Text-to-image training samples: an image fitted to its aspect bucket plus one tokenized caption.

`FitToBucket` runs in the reader's workers: it picks the sample's bucket in the current stage's
table (nearest in log-aspect), resizes to cover and crops (seeded by the sample, so a resumed or
re-sharded run crops the same way), draws the caption key from the caption mix and tokenizes it.
Pixels travel as uint8. `collate_bucket` makes the batch of one bucket in the main process,
re-fitting any sample that was queued under a neighbouring bucket (data_pipeline/bucket_batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.aspect_buckets import Bucket, fit, nearest_bucket, place
from data_pipeline.caption_mix import CaptionMix, caption_member


def caption_members(mix: CaptionMix) -> tuple[str, ...]:
    """The tar members a mix may read (``txt``, ``dsc.txt`` ...), for the reader's SampleSpec."""
    return tuple(caption_member(key) for key in mix.weights)


@dataclass
class FitToBucket:
    """sample dict (reader) -> training item, or None when no caption of the mix is usable.

    The item: ``pixels`` uint8 (3, H, W) at its bucket's size, ``bucket`` (index in ``table``),
    ``crop`` (top, left) and ``size`` (original width, height) in pixels, ``ids`` the caption's
    token ids (ending in </s>, at most ``max_tokens``), ``drawn``/``used`` caption keys, ``seed``.
    """

    table: Sequence[Bucket]
    mix: CaptionMix
    tokenizer: Any  # a Hugging Face tokenizer (T5's, or the toy one)
    max_tokens: int
    random_crop: bool = True

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        texts = {key: sample.get(caption_member(key)) for key in self.mix.weights}
        choice = self.mix.choose(texts, sample["seed"])
        if choice is None:
            return None
        drawn, used, caption = choice
        image: Image.Image = sample["image"]
        bucket = nearest_bucket(image.width, image.height, self.table)
        placement = place(image.width, image.height, self.table[bucket],
                          seed=sample["seed"] if self.random_crop else None)
        ids = self.tokenizer(caption, truncation=True, max_length=self.max_tokens)["input_ids"]
        return {"pixels": to_uint8_chw(fit(image, placement)), "bucket": bucket,
                "crop": (placement.top, placement.left), "size": placement.original, "ids": list(ids),
                "drawn": drawn, "used": used, "seed": sample["seed"]}


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def refit(pixels: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """uint8 (3, h, w) resized to cover ``bucket`` and centre-cropped to it (3, H, W); unchanged
    when it already has the bucket's size."""
    if pixels.shape[1:] == (bucket.height, bucket.width):
        return pixels
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return to_uint8_chw(fit(image, place(image.width, image.height, bucket)))


def pad_token_ids(ids: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest: (input_ids (B, T) int64, mask (B, T) bool)."""
    longest = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.bool)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return input_ids, mask


def collate_bucket(items: Sequence[dict[str, Any]], bucket: Bucket) -> dict[str, Any]:
    """One bucket's batch: ``pixels`` uint8 (B, 3, H, W), ``input_ids``/``mask`` (B, T),
    ``seeds`` int64 (B,), ``crops`` int64 (B, 2) as (top, left), ``used`` caption keys."""
    input_ids, mask = pad_token_ids([item["ids"] for item in items])
    return {"pixels": torch.stack([refit(item["pixels"], bucket) for item in items]),
            "input_ids": input_ids, "mask": mask,
            "seeds": torch.tensor([item["seed"] for item in items], dtype=torch.long),
            "crops": torch.tensor([item["crop"] for item in items], dtype=torch.long),
            "used": [item["used"] for item in items]}
