"""Config sections every training stage shares: the optimizer, the steps and batch split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from train.config.typed import ConfigError


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then a constant or cosine schedule (per optimizer step).

    ``implementation``: torch's AdamW kernel. ``auto`` leaves the choice to torch (foreach on a GPU,
    the per-parameter for-loop on the CPU; torch never picks fused by itself); ``for_loop``,
    ``foreach`` (one kernel per op over all parameters) and ``fused`` (one kernel per step, on the
    GPU and, since torch 2.4, the CPU) name one. They compute the same update up to rounding.
    """

    name: Literal["adamw"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    implementation: Literal["auto", "for_loop", "foreach", "fused"] = "auto"  # GPU speed switch (docs/real-run.md)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True, kw_only=True)
class TrainingStageConfig:
    """What every training stage's section has: length, batch split, clipping, optimizer."""

    steps: int
    global_batch_size: int
    micro_batch_size: int
    grad_clip: float | None = 1.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")
        check_batch(self.global_batch_size, self.micro_batch_size)


def check_batch(global_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """Gradient-accumulation steps for a global batch; ConfigError when it does not divide."""
    if micro_batch < 1 or global_batch < 1:
        raise ConfigError("global_batch_size", "global_batch_size and micro_batch_size must be >= 1")
    per_step = world_size * micro_batch
    if global_batch % per_step:
        raise ConfigError(
            "global_batch_size",
            f"{global_batch} is not divisible by world_size ({world_size}) x micro_batch_size "
            f"({micro_batch}) = {per_step}; set global_batch_size to a multiple of {per_step} "
            "or change micro_batch_size",
        )
    return global_batch // per_step


@dataclass(frozen=True, kw_only=True)
class TrainVaeConfig(TrainingStageConfig):
    """`recap train-vae`: reconstruction + KL on random crops of the training images, then the
    reconstruction PSNR of ``heldout_images`` held-out images (data.heldout) at ``resolution``."""

    resolution: int
    kl_weight: float = 1e-6
    reconstruction_loss: Literal["l1", "mse"] = "l1"  # mse: what PSNR measures; learns the toy scenes faster
    sample_posterior: bool = True  # false: decode the posterior mean (train-t2i's latent); toy colours learn faster
    object_weight: float = 0.0  # > 0: pixels far from their image's median colour weigh more (models/vae.py)
    heldout_images: int = 64  # held-out images whose reconstruction PSNR is measured at the end; 0: none

    def validate(self) -> None:
        super().validate()
        if self.resolution < 1:  # a multiple of the VAE's factor: checked by ExperimentConfig.validate
            raise ConfigError("resolution", f"must be >= 1 pixel, got {self.resolution}")
        if self.object_weight < 0:
            raise ConfigError("object_weight", f"must be >= 0, got {self.object_weight}")
        if self.heldout_images < 0:
            raise ConfigError("heldout_images", f"must be >= 0 (0: no held-out measure), got {self.heldout_images}")


@dataclass(frozen=True, kw_only=True)
class PretrainCaptionerConfig(TrainingStageConfig):
    """`recap pretrain-captioner`: CoCaLoss (contrastive + captioning) on images and alt-text."""

    caption_key: str = "txt"  # the text member trained on (the alt-text)
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        super().validate()
        if self.contrastive_weight < 0 or self.caption_weight <= 0:
            raise ConfigError("caption_weight", "caption_weight must be > 0 and contrastive_weight >= 0")


@dataclass(frozen=True, kw_only=True)
class FinetuneCaptionerConfig(TrainingStageConfig):
    """`recap finetune-captioner style=ssc|dsc`: the captioning loss on curated ground truth (and
    CoCa's contrastive loss against the same captions when ``contrastive_weight`` > 0)."""

    style: Literal["ssc", "dsc"]
    init_from: str  # an exported captioner directory, or an open_clip checkpoint of captioner.model_name
    freeze_image_tower: bool = True
    caption_weight: float = 1.0
    contrastive_weight: float = 0.0  # 0: captioning loss only (the paper's fine-tune)
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        super().validate()
        if self.caption_weight <= 0:
            raise ConfigError("caption_weight", f"must be > 0, got {self.caption_weight}")
        if self.contrastive_weight < 0:
            raise ConfigError("contrastive_weight", f"must be >= 0, got {self.contrastive_weight}")
