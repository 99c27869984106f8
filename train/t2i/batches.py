"""train-t2i's data side: the resolution plan, the caption mix, each stage's worker transform,
and the bucketed batches and what they report (a cache is checked in train/t2i/checks.py). Typed
config sections in, data_pipeline objects out (the flow of one sample: docs/train_t2i.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from data_pipeline.aspect_buckets import bucket_table
from data_pipeline.bucket_batches import BucketedBatches
from data_pipeline.caption_mix import CaptionMix
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.latent_cache import CACHE_MEMBER, FromCache, collate_cached
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from data_pipeline.t2i_samples import FitToBucket, caption_members, collate_bucket
from train.config.t2i import BucketConfig, CaptionMixConfig, TrainT2IConfig
from train.config.training import check_batch
from train.config.typed import ConfigError
from train.runtime.processes import Runtime
from train.t2i.resolution_schedule import PlannedStage, ResolutionPlan, ResolutionStage, check_schedule
from train.training.loop import Parts

log = logging.getLogger("recap")
MIX_NAMES = ("caption_mix/dsc", "caption_mix/ssc", "caption_mix/txt", "caption_mix/fallback", "caption_mix/dropped")


def resolution_stages(t: TrainT2IConfig) -> list[ResolutionStage]:
    """The configured stages, each stage's lr resolved (null: the optimizer's)."""
    stages = [ResolutionStage(s.resolution, s.steps, s.global_batch_size, s.micro_batch_size,
                              s.lr if s.lr is not None else t.optimizer.lr) for s in t.stages]
    try:
        check_schedule(stages, multiple=t.buckets.step)
    except ValueError as exc:
        raise ConfigError("train_t2i.stages", str(exc)) from None
    return stages


def accumulation(stages: list[ResolutionStage], world: int) -> list[int]:
    """Micro-batches per optimizer step and rank of each stage on ``world`` processes;
    ConfigError naming the stage whose global batch does not split."""
    out = []
    for i, s in enumerate(stages):
        try:
            out.append(check_batch(s.global_batch_size, s.micro_batch_size, world))
        except ConfigError as exc:
            raise exc.under(f"train_t2i.stages[{i}]") from None
    return out


def resolution_plan(t: TrainT2IConfig, world: int) -> ResolutionPlan:
    """The run's resolution stages and their accumulation on ``world`` processes."""
    stages = resolution_stages(t)
    return ResolutionPlan(tuple(stages), tuple(accumulation(stages, world)))


def caption_mix(m: CaptionMixConfig) -> CaptionMix:
    return CaptionMix(m.weights, fallback=tuple(m.fallback))


@dataclass(frozen=True)
class StageTransforms:
    """The worker transform of each resolution stage: fit raw images to the stage's buckets and
    tokenize the drawn caption, or (``cached``) pick the cached latents and T5 states."""

    buckets: BucketConfig
    mix: CaptionMix
    tokenizer: Any  # a Hugging Face tokenizer (T5's, or the toy one)
    max_tokens: int
    cached: bool
    downsample: int  # the VAE's factor f: cached latents are (C, H/f, W/f)

    def __call__(self, resolution: int) -> FitToBucket | FromCache:
        b = self.buckets
        table = bucket_table(resolution, step=b.step, max_aspect=b.max_aspect)
        if self.cached:
            return FromCache(table, resolution, self.mix, self.downsample)
        return FitToBucket(table, self.mix, self.tokenizer, self.max_tokens, random_crop=b.random_crop)


def check_latent_grid(buckets: BucketConfig, vae_factor: int, unet_factor: int) -> None:
    """ConfigError unless bucket sides (multiples of ``buckets.step``) give whole latents at the
    UNet's lowest level with the VAE train-t2i loaded. The config's own check
    (train/config/experiment.py) saw the VAE its ``vae`` section states; this checks the folder at
    train_t2i.vae."""
    multiple = vae_factor * unet_factor
    if buckets.step % multiple:
        raise ConfigError("train_t2i.vae", f"this VAE downsamples {vae_factor}x, so with the UNet's {unet_factor}x "
                          f"train_t2i.buckets.step must be a multiple of {multiple}, got {buckets.step}; set "
                          "vae.block_out_channels to the folder's and the step to a multiple of their product")


