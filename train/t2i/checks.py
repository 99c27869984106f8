"""What `recap train-t2i` and `recap cache` check before a launch (ConfigError: exit 2).

The launching process runs these (train/commands/prechecks.py) before torchrun or DeepSpeed's
launcher starts the workers, so this module imports no model library: the stage modules import
diffusers, T5 and the VAE (about 3 s more per launch on a CPU), these checks read only config
sections, the shards' stats and the cache's conditioning file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from data_pipeline import recaption as shard_jobs
from data_pipeline.latent_cache import CONDITIONING_FILE, STATS_SUFFIX, conditioning_url, decode_conditioning
from data_pipeline.shard_io import NoShardsError, is_local, list_shards, open_shard
from train.config.t2i import CacheConfig, TrainT2IConfig
from train.config.typed import ConfigError
from train.runtime.shard_jobs import check_rank, list_inputs, refuse_output_holding_inputs
from train.t2i.batches import resolution_plan

CACHE_KEYS = ("dsc", "ssc", "txt")  # the caption keys `recap cache` encodes with T5
_RERUN = "rerun `recap cache` with this config (done shards are skipped; it writes only that file)"


def check_train_t2i(t: TrainT2IConfig, weights: Mapping[str, float], world: int) -> None:
    """The stages and their batches split over the ``world`` processes the launcher starts, and a
    cache (when given) that holds every stage's resolution, every caption key drawn with a weight
    in ``weights``, the empty caption's states and those of the sampling prompts."""
    resolution_plan(t, world)
    if t.cache is not None:
        check_cache(t.cache, [s.resolution for s in t.stages], weights)
        read_conditioning(t.cache, t.sampling.prompts)


def check_cache_job(c: CacheConfig) -> list[str]:
    """`recap cache`'s arguments: its input shards (returned), an output that holds none of them,
    known caption keys and the job's rank."""
    urls = list_inputs("cache", c.input, hint="Run `recap recaption` first")
    refuse_output_holding_inputs("cache", urls, c.output)
    unknown = [k for k in c.keys if k not in CACHE_KEYS]
    if unknown or not c.keys:
        raise ConfigError("cache.keys", f"unknown caption key(s) {unknown}; choose among {', '.join(CACHE_KEYS)}")
    check_rank("cache", c.rank, c.world_size)
    return urls


def check_cache(cache: str, resolutions: Iterable[int], weights: Mapping[str, float]) -> None:
    """ConfigError unless the cache at ``cache`` holds every stage resolution and every caption
    key drawn with a weight > 0 (local shards: from the first shard's stats; remote: later,
    sample by sample)."""
    try:
        urls = list_shards(cache)
    except NoShardsError as exc:
        raise ConfigError("train_t2i.cache", f"{exc}; run `recap cache` first") from None
    local = [Path(u) for u in urls if is_local(u)]
    stats = shard_jobs.read_stats(local[0], STATS_SUFFIX) if local else None
    if local and stats is None:
        raise ConfigError("train_t2i.cache", f"{local[0]} is not a complete cache shard; run `recap cache` to finish it")
    if stats is None:  # remote shards: checked sample by sample
        return
    missing = sorted(set(resolutions) - set(stats["resolutions"]))
    keys = [k for k, w in weights.items() if w > 0 and k not in stats["keys"]]
    if missing or keys:
        raise ConfigError("train_t2i.cache", f"the cache holds resolutions {stats['resolutions']} and caption keys "
                          f"{stats['keys']}; this run also needs {missing or ''}{' ' if missing and keys else ''}"
                          f"{keys or ''}. Rerun `recap cache` with this config")


def read_conditioning(cache: str, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The conditioning file of the cache at ``cache`` (train_t2i.cache), on the CPU. ConfigError
    when it is missing or holds the states of sampling prompts other than ``prompts`` (when any)."""
    try:
        url = conditioning_url(list_shards(cache)[0])
    except NoShardsError as exc:
        raise ConfigError("train_t2i.cache", f"{exc}; run `recap cache` first") from None
    where = url if is_local(url) else CONDITIONING_FILE  # a remote URL may carry credentials
    try:
        with open_shard(url) as f:
            tensors, about = decode_conditioning(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigError("train_t2i.cache", f"no readable {where} ({exc.__class__.__name__}): a cache written "
                          "before `recap cache` stored the empty caption's and the sampling prompts' T5 states; "
                          f"{_RERUN}") from None
    if prompts and list(prompts) != about["prompts"]:
        raise ConfigError("train_t2i.cache", f"{where} holds the T5 states of sampling prompts {about['prompts']}, not "
                          f"of train_t2i.sampling.prompts {list(prompts)}; {_RERUN}")
    return tensors
