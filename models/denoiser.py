"""What train-t2i trains: the xf caption stage and the UNet, as one module.

The frozen parts (T5, VAE) stay outside it: DDP and DeepSpeed wrap only what learns.
"""

from __future__ import annotations

import torch
from torch import nn


class CaptionConditionedUNet(nn.Module):
    """(noisy latents, timesteps, T5 states, mask) -> the UNet's prediction (noise or v).

    Args of forward:
        noisy: (B, C, h, w) latents at the timesteps' noise level.
        timesteps: (B,) int64.
        states: (B, T, D) frozen T5 token states (zero at padding), mask: (B, T) bool.
    """

    def __init__(self, caption_transformer: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        self.caption_transformer, self.unet = caption_transformer, unet

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        tokens, pooled = self.caption_transformer(states, mask)  # (B, T, width), (B, pooled)
        return self.unet(noisy, timesteps, encoder_hidden_states=tokens, encoder_attention_mask=mask,
                         class_labels=pooled).sample
