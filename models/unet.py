"""The denoiser: diffusers' UNet2DConditionModel as the recipe configures it.

``resnet_time_scale_shift="scale_shift"``: the timestep embedding scales and shifts each
ResNet block's GroupNorm output (the recipe's timestep-conditioned GroupNorm) instead of being
added. Cross-attention at the levels ``attention_levels`` marks, to the xf tokens; the pooled
caption enters through ``class_embed_type="projection"`` and is added to the timestep embedding.
Any latent height and width divisible by 2**(levels - 1) works (multi-aspect buckets).
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import UNet2DConditionModel


def build_unet(*, block_out_channels: Sequence[int], attention_levels: Sequence[bool], layers_per_block: int,
               attention_head_dim: int, cross_attention_dim: int, pooled_dim: int, latent_channels: int = 4,
               norm_num_groups: int = 32) -> UNet2DConditionModel:
    """A randomly initialised UNet; ``cross_attention_dim`` is the xf width, ``pooled_dim`` the
    pooled caption's size."""
    if len(attention_levels) != len(block_out_channels):
        raise ValueError("attention_levels needs one entry per block_out_channels level")
    down = [("CrossAttnDownBlock2D" if attn else "DownBlock2D") for attn in attention_levels]
    up = [("CrossAttnUpBlock2D" if attn else "UpBlock2D") for attn in reversed(attention_levels)]
    return UNet2DConditionModel(
        in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=tuple(down), up_block_types=tuple(up), mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim, cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups, resnet_time_scale_shift="scale_shift",
        class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim,
    )
