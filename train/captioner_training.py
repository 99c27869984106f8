"""What pretrain-captioner and finetune-captioner share: one CoCa training run from a job spec.

The two stages differ only in their `CaptionerJob`: where the weights start, which text is the
target (alt-text, or curated ground truth), the loss weights and what is frozen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from data_pipeline.transforms import CaptionPairs
from models.captioner import CaptionerTraining, caption_loss, export_captioner, image_transform, tokenizer
from train.config_schema import ExperimentConfig, OptimizerConfig, check_batch
from train.loop import Schedule, resume_parts, train_steps
from train.optimization import build_optimizer, build_scheduler
from train.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.runtime import seed_everything, start_runtime
from train.typed_config import ConfigError


@dataclass(frozen=True)
class CaptionerJob:
    """One captioner training run.

    Attributes:
        stage: stage name for logs and metrics ("pretrain_captioner").
        section: the config section the job came from (for messages and the resume keys).
        build: () -> CoCa with its starting weights (called after seeding, identical on all ranks).
        model_name / architecture: how to describe the model when exporting it.
        caption_source: the text trained on: a member ("txt") or a metadata field ("json.gt_dsc").
        access: what ground truth the reader may expose (NONE, or CURATED_CAPTIONS).
        contrastive_weight / caption_weight: CoCaLoss weights.
        freeze_image_tower: keep the visual tower fixed (fine-tuning).
        steps, global_batch_size, micro_batch_size, grad_clip, gradient_checkpointing, optimizer:
            the section's training settings.
    """

    stage: str
    section: str
    build: Any
    model_name: str
    architecture: dict[str, Any]
    caption_source: str
    access: GroundTruthAccess
    contrastive_weight: float
    caption_weight: float
    freeze_image_tower: bool
    steps: int
    global_batch_size: int
    micro_batch_size: int
    grad_clip: float | None
    gradient_checkpointing: bool
    optimizer: OptimizerConfig


def _reader(cfg: ExperimentConfig, job: CaptionerJob, rank: int, world: int, coca: Any) -> ShardReader:
    spec = SampleSpec(job.access, image=True, captions=(job.caption_source,))
    transform = CaptionPairs(image_transform(coca), tokenizer(coca), job.caption_source)
    try:
        return ShardReader(cfg.data.train, spec=spec, options=cfg.data.reader, batch_size=job.micro_batch_size,
                           seed=cfg.seed, rank=rank, world_size=world, transform=transform)
    except (NoShardsError, ValueError) as exc:
        raise ConfigError("data.train", f"{exc}. Run `recap make-toy-data` first or point data.train at your shards") from None


def contrastive_only_parameters(coca: open_clip.CoCa) -> list[torch.nn.Parameter]:
    """Parameters that only feed the contrastive loss (the pooled text and image projections,
    the logit scale/bias). With contrastive weight 0 they get no gradient, and DDP requires every trained
    parameter to get one, so fine-tuning freezes them."""
    params = [coca.text.cls_emb, coca.logit_scale, coca.logit_bias, coca.visual.proj, *coca.text.ln_final.parameters()]
    projection = coca.text.text_projection  # a Parameter or an nn.Linear, depending on the config
    params += list(projection.parameters()) if isinstance(projection, torch.nn.Module) else [projection]
    return [p for p in params if isinstance(p, torch.nn.Parameter)]


def train_captioner(cfg: ExperimentConfig, run_dir: Path, job: CaptionerJob,
                    resume_keys: tuple[str, ...], resume_ignore: tuple[str, ...]) -> dict[str, Any]:
    """Train per ``job``, checkpoint, export to ``run_dir/captioner`` (open_clip formats)."""
    accum = check_batch(job.global_batch_size, job.micro_batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    rt = start_runtime(cfg.runtime, micro_batch_size=job.micro_batch_size, grad_accum=accum, grad_clip=job.grad_clip)
    log = setup_logging(run_dir, job.stage, rt.rank)
    if rt.is_main:
        write_config_snapshot(run_dir, cfg)

    seed_everything(cfg.seed)
    coca = job.build()
    coca.set_grad_checkpointing(job.gradient_checkpointing)
    frozen = 0
    if job.freeze_image_tower:
        frozen += sum(p.numel() for p in coca.visual.parameters())
        coca.visual.requires_grad_(False)
    if job.contrastive_weight == 0:
        for param in contrastive_only_parameters(coca):
            param.requires_grad_(False)
    model = CaptionerTraining(coca, caption_loss(contrastive_weight=job.contrastive_weight,
                                                 caption_weight=job.caption_weight, rank=rt.rank,
                                                 world_size=rt.world_size))
    optimizer = build_optimizer(model.parameters(), job.optimizer)
    scheduler = build_scheduler(optimizer, job.optimizer, job.steps)
    model, optimizer = rt.prepare(model, optimizer)
    seed_everything(cfg.seed, rt.rank)
    reader = _reader(cfg, job, rt.rank, rt.world_size, coca)
    parts, resumed = resume_parts(cfg, run_dir, rt, job.stage, model=model, optimizer=optimizer,
                                  scheduler=scheduler, reader=reader, resume_keys=resume_keys,
                                  resume_ignore=resume_ignore)
    trainable = sum(p.numel() for p in coca.parameters() if p.requires_grad)
    log.info("%s: %s on %s (%d trainable, %d frozen parameters), %d process(es), %s, %s; target %s", job.stage,
             job.model_name, cfg.data.train, trainable, frozen, rt.world_size, rt.device, rt.precision,
             job.caption_source)

    schedule = Schedule(steps=job.steps, accum=accum, global_batch=job.global_batch_size,
                        checkpoint_every=cfg.checkpoint.every_steps, log_every=cfg.logger.log_every_steps,
                        show_progress=cfg.logger.progress)
    result = train_steps(parts, schedule, lambda m, batch: m(*batch), desc=job.stage)  # batch: (images, tokens)

    weights = rt.full_state_dict(model)  # collective under ZeRO-3; keys "coca.*"
    export = run_dir / "captioner"
    if rt.is_main:
        final = job.build()
        final.load_state_dict({k.removeprefix("coca."): v for k, v in weights.items() if k.startswith("coca.")})
        export_captioner(final, job.architecture, export, job.model_name)
    rt.barrier()
    summary = {**result, "resumed": resumed, "processes": rt.world_size, "runtime": rt.name,
               "filtered_samples": reader.filtered_counts(), "export": str(export)}
    parts.metrics.close(summary)
    if rt.is_main:
        finish_stage(run_dir, job.stage.replace("_", "-"), summary)
    rt.close()
    return summary
