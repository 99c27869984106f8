"""`recap recaption`: write SSC and DSC captions into every training shard (stage 2).

Each process (torchrun rank or Slurm array task) takes every world_size-th input shard, skips
those already done, and writes one output shard per input shard: the input's members
byte-for-byte, one ``KEY.<caption key>.txt`` per captioner, and the caption lineage in
``KEY.json``. Images are decoded and preprocessed in DataLoader workers; the captioners run
batched with the KV-cached decoder (bf16 on GPU). See data_pipeline/recaption.py for the
exactly-once protocol, train/runtime/shard_jobs.py for the part shared with `recap cache`, and
docs/recaption.md for the commands.

Reads: recaption, runtime.device / runtime.precision, logger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from data_pipeline import recaption as shards
from data_pipeline.ground_truth import is_ground_truth_member
from data_pipeline.shard_io import IMAGE_EXTENSIONS, sha256_file
from train.runtime.placement import inference_placement
from train.runtime.shard_jobs import (ShardJob, check_rank, expected_samples, list_inputs, output_name,
                                      refuse_output_holding_inputs, start_job)
from train.config.experiment import ExperimentConfig
from train.config.captioning import RecaptionConfig
from train.config.typed import ConfigError

log = logging.getLogger("recap.recaption")
CAPTION_KEY = re.compile(r"[a-z][a-z0-9_]*")
RESERVED_KEYS = {*IMAGE_EXTENSIONS, "json", "txt", "cls", "npy"}  # members an input sample already has
WEIGHTS_FILE = "open_clip_model.safetensors"


def _input_shards(r: RecaptionConfig) -> list[str]:
    urls = list_inputs("recaption", r.input)
    names = Counter(output_name(u) for u in urls)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        raise ConfigError("recaption.input", f"{len(clash)} input shards share a file name (e.g. {clash[0]}); "
                          "each output shard is named after its input")
    return urls


def check(cfg: ExperimentConfig) -> list[str]:
    """Validate the arguments before any work starts; returns the input shard URLs.

    Raises ConfigError (exit code 2) for missing input, an output directory that holds input
    shards, an unknown or invalid caption key, and a missing captioner export.
    """
    r = cfg.recaption
    urls = _input_shards(r)
    refuse_output_holding_inputs("recaption", urls, r.output, note=" (input shards are never modified)")
    for key in r.keys:
        if key not in r.captioners:
            raise ConfigError("recaption.keys", f"unknown caption key '{key}'; keys with a captioner: "
                              f"{', '.join(r.captioners) or '(none)'} (add one: +recaption.captioners.{key}=DIR)")
        if not CAPTION_KEY.fullmatch(key) or key in RESERVED_KEYS or is_ground_truth_member(key):
            raise ConfigError("recaption.keys", f"'{key}' cannot be a caption key: use lowercase letters, digits "
                              f"and _, not an existing member name ({', '.join(sorted(RESERVED_KEYS))}) or gt_*")
        captioner = Path(r.captioners[key])
        if not (captioner / WEIGHTS_FILE).is_file():
            raise ConfigError(f"recaption.captioners.{key}", f"{captioner} is not an exported captioner (no "
                              f"{WEIGHTS_FILE}); run `recap finetune-captioner style={key}` first, or point it at one")
    check_rank("recaption", r.rank, r.world_size)
    return urls


class _Captioners:
    """The configured captioners on one device; captions a batch for every key."""

    def __init__(self, r: RecaptionConfig, device: Any, bf16: bool) -> None:
        import torch

        from models.captioner import SplitImageTransform, load_exported, load_exported_tokenizer

        self.device, self.decoding, self.keys = device, r.decoding, list(r.keys)
        self.models, self.tokenizers, self.splits, self.transform_of, self.transforms = {}, {}, {}, {}, {}
        self.lineage: dict[str, Any] = {}
        for key in self.keys:
            path = Path(r.captioners[key])
            model = load_exported(path).to(device).eval()
            self.models[key], self.tokenizers[key] = model, load_exported_tokenizer(path)
            split = SplitImageTransform(model)  # resize in the workers, normalise batched on the device
            name = repr(split.key())  # captioners with the same preprocessing share the pixels
            self.transforms.setdefault(name, split.pixels)
            self.splits[key], self.transform_of[key] = split, name
            self.lineage[key] = {"captioner": path.name if path.name != "captioner" else path.parent.name,
                                 "captioner_sha256": sha256_file(path / WEIGHTS_FILE),
                                 "decoding": dataclasses.asdict(r.decoding)}
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        self.tokens = 0

    def __call__(self, batch: shards.ShardBatch) -> list[dict[str, str]]:
        """{caption key: text} per sample of the batch, in order."""
        import torch

        from data_pipeline.seeding import derive_seed
        from models.caption_decoding import decode_text, generate_tokens

        out: list[dict[str, str]] = [{} for _ in batch.samples]
        if not batch.samples:
            return out
        # Sampling is seeded per (shard, batch): a shard's captions do not depend on which other
        # shards ran, or on a restart.
        shard_seed = int.from_bytes(hashlib.sha256(batch.task.output.name.encode()).digest()[:8], "little")
        options = dataclasses.replace(self.decoding, seed=derive_seed(self.decoding.seed, shard_seed, batch.number))
        for key in self.keys:
            pixels = batch.images[self.transform_of[key]].to(self.device, non_blocking=True)
            with torch.inference_mode(), self.autocast:
                ids = generate_tokens(self.models[key], self.splits[key].normalize(pixels), options,
                                      **self.tokenizers[key].generation_ids())
            for row, tokens in zip(out, ids, strict=True):
                row[key] = decode_text(tokens, self.tokenizers[key])
                self.tokens += len(tokens)
        return out


def _write_shards(job: ShardJob, tasks: list[shards.ShardTask], captioners: _Captioners, r: RecaptionConfig, *,
                  max_image_pixels: int, bar: Any) -> tuple[Counter, Counter]:
    """Caption and write every task's shard; returns (totals, failures by reason)."""
    loader = shards.batch_loader(tasks, captioners.transforms, batch_size=r.batch_size, num_workers=r.num_workers,
                                 max_image_pixels=max_image_pixels)

    def caption(batch: shards.ShardBatch) -> list[dict[str, bytes]]:
        return [shards.with_lineage(members, text, captioners.lineage)
                for (_, members), text in zip(batch.samples, captioners(batch), strict=True)]

    lineage = {"rank": job.rank, "world_size": job.world, "captioners": captioners.lineage}
    return job.write_all(loader, caption, lineage, bar=bar, total_tasks=len(tasks))


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Recaption this process's share of the input shards; returns its summary."""
    urls = check(cfg)
    r = cfg.recaption
    job = start_job("recaption", r.rank, r.world_size, stats_suffix=shards.STATS_SUFFIX)
    with job.running(run_dir, Path(r.output)):  # locked; SIGTERM/SIGUSR1: stop before the next batch, exit 75
        return _run(cfg, run_dir, urls, job)


