"""The schema of a composed experiment config (conf/recap.yaml + groups + experiment).

Every key in conf/ has a field here and every field is read by a stage or a model builder;
`train.config.typed.build` rejects unknown keys, wrong types and inconsistent values with the key's
full path and the fix. Below the entry points, code takes these dataclasses, never the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.options import ReaderOptions, ToyDataOptions
from train.config.captioning import CaptionConfig, EvaluateCaptionerConfig, RecaptionConfig, TrainTokenizerConfig
from train.config.evaluation import EvaluateConfig, TrainEvalClipConfig
from train.config.execution import CheckpointConfig, LauncherConfig, LoggerConfig, ResumeConfig, RuntimeConfig
from train.config.models import (CaptionerConfig, DiffusionConfig, TextEncoderConfig, UnetConfig,
                                 VaeConfig)
from train.config.sampling import PipelineConfig, SampleConfig, SweepReportConfig
from train.config.t2i import CacheConfig, CaptionMixConfig, TrainT2IConfig
from train.config.training import FinetuneCaptionerConfig, PretrainCaptionerConfig, TrainVaeConfig
from train.config.typed import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives: stage outputs go to ``<root>/<name>/<stage>``."""

    name: str  # one folder name (no '/', not '.' or '..'), checked before any work (exit 2)
    root: str = "runs"  # created when missing; must be writable (checked before any work: exit 2)

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    def validate(self) -> None:
        # run.name=../../etc wrote outside run.root; an empty name wrote into the root itself.
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ConfigError("name", f"must be one folder name under run.root (no '/', not '.' or '..'), got "
                              f"'{self.name}'")
        if not self.root:
            raise ConfigError("root", "must be a directory path (default: runs)")


@dataclass(frozen=True)
class DataConfig:
    """Shards: a directory of .tar files, a brace pattern, a `pipe:` command or a URL."""

    train: str
    heldout: str
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    toy: ToyDataOptions | None = None  # set when the data is the generated synthetic scenes


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole composed config; each stage reads the sections it needs."""

    run: RunConfig
    seed: int
    data: DataConfig
    captioner: CaptionerConfig
    text_encoder: TextEncoderConfig
    vae: VaeConfig
    unet: UnetConfig
    diffusion: DiffusionConfig
    runtime: RuntimeConfig
    logger: LoggerConfig
    launcher: LauncherConfig
    checkpoint: CheckpointConfig
    resume: ResumeConfig
    train_vae: TrainVaeConfig
    pretrain_captioner: PretrainCaptionerConfig
    finetune_captioner: FinetuneCaptionerConfig
    caption: CaptionConfig
    evaluate_captioner: EvaluateCaptionerConfig
    recaption: RecaptionConfig
    train_tokenizer: TrainTokenizerConfig
    caption_mix: CaptionMixConfig
    cache: CacheConfig
    train_t2i: TrainT2IConfig
    sample: SampleConfig
    pipeline: PipelineConfig
    sweep_report: SweepReportConfig
    train_eval_clip: TrainEvalClipConfig
    evaluate: EvaluateConfig

    def validate(self) -> None:
        # Caught here, before `recap` starts torchrun, rather than in every worker (train/runtime/processes.py).
        world = self.launcher.nproc_per_node * self.launcher.nnodes
        if self.runtime.kind == "single" and world > 1:
            raise ConfigError(
                "runtime",
                f"runtime=single runs one process but the launcher starts {world} (launcher.nproc_per_node x "
                "launcher.nnodes); use runtime=ddp or zero1/2/3, or launcher=local",
            )
        self._check_image_sizes()

    def _check_image_sizes(self) -> None:
        """Training sizes the latents must divide: train-vae's crops by the VAE's factor f, and
        train-t2i's bucket sides by f times the UNet's downsampling (each UNet level halves the
        latents). Sampling sizes are checked against the exported pipeline's own parts
        (RecapPipeline.check_size). The VAE train-t2i loads is checked again by train-t2i."""
        f, unet = self.vae.downsampling_factor, self.unet.downsampling_factor
        if self.train_vae.resolution % f:
            raise ConfigError("train_vae.resolution", f"{self.train_vae.resolution} is not a multiple of the VAE's "
                              f"downsampling factor {f} (vae.block_out_channels has {len(self.vae.block_out_channels)} "
                              f"levels); use e.g. {max(f, round(self.train_vae.resolution / f) * f)}")
        step, multiple = self.train_t2i.buckets.step, f * unet
        if step % multiple:
            raise ConfigError("train_t2i.buckets.step", f"{step} is not a multiple of {multiple} (the VAE's {f}x times "
                              f"the UNet's {unet}x downsampling: every bucket side must give whole latents at the "
                              f"UNet's lowest level); use e.g. {max(multiple, round(step / multiple) * multiple)}")
