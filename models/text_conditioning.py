"""Caption conditioning for the UNet: a frozen T5 encoder, then the trainable "xf" stage.

The recipe (after GLIDE/DALL-E 2) runs a few transformer layers ("xf") over the text encoder's
token states, trained with the UNet. Its per-token output feeds the UNet's cross-attention; its
masked mean, projected, is the pooled caption added to the timestep embedding (diffusers'
``class_embed_type="projection"``). Padding never leaks in: T5 and xf both see the attention
mask, and the pooled vector averages real tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def build_t5_encoder(*, pretrained: str | None, architecture: dict[str, Any] | None, vocab_size: int | None = None) -> Any:
    """A frozen ``T5EncoderModel`` in eval mode: T5-XXL from a local Hugging Face folder, or a tiny
    random one from ``architecture`` (T5Config fields) for a tokenizer of ``vocab_size`` tokens."""
    from transformers import T5Config, T5EncoderModel

    if (pretrained is None) == (architecture is None):
        raise ValueError("give exactly one of pretrained (a local folder) or architecture")
    if pretrained is not None:
        model = T5EncoderModel.from_pretrained(pretrained, local_files_only=True)
    else:
        if vocab_size is None:
            raise ValueError("a T5 built from an architecture needs the tokenizer's vocab_size")
        config = T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                          feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, **architecture)
        model = T5EncoderModel(config)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def encode_captions(t5: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T5 token states (B, T, d_model), zero at padded positions. ``input_ids``/``mask``: (B, T)."""
    states = t5(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    return states * mask.unsqueeze(-1).to(states.dtype)


class CaptionTransformer(ModelMixin, ConfigMixin):
    """The xf stage: (T5 states (B, T, text_dim), mask (B, T) bool) -> (tokens (B, T, width),
    pooled (B, pooled_dim)).

    A diffusers ``ModelMixin``/``ConfigMixin`` (still an ``nn.Module``) so that it saves and loads
    like the UNet and VAE: ``save_pretrained(folder)`` writes config.json + safetensors and
    ``CaptionTransformer.from_pretrained(folder)`` rebuilds it, offline, as a pipeline component.
    """

    @register_to_config
    def __init__(self, text_dim: int, width: int, layers: int, heads: int, pooled_dim: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(text_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        # Not ``self.layers``: ModelMixin resolves a config key (``layers``, the depth) before a
        # submodule of the same name, so the stack needs a name of its own.
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.proj_pooled = nn.Linear(width, pooled_dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every caption needs at least one unmasked token (T5 appends </s>)")
        x = self.proj_in(states)  # (B, T, width)
        x = self.blocks(x, src_key_padding_mask=~mask)
        tokens = self.norm_out(x) * mask.unsqueeze(-1).to(x.dtype)  # (B, T, width), zero at padding
        pooled = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(x.dtype)  # masked mean (B, width)
        return tokens, self.proj_pooled(pooled)
