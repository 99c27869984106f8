"""The text-to-image model's parts, built from the config: what train-t2i (and the stages after it)
load the same way.

Frozen: the tokenizer and T5 encoder (a local Hugging Face folder, or for the toy world a tiny
random T5 built from its architecture under a fixed seed, so every stage builds the very same
one), and the VAE (a diffusers folder). Trained: the xf caption stage and the UNet. (Training from
a cache loads neither T5 nor the VAE's encoder: train/t2i/cached_conditioning.py.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.caption_tokenizer import load_tokenizer
from data_pipeline.seeding import derive_seed
from models.denoiser import CaptionConditionedUNet
from models.pipeline import RecapPipeline
from models.text_conditioning import CaptionTransformer, build_t5_encoder, encode_captions
from models.unet import build_unet
from models.vae import downsampling_factor, encode_pixels
from train.config.models import TextEncoderConfig, UnetConfig
from train.config.typed import ConfigError

_T5_SEED_STREAM = 0x75  # the toy T5's weights depend on the experiment seed only


@dataclass
class FrozenEncoders:
    """Tokenizer, T5 and VAE, frozen and in eval mode on one device."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    max_tokens: int

    @property
    def text_dim(self) -> int:
        """D: the width of the T5 states."""
        return int(self.text_encoder.config.d_model)

    @property
    def latent_channels(self) -> int:
        """C: the VAE's latent channels."""
        return int(self.vae.config.latent_channels)

    def to(self, device: torch.device) -> FrozenEncoders:
        self.text_encoder.to(device)
        self.vae.to(device)
        return self

    @property
    def downsampling_factor(self) -> int:
        """f: the VAE's pixels per latent along each side."""
        return downsampling_factor(self.vae)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> scaled latents (B, C, H/f, W/f)."""
        return encode_pixels(self.vae, pixels)

    @torch.no_grad()
    def text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, T) -> T5 states (B, T, D), zero at padding."""
        return encode_captions(self.text_encoder, input_ids, mask)

    @torch.no_grad()
    def empty_caption(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's T5 states (T_e, D) and mask (T_e,): classifier-free guidance's
        unconditional input, computed once."""
        ids = torch.tensor([self.tokenizer("")["input_ids"]], device=device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        return self.text(ids, mask)[0], mask[0]

    def pipeline(self, weights: CaptionConditionedUNet, scheduler: Any) -> RecapPipeline:
        """A sampling pipeline of the trained ``weights`` (xf + UNet) with these encoders."""
        return RecapPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                             caption_transformer=weights.caption_transformer, unet=weights.unet, vae=self.vae,
                             scheduler=scheduler)


def load_text_encoder(te: TextEncoderConfig, seed: int) -> tuple[Any, Any]:
    """(tokenizer, frozen T5EncoderModel) per the text_encoder config section."""
    folder = te.tokenizer or te.pretrained
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        hint = "run `recap train-tokenizer` first" if te.pretrained is None else "point it at the T5 folder"
        raise ConfigError("text_encoder.tokenizer", f"no tokenizer at {folder} ({exc.__class__.__name__}); {hint}") from None
    if te.pretrained is not None:
        return tokenizer, build_t5_encoder(pretrained=te.pretrained, architecture=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _T5_SEED_STREAM))
        t5 = build_t5_encoder(pretrained=None, architecture=dataclasses.asdict(te.architecture), vocab_size=len(tokenizer))
    return tokenizer, t5


def _no_vae(folder: str, exc: Exception) -> ConfigError:
    return ConfigError("train_t2i.vae", f"no diffusers AutoencoderKL at {folder} ({exc.__class__.__name__}); run "
                       "`recap train-vae` (toy) or point it at a pretrained VAE folder")


def load_vae(folder: str) -> Any:
    """A frozen diffusers AutoencoderKL from a local folder."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise _no_vae(folder, exc) from None
    vae.requires_grad_(False)
    return vae.eval()


def load_vae_config(folder: str) -> dict[str, Any]:
    """The config of the diffusers AutoencoderKL in a local folder, without reading its weights."""
    from diffusers import AutoencoderKL

    try:
        return dict(AutoencoderKL.load_config(folder, local_files_only=True))
    except (OSError, ValueError) as exc:
        raise _no_vae(folder, exc) from None


def load_vae_decoder(folder: str) -> Any:
    """The frozen VAE of a local folder without its encoder half (``encoder`` and ``quant_conv``
    dropped before it moves anywhere): what decoding sample grids needs."""
    vae = load_vae(folder)
    vae.encoder, vae.quant_conv = None, None
    return vae


def load_frozen(te: TextEncoderConfig, vae_folder: str, seed: int) -> FrozenEncoders:
    tokenizer, t5 = load_text_encoder(te, seed)
    return FrozenEncoders(tokenizer, t5, load_vae(vae_folder), te.max_tokens)


def build_denoiser(unet: UnetConfig, *, text_dim: int, latent_channels: int) -> CaptionConditionedUNet:
    """xf + UNet, randomly initialised from the global torch RNG (seed it first)."""
    xf = CaptionTransformer(text_dim=text_dim, width=unet.xf_width, layers=unet.xf_layers, heads=unet.xf_heads,
                            pooled_dim=unet.xf_width)
    net = build_unet(block_out_channels=unet.block_out_channels, attention_levels=unet.attention_levels,
                     layers_per_block=unet.layers_per_block, attention_head_dim=unet.attention_head_dim,
                     cross_attention_dim=unet.xf_width, pooled_dim=unet.xf_width, latent_channels=latent_channels,
                     norm_num_groups=min(32, unet.block_out_channels[0]))
    return CaptionConditionedUNet(xf, net)
