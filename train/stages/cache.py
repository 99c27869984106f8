"""`recap cache`: precompute train-t2i's inputs, VAE latents and T5 states, into cache shards.

For every recaptioned shard, one cache shard of the same name (data_pipeline/latent_cache.py
has the format): per sample, the latents of its centre crop at its bucket for each resolution
stage of train_t2i.stages, and the T5 states of each caption key in cache.keys. Images are
decoded and fitted in DataLoader workers; the VAE and T5 run batched (bf16 on GPU). Shards are
split over processes and written exactly once like recaptioning (train/runtime/shard_jobs.py: a
killed job reruns to the same bytes; done shards are skipped). Rank 0 also writes, before its
shards, ``conditioning.safetensors``: the empty caption's and train_t2i.sampling.prompts' T5
states, so that `recap train-t2i train_t2i.cache=DIR` trains from the cache without loading T5
(train/t2i/cached_conditioning.py); a rerun leaves it untouched unless the prompts changed.

Reads: cache, train_t2i (vae, stages, buckets, sampling.prompts), text_encoder, seed,
runtime.device / runtime.precision, logger.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from data_pipeline import latent_cache
from data_pipeline import recaption as shards
from data_pipeline.aspect_buckets import Bucket, bucket_table, fit, nearest_bucket, place
from data_pipeline.caption_mix import caption_member
from data_pipeline.shard_io import IMAGE_EXTENSIONS, decode_text
from data_pipeline.t2i_samples import pad_token_ids, to_uint8_chw
from train.config.experiment import ExperimentConfig
from train.config.models import TextEncoderConfig
from train.config.t2i import CacheConfig, TrainT2IConfig
from train.runtime.placement import inference_placement
from train.runtime.shard_jobs import ShardJob, expected_samples, start_job
from train.t2i.cached_conditioning import conditioning_about, write_conditioning
from train.t2i.checks import check_cache_job
from train.t2i.parts import load_frozen

log = logging.getLogger("recap.cache")


class _Fit:
    """PIL image -> (uint8 pixels (3, H, W) of its centre crop at its bucket, bucket index, crop
    (top, left) in the resized image); a worker-side transform (picklable)."""

    def __init__(self, table: list[Bucket]) -> None:
        self.table = table

    def __call__(self, image: Any) -> tuple[torch.Tensor, int, tuple[int, int]]:
        index = nearest_bucket(image.width, image.height, self.table)
        placement = place(image.width, image.height, self.table[index])
        return to_uint8_chw(fit(image, placement)), index, (placement.top, placement.left)


def _as_list(items: list[Any]) -> list[Any]:
    return items


class _Features:
    """The frozen VAE and T5 on one device; computes a batch's cache entries."""

    def __init__(self, t: TrainT2IConfig, text_encoder: TextEncoderConfig, c: CacheConfig, seed: int,
                 device: torch.device, bf16: bool) -> None:
        self.frozen = load_frozen(text_encoder, t.vae, seed).to(device)
        self.device, self.keys = device, list(c.keys)
        self.dtype = torch.bfloat16 if c.dtype == "bfloat16" else torch.float32
        self.tables = {s.resolution: bucket_table(s.resolution, step=t.buckets.step, max_aspect=t.buckets.max_aspect)
                       for s in t.stages}
        self.transforms = {f"fit@{r}": _Fit(table) for r, table in self.tables.items()}
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    def __call__(self, batch: shards.ShardBatch) -> list[dict[str, bytes]]:
        """The output members of each sample of the batch: its own minus the image, plus the cache."""
        if not batch.samples:  # a shard's closing batch may hold only failures
            return []
        entries: list[dict[str, torch.Tensor]] = [{} for _ in batch.samples]
        with torch.inference_mode(), self.autocast:
            for resolution, table in self.tables.items():
                self._latents(batch.images[f"fit@{resolution}"], resolution, table, entries)
            for key in self.keys:
                self._states(batch.samples, key, entries)
        out = []
        for (_, members), entry in zip(batch.samples, entries, strict=True):
            kept = {ext: data for ext, data in members.items() if ext not in IMAGE_EXTENSIONS}
            out.append({**kept, latent_cache.CACHE_MEMBER: latent_cache.encode_entry(entry)})
        return out

    def _latents(self, fitted: list[tuple[torch.Tensor, int, tuple[int, int]]], resolution: int,
                 table: list[Bucket], entries: list[dict[str, torch.Tensor]]) -> None:
        for index in sorted({b for _, b, _ in fitted}):  # one VAE call per bucket present
            rows = [i for i, (_, b, _) in enumerate(fitted) if b == index]
            pixels = torch.stack([fitted[i][0] for i in rows]).to(self.device)
            latents = self.frozen.latents(pixels)  # (n, C, h, w)
            for row, lat in zip(rows, latents, strict=True):
                entries[row][latent_cache.latents_name(resolution)] = lat.to(self.dtype)
                entries[row][latent_cache.bucket_name(resolution)] = torch.tensor(
                    [table[index].width, table[index].height], dtype=torch.long)
                entries[row][f"crop@{resolution}"] = torch.tensor(fitted[row][2], dtype=torch.long)

    def _states(self, samples: list[tuple[str, dict[str, bytes]]], key: str,
                entries: list[dict[str, torch.Tensor]]) -> None:
        member = caption_member(key)
        texts = [(i, decode_text(m[member])) for i, (_, m) in enumerate(samples) if member in m]
        texts = [(i, t) for i, t in texts if t.strip()]
        if not texts:
            return
        tok = self.frozen.tokenizer
        ids, mask = pad_token_ids([tok(t, truncation=True, max_length=self.frozen.max_tokens)["input_ids"]
                                   for _, t in texts])
        states = self.frozen.text(ids.to(self.device), mask.to(self.device))  # (n, T, D)
        for (row, _), s, m in zip(texts, states, mask, strict=True):
            entries[row][latent_cache.states_name(key)] = s[: int(m.sum())].to(self.dtype)


