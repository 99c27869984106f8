"""Option dataclasses of the data pipeline (config nodes `data.reader` and `data.toy`).

Plain dataclasses with no dependencies, so the config schema can import them cheaply.
Validation raises ValueError naming the field; the config builder adds the full key.
"""

from __future__ import annotations

from dataclasses import dataclass

# PIL's own default limit (Image.MAX_IMAGE_PIXELS): about 9459 x 9459.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class ReaderOptions:
    """How shards are streamed. Everything else (rank, seed, batch size) is passed by the stage.

    Attributes:
        num_workers: DataLoader worker processes per rank (0 reads in the main process).
        open_shards: shards each reader stream interleaves at once; more gives a better shuffle.
        shuffle: shuffle shard order per (seed, epoch) and interleave open shards randomly.
        strict: raise on the first bad sample instead of skipping and counting it.
        max_fault_fraction: abort when more than this fraction of samples read were bad.
        fault_check_after: samples read before ``max_fault_fraction`` is enforced.
        prefetch_factor: batches each worker prepares ahead.
        max_image_pixels: an image whose header announces more pixels is skipped as
            image_too_large before it is decoded (a 20000x20000 JPEG is 6 MB on disk, 1.2 GB decoded).
    """

    num_workers: int = 2
    open_shards: int = 2
    shuffle: bool = True
    strict: bool = False
    max_fault_fraction: float = 0.2
    fault_check_after: int = 200
    prefetch_factor: int = 2
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def validate(self) -> None:
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.open_shards < 1:
            raise ValueError(f"open_shards must be >= 1, got {self.open_shards}")
        if not 0.0 <= self.max_fault_fraction <= 1.0:
            raise ValueError(f"max_fault_fraction must be in [0, 1], got {self.max_fault_fraction}")
        if self.fault_check_after < 1:
            raise ValueError(f"fault_check_after must be >= 1, got {self.fault_check_after}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")


@dataclass(frozen=True)
class ToyDataOptions:
    """The synthetic-scenes dataset written by `recap make-toy-data`.

    Attributes:
        train_shards / heldout_shards: number of shards per split (held-out is for evaluation).
        samples_per_shard: scenes per shard.
        curated_fraction: fraction of samples marked ``curated`` (the only ground truth that
            captioner fine-tuning may read).
        world: which toy world to draw (``data_pipeline.toy_scenes.WORLDS``): ``shapes`` (the
            demo's: 1-3 solid shapes on a 3x3 grid, small images) or ``full`` (1-4 shapes anywhere,
            textures, seven aspect ratios, up to 512 px; with words when text_probability > 0).
        text_probability: probability that a scene has a written word.
        seed: generation seed; sample i of the dataset depends only on (seed, split, i).
        jpeg_quality: JPEG quality of the written images (1-95).
        processes: generator processes (shards are spread over them).
    """

    train_shards: int = 8
    heldout_shards: int = 2
    samples_per_shard: int = 128
    curated_fraction: float = 0.05
    world: str = "shapes"
    text_probability: float = 0.0
    seed: int = 1234
    jpeg_quality: int = 90
    processes: int = 2

    def validate(self) -> None:
        from data_pipeline.toy_scenes import WORLDS  # options stay importable without PIL

        if self.world not in WORLDS:
            raise ValueError(f"world must be one of {sorted(WORLDS)}, got {self.world!r}")
        for name in ("train_shards", "heldout_shards", "samples_per_shard", "processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("curated_fraction", "text_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in [1, 95], got {self.jpeg_quality}")
