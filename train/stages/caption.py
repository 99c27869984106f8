"""`recap caption caption.input=PATH`: caption images with an exported captioner.

PATH is a folder of images (jpg/jpeg/png/webp, sorted), one image file, or shards (a directory of
.tar files, a brace pattern, `pipe:` commands). Captions are printed as "<key>\t<caption>" or,
with caption.output=FILE, written as JSONL {"key", "caption", "tokens"}.

Reads: caption (captioner, input, output, batch_size, limit, decoding), data.reader, logger.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import (
    IMAGE_TOO_LARGE, UNDECODABLE_IMAGE, DataError, ImageTooLarge, NoShardsError, decode_image, list_shards,
)
from data_pipeline.shard_reader import ShardReader
from models.caption_decoding import decode_text, generate_tokens
from models.captioner import image_transform
from train.config.experiment import ExperimentConfig
from train.outputs.run_logging import finish_stage, progress, setup_logging, write_config_snapshot
from train.config.typed import ConfigError
from train.captioning.exported import load_captioner
from train.runtime.placement import inference_placement

log = logging.getLogger("recap")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _image_files(path: Path) -> list[Path] | None:
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images or not any(path.glob("*.tar")):
            return images
    return None  # not images: shards


def _batches(spec: str, transform: Any, batch_size: int, options: ReaderOptions,
             skipped: Counter) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(keys, images (B, 3, S, S)) from a folder, an image file or shards; images that cannot be
    read are counted in ``skipped`` by reason (and logged), never captioned."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() not in (*IMAGE_SUFFIXES, ".tar"):
        raise ConfigError("caption.input", f"{spec} is neither an image ({', '.join(IMAGE_SUFFIXES)}), a folder of "
                          "images nor shards (.tar)")
    files = _image_files(path)
    if files is not None:
        if not files:
            raise ConfigError("caption.input", f"{spec} has no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
        for i in range(0, len(files), batch_size):
            keys, images = [], []
            for file in files[i : i + batch_size]:
                try:
                    images.append(transform(decode_image(file.read_bytes(), options.max_image_pixels)))
                    keys.append(str(file))
                except ImageTooLarge as exc:
                    skipped[IMAGE_TOO_LARGE] += 1
                    log.warning("skipped %s: %s: %s", file, IMAGE_TOO_LARGE, exc)
                except (OSError, ValueError) as exc:
                    skipped[UNDECODABLE_IMAGE] += 1
                    log.warning("skipped %s: %s: %s", file, UNDECODABLE_IMAGE, exc)
            if keys:
                yield keys, torch.stack(images)
        return
    try:
        shards = list_shards(spec)
    except NoShardsError as exc:
        raise ConfigError("caption.input", str(exc)) from None
    options = dataclasses.replace(options, num_workers=min(options.num_workers, len(shards)))
    reader = ShardReader(spec, spec=SampleSpec(GroundTruthAccess.NONE, image=True), options=options,
                         batch_size=batch_size, seed=0, epochs=1, collate=list,
                         transform=functools.partial(_keyed_image, transform))
    for items in reader:
        yield [k for k, _ in items], torch.stack([img for _, img in items])
    skipped.update(reader.fault_counts())


def _keyed_image(transform: Callable[[Image.Image], torch.Tensor], sample: dict[str, Any]) -> tuple[str, torch.Tensor]:
    return sample["__key__"], transform(sample["image"])


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Caption every image of caption.input; returns counts and throughput."""
    c = cfg.caption
    if c.input is None:
        raise ConfigError("caption.input", "is required: caption.input=<folder of images | image | shards>")
    log = setup_logging(run_dir, "caption")
    write_config_snapshot(run_dir, cfg)
    model, tok = load_captioner(c.captioner, "caption.captioner")
    device, _ = inference_placement(cfg.runtime)  # fp32 (as before): bf16 only where measured
    model = model.to(device)
    transform = image_transform(model)
    out = open(c.output, "w") if c.output else None
    count, tokens, start = 0, 0, time.perf_counter()
    bar = progress(desc="caption", unit="img", enabled=cfg.logger.progress and out is not None)
    skipped: Counter = Counter()
    for keys, images in _batches(c.input, transform, c.batch_size, cfg.data.reader, skipped):
        keys, images = keys[: (c.limit - count) if c.limit else None], images[: (c.limit - count) if c.limit else None]
        for key, ids in zip(keys, generate_tokens(model, images.to(device), c.decoding, **tok.generation_ids())):
            text = decode_text(ids, tok)
            if out is None:
                print(f"{key}\t{text}", flush=True)
            else:
                out.write(json.dumps({"key": key, "caption": text, "tokens": len(ids)}) + "\n")
            tokens += len(ids)
        count += len(keys)
        bar.update(len(keys))
        if c.limit and count >= c.limit:
            break
    bar.close()
    if out is not None:
        out.close()
    if count == 0 and skipped:
        raise DataError(f"no image of {c.input} could be captioned; skipped: "
                        + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    seconds = time.perf_counter() - start
    summary = {"images": count, "tokens": tokens, "images_per_s": round(count / seconds, 2) if count else 0.0,
               "captioner": c.captioner, "output": c.output, "strategy": c.decoding.strategy,
               "skipped_by_reason": dict(sorted(skipped.items()))}
    finish_stage(run_dir, "caption", summary)
    log.info("captioned %d images (%d tokens) in %.1f s", count, tokens, seconds)
    if skipped:
        log.warning("skipped %d images: %s", sum(skipped.values()), ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    return summary
