"""Text-to-image inference and the diffusers-format export of the trained model.

``RecapPipeline`` is a diffusers ``DiffusionPipeline`` over six components: the tokenizer, the
frozen T5 encoder, the xf stage (``CaptionTransformer``), the UNet, the VAE and any diffusers
scheduler (DDPM, DDIM, DPM-Solver++, ...). Sampling is the usual latent-diffusion loop with
classifier-free guidance against the empty caption "" (Ho & Salimans 2022), the same
unconditional input the trainer's caption dropout (``models.diffusion.drop_captions``) teaches:

    eps = eps(x_t, "") + guidance_scale * (eps(x_t, caption) - eps(x_t, ""))

``pipe.save_pretrained(folder)`` (or ``export_pipeline``) writes one subfolder per component plus
``model_index.json``, and the code diffusers cannot know, the way its community pipelines carry
theirs: this file as ``recap_pipeline.py`` (with ``text_conditioning.py``, which it imports) and
``caption_transformer/text_conditioning.py``, named in model_index.json as
``"_class_name": ["recap_pipeline", "RecapPipeline"]`` and
``"caption_transformer": ["text_conditioning", "CaptionTransformer"]``. Whoever has only
diffusers and transformers loads it with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``: diffusers (0.42) imports
the root file as the pipeline class and the component folder's file as the component class.
So the two files are copied verbatim, not maintained twice: models/text_conditioning.py imports
only libraries, and this module only libraries and text_conditioning, relatively (the one import
that works both in the ``models`` package and among diffusers' copies of the two files).

``RecapPipeline.from_pretrained(folder)`` (sampling, evaluation) runs the code in hand instead,
offline and without trust_remote_code: ``load_config`` reads the two entries as this class and
this module's ``CaptionTransformer``. Exports written before the code travelled name
``models.text_conditioning`` and load the same way.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

# Relative, so that diffusers' copy of this file imports its copy of text_conditioning.py.
from .text_conditioning import CaptionTransformer, encode_captions

OUTPUT_TYPES = ("pil", "pt", "latent")
INDEX_FILE = "model_index.json"
PIPELINE_MODULE = "recap_pipeline"  # <folder>/recap_pipeline.py: a copy of this file
COMPONENT_MODULE = "text_conditioning"  # <folder>/{., caption_transformer}/text_conditioning.py


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad xf tokens (B, T, W) with zeros and their mask (B, T) with False to ``length`` >= T."""
    if length < tokens.shape[1]:
        raise ValueError(f"cannot pad {tokens.shape[1]} tokens down to {length}")
    pad = length - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)


def tokenize_prompts(tokenizer: Any, prompts: list[str], device: Any,
                     max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (B, T), mask (B, T) bool) of ``prompts`` on ``device``: padded to the longest,
    truncated (keeping ``</s>``) to ``max_tokens``, by default the tokenizer's ``model_max_length``."""
    batch = tokenizer(list(prompts), padding="longest", truncation=True, return_tensors="pt",
                      max_length=max_tokens or tokenizer.model_max_length)
    return batch.input_ids.to(device), batch.attention_mask.to(device).bool()


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

    # caption_transformer is a CaptionTransformer, annotated by its base class: diffusers checks
    # components against these annotations, and loading an export's code it executes
    # text_conditioning.py again for the component, a class other than the one this file imported.
    def __init__(self, tokenizer: Any, text_encoder: Any, caption_transformer: ModelMixin,
                 unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, caption_transformer=caption_transformer,
                              unet=unet, vae=vae, scheduler=scheduler)

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """diffusers' reading of model_index.json (``from_pretrained`` asks this class), with the
        export's code entries read as this class and this module's ``CaptionTransformer``: the code
        in hand runs, not the folder's copy of it, and no trust_remote_code is needed."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs[, commit])
        if isinstance(config.get("_class_name"), list):  # [module file, class]: the folder's own code
            config["_class_name"] = cls.__name__
        if (config.get("caption_transformer") or [None, None])[1] == CaptionTransformer.__name__:
            config["caption_transformer"] = [CaptionTransformer.__module__, CaptionTransformer.__name__]
        return loaded

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' save, plus the code that loads it without this repository (module docstring):
        this file as recap_pipeline.py, text_conditioning.py beside it and in caption_transformer/,
        and model_index.json naming the two."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(folder) without push_to_hub, then upload the folder: the pipeline's "
                             "code files are written after diffusers' own push")
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        component_source = inspect.getsourcefile(CaptionTransformer)
        shutil.copyfile(inspect.getsourcefile(RecapPipeline), folder / f"{PIPELINE_MODULE}.py")
        for target in (folder, folder / "caption_transformer"):
            shutil.copyfile(component_source, target / f"{COMPONENT_MODULE}.py")
        index = json.loads((folder / INDEX_FILE).read_text())
        index["_class_name"] = [PIPELINE_MODULE, RecapPipeline.__name__]
        index["caption_transformer"] = [COMPONENT_MODULE, CaptionTransformer.__name__]
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")  # as diffusers writes it

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
        ids, mask = tokenize_prompts(self.tokenizer, prompts, self._execution_device, max_tokens)  # (B, T)
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
    tokenizer, scheduler, caption_transformer}/ + model_index.json, and the code that loads it
    without this repository (``RecapPipeline.save_pretrained``). Returns ``folder``."""
    folder = Path(folder)
    pipe = RecapPipeline(tokenizer=tokenizer, text_encoder=text_encoder, caption_transformer=caption_transformer,
                         unet=unet, vae=vae, scheduler=scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
