"""`recap train-t2i`: stage 3 of the recipe, the T5-conditioned latent diffusion UNet.

Reads: seed, train_t2i, caption_mix, text_encoder, unet, diffusion, data.reader, runtime,
checkpoint, resume, logger. Writes <run_dir>/checkpoints/, metrics.jsonl, samples/*.png,
summary.json and pipeline/ (diffusers folders: unet, vae, text_encoder, tokenizer, scheduler,
caption_transformer; the EMA weights when train_t2i.ema_decay is set) and raw_weights/ (the live
unet and caption_transformer beside an EMA export).

The algorithm, as `run` reads: frozen T5 + VAE, the xf stage + UNet and their EMA, bucketed
batches of recaptioned shards (one caption per sample from the caption mix), then for each
progressive-resolution stage: switch buckets and batch size, and train (noise, predict, MSE,
classifier-free-guidance dropout to the empty caption) until the stage's last step.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch

from data_pipeline.aspect_buckets import bucket_table
from data_pipeline.bucket_batches import BucketedBatches
from data_pipeline.caption_mix import CaptionMix
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.latent_cache import CACHE_MEMBER, FromCache, collate_cached
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from data_pipeline.t2i_samples import FitToBucket, caption_members, collate_bucket
from models.diffusion import (
    drop_captions, dropout_draws, loss_weights, make_scheduler, noised_and_target, weighted_mse,
)
from train.checkpointing import TrainState
from train.config_schema import ExperimentConfig, check_batch
from train.loop import Schedule, resume_parts, train_steps
from train.optimization import build_optimizer, build_staged_scheduler
from train.resolution_schedule import ResolutionStage, check_schedule, stage_at, stage_starts, total_steps
from train.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.runtime import Runtime, seed_everything, start_runtime
from train.t2i_parts import FrozenEncoders, build_denoiser, load_frozen
from train.t2i_export import export_raw_weights, export_trained, sample_grid, trained_weights
from train.typed_config import ConfigError

STAGE = "train_t2i"
log = logging.getLogger("recap")
# Keys that change what this stage computes: a resume with any of them changed is refused.
RESUME_KEYS = ("seed", "train_t2i", "caption_mix", "text_encoder", "unet", "diffusion", "data.reader",
               "runtime.kind", "runtime.zero_stage", "runtime.precision")
RESUME_IGNORE = ("train_t2i.sampling", "train_t2i.nan_policy", "train_t2i.max_consecutive_skips",
                 "data.reader.prefetch_factor", "data.reader.strict", "data.reader.max_fault_fraction",
                 "data.reader.fault_check_after")


def resolution_stages(cfg: ExperimentConfig) -> list[ResolutionStage]:
    """The configured stages, each stage's lr resolved (null: the optimizer's)."""
    t = cfg.train_t2i
    stages = [ResolutionStage(s.resolution, s.steps, s.global_batch_size, s.micro_batch_size,
                              s.lr if s.lr is not None else t.optimizer.lr) for s in t.stages]
    try:
        check_schedule(stages, multiple=t.buckets.step)
    except ValueError as exc:
        raise ConfigError("train_t2i.stages", str(exc)) from None
    return stages


def _accumulation(stages: list[ResolutionStage], world: int) -> list[int]:
    out = []
    for i, s in enumerate(stages):
        try:
            out.append(check_batch(s.global_batch_size, s.micro_batch_size, world))
        except ConfigError as exc:
            raise exc.under(f"train_t2i.stages[{i}]") from None
    return out


class EmaWeights:
    """EMA of the trained weights: diffusers' EMAModel (which gathers ZeRO-3 partitions itself),
    its shadow weights living in a module copy so that checkpoints save them as safetensors and
    the export is that module."""

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device) -> None:
        from diffusers.training_utils import EMAModel

        self.module = copy.deepcopy(model).requires_grad_(False).to(device).eval()
        self.ema = EMAModel(self.module.parameters(), decay=decay, foreach=True)
        self.ema.shadow_params = list(self.module.parameters())  # update the copy in place

    def step(self, parameters: Any, state: TrainState) -> None:
        self.ema.step(parameters)  # a collective under ZeRO-3: every rank calls it
        state.extra["ema_steps"] = self.ema.optimization_step

    def restored(self, state: TrainState) -> None:
        self.ema.optimization_step = state.extra.get("ema_steps", 0)  # its decay warms up with it


class Objective:
    """The training loss of one micro-batch (see models/diffusion.py for the math)."""

    def __init__(self, cfg: ExperimentConfig, frozen: FrozenEncoders, device: torch.device) -> None:
        d = cfg.diffusion
        self.frozen, self.min_snr_gamma, self.cfg_dropout = frozen, d.min_snr_gamma, d.cfg_dropout
        self.noise = make_scheduler(prediction_type=d.prediction_type, beta_schedule=d.beta_schedule,
                                    num_train_timesteps=d.num_train_timesteps)
        self.empty = frozen.empty_caption(device)  # (T_e, D), (T_e,): computed once

    def __call__(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # (B, C, h, w) and (B, T, D): from the cache, or encoded here from pixels and token ids
        latents = batch["latents"] if "latents" in batch else self.frozen.latents(batch["pixels"])
        states = batch["states"] if "states" in batch else self.frozen.text(batch["input_ids"], batch["mask"])
        drop = dropout_draws(batch["seeds"].cpu(), self.cfg_dropout).to(latents.device)  # (B,) per-sample seed
        states, mask = drop_captions(states, batch["mask"], drop, *self.empty)
        noise = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device)  # whatever the layout
        timesteps = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy, target = noised_and_target(self.noise, latents, noise, timesteps)
        prediction = model(noisy, timesteps, states, mask)
        loss = weighted_mse(prediction, target, loss_weights(self.noise, timesteps, self.min_snr_gamma))
        return {"loss": loss, "cfg_dropped": drop.float().mean()}


def _mix(cfg: ExperimentConfig) -> CaptionMix:
    m = cfg.caption_mix
    return CaptionMix(m.weights, fallback=tuple(m.fallback))


def _transform(cfg: ExperimentConfig, stage: ResolutionStage, tokenizer: Any) -> FitToBucket | FromCache:
    """The worker transform of a stage: fit raw images to buckets, or pick the cached entries."""
    b = cfg.train_t2i.buckets
    table = bucket_table(stage.resolution, step=b.step, max_aspect=b.max_aspect)
    if cfg.train_t2i.cache is not None:
        return FromCache(table, stage.resolution, _mix(cfg))
    return FitToBucket(table, _mix(cfg), tokenizer, cfg.text_encoder.max_tokens, random_crop=b.random_crop)


def _batches(cfg: ExperimentConfig, rt: Runtime, stage: ResolutionStage, tokenizer: Any) -> BucketedBatches:
    t = cfg.train_t2i
    transform = _transform(cfg, stage, tokenizer)
    if t.cache is None:
        key, source, collate = "train_t2i.input", t.input, collate_bucket
        spec = SampleSpec(GroundTruthAccess.NONE, image=True, optional_texts=caption_members(_mix(cfg)))
    else:
        key, source, collate = "train_t2i.cache", t.cache, collate_cached
        spec = SampleSpec(GroundTruthAccess.NONE, image=False, binary=(CACHE_MEMBER,))
    try:
        reader = ShardReader(source, spec=spec, options=cfg.data.reader, batch_size=stage.micro_batch_size,
                             seed=cfg.seed, rank=rt.rank, world_size=rt.world_size, transform=transform, collate=list)
    except (NoShardsError, ValueError) as exc:
        raise ConfigError(key, f"{exc}. Run `recap recaption` (and `recap cache` for a cache) first") from None
    return BucketedBatches(reader, transform.table, batch_size=stage.micro_batch_size,
                           queue_batches=t.buckets.queue_batches, seed=cfg.seed, gather=rt.gather_objects,
                           collate=collate)


def _mix_report(rt: Runtime, batches: BucketedBatches) -> dict[str, float]:
    """Realised caption-mix ratios over all ranks (equal batch counts: the mean of the ranks')."""
    names = ["caption_mix/dsc", "caption_mix/ssc", "caption_mix/txt", "caption_mix/fallback", "caption_mix/dropped"]
    mine = batches.mix.ratios()
    means = rt.mean(torch.tensor([mine.get(n, 0.0) for n in names], dtype=torch.float64)).tolist()
    return dict(zip(names, means))


def check(cfg: ExperimentConfig) -> None:
    """Before launch: the stages and their batches split over the processes the launcher starts,
    and a cache (when given) that holds every stage's resolution and every caption key drawn."""
    launcher = cfg.launcher
    world = launcher.nproc_per_node * launcher.nnodes  # launcher=local: 1 (LauncherConfig.validate)
    _accumulation(resolution_stages(cfg), world)
    if cfg.train_t2i.cache is not None:
        _check_cache(cfg)


def _check_cache(cfg: ExperimentConfig) -> None:
    from data_pipeline import recaption as shard_jobs
    from data_pipeline.latent_cache import STATS_SUFFIX
    from data_pipeline.shard_io import is_local, list_shards

    t = cfg.train_t2i
    try:
        urls = list_shards(t.cache)
    except NoShardsError as exc:
        raise ConfigError("train_t2i.cache", f"{exc}; run `recap cache` first") from None
    local = [Path(u) for u in urls if is_local(u)]
    stats = shard_jobs.read_stats(local[0], STATS_SUFFIX) if local else None
    if local and stats is None:
        raise ConfigError("train_t2i.cache", f"{local[0]} is not a complete cache shard; run `recap cache` to finish it")
    if stats is None:  # remote shards: checked sample by sample
        return
    missing = sorted({s.resolution for s in t.stages} - set(stats["resolutions"]))
    keys = [k for k, w in cfg.caption_mix.weights.items() if w > 0 and k not in stats["keys"]]
    if missing or keys:
        raise ConfigError("train_t2i.cache", f"the cache holds resolutions {stats['resolutions']} and caption keys "
                          f"{stats['keys']}; this run also needs {missing or ''}{' ' if missing and keys else ''}"
                          f"{keys or ''}. Rerun `recap cache` with this config")


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Train (resuming from run_dir/checkpoints if present), sample, export the pipeline."""
    t = cfg.train_t2i
    stages = resolution_stages(cfg)
    accums = _accumulation(stages, int(os.environ.get("WORLD_SIZE", "1")))
    if t.cache is not None:
        _check_cache(cfg)
    rt = start_runtime(cfg.runtime, micro_batch_size=stages[0].micro_batch_size, grad_accum=accums[0],
                       grad_clip=t.grad_clip)
    setup_logging(run_dir, STAGE, rt.rank)
    if rt.is_main:
        write_config_snapshot(run_dir, cfg)

    frozen = load_frozen(cfg.text_encoder, t.vae, cfg.seed).to(rt.device)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    denoiser = build_denoiser(cfg.unet, text_dim=frozen.text_dim, latent_channels=frozen.vae.config.latent_channels)
    if t.gradient_checkpointing:
        denoiser.unet.enable_gradient_checkpointing()
    ema = EmaWeights(denoiser, t.ema_decay, rt.device) if t.ema_decay is not None else None
    optimizer = build_optimizer(denoiser.parameters(), t.optimizer)
    scheduler = build_staged_scheduler(optimizer, t.optimizer, [s.steps for s in stages], [s.lr for s in stages])
    model, optimizer = rt.prepare(denoiser, optimizer)
    seed_everything(cfg.seed, rt.rank)  # per-rank noise and timesteps
    batches = _batches(cfg, rt, stages[0], frozen.tokenizer)
    parts, resumed = resume_parts(cfg, run_dir, rt, STAGE, model=model, optimizer=optimizer, scheduler=scheduler,
                                  reader=batches, resume_keys=RESUME_KEYS, resume_ignore=RESUME_IGNORE,
                                  extra={"ema": ema.module} if ema else None)
    state = parts.state
    if ema:
        ema.restored(state)
    objective = Objective(cfg, frozen, rt.device)
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    log.info("%s: %d trainable parameters (xf + UNet), %d process(es), %s, %s; stages %s", STAGE, trainable,
             rt.world_size, rt.device, rt.precision, " -> ".join(f"{s.resolution}px x {s.steps}" for s in stages))

    def build() -> Any:
        return build_denoiser(cfg.unet, text_dim=frozen.text_dim, latent_channels=frozen.vae.config.latent_channels)

    def weights() -> Any:  # what samples and the export use (collective without EMA)
        return trained_weights(rt, model, ema.module if ema else None, build)

    def after_step(st: TrainState) -> None:
        if ema:
            ema.step(model.parameters(), st)
        every = t.sampling.every_steps
        if every and st.step % every == 0:
            _samples(cfg, rt, parts, frozen, weights(), st.step, stages, objective)

    results: list[dict[str, Any]] = []
    first = stage_at(stages, state.step)[0] if state.step < total_steps(stages) else len(stages)
    for index in range(first, len(stages)):
        _enter_stage(cfg, rt, model, batches, frozen.tokenizer, stages, accums, index, parts)
        stage = stages[index]
        schedule = Schedule(steps=stage_starts(stages)[index] + stage.steps, accum=accums[index],
                            global_batch=stage.global_batch_size, checkpoint_every=cfg.checkpoint.every_steps,
                            log_every=cfg.logger.log_every_steps, show_progress=cfg.logger.progress,
                            nan_policy=t.nan_policy, max_consecutive_skips=t.max_consecutive_skips)
        results.append(train_steps(parts, schedule, objective, desc=f"{STAGE} {stage.resolution}px",
                                   after_step=after_step, report=lambda: _mix_report(rt, batches)))

    final = weights()
    raw = trained_weights(rt, model, None, build) if ema else None  # collective
    grid = _samples(cfg, rt, parts, frozen, final, state.step, stages, objective)
    export = run_dir / "pipeline"
    if rt.is_main:
        export_trained(export, weights=final, frozen=frozen, noise=objective.noise)
        export_raw_weights(run_dir / "raw_weights", raw)
    rt.barrier()
    summary = {**(results[-1] if results else {"steps": state.step}), "resumed": resumed, "processes": rt.world_size,
               "runtime": rt.name, "stages": [f"{s.resolution}px x {s.steps}" for s in stages],
               "img_per_s_by_stage": [r["img_per_s"] for r in results], "caption_mix": _mix_report(rt, batches),
               "read_ahead_dropped_at_stage_switches": batches.discarded, "moved_to_neighbour_bucket":
               batches.queues.moved, "samples": str(grid) if grid else None, "export": str(export)}
    parts.metrics.close(summary)
    if rt.is_main:
        finish_stage(run_dir, "train-t2i", summary)
    rt.close()
    return summary


def _enter_stage(cfg: ExperimentConfig, rt: Runtime, model: Any, batches: BucketedBatches, tokenizer: Any,
                 stages: list[ResolutionStage], accums: list[int], index: int, parts: Any) -> None:
    """Switch buckets, batch size and accumulation to stage ``index`` (a no-op for the data when
    a resumed run continues inside it)."""
    stage = stages[index]
    transform = _transform(cfg, stage, tokenizer)
    dropped = batches.set_stage(transform.table, stage.micro_batch_size, transform)
    rt.set_accumulation(model, micro_batch_size=stage.micro_batch_size, grad_accum=accums[index])
    parts.metrics.event(parts.state.step, "resolution_stage", index=index, resolution=stage.resolution,
                        buckets=len(transform.table), read_ahead_dropped=dropped)
    log.info(
        "resolution stage %d/%d: %dpx (%d buckets: %s), steps %d-%d, global batch %d (%d x %d micro-batches of %d), "
        "lr %g%s", index + 1, len(stages), stage.resolution, len(transform.table),
        " ".join(str(b) for b in transform.table), stage_starts(stages)[index] + 1,
        stage_starts(stages)[index] + stage.steps, stage.global_batch_size, rt.world_size, accums[index],
        stage.micro_batch_size, stage.lr, f"; dropped {dropped} read-ahead samples of the previous stage" if dropped
        else "")


def _samples(cfg: ExperimentConfig, rt: Runtime, parts: Any, frozen: FrozenEncoders, weights: Any, step: int,
             stages: list[ResolutionStage], objective: Objective) -> Path | None:
    """A grid of the sampling prompts at the current stage's resolution (main rank)."""
    s = cfg.train_t2i.sampling
    if not s.prompts or not rt.is_main:
        return None
    resolution = stages[stage_at(stages, step - 1)[0]].resolution if step else stages[0].resolution
    path = parts.metrics.path.parent / "samples" / f"step_{step:07d}.png"
    sample_grid(path, weights=weights, frozen=frozen, prompts=s.prompts, resolution=resolution, steps=s.steps,
                guidance_scale=s.guidance_scale, seed=s.seed, noise_config=objective.noise.config)
    parts.metrics.image(step, "samples", path, caption=" | ".join(s.prompts))
    return path
