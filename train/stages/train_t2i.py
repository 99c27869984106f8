"""`recap train-t2i`: stage 3 of the recipe, the T5-conditioned latent diffusion UNet.

Reads: seed, train_t2i, caption_mix, text_encoder, unet, diffusion, data.reader, runtime,
checkpoint, resume, logger. Writes <run_dir>/checkpoints/, metrics.jsonl, samples/*.png,
summary.json and pipeline/ (diffusers folders: unet, vae, text_encoder, tokenizer, scheduler,
caption_transformer; the EMA weights when train_t2i.ema_decay is set) and raw_weights/ (the live
unet and caption_transformer beside an EMA export).

The algorithm, as `run` reads: frozen T5 + VAE, the xf stage + UNet and their EMA, bucketed
batches of recaptioned shards (one caption per sample from the caption mix), then for each
progressive-resolution stage: switch buckets and batch size, and train (noise, predict, MSE,
classifier-free-guidance dropout to the empty caption; train/t2i/objective.py) until the
stage's last step. From a cache (train_t2i.cache), neither T5 nor the VAE's encoder is loaded
for training: the cache holds the empty caption's and the sampling prompts' T5 states, and only
the rank that draws sample grids loads the VAE's decoder (train/t2i/cached_conditioning.py); the
export loads the whole frozen encoders on the main rank's CPU after training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from models.denoiser import CaptionConditionedUNet
from train.config.experiment import ExperimentConfig
from train.config.t2i import SamplingConfig
from train.outputs.run_logging import config_snapshot
from train.runtime.environment import launched_world_size
from train.runtime.processes import Runtime, seed_everything, start_runtime
from train.t2i.batches import (
    batches_summary, bucketed_batches, check_latent_grid, enter_stage, mix_report, resolution_plan,
    stage_transforms,
)
from train.t2i.cached_conditioning import CachedEncoders, load_cached
from train.t2i.export import export_raw_weights, export_trained, sample_grid, trained_weights
from train.t2i.objective import Objective
from train.t2i.parts import FrozenEncoders, build_denoiser, load_frozen
from train.t2i.resolution_schedule import ResolutionPlan
from train.t2i.speed import compile_unet, to_channels_last
from train.training.checkpointing import TrainState
from train.training.ema import EmaWeights
from train.training.loop import Parts, train_steps
from train.training.optimization import build_optimizer, build_staged_scheduler
from train.training.session import READER_TUNING_KEYS, RunSettings, open_session, start_logs

STAGE = "train_t2i"
log = logging.getLogger("recap")
# Keys that change what this stage computes: a resume with any of them changed is refused.
RESUME_KEYS = ("seed", "train_t2i", "caption_mix", "text_encoder", "unet", "diffusion", "data.reader",
               "runtime.kind", "runtime.zero_stage", "runtime.precision")
RESUME_IGNORE = ("train_t2i.sampling", "train_t2i.nan_policy", "train_t2i.max_consecutive_skips",
                 "train_t2i.channels_last", "train_t2i.compile_unet", *READER_TUNING_KEYS)


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Train (resuming from run_dir/checkpoints if present), sample, export the pipeline;
    train/t2i/checks.py validated the stages and the cache before launch."""
    t = cfg.train_t2i
    plan = resolution_plan(t, launched_world_size())  # stages, their lrs and gradient accumulation
    rt = start_runtime(cfg.runtime, micro_batch_size=plan[0].stage.micro_batch_size, grad_accum=plan[0].accum,
                       grad_clip=t.grad_clip)
    settings = RunSettings(run_dir, STAGE, cfg.run.name, cfg.checkpoint, cfg.resume, cfg.logger, config_snapshot(cfg),
                           RESUME_KEYS, RESUME_IGNORE, nan_policy=t.nan_policy,
                           max_consecutive_skips=t.max_consecutive_skips)
    start_logs(settings, rt)

    frozen = _frozen(cfg, rt)  # tokenizer, T5, VAE: the experiment's (from a cache: its states, no T5)
    seed = cfg.seed if t.seed is None else t.seed  # the training's own
    build = partial(build_denoiser, cfg.unet, text_dim=frozen.text_dim, latent_channels=frozen.latent_channels)
    seed_everything(seed)  # identical initial weights on every rank
    denoiser = build()  # xf + UNet
    if t.gradient_checkpointing:
        denoiser.unet.enable_gradient_checkpointing()
    if t.channels_last:
        to_channels_last(denoiser)
    ema = EmaWeights(denoiser, t.ema_decay, rt.device) if t.ema_decay is not None else None
    if t.compile_unet:
        compile_unet(denoiser)  # after the EMA copy (train/t2i/speed.py)
    optimizer = build_optimizer(denoiser.parameters(), t.optimizer)
    scheduler = build_staged_scheduler(optimizer, t.optimizer, plan.lengths, plan.lrs)
    model, optimizer = rt.prepare(denoiser, optimizer)
    seed_everything(seed, rt.rank)  # per-rank noise and timesteps
    check_latent_grid(t.buckets, frozen.downsampling_factor, cfg.unet.downsampling_factor)
    transforms = stage_transforms(t, cfg.caption_mix, frozen.tokenizer, cfg.text_encoder.max_tokens,
                                  frozen.downsampling_factor)
    batches = bucketed_batches(t, cfg.data.reader, seed, rt, transforms, plan[0].stage)
    parts, resumed = open_session(settings, rt, model=model, optimizer=optimizer, scheduler=scheduler,
                                  reader=batches, ema=ema)
    objective = Objective(cfg.diffusion, frozen, rt.device)
    _log_start(denoiser, rt, plan, _speed_switches(cfg))

    weights = partial(trained_weights, rt, model, ema.module if ema else None, build)  # collective without EMA
    grids = _Grids(t.sampling, run_dir / "samples", frozen, objective.noise.config, plan)
    after_step = partial(_after_step, parts=parts, ema=ema, weights=weights, grids=grids)
    results = []
    for planned in plan.remaining(parts.state.step):  # e.g. 256 -> 512 -> 1024 px
        enter_stage(planned, batches, transforms, parts)
        schedule = settings.schedule(planned.end, planned.accum, planned.stage.global_batch_size)
        results.append(train_steps(parts, schedule, objective, desc=f"{STAGE} {planned.stage.resolution}px",
                                   after_step=after_step, report=partial(mix_report, rt, batches)))

    final = weights()
    raw = trained_weights(rt, model, None, build) if ema else None  # the live weights beside EMA (collective)
    grid = grids.write(parts, final)
    if rt.is_main:
        # from a cache: tokenizer, T5 and the whole VAE loaded now, on the CPU, for the export only
        whole = frozen if isinstance(frozen, FrozenEncoders) else load_frozen(cfg.text_encoder, t.vae, cfg.seed)
        export_trained(run_dir / "pipeline", weights=final, frozen=whole, noise=objective.noise)
        export_raw_weights(run_dir / "raw_weights", raw)
    rt.barrier()
    return parts.finish({**(results[-1] if results else {"steps": parts.state.step}), "resumed": resumed,
                         "processes": rt.world_size, "runtime": rt.name, "stages": plan.labels(),
                         "img_per_s_by_stage": [r["img_per_s"] for r in results], **batches_summary(rt, batches),
                         "samples": str(grid) if grid else None, "export": str(run_dir / "pipeline")})


