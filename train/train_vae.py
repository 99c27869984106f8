"""`recap train-vae`: train the toy world's AutoencoderKL and export it as a diffusers folder.

Reads: seed, data.train, data.reader, vae, train_vae, runtime, checkpoint, resume, logger.
Writes: <run_dir>/checkpoints/, metrics.jsonl, summary.json, vae/ (diffusers AutoencoderKL).
Production runs load a pretrained VAE (vae.pretrained) and skip this stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from data_pipeline.transforms import SquareCrops
from models.vae import VaeTraining, build_vae, latent_scaling_factor
from train.config_schema import ExperimentConfig, check_batch
from train.loop import Schedule, resume_parts, train_steps
from train.optimization import build_optimizer, build_scheduler
from train.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.runtime import Runtime, seed_everything, start_runtime
from train.typed_config import ConfigError

STAGE = "train_vae"
# Keys that change what this stage computes: a resume with any of them changed is refused.
RESUME_KEYS = ("seed", "data.train", "data.reader", "vae", "train_vae", "runtime.kind", "runtime.zero_stage",
               "runtime.precision")
RESUME_IGNORE = ("train_vae.steps", "data.reader.prefetch_factor", "data.reader.strict",
                 "data.reader.max_fault_fraction", "data.reader.fault_check_after")


def _build(cfg: ExperimentConfig) -> Any:
    vc = cfg.vae
    return build_vae(vc.block_out_channels, layers_per_block=vc.layers_per_block, latent_channels=vc.latent_channels,
                     norm_num_groups=vc.norm_num_groups)


def _reader(cfg: ExperimentConfig, rt: Runtime) -> ShardReader:
    try:
        return ShardReader(cfg.data.train, spec=SampleSpec(GroundTruthAccess.NONE, image=True), options=cfg.data.reader,
                           batch_size=cfg.train_vae.micro_batch_size, seed=cfg.seed, rank=rt.rank,
                           world_size=rt.world_size, transform=SquareCrops(cfg.train_vae.resolution))
    except (NoShardsError, ValueError) as exc:
        raise ConfigError("data.train", f"{exc}. Run `recap make-toy-data` first or point data.train at your shards") from None


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Train, checkpoint and export the VAE; resumes from run_dir/checkpoints if present."""
    tv = cfg.train_vae
    if cfg.vae.pretrained is not None:
        raise ConfigError("vae.pretrained", "is set, so there is no VAE to train; train-vae is for vae=tiny (toy)")
    accum = check_batch(tv.global_batch_size, tv.micro_batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    rt = start_runtime(cfg.runtime, micro_batch_size=tv.micro_batch_size, grad_accum=accum, grad_clip=tv.grad_clip)
    log = setup_logging(run_dir, STAGE, rt.rank)
    if rt.is_main:
        write_config_snapshot(run_dir, cfg)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = VaeTraining(_build(cfg), tv.kl_weight)
    optimizer = build_optimizer(model.parameters(), tv.optimizer)
    scheduler = build_scheduler(optimizer, tv.optimizer, tv.steps)
    model, optimizer = rt.prepare(model, optimizer)
    seed_everything(cfg.seed, rt.rank)  # per-rank stream for the posterior samples
    reader = _reader(cfg, rt)
    parts, resumed = resume_parts(cfg, run_dir, rt, STAGE, model=model, optimizer=optimizer, scheduler=scheduler,
                                  reader=reader, resume_keys=RESUME_KEYS, resume_ignore=RESUME_IGNORE)
    log.info("%s on %d process(es), %s, %s; %d steps of %d images (%d micro-batches of %d per rank)", STAGE,
             rt.world_size, rt.device, rt.precision, tv.steps, tv.global_batch_size, accum, tv.micro_batch_size)

    schedule = Schedule(steps=tv.steps, accum=accum, global_batch=tv.global_batch_size,
                        checkpoint_every=cfg.checkpoint.every_steps, log_every=cfg.logger.log_every_steps,
                        show_progress=cfg.logger.progress)
    result = train_steps(parts, schedule, lambda m, images: m(images), desc=STAGE)  # images: (B, 3, res, res)

    summary = {**result, "resumed": resumed, "processes": rt.world_size, "runtime": rt.name,
               "export": _export(rt, model, cfg, run_dir, next(iter(reader)))}
    parts.metrics.close(summary)
    if rt.is_main:
        finish_stage(run_dir, "train-vae", summary)
    rt.close()
    return summary


def _export(rt: Runtime, model: Any, cfg: ExperimentConfig, run_dir: Path, images: torch.Tensor) -> str:
    """Save a diffusers AutoencoderKL folder with a scaling factor fitted to the latents."""
    weights = rt.full_state_dict(model)  # collective under ZeRO-3; keys "vae.*"
    out = run_dir / "vae"
    if rt.is_main:
        vae = _build(cfg)
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in weights.items()})
        vae.eval()
        given = cfg.vae.scaling_factor
        factor = given if given is not None else latent_scaling_factor(vae, images.float())
        vae.register_to_config(scaling_factor=factor)
        vae.save_pretrained(out)
    rt.barrier()
    return str(out)
