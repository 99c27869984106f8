"""`recap pretrain-captioner`: CoCa on images and their alt-text, contrastive + captioning loss.

Reads: seed, data.train, data.reader, captioner, pretrain_captioner, runtime, checkpoint,
resume, logger. Writes <run_dir>/captioner/ (open_clip formats), checkpoints/, metrics.jsonl.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from data_pipeline.ground_truth import GroundTruthAccess
from models.captioner import build_captioner, coca_config
from train.captioning.coca_training import CaptionerJob, train_captioner
from train.config.experiment import ExperimentConfig
from train.config.models import CaptionerConfig
from train.config.typed import ConfigError
from train.outputs.run_logging import config_snapshot
from train.training.session import READER_TUNING_KEYS, RunSettings

STAGE = "pretrain_captioner"
RESUME_KEYS = ("seed", "data.train", "data.reader", "captioner", "pretrain_captioner", "runtime.kind",
               "runtime.zero_stage", "runtime.precision")
RESUME_IGNORE = ("pretrain_captioner.steps", *READER_TUNING_KEYS)


def _build(c: CaptionerConfig) -> Any:
    try:
        return build_captioner(c.model_name, c.architecture, c.pretrained)
    except FileNotFoundError as exc:
        raise ConfigError("captioner.pretrained", str(exc)) from None
    except ValueError as exc:
        raise ConfigError("captioner.architecture" if c.architecture else "captioner.model_name", str(exc)) from None


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    c, p = cfg.captioner, cfg.pretrain_captioner
    _build(c)  # fail on a bad architecture or a missing checkpoint before starting processes
    job = CaptionerJob(
        section="pretrain_captioner", build=partial(_build, c),
        model_name=c.model_name, architecture=coca_config(c.model_name, c.architecture),
        caption_source=p.caption_key, access=GroundTruthAccess.NONE,  # training never sees ground truth
        contrastive_weight=p.contrastive_weight, caption_weight=p.caption_weight, freeze_image_tower=False,
        steps=p.steps, global_batch_size=p.global_batch_size, micro_batch_size=p.micro_batch_size,
        grad_clip=p.grad_clip, gradient_checkpointing=p.gradient_checkpointing, optimizer=p.optimizer)
    settings = RunSettings(run_dir, STAGE, cfg.run.name, cfg.checkpoint, cfg.resume, cfg.logger, config_snapshot(cfg),
                           RESUME_KEYS, RESUME_IGNORE)
    return train_captioner(job, settings, cfg.runtime, cfg.data, cfg.seed)
