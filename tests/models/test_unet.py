"""The UNet preset: scale-shift timestep norm, non-square latents, masked cross-attention, pooled caption."""

from __future__ import annotations

import pytest
import torch

from models.unet import build_unet
from tests.helpers import assert_close_to_scale

TINY = dict(block_out_channels=[32, 64, 64], attention_levels=[False, True, True], layers_per_block=1,
            attention_head_dim=16, cross_attention_dim=24, pooled_dim=24, norm_num_groups=16)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(**TINY).eval()


def _inputs(height: int = 8, width: int = 16):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, height, width, generator=g)
    tokens = torch.randn(2, 5, 24, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = torch.randn(2, 24, generator=g)
    return latents, torch.tensor([10, 500]), tokens, mask, pooled


def _run(unet, latents, t, tokens, mask, pooled):
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=tokens, encoder_attention_mask=mask, class_labels=pooled).sample


def test_config_is_the_recipes(unet) -> None:
    cfg = unet.config
    assert cfg.resnet_time_scale_shift == "scale_shift" and cfg.class_embed_type == "projection"
    assert cfg.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert cfg.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


@pytest.mark.parametrize(("height", "width"), [(8, 16), (16, 4), (8, 8)])
def test_non_square_latents_keep_their_shape(unet, height: int, width: int) -> None:
    latents, t, tokens, mask, pooled = _inputs(height, width)
    assert _run(unet, latents, t, tokens, mask, pooled).shape == (2, 4, height, width)


def test_masked_tokens_do_not_matter_and_the_caption_does(unet) -> None:
    latents, t, tokens, mask, pooled = _inputs()
    out = _run(unet, latents, t, tokens, mask, pooled)
    changed = tokens.clone()
    changed[0, 3:] = 100.0  # under the mask
    assert_close_to_scale(_run(unet, latents, t, changed, mask, pooled), out)
    changed[0, 0] += 1.0  # a real token
    assert not torch.allclose(_run(unet, latents, t, changed, mask, pooled)[0], out[0], atol=1e-4)
    assert not torch.allclose(_run(unet, latents, t, tokens, mask, pooled + 1.0), out, atol=1e-4)  # pooled is used


def test_mismatched_levels_are_refused() -> None:
    with pytest.raises(ValueError, match="one entry per block_out_channels"):
        build_unet(**{**TINY, "attention_levels": [True, True]})
