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

    name: str
    root: str = "runs"

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


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
