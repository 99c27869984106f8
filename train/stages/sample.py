"""`recap sample`: prompts -> images with the trained text-to-image pipeline.

Reads: sample (sampler, prompts, prompts_file, height, width, rewriter), runtime.device and
runtime.precision. Writes <run_dir>/images/NNNN.png (one per prompt), grid.png (every image with
its prompt under it), prompts.jsonl (prompt, rewritten prompt, seed, file) and summary.json.

Image i is drawn from its own noise, seeded by ``sampler.seed + i`` (train/t2i/sampling.py): the
same prompt list gives the same images at any batch size, and adding prompts at the end changes
none of the earlier ones.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from train.config.experiment import ExperimentConfig
from train.config.typed import ConfigError
from train.outputs.image_grids import labelled_grid, to_pil
from train.outputs.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.runtime.placement import inference_placement
from train.t2i.prompt_rewriter import RewriteError, build_rewriter
from train.t2i.sampling import generate, load_sampler

STAGE = "sample"
log = logging.getLogger("recap")


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


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "prompt"


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
    device, bf16 = inference_placement(cfg.runtime)
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