def _frozen(cfg: ExperimentConfig, rt: Runtime) -> FrozenEncoders | CachedEncoders:
    """The frozen side on this rank: from raw images the tokenizer, T5 and VAE on its device; from
    a cache its conditioning states and the VAE's config, plus the VAE's decoder on the rank that
    draws sample grids."""
    t = cfg.train_t2i
    if t.cache is None:
        return load_frozen(cfg.text_encoder, t.vae, cfg.seed).to(rt.device)
    return load_cached(t.cache, t.vae, t.sampling.prompts, rt.device, decoder=rt.is_main and bool(t.sampling.prompts))


def _log_start(denoiser: CaptionConditionedUNet, rt: Runtime, plan: ResolutionPlan, speed: str) -> None:
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    log.info("%s: %d trainable parameters (xf + UNet), %d process(es), %s, %s; stages %s; %s", STAGE, trainable,
             rt.world_size, rt.device, rt.precision, " -> ".join(plan.labels()), speed)


def _speed_switches(cfg: ExperimentConfig) -> str:
    """The GPU speed switches as the start line reports them: 'speed: channels_last, AdamW fused'."""
    t = cfg.train_t2i
    on = [name for name, value in (("channels_last", t.channels_last), ("compile_unet", t.compile_unet),
                                   ("allow_tf32", cfg.runtime.allow_tf32)) if value]
    return f"speed: {', '.join([*on, f'AdamW {t.optimizer.implementation}'])}"


@dataclass(frozen=True)
class _Grids:
    """Sample grids of train_t2i.sampling's prompts at the current stage's resolution, written by
    the main rank to ``folder``/step_NNNNNNN.png and logged as images."""

    sampling: SamplingConfig
    folder: Path
    frozen: FrozenEncoders | CachedEncoders
    noise_config: Any  # the training noise schedule's config (the DDIM sampler's)
    plan: ResolutionPlan

    def due(self, step: int) -> bool:
        """Whether train_t2i.sampling.every_steps asks for a grid after ``step``."""
        every = self.sampling.every_steps
        return bool(every) and step % every == 0

    def write(self, parts: Parts, weights: CaptionConditionedUNet | None) -> Path | None:
        """The grid of ``weights`` (None off the main rank) at the run's current step."""
        s, step = self.sampling, parts.state.step
        if not s.prompts or not parts.runtime.is_main:
            return None
        path = self.folder / f"step_{step:07d}.png"
        sample_grid(path, weights=weights, frozen=self.frozen, prompts=s.prompts,
                    resolution=self.plan.resolution_after(step), steps=s.steps, guidance_scale=s.guidance_scale,
                    seed=s.seed, noise_config=self.noise_config)
        parts.metrics.image(step, "samples", path, caption=" | ".join(s.prompts))
        return path


def _after_step(state: TrainState, *, parts: Parts, ema: EmaWeights | None,
                weights: Callable[[], CaptionConditionedUNet | None], grids: _Grids) -> None:
    """After each applied optimizer step: the EMA update, then a sample grid when one is due
    (gathering the weights is a collective without EMA: every rank takes part)."""
    if ema:
        ema.step(parts.model.parameters(), state)
    if grids.due(state.step):
        grids.write(parts, weights())
