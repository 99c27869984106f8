"""The models' sections: the CoCa captioner, the T5 text encoder, the VAE, the UNet and the
diffusion objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from train.config.typed import ConfigError


@dataclass(frozen=True)
class CaptionerConfig:
    """An open_clip CoCa. ``architecture`` is an open_clip model config (embed_dim, vision_cfg,
    text_cfg, multimodal_cfg) used instead of open_clip's built-in ``model_name`` config."""

    model_name: str
    architecture: dict[str, Any] | None = None
    pretrained: str | None = None  # local open_clip checkpoint file; null = random init
    fitted_vocab_size: int | None = None  # null: open_clip's BPE (49408); N: fitted by pretrain-captioner (toy)

    def validate(self) -> None:
        from data_pipeline.caption_tokenizer import CAPTIONER_MIN_VOCAB

        if self.fitted_vocab_size is not None:
            if self.architecture is None or self.pretrained is not None:
                raise ConfigError("fitted_vocab_size", "needs a captioner built from captioner.architecture without "
                                  "pretrained weights (those have open_clip's 49408-token embeddings); set it to null")
            if self.fitted_vocab_size < CAPTIONER_MIN_VOCAB:
                raise ConfigError("fitted_vocab_size", f"must be >= {CAPTIONER_MIN_VOCAB} (special tokens and the "
                                  f"alphabet), got {self.fitted_vocab_size}")
        vocab_size = self.fitted_vocab_size or 49408  # the tokenizer's: fitted, or open_clip's BPE
        for tower in ("text_cfg", "multimodal_cfg"):
            named = (self.architecture or {}).get(tower, {}).get("vocab_size", vocab_size)
            if named != vocab_size:
                raise ConfigError(f"architecture.{tower}.vocab_size", f"is {named} but the tokenizer has {vocab_size} "
                                  "tokens (captioner.fitted_vocab_size, null: open_clip's 49408); make them equal, "
                                  "e.g. captioner=coca_tiny_small_vocab")


@dataclass(frozen=True)
class T5Architecture:
    """A T5 encoder built from scratch (toy runs): transformers.T5Config fields."""

    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int


@dataclass(frozen=True)
class TextEncoderConfig:
    """Frozen T5 encoder: ``pretrained`` HF folder (production) or a tiny ``architecture``."""

    max_tokens: int
    pretrained: str | None = None
    architecture: T5Architecture | None = None
    tokenizer: str | None = None  # HF tokenizer folder; null = the pretrained folder

    def validate(self) -> None:
        if (self.pretrained is None) == (self.architecture is None):
            raise ConfigError("pretrained", "set exactly one of text_encoder.pretrained or text_encoder.architecture")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be >= 1, got {self.max_tokens}")


VAE_LEVELS = (2, 3, 4)  # downsampling factor f = 2**(levels - 1): 2x, 4x or 8x


@dataclass(frozen=True)
class VaeConfig:
    """diffusers AutoencoderKL: a ``pretrained`` local folder (whose architecture these fields
    state) or an architecture trained by `recap train-vae` (toy). ``len(block_out_channels)``
    levels downsample 2**(levels - 1) times: 8x for Stable Diffusion's 4, 4x for 3, 2x for 2."""

    pretrained: str | None = None
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    scaling_factor: float | None = None  # null: the pretrained folder's, or estimated by train-vae

    @property
    def downsampling_factor(self) -> int:
        """f: pixels per latent along each side (diffusers' ``vae_scale_factor``)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels not in VAE_LEVELS:
            raise ConfigError("block_out_channels", f"needs {VAE_LEVELS[0]} to {VAE_LEVELS[-1]} levels (downsampling "
                              f"factor f = 2**(levels - 1): 2x, 4x or 8x), got {levels}: {self.block_out_channels}; "
                              "e.g. [32, 64, 64] for 4x or [32, 64, 64, 64] for 8x")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError("norm_num_groups", f"must divide every block_out_channels {self.block_out_channels}")


@dataclass(frozen=True)
class UnetConfig:
    """diffusers UNet2DConditionModel with scale-shift timestep norm (see models/unet.py)."""

    block_out_channels: list[int]
    attention_levels: list[bool]
    layers_per_block: int
    attention_head_dim: int
    xf_layers: int
    xf_width: int
    xf_heads: int

    @property
    def downsampling_factor(self) -> int:
        """Latent pixels per UNet bottleneck pixel along each side: 2**(levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError("attention_levels", "needs one entry per block_out_channels level")
        if self.xf_width % self.xf_heads:
            raise ConfigError("xf_heads", f"must divide xf_width={self.xf_width}")


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and objective (diffusers scheduler names)."""

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    num_train_timesteps: int = 1000
    min_snr_gamma: float | None = None
    cfg_dropout: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError("cfg_dropout", f"must be in [0, 1), got {self.cfg_dropout}")
