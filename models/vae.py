"""The latent autoencoder: diffusers' AutoencoderKL (8x downsampling) and its training loss.

Pure: builds modules and computes tensors; no IO beyond diffusers' own folder format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


def build_vae(block_out_channels: list[int], *, layers_per_block: int, latent_channels: int = 4,
              norm_num_groups: int = 32, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL; len(block_out_channels)=4 gives 8x downsampling."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, scaling_factor=scaling_factor,
    )


def vae_loss(vae: torch.nn.Module, images: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)), both per element.

    Args:
        images: (B, 3, H, W) in [-1, 1], H and W multiples of 8.
    Returns:
        Scalar loss. Samples z with the global torch RNG (restored on resume).
    """
    posterior = vae.encode(images).latent_dist  # mean/logvar: (B, C, H/8, W/8)
    recon = vae.decode(posterior.sample()).sample  # (B, 3, H, W)
    kl = posterior.kl().sum() / posterior.mean.numel()
    return F.l1_loss(recon, images) + kl_weight * kl


class VaeTraining(torch.nn.Module):
    """The VAE with its loss as ``forward``: DDP and DeepSpeed only see calls to forward."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> scalar loss."""
        return vae_loss(self.vae, images, self.kl_weight)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the posterior means of ``images`` (B, 3, H, W): latents then have unit scale."""
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


@torch.no_grad()
def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> scaled latents (B, C, H/8, W/8): the posterior mean (mode)
    times the VAE's scaling factor, so that they have about unit variance."""
    images = pixels.to(vae.dtype) / 127.5 - 1.0  # [-1, 1]
    # contiguous: the posterior mean comes out in a strided layout, which *_like ops would copy
    return (vae.encode(images).latent_dist.mode() * vae.config.scaling_factor).contiguous()
