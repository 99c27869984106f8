"""The training loss of train-t2i for one micro-batch, as DiT's `training_losses` reads: encode,
drop captions for classifier-free guidance, noise, predict, weighted MSE (the math is in
models/diffusion.py)."""

from __future__ import annotations

from typing import Any

import torch

from models.diffusion import (
    drop_captions, dropout_draws, loss_weights, make_scheduler, noised_and_target, weighted_mse,
)
from train.config.models import DiffusionConfig
from train.t2i.cached_conditioning import CachedEncoders
from train.t2i.parts import FrozenEncoders


class Objective:
    """(model, batch) -> {"loss", "cfg_dropped"}: the loss a `train_steps` call minimises.

    A batch holds either ``pixels`` uint8 (B, 3, H, W) with ``input_ids``/``mask`` (B, T), or
    cached ``latents`` (B, C, H/f, W/f) (f: the VAE's factor) with T5 ``states`` (B, T, D) and
    ``mask``; and ``seeds`` int64 (B,) on the CPU (train/training/loop.py leaves them there), one
    per sample. Cached batches only with ``CachedEncoders`` (no T5, no VAE encoder: the empty
    caption's states come from the cache).
    """

    def __init__(self, diffusion: DiffusionConfig, frozen: FrozenEncoders | CachedEncoders,
                 device: torch.device) -> None:
        d = diffusion
        self.frozen, self.min_snr_gamma, self.cfg_dropout = frozen, d.min_snr_gamma, d.cfg_dropout
        self.noise = make_scheduler(prediction_type=d.prediction_type, beta_schedule=d.beta_schedule,
                                    num_train_timesteps=d.num_train_timesteps)
        self.empty = frozen.empty_caption(device)  # (T_e, D), (T_e,): computed once

    def __call__(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # (B, C, h, w) and (B, T, D): from the cache, or encoded here from pixels and token ids
        latents = batch["latents"] if "latents" in batch else self.frozen.latents(batch["pixels"])
        states = batch["states"] if "states" in batch else self.frozen.text(batch["input_ids"], batch["mask"])
        drop = dropout_draws(batch["seeds"], self.cfg_dropout).to(latents.device)  # (B,) from per-sample seeds
        states, mask = drop_captions(states, batch["mask"], drop, *self.empty)
        noise = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device)  # whatever the layout
        timesteps = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy, target = noised_and_target(self.noise, latents, noise, timesteps)
        prediction = model(noisy, timesteps, states, mask)
        loss = weighted_mse(prediction, target, loss_weights(self.noise, timesteps, self.min_snr_gamma))
        return {"loss": loss, "cfg_dropped": drop.float().mean()}