def stage_transforms(t: TrainT2IConfig, mix: CaptionMixConfig, tokenizer: Any, max_tokens: int,
                     vae_factor: int) -> StageTransforms:
    """The run's stage transforms, its caption mix built once (from raw images, or from
    train_t2i.cache when it is set); ``vae_factor``: the loaded VAE's downsampling factor f."""
    return StageTransforms(t.buckets, caption_mix(mix), tokenizer, max_tokens, cached=t.cache is not None,
                           downsample=vae_factor)


def bucketed_batches(t: TrainT2IConfig, options: ReaderOptions, seed: int, rt: Runtime, transforms: StageTransforms,
                     first: ResolutionStage) -> BucketedBatches:
    """This rank's one-bucket batches of train_t2i.input (or its cache), set up for stage ``first``:
    raw ``pixels`` uint8 (B, 3, H, W) and ``input_ids``/``mask`` (B, T), or cached ``latents``
    and ``states``; ``seeds`` int64 (B,) either way."""
    transform = transforms(first.resolution)
    if t.cache is None:
        key, source, collate = "train_t2i.input", t.input, collate_bucket
        spec = SampleSpec(GroundTruthAccess.NONE, image=True, optional_texts=caption_members(transforms.mix))
    else:
        key, source, collate = "train_t2i.cache", t.cache, partial(collate_cached, downsample=transforms.downsample)
        spec = SampleSpec(GroundTruthAccess.NONE, image=False, binary=(CACHE_MEMBER,))
    try:
        reader = ShardReader(source, spec=spec, options=options, batch_size=first.micro_batch_size, seed=seed,
                             rank=rt.rank, world_size=rt.world_size, transform=transform, collate=list)
    except (NoShardsError, ValueError) as exc:
        raise ConfigError(key, f"{exc}. Run `recap recaption` (and `recap cache` for a cache) first") from None
    return BucketedBatches(reader, transform.table, batch_size=first.micro_batch_size,
                           queue_batches=t.buckets.queue_batches, seed=seed, gather=rt.gather_objects,
                           collate=collate)


def enter_stage(planned: PlannedStage, batches: BucketedBatches, transforms: StageTransforms, parts: Parts) -> None:
    """Switch buckets, batch size and accumulation to ``planned`` (a no-op for the data when a
    resumed run continues inside it)."""
    stage, rt = planned.stage, parts.runtime
    transform = transforms(stage.resolution)
    dropped = batches.set_stage(transform.table, stage.micro_batch_size, transform)
    rt.set_accumulation(parts.model, micro_batch_size=stage.micro_batch_size, grad_accum=planned.accum)
    parts.metrics.event(parts.state.step, "resolution_stage", index=planned.index, resolution=stage.resolution,
                        buckets=len(transform.table), read_ahead_dropped=dropped)
    log.info(
        "resolution stage %d/%d: %dpx (%d buckets: %s), steps %d-%d, global batch %d (%d x %d micro-batches of %d), "
        "lr %g%s", planned.index + 1, planned.count, stage.resolution, len(transform.table),
        " ".join(str(b) for b in transform.table), planned.start + 1, planned.end, stage.global_batch_size,
        rt.world_size, planned.accum, stage.micro_batch_size, stage.lr,
        f"; dropped {dropped} read-ahead samples of the previous stage" if dropped else "")


def mix_report(rt: Runtime, batches: BucketedBatches) -> dict[str, float]:
    """Realised caption-mix ratios over all ranks (equal batch counts: the mean of the ranks').
    A collective: every rank calls it."""
    mine = batches.mix.ratios()
    means = rt.mean(torch.tensor([mine.get(n, 0.0) for n in MIX_NAMES], dtype=torch.float64)).tolist()
    return dict(zip(MIX_NAMES, means))


def batches_summary(rt: Runtime, batches: BucketedBatches) -> dict[str, Any]:
    """What the batches did over the run, for summary.json (a collective: every rank calls it)."""
    return {"caption_mix": mix_report(rt, batches), "read_ahead_dropped_at_stage_switches": batches.discarded,
            "moved_to_neighbour_bucket": batches.queues.moved,
            # samples read that had no caption of any mixed key (all ranks): not trained on
            "samples_without_caption": sum(rt.gather_objects(batches.mix.dropped))}
