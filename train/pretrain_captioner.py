"""`recap pretrain-captioner`: CoCa on images and their alt-text, contrastive + captioning loss.

Reads: seed, data.train, data.reader, captioner, pretrain_captioner, runtime, checkpoint,
resume, logger. Writes <run_dir>/captioner/ (open_clip formats), checkpoints/, metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.ground_truth import GroundTruthAccess
from models.captioner import build_captioner, coca_config
from train.captioner_training import CaptionerJob, train_captioner
from train.config_schema import ExperimentConfig
from train.typed_config import ConfigError

RESUME_KEYS = ("seed", "data.train", "data.reader", "captioner", "pretrain_captioner", "runtime.kind",
               "runtime.zero_stage", "runtime.precision")
RESUME_IGNORE = ("pretrain_captioner.steps", "data.reader.prefetch_factor", "data.reader.strict",
                 "data.reader.max_fault_fraction", "data.reader.fault_check_after")


def _build(cfg: ExperimentConfig) -> Any:
    c = cfg.captioner
    try:
        return build_captioner(c.model_name, c.architecture, c.pretrained)
    except FileNotFoundError as exc:
        raise ConfigError("captioner.pretrained", str(exc)) from None
    except ValueError as exc:
        raise ConfigError("captioner.architecture" if c.architecture else "captioner.model_name", str(exc)) from None


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    c, p = cfg.captioner, cfg.pretrain_captioner
    _build(cfg)  # fail on a bad architecture or a missing checkpoint before starting processes
    job = CaptionerJob(
        stage="pretrain_captioner", section="pretrain_captioner",
        build=lambda: _build(cfg),
        model_name=c.model_name, architecture=coca_config(c.model_name, c.architecture),
        caption_source=p.caption_key, access=GroundTruthAccess.NONE,  # training never sees ground truth
        contrastive_weight=p.contrastive_weight, caption_weight=p.caption_weight, freeze_image_tower=False,
        steps=p.steps, global_batch_size=p.global_batch_size, micro_batch_size=p.micro_batch_size,
        grad_clip=p.grad_clip, gradient_checkpointing=p.gradient_checkpointing, optimizer=p.optimizer)
    return train_captioner(cfg, run_dir, job, RESUME_KEYS, RESUME_IGNORE)
