"""What train-t2i hands on: sample grids during training, the exported diffusers pipeline, and
loading it back for sampling and evaluation.

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
from models.pipeline import RecapPipeline, export_pipeline
from models.text_conditioning import CaptionTransformer
from train.config_sampling import SamplerConfig
from train.runtime import Runtime
from train.t2i_parts import FrozenEncoders
from train.typed_config import ConfigError


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


def pipeline_for(weights: CaptionConditionedUNet, frozen: FrozenEncoders, scheduler: Any) -> RecapPipeline:
    return RecapPipeline(tokenizer=frozen.tokenizer, text_encoder=frozen.text_encoder,
                         caption_transformer=weights.caption_transformer, unet=weights.unet, vae=frozen.vae,
                         scheduler=scheduler)


def sample_grid(path: Path, *, weights: CaptionConditionedUNet, frozen: FrozenEncoders, prompts: Sequence[str],
                resolution: int, steps: int, guidance_scale: float, seed: int, noise_config: Any) -> Path:
    """One image per prompt (DDIM, classifier-free guidance, its own seeded generator: the
    training RNG is untouched), saved side by side as a PNG at ``path``."""
    from diffusers import DDIMScheduler
    from torchvision.utils import save_image

    device = next(weights.parameters()).device
    pipe = pipeline_for(weights, frozen, DDIMScheduler.from_config(noise_config))
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


RAW_IS_EXPORT = "same_as_pipeline.json"  # raw_weights/ of a run without EMA: the export holds the live weights


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
    pipe = RecapPipeline.from_pretrained(str(folder))
    if options.weights == "raw":
        raw = Path(options.raw_weights or "")
        if (raw / "unet").is_dir():
            pipe.unet = UNet2DConditionModel.from_pretrained(str(raw / "unet"))
            pipe.caption_transformer = CaptionTransformer.from_pretrained(str(raw / "caption_transformer"))
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
    pipe.to(device, dtype)
    return pipe
