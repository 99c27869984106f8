"""The latent autoencoder: diffusers' AutoencoderKL, its training loss and its reconstruction PSNR.

A VAE of L levels (``len(block_out_channels)``) downsamples by f = 2**(L - 1): 8x for Stable
Diffusion's 4 levels, 4x or 2x for the toy world's smaller ones. Pure: builds modules and computes
tensors; no IO beyond diffusers' own folder format.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


def build_vae(block_out_channels: list[int], *, layers_per_block: int, latent_channels: int = 4,
              norm_num_groups: int = 32, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL downsampling 2**(len(block_out_channels) - 1) times
    (4 levels: 8x)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, scaling_factor=scaling_factor,
    )


ReconstructionLoss = Literal["l1", "mse"]


def object_weights(images: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel weights (B, 1, H, W) with mean 1: 1 + object_weight * the pixel's distance from
    its image's median colour, normalised per image. On scenes of small objects on a plain
    background (the toy world) the objects weigh more than their share of the pixels.

    images: (B, 3, H, W) in [-1, 1].
    """
    median = images.flatten(2).median(dim=2).values[..., None, None]  # (B, 3, 1, 1)
    weights = 1.0 + object_weight * (images - median).norm(dim=1, keepdim=True)  # (B, 1, H, W)
    return weights / weights.mean(dim=(2, 3), keepdim=True)


def vae_loss(vae: torch.nn.Module, images: torch.Tensor, kl_weight: float,
             reconstruction: ReconstructionLoss = "l1", sample_posterior: bool = True,
             object_weight: float = 0.0) -> torch.Tensor:
    """Reconstruction (L1 or MSE) of z + kl_weight * KL(q(z|x) || N(0, I)), both per element.

    z is a sample of the posterior q(z|x) (a VAE), or with ``sample_posterior=False`` its mean,
    the latent that `encode_pixels` gives the diffusion model (an autoencoder whose KL term only
    keeps the means near 0). Measured on the toy world (benchmarks/toy_vae_quality.py): L1 settles
    on the background colour for the first thousands of steps where MSE (what PSNR measures) draws
    the objects, and the sampling noise of a freshly initialised posterior (std ~1) hides the
    objects' colours from the decoder for longer than a CPU run lasts.

    Args:
        images: (B, 3, H, W) in [-1, 1], H and W multiples of the VAE's factor f.
    Returns:
        Scalar loss. A sampled z draws from the global torch RNG (restored on resume).
    """
    posterior = vae.encode(images).latent_dist  # mean/logvar: (B, C, H/f, W/f)
    z = posterior.sample() if sample_posterior else posterior.mode()
    recon = vae.decode(z).sample  # (B, 3, H, W)
    kl = posterior.kl().sum() / posterior.mean.numel()
    if reconstruction == "l1":
        error = (recon - images).abs()
    elif reconstruction == "mse":
        error = (recon - images).square()
    else:
        raise ValueError(f"reconstruction must be 'l1' or 'mse', got {reconstruction!r}")
    if object_weight:
        error = error * object_weights(images, object_weight)
    return error.mean() + kl_weight * kl


class VaeTraining(torch.nn.Module):
    """The VAE with its loss as ``forward``: DDP and DeepSpeed only see calls to forward."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, reconstruction: ReconstructionLoss = "l1",
                 sample_posterior: bool = True, object_weight: float = 0.0) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight
        self.reconstruction, self.sample_posterior = reconstruction, sample_posterior
        self.object_weight = object_weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> scalar loss."""
        return vae_loss(self.vae, images, self.kl_weight, self.reconstruction, self.sample_posterior,
                        self.object_weight)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """f: pixels per latent along each side, 2**(levels - 1) (diffusers' ``vae_scale_factor``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the posterior means of ``images`` (B, 3, H, W): latents then have unit scale."""
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


@torch.no_grad()
def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> scaled latents (B, C, H/f, W/f): the posterior mean (mode)
    times the VAE's scaling factor, so that they have about unit variance."""
    images = pixels.to(vae.dtype) / 127.5 - 1.0  # [-1, 1]
    # contiguous: the posterior mean comes out in a strided layout, which *_like ops would copy
    return (vae.encode(images).latent_dist.mode() * vae.config.scaling_factor).contiguous()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> their reconstructions (B, 3, H, W), clamped to [-1, 1]:
    decoded from the posterior mean (no sampling, so no RNG is drawn)."""
    images = images.to(vae.dtype)
    return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1.0, 1.0)


def psnr_db(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image: (B, 3, H, W) pairs in [-1, 1] -> (B,) float32.

    10 * log10(1 / MSE) with pixels rescaled to [0, 1] (the usual 8-bit PSNR up to quantisation);
    an exact reconstruction gives 100 dB rather than infinity.
    """
    if images.shape != reconstructions.shape:
        raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(reconstructions.shape)} differ")
    err = ((images.float() - reconstructions.float()) / 2.0).square()  # in [0, 1] units
    mse = err.flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)
