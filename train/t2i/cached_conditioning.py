"""train-t2i from a cache without T5 and without the VAE's encoder.

Trained from `recap cache`'s shards, the diffusion model needs of T5 only what no cached sample
holds: the empty caption's states, which classifier-free-guidance dropout swaps in, and the states
of train_t2i.sampling.prompts for the sample grids. `recap cache` computes them once, beside the
shards (``conditioning.safetensors``; data_pipeline/latent_cache.py has the format), with the same
calls train-t2i made from raw images: the empty caption as `FrozenEncoders.empty_caption` encodes
it, the prompts as `RecapPipeline.encode_prompts` pads them. train-t2i then builds `CachedEncoders`
in place of `FrozenEncoders`: the states' width and the VAE's config on every rank, the VAE's decoder
only on the rank that draws sample grids. T5 (T5-XXL: 9.5 GB in bf16 per GPU) and the VAE's
encoder are never loaded for training; the export at the end loads the whole frozen encoders once,
on the main rank's CPU, after training (train/stages/train_t2i.py).

A cache without the file (written before it existed), or with the states of other sampling
prompts, is refused before training (exit 2): rerunning `recap cache` with the run's config skips
every done shard and writes only this file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.latent_cache import CONDITIONING_FILE, decode_conditioning, encode_conditioning
from data_pipeline.shard_io import write_bytes_atomic
from models.denoiser import CaptionConditionedUNet
from models.pipeline import RecapPipeline, tokenize_prompts
from train.config.models import TextEncoderConfig
from train.config.typed import ConfigError
from train.t2i.checks import read_conditioning
from train.t2i.parts import FrozenEncoders, load_vae_config, load_vae_decoder

log = logging.getLogger("recap")


def prompt_states(frozen: FrozenEncoders, prompts: Sequence[str],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 states (P, T, D), zero at padding, and mask (P, T) bool of ``prompts``, as
    `RecapPipeline.encode_prompts` computes them before its xf stage: padded to the longest,
    truncated to the tokenizer's ``model_max_length``."""
    ids, mask = tokenize_prompts(frozen.tokenizer, list(prompts), device)
    return frozen.text(ids, mask), mask


def conditioning_tensors(frozen: FrozenEncoders, prompts: Sequence[str],
                         device: torch.device) -> dict[str, torch.Tensor]:
    """The conditioning file's tensors (data_pipeline/latent_cache.py), float32 outside autocast."""
    tensors = dict(zip(("empty_states", "empty_mask"), frozen.empty_caption(device)))
    if prompts:  # the grid's batch: the prompts, and the empty caption once per prompt for guidance
        tensors["prompt_states"], tensors["prompt_mask"] = prompt_states(frozen, prompts, device)
        tensors["unconditional_states"], tensors["unconditional_mask"] = prompt_states(frozen, [""] * len(prompts),
                                                                                       device)
    return tensors


def conditioning_about(te: TextEncoderConfig, seed: int, prompts: Sequence[str]) -> dict[str, Any]:
    """What the cache's T5 states were computed with, and the sampling prompts: the file's metadata."""
    toy = te.pretrained is None
    return {"text_encoder": te.pretrained or "architecture", "architecture": asdict(te.architecture) if toy else None,
            "seed": seed if toy else None, "tokenizer": te.tokenizer or te.pretrained, "max_tokens": te.max_tokens,
            "prompts": list(prompts)}


def _encoder_of(about: dict[str, Any]) -> str:
    return ", ".join(f"{k} {about.get(k)}" for k in ("text_encoder", "architecture", "seed", "tokenizer", "max_tokens"))


