"""Text-to-image inference and the diffusers-format export of the trained model.

``RecapPipeline`` is a diffusers ``DiffusionPipeline`` over six components: the tokenizer, the
frozen T5 encoder, the xf stage (``CaptionTransformer``), the UNet, the VAE and any diffusers
scheduler (DDPM, DDIM, DPM-Solver++, ...). Sampling is the usual latent-diffusion loop with
classifier-free guidance against the empty caption "" (Ho & Salimans 2022), the same
unconditional input the trainer's caption dropout (``models.diffusion.drop_captions``) teaches:

    eps = eps(x_t, "") + guidance_scale * (eps(x_t, caption) - eps(x_t, ""))

``pipe.save_pretrained(folder)`` (or ``export_pipeline``) writes one subfolder per component plus
``model_index.json``; ``RecapPipeline.from_pretrained(folder)`` reads it back offline.

How the xf stage's library is found again: diffusers records a component whose top-level package
is not one it knows (diffusers, transformers, ...) under its *full module path*, so
model_index.json holds ``"caption_transformer": ["models.text_conditioning", "CaptionTransformer"]``.
On loading, diffusers (0.42) deliberately imports no module a repository names; it takes that
name from ``sys.modules``. This file imports ``models.text_conditioning`` at the top, so whoever
holds ``RecapPipeline`` has the module loaded, and no re-export from ``models/__init__.py`` nor
override of the loader is needed. (``DiffusionPipeline.from_pretrained`` without our class would
not know ``RecapPipeline``; load with ``RecapPipeline.from_pretrained``.)
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from models.text_conditioning import CaptionTransformer, encode_captions

OUTPUT_TYPES = ("pil", "pt", "latent")


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad xf tokens (B, T, W) with zeros and their mask (B, T) with False to ``length`` >= T."""
    if length < tokens.shape[1]:
        raise ValueError(f"cannot pad {tokens.shape[1]} tokens down to {length}")
    pad = length - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)


