"""What train-t2i hands on: sample grids during training and the exported diffusers pipeline
(train/t2i/sampling.py loads it back for sampling and evaluation).

Both use the weights a user would sample from: the EMA copy when there is one (whole on every
rank), else the live weights gathered from the runtime (a collective under ZeRO-3, so every
rank calls `trained_weights`; only the main rank generates and writes). With EMA, the live
weights are exported too (``raw_weights/{unet,caption_transformer}``), for `sample.sampler.weights=raw`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from models.denoiser import CaptionConditionedUNet
from models.pipeline import export_pipeline
from train.runtime.processes import Runtime
from train.t2i.cached_conditioning import CachedEncoders
from train.t2i.parts import FrozenEncoders


def trained_weights(rt: Runtime, model: Any, ema: CaptionConditionedUNet | None,
                    build: Callable[[], CaptionConditionedUNet]) -> CaptionConditionedUNet | None:
    """The EMA module, or a fresh ``build()`` holding the gathered live weights on the main
    rank (None on the others). Collective without EMA: call it on every rank."""
    if ema is not None:
        return ema
    state = rt.full_state_dict(model)
    if not rt.is_main:
        return None
    module = build()
    module.load_state_dict(state)
    return module.to(rt.device).eval()


def sample_grid(path: Path, *, weights: CaptionConditionedUNet, frozen: FrozenEncoders | CachedEncoders,
                prompts: Sequence[str], resolution: int, steps: int, guidance_scale: float, seed: int,
                noise_config: Any) -> Path:
    """One image per prompt (DDIM, classifier-free guidance, its own seeded generator: the
    training RNG is untouched), saved side by side as a PNG at ``path``. ``frozen``: T5 and the
    VAE, or from a cache the prompts' cached states and the VAE's decoder."""
    from diffusers import DDIMScheduler
    from torchvision.utils import save_image

    device = next(weights.parameters()).device
    pipe = frozen.pipeline(weights, DDIMScheduler.from_config(noise_config))
    pipe.set_progress_bar_config(disable=True)
    was_training = weights.training
    weights.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    images = pipe(list(prompts), height=resolution, width=resolution, num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=generator, output_type="pt")  # (B, 3, H, W) in [0, 1]
    weights.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), str(path), nrow=len(prompts), padding=2)
    return path


def export_trained(folder: Path, *, weights: CaptionConditionedUNet, frozen: FrozenEncoders, noise: Any) -> Path:
    """The diffusers folders (unet, vae, text_encoder, tokenizer, scheduler, caption_transformer)
    of the trained model, with the training noise schedule."""
    return export_pipeline(folder, tokenizer=frozen.tokenizer, text_encoder=frozen.text_encoder,
                           caption_transformer=weights.caption_transformer, unet=weights.unet, vae=frozen.vae,
                           scheduler=noise)


# raw_weights/ of a run without EMA: the export holds the live weights (t2i/sampling.py reads it)
RAW_IS_EXPORT = "same_as_pipeline.json"


def export_raw_weights(folder: Path, weights: CaptionConditionedUNet | None) -> Path:
    """The live (non-EMA) unet and caption_transformer as diffusers folders under ``folder``, or,
    for a run without EMA (``weights`` None), a note that pipeline/ holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None:
        (folder / RAW_IS_EXPORT).write_text('{"ema": false}\n')
        return folder
    weights.unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    weights.caption_transformer.save_pretrained(str(folder / "caption_transformer"), safe_serialization=True)
    return folder