def write_conditioning(folder: Path, frozen: FrozenEncoders, about: dict[str, Any], device: torch.device) -> bool:
    """Write ``folder``/conditioning.safetensors unless it holds ``about``'s states already (a
    rerun leaves it untouched; new sampling prompts rewrite it, atomically). True when written.
    ConfigError when it holds another text encoder's states: so do the done shards beside it."""
    path = folder / CONDITIONING_FILE
    if path.is_file():
        try:
            _, old = decode_conditioning(path.read_bytes())
        except ValueError:
            old = None  # unreadable: written again
        if old == about:
            return False
        same_encoder = old is None or all(old.get(k) == v for k, v in about.items() if k != "prompts")
        if not same_encoder:
            raise ConfigError("cache.output", f"{folder} holds T5 states of {_encoder_of(old)}; this config's text "
                              f"encoder is {_encoder_of(about)}: write the cache to a new cache.output")
    write_bytes_atomic(path, encode_conditioning(conditioning_tensors(frozen, about["prompts"], device), about))
    return True


class _StatesPipeline(RecapPipeline):
    """RecapPipeline whose prompt batches come as T5 states (``states``: prompts tuple -> (states
    (B, T, D), mask (B, T))) instead of through the tokenizer and T5: sample grids from a cache.
    Never saved (it has neither)."""

    states: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RecapPipeline.encode_prompts with the states looked up (``max_tokens``: already applied)."""
        if tuple(prompts) not in self.states:
            raise ValueError(f"no cached T5 states for the prompts {list(prompts)}")
        states, mask = (t.to(self._execution_device) for t in self.states[tuple(prompts)])
        tokens, pooled = self.caption_transformer(states.to(self.caption_transformer.dtype), mask)
        return tokens.to(self.unet.dtype), mask, pooled.to(self.unet.dtype)


@dataclass
class CachedEncoders:
    """FrozenEncoders' stand-in for train-t2i from a cache: the cache's conditioning tensors (CPU)
    for T5, the VAE's config for the VAE, and its decoder (``decoder``, None on the ranks that
    draw no sample grids). No tokenizer: cached captions are T5 states already."""

    conditioning: dict[str, torch.Tensor]
    prompts: tuple[str, ...]  # train_t2i.sampling.prompts: the cached ones (read_conditioning checked)
    vae_config: dict[str, Any]
    decoder: Any | None
    tokenizer: None = None

    @property
    def text_dim(self) -> int:
        """D: the width of the cached T5 states."""
        return int(self.conditioning["empty_states"].shape[-1])

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["latent_channels"])

    @property
    def downsampling_factor(self) -> int:
        """f, as models.vae.downsampling_factor reads it off a loaded VAE."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    def empty_caption(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's T5 states (T_e, D) and mask (T_e,) on ``device``."""
        return self.conditioning["empty_states"].to(device), self.conditioning["empty_mask"].to(device)

    def pipeline(self, weights: CaptionConditionedUNet, scheduler: Any) -> RecapPipeline:
        """A pipeline of ``weights`` that samples the cached prompts (their batch as cached) only."""
        assert self.decoder is not None, "the VAE's decoder is loaded only where sample grids are drawn"
        c = self.conditioning
        pipe = _StatesPipeline(tokenizer=None, text_encoder=None, caption_transformer=weights.caption_transformer,
                               unet=weights.unet, vae=self.decoder, scheduler=scheduler)
        count = c["prompt_states"].shape[0] if "prompt_states" in c else 0
        pipe.states = {} if not count else {
            ("",) * count: (c["unconditional_states"], c["unconditional_mask"]),
            tuple(self.prompts): (c["prompt_states"], c["prompt_mask"])}
        return pipe


def load_cached(cache: str, vae_folder: str, prompts: Sequence[str], device: torch.device, *,
                decoder: bool) -> CachedEncoders:
    """What train-t2i from the cache at ``cache`` needs of the frozen encoders: its conditioning
    file (checked against the sampling ``prompts``), the VAE's config, and with ``decoder`` (the
    rank that draws sample grids) the VAE's decoder on ``device``."""
    conditioning = read_conditioning(cache, prompts)
    vae = load_vae_decoder(vae_folder).to(device) if decoder else None
    return CachedEncoders(conditioning, tuple(prompts), load_vae_config(vae_folder), vae)