def guided(noise: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``noise`` (2B, C, h, w) is [unconditional; conditional] -> (B, C, h, w)."""
    uncond, cond = noise.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class RecapPipeline(DiffusionPipeline):
    """Caption -> image with the T5-conditioned latent diffusion model.

    Components: ``tokenizer`` (a Hugging Face tokenizer that appends ``</s>``), ``text_encoder``
    (``transformers.T5EncoderModel``), ``caption_transformer`` (the xf stage), ``unet``
    (``UNet2DConditionModel`` with a pooled-caption class embedding), ``vae`` (``AutoencoderKL``)
    and ``scheduler`` (any diffusers scheduler with ``set_timesteps``/``scale_model_input``/``step``).
    """

    model_cpu_offload_seq = "text_encoder->caption_transformer->unet->vae"

    def __init__(self, tokenizer: Any, text_encoder: Any, caption_transformer: CaptionTransformer,
                 unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, caption_transformer=caption_transformer,
                              unet=unet, vae=vae, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for a 4-level VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: the VAE's factor x the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless both sides are positive multiples of ``size_multiple`` pixels."""
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"height and width must be positive multiples of {m} (the VAE's {self.vae_scale_factor}x "
                             f"times the UNet's {m // self.vae_scale_factor}x downsampling); got {height}x{width}. "
                             f"Round to e.g. {max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}.")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions -> (tokens (B, T, width) in the UNet's dtype, mask (B, T) bool, pooled (B, P)).

        Padded to the longest caption; truncated (keeping ``</s>``) to ``max_tokens``, by default the
        tokenizer's ``model_max_length``. Padded positions have zero tokens and a False mask.
        """
        if isinstance(prompts, str):
            raise ValueError("encode_prompts takes a list of captions; wrap a single one as [prompt]")
        device = self._execution_device
        batch = self.tokenizer(list(prompts), padding="longest", truncation=True, return_tensors="pt",
                               max_length=max_tokens or self.tokenizer.model_max_length)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device).bool()  # (B, T)
        states = encode_captions(self.text_encoder, ids, mask)  # (B, T, d_model)
        tokens, pooled = self.caption_transformer(states.to(self.caption_transformer.dtype), mask)
        return tokens.to(self.unet.dtype), mask, pooled.to(self.unet.dtype)

    def _conditioning(self, prompts: list[str], guidance: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet's (tokens, mask, pooled): the captions' own, or [empty caption; captions] (2B rows)
        padded to a common length when guiding."""
        tokens, mask, pooled = self.encode_prompts(prompts)
        if not guidance:
            return tokens, mask, pooled
        empty_tokens, empty_mask, empty_pooled = self.encode_prompts([""] * len(prompts))
        length = max(tokens.shape[1], empty_tokens.shape[1])
        empty_tokens, empty_mask = pad_tokens(empty_tokens, empty_mask, length)
        tokens, mask = pad_tokens(tokens, mask, length)
        return torch.cat([empty_tokens, tokens]), torch.cat([empty_mask, mask]), torch.cat([empty_pooled, pooled])

    def _initial_latents(self, batch: int, height: int, width: int, generator: torch.Generator | None,
                         latents: torch.Tensor | None) -> torch.Tensor:
        """Unit noise (B, C, H/f, W/f) from ``generator`` or the given ``latents``, x init_noise_sigma."""
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; {height}x{width} images of {batch} "
                             f"prompts need {shape}")
        return latents.to(self._execution_device, self.unet.dtype) * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator: torch.Generator | None) -> dict[str, Any]:
        """``generator`` for schedulers whose ``step`` draws noise (DDPM, SDE solvers); others take none."""
        return {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, height: int, width: int, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil") -> Any:
        """Sample one image per prompt.

        Args:
            prompts: a caption or a list of B captions.
            height, width: image size in pixels, multiples of ``size_multiple``.
            guidance_scale: classifier-free guidance weight; 1 runs the conditional branch only.
            generator: seeds the initial noise (and the scheduler's noise, if it draws any).
            latents: optional unit-variance initial noise (B, C, height/f, width/f), f the VAE factor.
            output_type: "pil" -> list of B PIL images; "pt" -> float32 (B, 3, height, width) in
                [0, 1]; "latent" -> the final latents (B, C, height/f, width/f), unscaled.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.check_size(height, width)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        guidance = guidance_scale != 1.0
        tokens, mask, pooled = self._conditioning(prompts, guidance)  # (B or 2B, T, width), (., T), (., P)
        x = self._initial_latents(len(prompts), height, width, generator, latents)  # (B, C, h, w)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        step_kwargs = self._step_kwargs(generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(torch.cat([x, x]) if guidance else x, t)
            noise = self.unet(model_in, t, encoder_hidden_states=tokens, encoder_attention_mask=mask,
                              class_labels=pooled).sample
            noise = guided(noise, guidance_scale) if guidance else noise
            x = self.scheduler.step(noise, t, x, **step_kwargs).prev_sample
        output = x if output_type == "latent" else self._decode(x, output_type)
        self.maybe_free_model_hooks()
        return output

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Latents (B, C, h, w) -> float32 (B, 3, H, W) in [0, 1], or a list of PIL images."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
        if output_type == "pt":
            return images
        return self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())


def export_pipeline(folder: str | Path, *, tokenizer: Any, text_encoder: Any, caption_transformer: CaptionTransformer,
                    unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: Any) -> Path:
    """Write the model in diffusers format (safetensors): ``folder``/{unet, vae, text_encoder,
    tokenizer, scheduler, caption_transformer}/ + model_index.json. Returns ``folder``."""
    folder = Path(folder)
    pipe = RecapPipeline(tokenizer=tokenizer, text_encoder=text_encoder, caption_transformer=caption_transformer,
                         unet=unet, vae=vae, scheduler=scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
