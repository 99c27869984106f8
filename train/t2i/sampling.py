"""Sampling from the exported text-to-image pipeline: loading it back and drawing images.

Used by `recap sample` and `recap evaluate`. `load_sampler` reads what train-t2i exports
(train/t2i/export.py): pipeline/ and, for ``weights=raw``, raw_weights/. `generate` draws image i
from its own noise, seeded by ``seed + i``: the same prompt list gives the same images at any batch
size, and adding prompts at the end changes none of the earlier ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.pipeline import RecapPipeline
from models.text_conditioning import CaptionTransformer
from train.config.sampling import SamplerConfig
from train.config.typed import ConfigError
from train.outputs.run_logging import progress
from train.t2i.export import RAW_IS_EXPORT


def sampling_scheduler(name: str, noise_config: Any) -> Any:
    """``ddim`` or ``dpmpp`` (DPM-Solver++ 2M) on the training noise schedule ``noise_config``."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(noise_config)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(noise_config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose ddim or dpmpp")


def load_sampler(options: SamplerConfig, device: torch.device, dtype: torch.dtype = torch.float32,
                 key: str = "sampler", size: tuple[int, int] | None = None, size_key: str = "size") -> RecapPipeline:
    """The exported pipeline at ``options.pipeline`` on ``device``, with the scheduler named by
    ``options.scheduler`` and, for ``weights=raw``, the live weights from ``options.raw_weights``
    (the export itself when train-t2i ran without EMA); its progress bar off. ConfigError
    (naming ``key``) when a folder is missing, or (naming ``size_key``) when ``size`` (height,
    width) is not one the model can draw."""
    from diffusers import UNet2DConditionModel

    folder = Path(options.pipeline)
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{key}.pipeline", f"{folder} is not an exported pipeline (no model_index.json); run "
                          "`recap train-t2i` first or point it at train-t2i's <run>/pipeline folder")
    # loaded in ``dtype``: diffusers warns on every `.to(dtype)` (about modules to keep in float32)
    pipe = RecapPipeline.from_pretrained(str(folder), dtype=dtype)
    if options.weights == "raw":
        raw = Path(options.raw_weights or "")
        if (raw / "unet").is_dir():
            pipe.unet = UNet2DConditionModel.from_pretrained(str(raw / "unet"), dtype=dtype)
            pipe.caption_transformer = CaptionTransformer.from_pretrained(str(raw / "caption_transformer"), dtype=dtype)
        elif not (raw / RAW_IS_EXPORT).is_file():
            raise ConfigError(f"{key}.raw_weights", f"{raw} holds no unet/ folder; train-t2i writes it next to "
                              "pipeline/ when it trains with EMA")
    pipe.scheduler = sampling_scheduler(options.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if size is not None:
        try:
            pipe.check_size(*size)
        except ValueError as exc:
            raise ConfigError(size_key, str(exc)) from None
    pipe.to(device)
    return pipe


def initial_noise(pipe: RecapPipeline, count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(count, C, height/f, width/f) unit noise; row i from its own generator seeded ``seed + i``."""
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])


def generate(pipe: RecapPipeline, prompts: list[str], *, height: int, width: int, steps: int, guidance_scale: float,
             seed: int, batch_size: int, show_progress: bool = False) -> torch.Tensor:
    """float32 (N, 3, height, width) in [0, 1], one image per prompt (see module docstring for seeds)."""
    noise = initial_noise(pipe, len(prompts), height, width, seed)
    images = []
    bar = progress(total=len(prompts), desc="sample", unit="img", enabled=show_progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        images.append(pipe(chunk, height=height, width=width, num_inference_steps=steps,
                           guidance_scale=guidance_scale, latents=noise[start:start + len(chunk)],
                           output_type="pt").float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(images)