def _run(cfg: ExperimentConfig, run_dir: Path, urls: list[str], job: ShardJob) -> dict[str, Any]:
    from train.outputs.run_logging import finish_stage, progress, setup_logging, write_config_snapshot

    r = cfg.recaption
    rank, world = job.rank, job.world
    logger = setup_logging(run_dir, "recaption", rank, console=job.console)
    if rank == 0:
        write_config_snapshot(run_dir, cfg)
    tasks, already_done = job.tasks(urls, Path(r.output), redo_failures=r.only_failures)
    device, bf16 = inference_placement(cfg.runtime)
    captioners = _Captioners(r, device, bf16)
    logger.info("rank %d/%d: %d of %d input shards are mine, %d already done, %d to write (%s, %s)", rank, world,
                len(tasks) + already_done, len(urls), already_done, len(tasks), device, "bf16" if bf16 else "fp32")
    Path(r.output).mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    bar = progress(desc=job.label, unit="img", total=expected_samples(tasks),
                   enabled=cfg.logger.progress and job.console)
    totals, reasons = _write_shards(job, tasks, captioners, r, max_image_pixels=cfg.data.reader.max_image_pixels,
                                    bar=bar)
    seconds = time.perf_counter() - start
    summary = {
        "rank": rank, "world_size": world, "input_shards": len(urls),
        "shards_mine": len(tasks) + already_done, "shards_written": totals["shards"], "shards_already_done": already_done,
        "images_captioned": totals["images"], "images_copied": totals["copied"],
        "duplicate_keys_across_shards": totals["duplicate_keys_across_shards"],
        "failures": sum(reasons.values()), "failures_by_reason": dict(sorted(reasons.items())),
        "tokens": captioners.tokens, "seconds": round(seconds, 2),
        "images_per_s": round(totals["images"] / seconds, 2) if totals["images"] else 0.0,
        "keys": list(r.keys), "output": r.output, "only_failures": r.only_failures,
    }
    finish_stage(run_dir, "recaption", summary, filename=job.summary_file)
    return summary
