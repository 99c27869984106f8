"""`recap pretrain-captioner`: CoCa on images and their alt-text, contrastive + captioning loss.

With captioner.fitted_vocab_size set (toy), it first fits the captioners' tokenizer on every text
they will train on: the alt-text of data.train and the curated ground-truth captions (gt_ssc,
gt_dsc) that finetune-captioner targets. Here rather than in a later stage, because fine-tuning
keeps the pretrained token embeddings, so the one vocabulary must cover both; and rather than in
train-tokenizer, which runs after recaptioning for the T5. The fit reads ground truth at the
fine-tune's CURATED_CAPTIONS access; the training reader still sees none.

Reads: seed, data.train, data.reader, captioner, pretrain_captioner, runtime, checkpoint,
resume, logger. Writes <run_dir>/captioner/ (open_clip formats, with the fitted tokenizer),
tokenizer/ (fitted), checkpoints/, metrics.jsonl.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from data_pipeline.ground_truth import GT_CAPTION_FIELDS, GroundTruthAccess
from data_pipeline.samples import JSON_PREFIX
from models.captioner import build_captioner, coca_config, with_vocab_size
from models.captioner_tokenizer import OPEN_CLIP_VOCAB_SIZE
from train.captioning.coca_training import CaptionerJob, FittedVocabulary, train_captioner
from train.config.experiment import ExperimentConfig
from train.config.models import CaptionerConfig
from train.config.typed import ConfigError
from train.outputs.run_logging import config_snapshot
from train.training.session import READER_TUNING_KEYS, RunSettings

STAGE = "pretrain_captioner"
RESUME_KEYS = ("seed", "data.train", "data.reader", "captioner", "pretrain_captioner", "runtime.kind",
               "runtime.zero_stage", "runtime.precision")
RESUME_IGNORE = ("pretrain_captioner.steps", *READER_TUNING_KEYS)


def _architecture(c: CaptionerConfig) -> dict[str, Any] | None:
    """captioner.architecture with the tokenizer's vocab_size (None: open_clip's built-in config)."""
    if c.architecture is None:
        return None
    try:
        return with_vocab_size(c.architecture, c.fitted_vocab_size or OPEN_CLIP_VOCAB_SIZE)
    except ValueError as exc:
        raise ConfigError("captioner.architecture", str(exc)) from None


def _build(c: CaptionerConfig) -> Any:
    try:
        return build_captioner(c.model_name, _architecture(c), c.pretrained)
    except FileNotFoundError as exc:
        raise ConfigError("captioner.pretrained", str(exc)) from None
    except ValueError as exc:
        raise ConfigError("captioner.architecture" if c.architecture else "captioner.model_name", str(exc)) from None


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    c, p = cfg.captioner, cfg.pretrain_captioner
    _build(c)  # fail on a bad architecture or a missing checkpoint before starting processes
    vocabulary = None
    if c.fitted_vocab_size is not None:
        texts = (p.caption_key, *(JSON_PREFIX + field for field in GT_CAPTION_FIELDS))
        vocabulary = FittedVocabulary(c.fitted_vocab_size, texts, GroundTruthAccess.CURATED_CAPTIONS)  # as finetuning
    job = CaptionerJob(
        section="pretrain_captioner", build=partial(_build, c),
        model_name=c.model_name, architecture=coca_config(c.model_name, _architecture(c)),
        caption_source=p.caption_key, access=GroundTruthAccess.NONE,  # training never sees ground truth
        contrastive_weight=p.contrastive_weight, caption_weight=p.caption_weight, freeze_image_tower=False,
        tokenizer=vocabulary,
        steps=p.steps, global_batch_size=p.global_batch_size, micro_batch_size=p.micro_batch_size,
        grad_clip=p.grad_clip, gradient_checkpointing=p.gradient_checkpointing, optimizer=p.optimizer)
    settings = RunSettings(run_dir, STAGE, cfg.run.name, cfg.checkpoint, cfg.resume, cfg.logger, config_snapshot(cfg),
                           RESUME_KEYS, RESUME_IGNORE)
    return train_captioner(job, settings, cfg.runtime, cfg.data, cfg.seed)
