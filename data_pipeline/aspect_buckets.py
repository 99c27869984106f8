"""Multi-aspect buckets: a table of training sizes of about equal pixel area, the bucket of an
image (nearest in log-aspect), and the resize-to-cover + crop that puts it there.

No metadata pre-scan: a sample's bucket follows from its own width and height when it is read.
Every size is a multiple of ``step`` pixels (a multiple of the VAE's factor f times the UNet's
downsampling, so that every side gives whole latents at the UNet's lowest level: 64 by default,
8x times 8x), and no bucket holds more pixels than ``base**2``, so a batch of any bucket costs
at most what a square batch does. Crop offsets are returned so the trainer can record them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from data_pipeline.seeding import derive_seed


@dataclass(frozen=True, order=True)
class Bucket:
    """A training size in pixels."""

    width: int
    height: int

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def bucket_table(base: int, *, step: int = 64, max_aspect: float = 4.0) -> list[Bucket]:
    """Buckets for base resolution ``base`` (pixels), sorted from tallest to widest.

    For each width that is a multiple of ``step``, the tallest height (a multiple of ``step``)
    with width x height <= base**2; kept when the aspect ratio lies within
    [1/max_aspect, max_aspect]. Symmetric: (w, h) is in the table exactly when (h, w) is; the
    square (base, base) is in it when ``base`` is a multiple of ``step``.
    """
    if base < step or step < 1:
        raise ValueError(f"base resolution {base} must be >= step {step} >= 1")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1 (a ratio like 4 for 1:4..4:1), got {max_aspect}")
    area = base * base
    table = set()
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            table.add(Bucket(width, height))
    # Keep (w, h) only with its transpose: of widths sharing a height (384x128 and 512x128 at
    # base 256), only the one that height maximises survives, and portrait mirrors landscape.
    table = {b for b in table if Bucket(b.height, b.width) in table}
    return sorted(table, key=lambda b: (b.log_aspect, b.width))


def nearest_bucket(width: int, height: int, table: Sequence[Bucket]) -> int:
    """Index of the bucket nearest to a width x height image in log-aspect (ties: the first)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(range(len(table)), key=lambda i: abs(table[i].log_aspect - target))


@dataclass(frozen=True)
class Placement:
    """How an image was fitted into its bucket: resized to ``resized`` (width, height), then
    cropped at (``left``, ``top``) to the bucket's size. ``original`` is (width, height)."""

    bucket: Bucket
    original: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int


def place(width: int, height: int, bucket: Bucket, *, seed: int | None = None) -> Placement:
    """Resize-to-cover geometry: the smallest scale at which the image covers the bucket, then a
    crop of the bucket's size; centred, or uniform over the valid offsets when ``seed`` is given."""
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    spare_x, spare_y = resized[0] - bucket.width, resized[1] - bucket.height
    if seed is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = derive_seed(seed, 0) % (spare_x + 1), derive_seed(seed, 1) % (spare_y + 1)
    return Placement(bucket, (width, height), resized, left, top)


def fit(image: Image.Image, placement: Placement) -> Image.Image:
    """The image resized (bicubic, antialiased) and cropped as ``placement`` says."""
    resized = image.resize(placement.resized, Image.Resampling.BICUBIC)
    box = (placement.left, placement.top, placement.left + placement.bucket.width,
           placement.top + placement.bucket.height)
    return resized.crop(box)
