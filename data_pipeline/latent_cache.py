"""The feature cache of train-t2i: per sample, VAE latents at its bucket of every resolution stage
and the T5 states of every caption key, so that training skips image decoding, the VAE and T5.

One cache shard per recaptioned shard (same name), written by `recap cache` with the
exactly-once protocol of recaptioning (data_pipeline/recaption.py). Each sample keeps its
text members and json, drops its image, and gains ``KEY.cache.safetensors`` holding:

    latents@<res>  (C, h, w)  scaled VAE latents (posterior mean) of the centre crop at the
                              sample's bucket of base resolution <res>, in the cache dtype
                              (h, w: the bucket's sides over the VAE's factor f)
    bucket@<res>   (2,) int64 the bucket's (width, height) in pixels
    crop@<res>     (2,) int64 the crop's (top, left) in the image resized to cover the bucket
    t5@<key>       (T, D)     unpadded T5 states of caption key <key> (ending in </s>); absent
                              when the sample has no such caption

`FromCache` turns that member into training items for `BucketedBatches`; `collate_cached`
batches them. The trainer then starts from latents and states instead of pixels and token ids.

Beside the shards, ``conditioning.safetensors`` holds the T5 states no sample holds, so that
train-t2i from the cache loads no T5 (written once by the cache job's rank 0; float32, computed
outside autocast, as train-t2i computed them from raw images):

    empty_states          (T_e, D) the empty caption's states, classifier-free-guidance dropout's
    empty_mask            (T_e,)   bool, all True
    prompt_states         (P, T, D) train_t2i.sampling.prompts as RecapPipeline.encode_prompts
    prompt_mask           (P, T)    pads them (to the longest, zero at padding); absent when P = 0
    unconditional_states  (P, T_u, D) the empty caption P times, the sample grid's guidance batch
    unconditional_mask    (P, T_u)

and, in the safetensors header's metadata (``recap``: a JSON object), what they were computed
with: text_encoder, tokenizer, max_tokens, seed (the toy T5's), prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.aspect_buckets import Bucket
from data_pipeline.caption_mix import CaptionMix
from data_pipeline.shard_io import is_local, shard_name

CACHE_MEMBER = "cache.safetensors"
STATS_SUFFIX = ".cache.json"
CONDITIONING_FILE = "conditioning.safetensors"
_ABOUT = "recap"  # the conditioning file's metadata entry (safetensors metadata maps str to str)


def latents_name(resolution: int) -> str:
    return f"latents@{resolution}"


def bucket_name(resolution: int) -> str:
    return f"bucket@{resolution}"


def states_name(key: str) -> str:
    return f"t5@{key}"


def encode_entry(tensors: dict[str, torch.Tensor]) -> bytes:
    """One sample's cache member (safetensors bytes; tensors made contiguous on the CPU)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def decode_entry(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def encode_conditioning(tensors: dict[str, torch.Tensor], about: dict[str, Any]) -> bytes:
    """The conditioning file's bytes: ``tensors`` and ``about`` (JSON, sorted keys) as metadata."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={_ABOUT: json.dumps(about, sort_keys=True)})


def decode_conditioning(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, about) of a conditioning file's bytes; ValueError when they are not one."""
    from safetensors.torch import load

    try:  # safetensors: an 8-byte little-endian header length, then the JSON header
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        about = json.loads(header["__metadata__"][_ABOUT])
        return load(data), about
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a cache conditioning file ({exc.__class__.__name__})") from None


def conditioning_url(shard_url: str) -> str:
    """Where the conditioning file of the cache holding ``shard_url`` lies: beside it (a remote
    URL or ``pipe:`` command with the shard's file name replaced)."""
    if is_local(shard_url):
        return str(Path(shard_url).parent / CONDITIONING_FILE)
    head, _, tail = shard_url.rpartition(shard_name(shard_url).removeprefix("pipe:"))
    return f"{head}{CONDITIONING_FILE}{tail}"


@dataclass
class FromCache:
    """sample dict (reader, with the cache member as bytes) -> training item, or None when no
    caption of the mix is cached for it.

    The item: ``latents`` (C, h, w) float32, ``bucket`` (index in ``table``), ``states`` (T, D)
    float32, ``drawn``/``used`` caption keys, ``seed``. ``downsample`` is the factor f of the VAE
    the trainer uses: latents cached by a VAE of another factor are refused.
    """

    table: Sequence[Bucket]
    resolution: int
    mix: CaptionMix
    downsample: int

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        entry = decode_entry(sample[CACHE_MEMBER])
        key = latents_name(self.resolution)
        if key not in entry:
            cached = sorted(k.split("@")[1] for k in entry if k.startswith("latents@"))
            raise ValueError(f"sample {sample['__key__']} has no latents for resolution {self.resolution} (cached: "
                             f"{', '.join(cached)}); rerun `recap cache` with this stage's resolution")
        width, height = entry[bucket_name(self.resolution)].tolist()
        try:
            bucket = self.table.index(Bucket(width, height))
        except ValueError:
            raise ValueError(f"the cached bucket {width}x{height} is not in this run's table at {self.resolution}px "
                             "(train_t2i.buckets changed since `recap cache`); rerun `recap cache`") from None
        latent_hw = tuple(entry[key].shape[1:])
        if latent_hw != (height // self.downsample, width // self.downsample):
            raise ValueError(f"sample {sample['__key__']}: cached latents of {width}x{height} pixels are "
                             f"{latent_hw[1]}x{latent_hw[0]}, not the {width // self.downsample}x"
                             f"{height // self.downsample} of this run's {self.downsample}x VAE (train_t2i.vae "
                             "changed since `recap cache`); rerun `recap cache`")
        available = {k: "cached" if states_name(k) in entry else None for k in self.mix.weights}
        choice = self.mix.choose(available, sample["seed"])
        if choice is None:
            return None
        drawn, used, _ = choice
        return {"latents": entry[key].float(), "bucket": bucket, "states": entry[states_name(used)].float(),
                "drawn": drawn, "used": used, "seed": sample["seed"]}


def refit_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, h, w) latents resized to cover (height, width) and centre-cropped: for a sample that
    overflowed into a neighbouring bucket (rare: the queue of its own bucket was full)."""
    c, h, w = latents.shape
    if (h, w) == (height, width):
        return latents
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    resized = F.interpolate(latents[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return resized[:, top : top + height, left : left + width]


def collate_cached(items: Sequence[dict[str, Any]], bucket: Bucket, *, downsample: int) -> dict[str, Any]:
    """One bucket's batch: ``latents`` (B, C, H/f, W/f) for the VAE's factor f = ``downsample``,
    ``states`` (B, T, D) zero-padded with ``mask`` (B, T), ``seeds`` (B,), ``used`` caption keys."""
    h, w = bucket.height // downsample, bucket.width // downsample
    longest = max(item["states"].shape[0] for item in items)
    dim = items[0]["states"].shape[1]
    states = torch.zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, item in enumerate(items):
        n = item["states"].shape[0]
        states[i, :n], mask[i, :n] = item["states"], True
    return {"latents": torch.stack([refit_latents(item["latents"], h, w) for item in items]), "states": states,
            "mask": mask, "seeds": torch.tensor([item["seed"] for item in items], dtype=torch.long),
            "used": [item["used"] for item in items]}
