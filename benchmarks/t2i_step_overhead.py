"""Trainer overhead: train-t2i's full training step against a bare PyTorch loop, same batch.

Both sides train the same xf + UNet (the configured preset, random init) with the same frozen
T5 and VAE, AdamW, gradient clipping and EMA, on one fixed batch (data loading is measured by
benchmarks/reader_throughput.py). Ours is `train.training.loop.train_steps` driving `Objective` through
the runtime, checkpointer, metrics logger and NaN policy, exactly as `recap train-t2i` runs it;
the peer is the dozen lines a bare loop needs. Step times come from timestamps taken after each
step (median; the first steps are warm-up), alternating the two sides. Prints ms/step and the
ratio ours/bare (goal: <= 1.05).

    python benchmarks/t2i_step_overhead.py                       # toy UNet, 64 px, batch 16
    python benchmarks/t2i_step_overhead.py --resolution 128 --batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.caption_tokenizer import train_caption_tokenizer
from models.diffusion import drop_captions, dropout_draws, loss_weights, noised_and_target, weighted_mse
from models.vae import build_vae
from train.training.checkpointing import Checkpointer, TrainState
from train.config.loading import load_experiment
from train.config.execution import ResumeConfig
from train.training.loop import Parts, Schedule, train_steps
from train.training.optimization import build_optimizer, build_staged_scheduler
from train.outputs.run_logging import MetricsLogger
from train.runtime.processes import keep_freed_memory_in_heap, seed_everything, start_runtime
from train.t2i.objective import Objective
from train.t2i.parts import FrozenEncoders, build_denoiser, load_text_encoder
from train.training.ema import EmaWeights


class SameBatch:
    """A reader that yields one batch forever (what both sides train on)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self) -> Any:
        while True:
            yield self.batch

    def fault_counts(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}


def _parts(cfg: Any, tmp: Path, tokenizer_dir: Path) -> tuple[FrozenEncoders, Any]:
    from data_pipeline.caption_tokenizer import save_tokenizer

    colours, shapes = ["red", "blue", "green", "orange"], ["circle", "square", "star", "heart"]
    corpus = [f"a large striped {c} {s} in the top left on a beige background" for c in colours for s in shapes]
    save_tokenizer(train_caption_tokenizer(corpus * 4, vocab_size=200, max_tokens=cfg.text_encoder.max_tokens),
                   tokenizer_dir)
    te = dataclasses.replace(cfg.text_encoder, tokenizer=str(tokenizer_dir))
    tokenizer, t5 = load_text_encoder(te, cfg.seed)
    v = cfg.vae
    vae = build_vae(v.block_out_channels, layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
                    norm_num_groups=v.norm_num_groups).requires_grad_(False).eval()
    return FrozenEncoders(tokenizer, t5, vae, cfg.text_encoder.max_tokens), tokenizer


