"""`recap sample`: prompts -> images with the trained text-to-image pipeline.

Reads: sample (sampler, prompts, prompts_file, height, width, rewriter), runtime.device and
runtime.precision. Writes <run_dir>/images/NNNN.png (one per prompt), grid.png (every image with
its prompt under it), prompts.jsonl (prompt, rewritten prompt, seed, file) and summary.json.

Image i is drawn from its own noise, seeded by ``sampler.seed + i``: the same prompt list gives
the same images at any batch size, and adding prompts at the end changes none of the earlier
ones.
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from models.pipeline import RecapPipeline
from train.config_schema import ExperimentConfig
from train.prompt_rewriter import RewriteError, build_rewriter
from train.recaption import inference_placement
from train.run_logging import finish_stage, progress, setup_logging, write_config_snapshot
from train.t2i_export import load_sampler
from train.typed_config import ConfigError

STAGE = "sample"
log = logging.getLogger("recap")
_LABEL_CHARS = 28  # characters per label line under a grid cell of 128 px (scaled with width)
_LABEL_LINES = 4


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """``prompts`` then the non-empty lines of ``prompts_file`` (lines starting with # are comments)."""
    out = [p for p in prompts if p.strip()]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError("sample.prompts_file", f"{path} is not a file (one prompt per line)")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not out:
        raise ConfigError("sample.prompts", "no prompts: give sample.prompts='[\"a red circle\", \"a blue star\"]' "
                          "or sample.prompts_file=prompts.txt (one per line)")
    return out


def initial_noise(pipe: RecapPipeline, count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(count, C, height/f, width/f) unit noise; row i from its own generator seeded ``seed + i``."""
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])


def generate(pipe: RecapPipeline, prompts: list[str], *, height: int, width: int, steps: int, guidance_scale: float,
             seed: int, batch_size: int, show_progress: bool = False) -> torch.Tensor:
    """float32 (N, 3, height, width) in [0, 1], one image per prompt (see module docstring for seeds)."""
    noise = initial_noise(pipe, len(prompts), height, width, seed)
    images = []
    bar = progress(total=len(prompts), desc=STAGE, unit="img", enabled=show_progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        images.append(pipe(chunk, height=height, width=width, num_inference_steps=steps,
                           guidance_scale=guidance_scale, latents=noise[start:start + len(chunk)],
                           output_type="pt").float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(images)


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "prompt"


def to_pil(image: torch.Tensor) -> Image.Image:
    """float (3, H, W) in [0, 1] -> an 8-bit RGB image."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int = 4) -> Image.Image:
    """Images (N, 3, H, W) in [0, 1] in a grid, each with its label wrapped underneath."""
    n, _, h, w = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    font = ImageFont.load_default()
    line_h = 12
    chars = max(12, _LABEL_CHARS * w // 128)
    cell_h = h + line_h * _LABEL_LINES + 6
    grid = Image.new("RGB", (columns * (w + 4) + 4, rows * cell_h + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = 4 + (i % columns) * (w + 4), 4 + (i // columns) * cell_h
        grid.paste(to_pil(image), (x, y))
        lines = textwrap.wrap(label, chars)[:_LABEL_LINES]
        for j, line in enumerate(lines):
            draw.text((x, y + h + 3 + j * line_h), line, fill="black", font=font)
    return grid


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Rewrite the prompts, sample one image per prompt, write PNGs, a grid and prompts.jsonl."""
    s = cfg.sample
    prompts = read_prompts(s.prompts, s.prompts_file)
    setup_logging(run_dir, STAGE)
    write_config_snapshot(run_dir, cfg)
    rewrite = build_rewriter(s.rewriter)
    try:
        rewritten = [rewrite(p) for p in prompts]
    except RewriteError as exc:
        raise ConfigError("sample.rewriter", str(exc)) from None
    device, bf16 = inference_placement(cfg)
    pipe = load_sampler(s.sampler, device, torch.bfloat16 if bf16 else torch.float32, key="sample.sampler",
                        size=(s.height, s.width), size_key="sample.height")
    log.info("%s: %d prompt(s) at %dx%d, %s x %d steps, guidance %g, %s weights, rewriter %s", STAGE, len(prompts),
             s.height, s.width, s.sampler.scheduler, s.sampler.steps, s.sampler.guidance_scale, s.sampler.weights,
             s.rewriter.kind)
    start = time.perf_counter()
    images = generate(pipe, rewritten, height=s.height, width=s.width, steps=s.sampler.steps,
                      guidance_scale=s.sampler.guidance_scale, seed=s.sampler.seed, batch_size=s.sampler.batch_size,
                      show_progress=cfg.logger.progress)
    seconds = time.perf_counter() - start
    records = _write_outputs(run_dir, images, prompts, rewritten, s.sampler.seed)
    summary = {"images": len(prompts), "grid": str(run_dir / "grid.png"), "size": f"{s.height}x{s.width}",
               "scheduler": s.sampler.scheduler, "steps": s.sampler.steps, "guidance_scale": s.sampler.guidance_scale,
               "weights": s.sampler.weights, "pipeline": s.sampler.pipeline, "rewriter": s.rewriter.kind,
               "rewritten": sum(r["prompt"] != r["rewritten"] for r in records), "seconds": round(seconds, 2),
               "s_per_image": round(seconds / len(prompts), 3), "device": str(device)}
    finish_stage(run_dir, STAGE, summary)
    return summary


def _write_outputs(run_dir: Path, images: torch.Tensor, prompts: list[str], rewritten: list[str],
                   seed: int) -> list[dict[str, Any]]:
    folder = run_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, prompt, text) in enumerate(zip(images, prompts, rewritten, strict=True)):
        path = folder / f"{i:04d}_{_slug(prompt)}.png"
        to_pil(image).save(path)
        records.append({"index": i, "prompt": prompt, "rewritten": text, "seed": seed + i, "file": str(path)})
    labelled_grid(images, rewritten).save(run_dir / "grid.png")
    with open(run_dir / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records
