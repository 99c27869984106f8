"""Config sections of stage 3: caption mix, resolution stages, buckets, samples, train_t2i, cache.

Part of the schema; train/config/experiment.py composes the sections into ExperimentConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from train.config.training import OptimizerConfig, check_batch
from train.config.typed import ConfigError


@dataclass(frozen=True)
class CaptionMixConfig:
    """Which caption each diffusion sample trains on: ``dsc`` and ``ssc`` fractions, the rest the
    alt-text (``txt``), as the recipe's sweep varies it (``caption_mix.dsc=0.65,0.8,0.9,0.95``).
    ``fallback``: keys tried in order when the drawn one is missing or empty for a sample."""

    dsc: float = 0.95
    ssc: float = 0.0
    fallback: list[str] = field(default_factory=lambda: ["dsc", "ssc", "txt"])

    @property
    def weights(self) -> dict[str, float]:
        return {"dsc": self.dsc, "ssc": self.ssc, "txt": max(0.0, round(1.0 - self.dsc - self.ssc, 12))}

    def validate(self) -> None:
        if not (0.0 <= self.dsc <= 1.0 and 0.0 <= self.ssc <= 1.0) or self.dsc + self.ssc > 1.0 + 1e-9:
            raise ConfigError("dsc", f"dsc and ssc must be fractions with dsc + ssc <= 1 (the rest is alt-text), "
                              f"got dsc={self.dsc}, ssc={self.ssc}")
        unknown = [k for k in self.fallback if k not in ("dsc", "ssc", "txt")]
        if unknown:
            raise ConfigError("fallback", f"unknown caption key(s) {unknown}; keys: dsc, ssc, txt")


@dataclass(frozen=True)
class ResolutionStageConfig:
    """One progressive-resolution stage (train/t2i/resolution_schedule.py). ``lr`` null: the
    optimizer's lr."""

    resolution: int
    steps: int
    global_batch_size: int
    micro_batch_size: int
    lr: float | None = None

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("lr", f"must be > 0 or null, got {self.lr}")
        check_batch(self.global_batch_size, self.micro_batch_size)


@dataclass(frozen=True)
class BucketConfig:
    """Multi-aspect buckets (data_pipeline/aspect_buckets.py): sides are multiples of ``step``
    pixels (itself a multiple of the VAE's factor times the UNet's downsampling, checked by
    ExperimentConfig.validate), aspect ratios within 1:max_aspect..max_aspect:1;
    ``queue_batches`` read-ahead batches per bucket and rank; ``random_crop`` (else centred)."""

    step: int = 64
    max_aspect: float = 4.0
    queue_batches: int = 2
    random_crop: bool = True

    def validate(self) -> None:
        if self.step < 1:
            raise ConfigError("step", f"must be >= 1 pixel, got {self.step}")
        if self.max_aspect < 1:
            raise ConfigError("max_aspect", f"must be >= 1, got {self.max_aspect}")
        if self.queue_batches < 1:
            raise ConfigError("queue_batches", f"must be >= 1, got {self.queue_batches}")


@dataclass(frozen=True)
class SamplingConfig:
    """Sample grids during training: every ``every_steps`` (null: only at the end), with the EMA
    weights when there are any."""

    prompts: list[str] = field(default_factory=list)
    every_steps: int | None = None
    steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0

    def validate(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError("every_steps", f"must be >= 1 or null, got {self.every_steps}")
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class TrainT2IConfig:
    """`recap train-t2i`: the T5-conditioned latent diffusion UNet on recaptioned shards."""

    input: str  # shards with KEY.dsc.txt / KEY.ssc.txt (recaption's output) and alt-text KEY.txt
    vae: str  # a diffusers AutoencoderKL folder (train-vae's export, or a pretrained VAE)
    stages: list[ResolutionStageConfig]
    cache: str | None = None  # `recap cache` output: train from cached latents and T5 states instead
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.9999  # null: no EMA weights
    gradient_checkpointing: bool = False
    channels_last: bool = False  # GPU speed switch (docs/real-run.md): the UNet's weights and input in NHWC strides
    compile_unet: bool = False  # GPU speed switch: torch.compile (inductor) of the UNet, in place; off until measured
    nan_policy: Literal["fail", "skip"] = "fail"
    max_consecutive_skips: int = 3
    buckets: BucketConfig = field(default_factory=BucketConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # The training's own seed (initial weights, data order, noise and timesteps); null: the
    # experiment's `seed`. A sweep varies it for error bars without retraining the shared stages
    # (the T5, VAE and cache keep the experiment's seed): train_t2i.seed=0,1
    seed: int | None = None

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError("stages", "needs at least one resolution stage")
        for i, stage in enumerate(self.stages):
            if stage.resolution % self.buckets.step:
                raise ConfigError(f"stages[{i}].resolution", f"{stage.resolution} is not a multiple of "
                                  f"buckets.step={self.buckets.step}")
            if i and stage.resolution < self.stages[i - 1].resolution:
                raise ConfigError(f"stages[{i}].resolution", "progressive training only grows the resolution")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("ema_decay", f"must be in (0, 1) or null, got {self.ema_decay}")
        if self.max_consecutive_skips < 1:
            raise ConfigError("max_consecutive_skips", f"must be >= 1, got {self.max_consecutive_skips}")


@dataclass(frozen=True)
class CacheConfig:
    """`recap cache`: VAE latents (per resolution stage of train_t2i) and T5 states (per caption
    key) of every recaptioned sample, for train_t2i.cache."""

    input: str  # recaptioned shards
    output: str  # a directory; one cache shard per input shard
    keys: list[str] = field(default_factory=lambda: ["dsc", "ssc", "txt"])
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    batch_size: int = 32
    num_workers: int = 2
    rank: int | None = None  # null: from torchrun (RANK) or a Slurm array
    world_size: int | None = None

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("batch_size", "batch_size must be >= 1 and num_workers >= 0")
