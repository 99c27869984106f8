"""What pretrain-captioner and finetune-captioner share: one CoCa training run from a job spec.

The two stages differ only in their `CaptionerJob`: where the weights start, which text is the
target (alt-text, or curated ground truth), the loss weights, what is frozen, and where the
tokenizer comes from (open_clip's BPE, the fitted one of the exported captioner fine-tuning
starts from, or one fitted now: `FittedVocabulary`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from data_pipeline.caption_tokenizer import save_tokenizer, train_captioner_tokenizer
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from data_pipeline.transforms import CaptionPairs
from models.captioner import CaptionerTraining, caption_loss, export_captioner, image_transform
from models.captioner_tokenizer import CaptionerTokenizer, context_length, fitted_tokenizer, open_clip_tokenizer
from train.config.execution import RuntimeConfig
from train.config.experiment import DataConfig
from train.config.training import OptimizerConfig, check_batch
from train.config.typed import ConfigError
from train.runtime.environment import launched_world_size
from train.runtime.processes import Runtime, seed_everything, start_runtime
from train.training.loop import train_steps
from train.training.optimization import build_optimizer, build_scheduler
from train.training.session import RunSettings, open_session, start_logs


TOKENIZER_DIR = "tokenizer"  # under the run directory: a FittedVocabulary's tokenizer, shared by the ranks


@dataclass(frozen=True)
class FittedVocabulary:
    """Fit the job's tokenizer before training: ``vocab_size`` tokens on the non-empty texts under
    ``sources`` of data.train, read with ``access`` (data_pipeline/caption_tokenizer.py)."""

    vocab_size: int
    sources: tuple[str, ...]
    access: GroundTruthAccess


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
        tokenizer: None for open_clip's BPE, a folder holding a fitted tokenizer (an exported
            captioner's), or a FittedVocabulary to fit one now.
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
    tokenizer: Path | FittedVocabulary | None
    steps: int
    global_batch_size: int
    micro_batch_size: int
    grad_clip: float | None
    gradient_checkpointing: bool
    optimizer: OptimizerConfig


def _reader(data: DataConfig, seed: int, job: CaptionerJob, rank: int, world: int, coca: Any,
            tok: CaptionerTokenizer) -> ShardReader:
    spec = SampleSpec(job.access, image=True, captions=(job.caption_source,))
    transform = CaptionPairs(image_transform(coca), tok, job.caption_source)
    try:
        return ShardReader(data.train, spec=spec, options=data.reader, batch_size=job.micro_batch_size,
                           seed=seed, rank=rank, world_size=world, transform=transform)
    except (NoShardsError, ValueError) as exc:
        raise ConfigError("data.train", f"{exc}. Run `recap make-toy-data` first or point data.train at your shards") from None


def _fit_texts(data: DataConfig, vocabulary: FittedVocabulary, counts: dict[str, int]) -> Iterator[str]:
    """The non-empty texts under ``vocabulary.sources`` of every sample of data.train, one pass;
    counts them per source into ``counts``. The reader is opened now (a ConfigError here, not
    from inside the tokenizer's training)."""
    spec = SampleSpec(vocabulary.access, image=False, optional_texts=vocabulary.sources)
    options = dataclasses.replace(data.reader, shuffle=False)  # fitting does not depend on the order
    try:
        reader = ShardReader(data.train, spec=spec, options=options, batch_size=64, seed=0, epochs=1, collate=list)
    except (NoShardsError, ValueError) as exc:
        raise ConfigError("data.train", f"{exc}. Run `recap make-toy-data` first or point data.train at your shards") from None

    def texts() -> Iterator[str]:
        for batch in reader:
            for sample in batch:
                for source in vocabulary.sources:
                    if sample[source].strip():
                        counts[source] = counts.get(source, 0) + 1
                        yield sample[source]

    return texts()


def _tokenizer(job: CaptionerJob, run_dir: Path, data: DataConfig, rt: Runtime,
               log: logging.Logger) -> CaptionerTokenizer:
    """The job's tokenizer. A FittedVocabulary is fitted by the main process into
    run_dir/TOKENIZER_DIR, then read by every rank; a resumed run fits it again, which gives the
    same tokenizer (fitting is deterministic and data.train is a resume key)."""
    context = context_length(job.architecture)
    if job.tokenizer is None:
        return open_clip_tokenizer(context)
    folder = job.tokenizer
    if isinstance(folder, FittedVocabulary):
        vocabulary, folder = folder, run_dir / TOKENIZER_DIR
        if rt.is_main:
            counts: dict[str, int] = {}
            fitted = train_captioner_tokenizer(_fit_texts(data, vocabulary, counts), vocabulary.vocab_size, context)
            if not counts:
                raise ConfigError("data.train", f"has no text under {list(vocabulary.sources)} to fit the captioner's "
                                  "tokenizer on")
            save_tokenizer(fitted, folder)
            unused = sum(token.startswith("<unused") for token in fitted.get_vocab())
            log.info("fitted a %d-token captioner tokenizer (%d unused) on %s texts, saved to %s", len(fitted), unused,
                     counts, folder)
        rt.barrier()
    return fitted_tokenizer(folder, context)


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
    tok = _tokenizer(job, settings.run_dir, data, rt, log)

    seed_everything(seed)
    coca = job.build()
    tok.check_model(coca)
    frozen = _freeze(coca, job)
    model = CaptionerTraining(coca, caption_loss(contrastive_weight=job.contrastive_weight,
                                                 caption_weight=job.caption_weight, pad_id=tok.ids.pad, rank=rt.rank,
                                                 world_size=rt.world_size), eot_id=tok.ids.eot)
    optimizer = build_optimizer(model.parameters(), job.optimizer)
    scheduler = build_scheduler(optimizer, job.optimizer, job.steps)
    model, optimizer = rt.prepare(model, optimizer)
    seed_everything(seed, rt.rank)
    reader = _reader(data, seed, job, rt.rank, rt.world_size, coca, tok)
    parts, resumed = open_session(settings, rt, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader)
    trainable = sum(p.numel() for p in coca.parameters() if p.requires_grad)
    log.info("%s: %s on %s (%d trainable, %d frozen parameters), %d process(es), %s, %s; target %s; %d-token %s "
             "tokenizer", settings.stage, job.model_name, data.train, trainable, frozen, rt.world_size, rt.device,
             rt.precision, job.caption_source, tok.vocab_size, "fitted" if tok.fitted else "open_clip BPE")

    schedule = settings.schedule(job.steps, accum, job.global_batch_size)
    result = train_steps(parts, schedule, lambda m, batch: m(*batch), desc=settings.stage)  # batch: (images, tokens)

    weights = rt.full_state_dict(model)  # collective under ZeRO-3; keys "coca.*"
    export = settings.run_dir / "captioner"
    if rt.is_main:
        final = job.build()
        final.load_state_dict({k.removeprefix("coca."): v for k, v in weights.items() if k.startswith("coca.")})
        export_captioner(final, job.architecture, export, job.model_name, tok)
    rt.barrier()
    return parts.finish({**result, "resumed": resumed, "processes": rt.world_size, "runtime": rt.name,
                         "filtered_samples": reader.filtered_counts(), "export": str(export),
                         "vocab_size": tok.vocab_size})


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
