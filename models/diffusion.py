"""The diffusion objective, apart from the network: noising, targets, loss weights, CFG dropout.

Schedules are diffusers' ``DDPMScheduler`` (its ``add_noise`` and ``get_velocity`` are the
forward process); the rest is the few lines of math a trainer needs around a denoiser:

    noisy, target = noised_and_target(scheduler, latents, noise, t)   # eps or v target
    loss = weighted_mse(unet(noisy, t, ...), target, loss_weights(scheduler, t, min_snr_gamma))

Min-SNR weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
per-timestep weight min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for
v targets, so the loss on x0 is capped at gamma.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def make_scheduler(*, prediction_type: str, beta_schedule: str, num_train_timesteps: int) -> DDPMScheduler:
    """The training noise schedule (DDPM betas; ``squaredcos_cap_v2`` is the improved-DDPM cosine)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False)


def noised_and_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target), both shaped like ``latents`` (B, C, H, W); ``timesteps`` (B,) int64."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not trained here (epsilon or v_prediction)")


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, (B,) float32."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights (B,): ones, or min-SNR-gamma for the scheduler's target."""
    if min_snr_gamma is None:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    ratio = snr(scheduler, timesteps)
    capped = torch.clamp(ratio, max=min_snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return capped / (ratio + 1.0)
    return capped / ratio


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight x per-sample MSE (mean over C, H, W), in float32."""
    per_sample = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)  # (B,)
    return (weights * per_sample).mean()


def drop_captions(states: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, empty_states: torch.Tensor,
                  empty_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance dropout: rows where ``drop`` (B,) is True get the empty caption.

    ``states`` (B, T, D) and ``mask`` (B, T) are the batch's T5 outputs; ``empty_states``
    (T_e, D) and ``empty_mask`` (T_e,) the empty caption's, computed once (T_e <= T; padded here).
    """
    if empty_states.shape[0] > states.shape[1]:
        raise ValueError(f"the empty caption has {empty_states.shape[0]} tokens, the batch only {states.shape[1]}")
    pad = states.shape[1] - empty_states.shape[0]
    empty_s = torch.nn.functional.pad(empty_states, (0, 0, 0, pad)).to(states.dtype)  # (T, D)
    empty_m = torch.nn.functional.pad(empty_mask, (0, pad)).to(mask.dtype)  # (T,)
    rows = drop.view(-1, 1, 1)
    return torch.where(rows, empty_s, states), torch.where(drop.view(-1, 1), empty_m, mask)


def dropout_draws(seeds: torch.Tensor, probability: float) -> torch.Tensor:
    """Which samples (B,) drop their caption, from each sample's own seed (int64): the same
    decision after a resume or on any number of ranks."""
    generator = torch.Generator()
    draws = []
    for seed in seeds.tolist():
        generator.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        draws.append(torch.rand((), generator=generator).item() < probability)
    return torch.tensor(draws, dtype=torch.bool)
