"""`recap train-vae`: train the toy world's AutoencoderKL, export it as a diffusers folder and
measure how well it reconstructs held-out scenes.

Reads: seed, data.train, data.heldout, data.reader, vae, train_vae, runtime, checkpoint, resume, logger.
Writes: <run_dir>/checkpoints/, metrics.jsonl, summary.json (with ``heldout_psnr_db``: median and
min PSNR of train_vae.heldout_images held-out crops at train_vae.resolution), vae/ (diffusers
AutoencoderKL). Production runs load a pretrained VAE (vae.pretrained) and skip this stage.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from data_pipeline.transforms import SquareCrops
from models.vae import VaeTraining, build_vae, latent_scaling_factor, psnr_db, reconstruct
from train.config.experiment import ExperimentConfig
from train.config.models import VaeConfig
from train.config.training import TrainVaeConfig, check_batch
from train.config.typed import ConfigError
from train.evaluation.heldout import read_items
from train.outputs.run_logging import config_snapshot
from train.runtime.environment import launched_world_size
from train.runtime.processes import Runtime, seed_everything, start_runtime
from train.training.loop import train_steps
from train.training.optimization import build_optimizer, build_scheduler
from train.training.session import READER_TUNING_KEYS, RunSettings, open_session, start_logs

STAGE = "train_vae"
# Keys that change what this stage computes: a resume with any of them changed is refused.
RESUME_KEYS = ("seed", "data.train", "data.reader", "vae", "train_vae", "runtime.kind", "runtime.zero_stage",
               "runtime.precision")
RESUME_IGNORE = ("train_vae.steps", "train_vae.heldout_images", *READER_TUNING_KEYS)


def _build(vc: VaeConfig) -> Any:
    return build_vae(vc.block_out_channels, layers_per_block=vc.layers_per_block, latent_channels=vc.latent_channels,
                     norm_num_groups=vc.norm_num_groups)


def _reader(shards: str, options: ReaderOptions, tv: TrainVaeConfig, seed: int, rt: Runtime) -> ShardReader:
    try:
        return ShardReader(shards, spec=SampleSpec(GroundTruthAccess.NONE, image=True), options=options,
                           batch_size=tv.micro_batch_size, seed=seed, rank=rt.rank, world_size=rt.world_size,
                           transform=SquareCrops(tv.resolution))
    except (NoShardsError, ValueError) as exc:
        raise ConfigError("data.train", f"{exc}. Run `recap make-toy-data` first or point data.train at your shards") from None


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Train, checkpoint and export the VAE; resumes from run_dir/checkpoints if present."""
    tv = cfg.train_vae
    if cfg.vae.pretrained is not None:
        raise ConfigError("vae.pretrained", "is set, so there is no VAE to train; train-vae is for vae=tiny (toy)")
    accum = check_batch(tv.global_batch_size, tv.micro_batch_size, launched_world_size())
    rt = start_runtime(cfg.runtime, micro_batch_size=tv.micro_batch_size, grad_accum=accum, grad_clip=tv.grad_clip)
    settings = RunSettings(run_dir, STAGE, cfg.run.name, cfg.checkpoint, cfg.resume, cfg.logger, config_snapshot(cfg),
                           RESUME_KEYS, RESUME_IGNORE)
    log = start_logs(settings, rt)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = VaeTraining(_build(cfg.vae), tv.kl_weight, tv.reconstruction_loss, tv.sample_posterior,
                        tv.object_weight)
    optimizer = build_optimizer(model.parameters(), tv.optimizer)
    scheduler = build_scheduler(optimizer, tv.optimizer, tv.steps)
    model, optimizer = rt.prepare(model, optimizer)
    seed_everything(cfg.seed, rt.rank)  # per-rank stream for the posterior samples
    reader = _reader(cfg.data.train, cfg.data.reader, tv, cfg.seed, rt)
    # read before training, on the main rank: a missing data.heldout fails now, not after it
    measured = rt.is_main and tv.heldout_images > 0
    heldout = heldout_crops(cfg.data.heldout, tv.resolution, tv.heldout_images, cfg.data.reader,
                            cfg.seed) if measured else None
    parts, resumed = open_session(settings, rt, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader)
    log.info("%s on %d process(es), %s, %s; %d steps of %d images (%d micro-batches of %d per rank)", STAGE,
             rt.world_size, rt.device, rt.precision, tv.steps, tv.global_batch_size, accum, tv.micro_batch_size)

    schedule = settings.schedule(tv.steps, accum, tv.global_batch_size)
    result = train_steps(parts, schedule, lambda m, images: m(images), desc=STAGE)  # images: (B, 3, res, res)

    images = next(iter(reader))  # the batch after training: fits the latent scaling factor
    vae = _export(rt, model, cfg.vae, run_dir / "vae", images)  # None off the main rank
    psnr = heldout_psnr(vae, heldout, rt.device) if vae is not None and heldout is not None else None
    if psnr is not None:
        log.info("held-out reconstruction at %d px: PSNR median %.2f dB, min %.2f dB over %d images", tv.resolution,
                 psnr["median"], psnr["min"], psnr["images"])
    rt.barrier()
    return parts.finish({**result, "resumed": resumed, "processes": rt.world_size, "runtime": rt.name,
                         "export": str(run_dir / "vae"), "heldout_psnr_db": psnr})


def _export(rt: Runtime, model: Any, vc: VaeConfig, out: Path, images: torch.Tensor) -> Any:
    """Save a diffusers AutoencoderKL folder at ``out`` with vae.scaling_factor, or one fitted to
    the latents of ``images`` (B, 3, H, W); returns that VAE (eval mode, CPU) on the main rank,
    None on the others."""
    weights = rt.full_state_dict(model)  # collective under ZeRO-3; keys "vae.*"
    if not rt.is_main:
        return None
    vae = _build(vc)
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in weights.items()})
    vae.eval()
    given = vc.scaling_factor
    factor = given if given is not None else latent_scaling_factor(vae, images.float())
    vae.register_to_config(scaling_factor=factor)
    vae.save_pretrained(out)
    return vae


def heldout_crops(shards: str, resolution: int, limit: int, reader: ReaderOptions, seed: int) -> torch.Tensor:
    """The first ``limit`` samples of the held-out ``shards`` as the trainer sees images: (N, 3,
    resolution, resolution) float32 in [-1, 1], a square crop per sample drawn from its seed.
    (read_items opens the shards with evaluation access; SquareCrops keeps only the pixels.)"""
    crops = read_items(shards, "data.heldout", SquareCrops(resolution), reader=reader, seed=seed, limit=limit,
                       fix="Point data.heldout at held-out image shards (`recap make-toy-data` writes them), or set "
                       "train_vae.heldout_images=0 to skip the held-out reconstruction measure")
    return torch.stack(crops)


def heldout_psnr(vae: Any, images: torch.Tensor, device: torch.device, batch_size: int = 32) -> dict[str, Any]:
    """Reconstruction PSNR (dB) of ``images`` (N, 3, H, W) in [-1, 1] through ``vae`` (posterior
    mean, no sampling): {"median", "min", "images", "resolution"}. Runs on ``device`` and leaves
    the VAE on the CPU."""
    vae.to(device)
    per_image = torch.cat([psnr_db(batch, reconstruct(vae, batch.to(device)).cpu())
                           for batch in images.split(batch_size)])  # (N,)
    vae.to("cpu")
    values = per_image.tolist()
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "images": len(values),
            "resolution": int(images.shape[-1])}