def _batch(tokenizer: Any, batch: int, resolution: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    captions = [f"a large striped red circle number {i} in the top left" for i in range(batch)]
    from data_pipeline.t2i_samples import pad_token_ids

    ids, mask = pad_token_ids([tokenizer(c)["input_ids"] for c in captions])
    return {"pixels": torch.randint(0, 256, (batch, 3, resolution, resolution), generator=g, dtype=torch.uint8),
            "input_ids": ids, "mask": mask, "seeds": torch.arange(batch, dtype=torch.long) * 7919,
            "crops": torch.zeros(batch, 2, dtype=torch.long), "used": ["dsc"] * batch}


def ours(cfg: Any, frozen: FrozenEncoders, batch: dict[str, Any], steps: int, tmp: Path) -> list[float]:
    rt = start_runtime(cfg.runtime, micro_batch_size=len(batch["seeds"]), grad_accum=1, grad_clip=1.0)
    seed_everything(0)
    denoiser = build_denoiser(cfg.unet, text_dim=frozen.text_dim, latent_channels=4)
    ema = EmaWeights(denoiser, 0.999, rt.device)
    optimizer = build_optimizer(denoiser.parameters(), cfg.train_t2i.optimizer)
    scheduler = build_staged_scheduler(optimizer, cfg.train_t2i.optimizer, [steps + 1], [cfg.train_t2i.optimizer.lr])
    model, optimizer = rt.prepare(denoiser, optimizer)
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    parts = Parts(runtime=rt, model=model, optimizer=optimizer, scheduler=scheduler, reader=SameBatch(batch),
                  checkpointer=Checkpointer(run_dir / "checkpoints", rt, fingerprint={}, config={}, keep_last=1,
                                            resume=ResumeConfig()),
                  metrics=MetricsLogger(run_dir, cfg.logger.__class__(progress=False, wandb=cfg.logger.wandb.__class__(
                      mode="disabled")), stage="bench", run_name="bench", config={}),
                  state=TrainState(), extra={"ema": ema.module})
    stamps: list[float] = []

    def after_step(state: TrainState) -> None:
        ema.step(model.parameters(), state)
        stamps.append(time.perf_counter())

    schedule = Schedule(steps=steps + 1, accum=1, global_batch=len(batch["seeds"]), checkpoint_every=10**9,
                        log_every=1, show_progress=False)
    # steps + 1: the loop checkpoints after its last step, outside the timed steps
    train_steps(parts, schedule, Objective(cfg.diffusion, frozen, rt.device), desc="ours", after_step=after_step)
    parts.metrics.close()
    rt.close()
    return [b - a for a, b in zip(stamps, stamps[1:])][: steps - 1]


def bare(cfg: Any, frozen: FrozenEncoders, batch: dict[str, Any], steps: int) -> list[float]:
    """The peer: the same computation as a plain loop."""
    from diffusers.training_utils import EMAModel

    from models.diffusion import make_scheduler

    d = cfg.diffusion
    seed_everything(0)
    model = build_denoiser(cfg.unet, text_dim=frozen.text_dim, latent_channels=4)
    ema = EMAModel(model.parameters(), decay=0.999, foreach=True)
    o = cfg.train_t2i.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    noise_schedule = make_scheduler(prediction_type=d.prediction_type, beta_schedule=d.beta_schedule,
                                    num_train_timesteps=d.num_train_timesteps)
    empty = frozen.empty_caption(torch.device("cpu"))
    stamps = [time.perf_counter()]
    for _ in range(steps):
        with torch.no_grad():
            latents = frozen.latents(batch["pixels"])
            states = frozen.text(batch["input_ids"], batch["mask"])
        drop = dropout_draws(batch["seeds"], d.cfg_dropout)
        states, mask = drop_captions(states, batch["mask"], drop, *empty)
        noise = torch.randn(latents.shape)
        t = torch.randint(0, d.num_train_timesteps, (latents.shape[0],))
        noisy, target = noised_and_target(noise_schedule, latents, noise, t)
        loss = weighted_mse(model(noisy, t, states, mask), target, loss_weights(noise_schedule, t, d.min_snr_gamma))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    parser.add_argument("--unet", default="tiny", help="a conf/unet preset")
    args = parser.parse_args()
    cfg = load_experiment([f"unet={args.unet}", "runtime=single"])
    # Our runtime keeps freed CPU memory in the heap (train/runtime/processes.py); give the bare loop the same
    # allocator setting so that the ratio measures the trainer, not malloc.
    keep_freed_memory_in_heap()
    with tempfile.TemporaryDirectory() as tmp:
        frozen, tokenizer = _parts(cfg, Path(tmp), Path(tmp) / "tokenizer")
        batch = _batch(tokenizer, args.batch, args.resolution)
        times: dict[str, list[float]] = {"ours": [], "bare": []}
        for _ in range(args.rounds):
            times["bare"] += bare(cfg, frozen, batch, args.steps)
            times["ours"] += ours(cfg, frozen, batch, args.steps, Path(tmp))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"train-t2i step, unet={args.unet}, {args.resolution}px, batch {args.batch}, "
          f"{len(times['ours'])} timed steps per side ({torch.get_num_threads()} threads)")
    print("| side | ms/step (median) | vs bare |\n|---|---:|---:|")
    for side in ("bare", "ours"):
        print(f"| {side} | {med[side]:.1f} | {med[side] / med['bare']:.3f} |")


if __name__ == "__main__":
    main()
