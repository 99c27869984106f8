"""`recap finetune-captioner style=ssc|dsc`: turn the pretrained CoCa into the SSC or DSC captioner.

The captioning loss (with finetune_captioner.contrastive_weight > 0, CoCa's contrastive loss
against the same captions too; 0 by default, as in the paper), on the ground-truth short (gt_ssc) or descriptive
(gt_dsc) captions of *curated* samples only: the reader runs with CURATED_CAPTIONS access, so
every other sample's ground truth is dropped in the worker and the sample filtered out. The
image tower is frozen by default, so SSC and DSC differ only in their text heads.

Reads: seed, data.train, data.reader, captioner, finetune_captioner, runtime, checkpoint,
resume, logger. Writes <run_dir>/<style>/captioner/ (open_clip formats, with the fitted tokenizer
of the captioner it starts from, if it has one), checkpoints/, metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.ground_truth import GroundTruthAccess
from models.captioner import build_captioner, coca_config, load_exported
from train.captioning.coca_training import CaptionerJob, train_captioner
from train.config.experiment import ExperimentConfig
from train.config.models import CaptionerConfig
from train.config.typed import ConfigError
from train.outputs.run_logging import config_snapshot
from train.training.session import READER_TUNING_KEYS, RunSettings

RESUME_KEYS = ("seed", "data.train", "data.reader", "captioner", "finetune_captioner", "runtime.kind",
               "runtime.zero_stage", "runtime.precision")
RESUME_IGNORE = ("finetune_captioner.steps", *READER_TUNING_KEYS)


def _starting_point(c: CaptionerConfig, init_from: str) -> tuple[Any, dict[str, Any], Path | None]:
    """(build function, architecture, fitted tokenizer folder or None) from finetune_captioner.init_from:
    an exported captioner directory (pretrain-captioner's output, with its tokenizer) or an
    open_clip checkpoint of captioner.model_name (open_clip's BPE)."""
    source = Path(init_from)
    if source.is_dir():
        import json

        from models.captioner import CONFIG_FILE

        if not (source / CONFIG_FILE).is_file():
            raise ConfigError("finetune_captioner.init_from", f"{source} is not an exported captioner (no {CONFIG_FILE})")
        config = json.loads((source / CONFIG_FILE).read_text())["model_cfg"]
        fitted = source if config["text_cfg"].get("hf_tokenizer_name") else None
        return (lambda: load_exported(source).train()), config, fitted
    if source.is_file():
        if c.fitted_vocab_size is not None:
            raise ConfigError("finetune_captioner.init_from", f"{source} is a checkpoint file, but with "
                              "captioner.fitted_vocab_size the captioner's tokenizer is in its exported folder: point "
                              "init_from at pretrain-captioner's captioner/ directory")
        return ((lambda: build_captioner(c.model_name, c.architecture, str(source))),
                coca_config(c.model_name, c.architecture), None)
    raise ConfigError("finetune_captioner.init_from", f"{source} does not exist; run `recap pretrain-captioner` first "
                      "or point it at an open_clip CoCa checkpoint")


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    f = cfg.finetune_captioner
    build, architecture, tokenizer = _starting_point(cfg.captioner, f.init_from)
    job = CaptionerJob(
        section="finetune_captioner", build=build,
        model_name=cfg.captioner.model_name, architecture={k: v for k, v in architecture.items() if k != "custom_text"},
        caption_source=f"json.gt_{f.style}", access=GroundTruthAccess.CURATED_CAPTIONS,
        contrastive_weight=f.contrastive_weight, caption_weight=f.caption_weight, freeze_image_tower=f.freeze_image_tower,
        tokenizer=tokenizer,
        steps=f.steps, global_batch_size=f.global_batch_size, micro_batch_size=f.micro_batch_size,
        grad_clip=f.grad_clip, gradient_checkpointing=f.gradient_checkpointing, optimizer=f.optimizer)
    settings = RunSettings(run_dir / f.style, f"finetune_captioner_{f.style}", cfg.run.name, cfg.checkpoint,
                           cfg.resume, cfg.logger, config_snapshot(cfg), RESUME_KEYS, RESUME_IGNORE)
    return train_captioner(job, settings, cfg.runtime, cfg.data, cfg.seed)
