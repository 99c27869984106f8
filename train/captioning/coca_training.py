"""What pretrain-captioner and finetune-captioner share: one CoCa training run from a job spec.

The two stages differ only in their `CaptionerJob`: where the weights start, which text is the
target (alt-text, or curated ground truth), the loss weights and what is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import open_clip
import torch

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from data_pipeline.transforms import CaptionPairs
from models.captioner import CaptionerTraining, caption_loss, export_captioner, image_transform, tokenizer
from train.config.execution import RuntimeConfig
from train.config.experiment import DataConfig
from train.config.training import OptimizerConfig, check_batch
from train.config.typed import ConfigError
from train.runtime.environment import launched_world_size
from train.runtime.processes import seed_everything, start_runtime
from train.training.loop import train_steps
from train.training.optimization import build_optimizer, build_scheduler
from train.training.session import RunSettings, open_session, start_logs


@dataclass(frozen=True)
class CaptionerJob:
    """One captioner training run.

    Attributes:
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


def _reader(data: DataConfig, seed: int, job: CaptionerJob, rank: int, world: int, coca: Any) -> ShardReader:
    spec = SampleSpec(job.access, image=True, captions=(job.caption_source,))
    transform = CaptionPairs(image_transform(coca), tokenizer(coca), job.caption_source)
    try:
        return ShardReader(data.train, spec=spec, options=data.reader, batch_size=job.micro_batch_size,
                           seed=seed, rank=rank, world_size=world, transform=transform)
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


def train_captioner(job: CaptionerJob, settings: RunSettings, runtime: RuntimeConfig, data: DataConfig,
                    seed: int) -> dict[str, Any]:
    """Train per ``job`` on ``data.train``, checkpoint, export to ``settings.run_dir/captioner``
    (open_clip formats); returns the summary."""
    accum = check_batch(job.global_batch_size, job.micro_batch_size, launched_world_size())
    rt = start_runtime(runtime, micro_batch_size=job.micro_batch_size, grad_accum=accum, grad_clip=job.grad_clip)
    log = start_logs(settings, rt)

    seed_everything(seed)
    coca = job.build()
    frozen = _freeze(coca, job)
    model = CaptionerTraining(coca, caption_loss(contrastive_weight=job.contrastive_weight,
                                                 caption_weight=job.caption_weight, rank=rt.rank,
                                                 world_size=rt.world_size))
    optimizer = build_optimizer(model.parameters(), job.optimizer)
    scheduler = build_scheduler(optimizer, job.optimizer, job.steps)
    model, optimizer = rt.prepare(model, optimizer)
    seed_everything(seed, rt.rank)
    reader = _reader(data, seed, job, rt.rank, rt.world_size, coca)
    parts, resumed = open_session(settings, rt, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader)
    trainable = sum(p.numel() for p in coca.parameters() if p.requires_grad)
    log.info("%s: %s on %s (%d trainable, %d frozen parameters), %d process(es), %s, %s; target %s", settings.stage,
             job.model_name, data.train, trainable, frozen, rt.world_size, rt.device, rt.precision,
             job.caption_source)

    schedule = settings.schedule(job.steps, accum, job.global_batch_size)
    result = train_steps(parts, schedule, lambda m, batch: m(*batch), desc=settings.stage)  # batch: (images, tokens)

    weights = rt.full_state_dict(model)  # collective under ZeRO-3; keys "coca.*"
    export = settings.run_dir / "captioner"
    if rt.is_main:
        final = job.build()
        final.load_state_dict({k.removeprefix("coca."): v for k, v in weights.items() if k.startswith("coca.")})
        export_captioner(final, job.architecture, export, job.model_name)
    rt.barrier()
    return parts.finish({**result, "resumed": resumed, "processes": rt.world_size, "runtime": rt.name,
                         "filtered_samples": reader.filtered_counts(), "export": str(export)})


def _freeze(coca: open_clip.CoCa, job: CaptionerJob) -> int:
    """Gradient checkpointing and what ``job`` keeps fixed; returns the frozen image-tower size
    (parameters, for the log)."""
    coca.set_grad_checkpointing(job.gradient_checkpointing)
    frozen = 0
    if job.freeze_image_tower:
        frozen += sum(p.numel() for p in coca.visual.parameters())
        coca.visual.requires_grad_(False)
    if job.contrastive_weight == 0:
        for param in contrastive_only_parameters(coca):
            param.requires_grad_(False)
    return frozen