def _write_shards(job: ShardJob, tasks: list[shards.ShardTask], features: _Features, c: CacheConfig, *, vae: str,
                  text_encoder: str, max_image_pixels: int, bar: Any) -> tuple[Counter, Counter]:
    """Cache and write every task's shard; returns (totals, failures by reason)."""
    lineage = {"rank": job.rank, "world_size": job.world, "vae": vae, "resolutions": sorted(features.tables),
               "keys": features.keys, "dtype": c.dtype, "text_encoder": text_encoder}
    loader = shards.batch_loader(tasks, features.transforms, batch_size=c.batch_size, num_workers=c.num_workers,
                                 collate=_as_list, max_image_pixels=max_image_pixels)
    return job.write_all(loader, features, lineage, bar=bar, total_tasks=len(tasks))


def _conditioning(cfg: ExperimentConfig, features: _Features, device: torch.device) -> None:
    """The cache's conditioning file (the empty caption's and the sampling prompts' T5 states),
    written once: a rerun with the same text encoder and prompts leaves it as it is."""
    prompts = cfg.train_t2i.sampling.prompts
    about = conditioning_about(cfg.text_encoder, cfg.seed, prompts)
    written = write_conditioning(Path(cfg.cache.output), features.frozen, about, device)
    log.info("%s %s: the empty caption's T5 states and %d sampling prompt(s)", "wrote" if written else "kept",
             Path(cfg.cache.output) / latent_cache.CONDITIONING_FILE, len(prompts))


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Cache this process's share of the input shards; returns its summary."""
    urls = check_cache_job(cfg.cache)
    c = cfg.cache
    job = start_job("cache", c.rank, c.world_size, stats_suffix=latent_cache.STATS_SUFFIX)
    with job.running(run_dir, Path(c.output)):  # locked; SIGTERM/SIGUSR1: stop before the next batch, exit 75
        return _run(cfg, run_dir, urls, job)


def _run(cfg: ExperimentConfig, run_dir: Path, urls: list[str], job: ShardJob) -> dict[str, Any]:
    from train.outputs.run_logging import finish_stage, progress, setup_logging, write_config_snapshot

    c = cfg.cache
    rank, world = job.rank, job.world
    logger = setup_logging(run_dir, "cache", rank, console=job.console)
    if rank == 0:
        write_config_snapshot(run_dir, cfg)
    tasks, already_done = job.tasks(urls, Path(c.output))
    device, bf16 = inference_placement(cfg.runtime)
    features = _Features(cfg.train_t2i, cfg.text_encoder, c, cfg.seed, device, bf16)
    logger.info("rank %d/%d: %d of %d shards are mine, %d already done, %d to write; resolutions %s, keys %s, %s (%s)",
                rank, world, len(tasks) + already_done, len(urls), already_done, len(tasks),
                sorted(features.tables), features.keys, c.dtype, device)
    Path(c.output).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _conditioning(cfg, features, device)
    start = time.perf_counter()
    bar = progress(desc=job.label, unit="img", total=expected_samples(tasks),
                   enabled=cfg.logger.progress and job.console)
    totals, reasons = _write_shards(job, tasks, features, c, vae=cfg.train_t2i.vae, bar=bar,
                                    max_image_pixels=cfg.data.reader.max_image_pixels,
                                    text_encoder=cfg.text_encoder.pretrained or "architecture")
    seconds = time.perf_counter() - start
    summary = {"rank": rank, "world_size": world, "input_shards": len(urls), "shards_written": totals["shards"],
               "shards_already_done": already_done, "samples_cached": totals["images"],
               "duplicate_keys_across_shards": totals["duplicate_keys_across_shards"],
               "failures": sum(reasons.values()), "failures_by_reason": dict(sorted(reasons.items())),
               "seconds": round(seconds, 2),
               "images_per_s": round(totals["images"] / seconds, 2) if totals["images"] else 0.0,
               "resolutions": sorted(features.tables), "keys": features.keys, "dtype": c.dtype, "output": c.output}
    finish_stage(run_dir, "cache", summary, filename=job.summary_file)
    return summary
