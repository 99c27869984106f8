"""Cached vs raw-image training throughput of `recap train-t2i`, same shards, same model, one run.

Generates toy shards with ground-truth captions (the recaption layout), a toy tokenizer and a
random VAE of the toy preset, then runs the real stage twice: from raw images (decode, fit to
buckets, VAE and T5 every step) and from `recap cache`'s output (latents and T5 states read from
shards). Prints training images/s of each (the stage's own img/s, whole steps including data
loading) and the ratio cached/raw, plus what building the cache cost.

    python benchmarks/t2i_cached_vs_raw.py                  # 64 px, 40 steps of 16 images
    python benchmarks/t2i_cached_vs_raw.py --resolution 128 --batch 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from data_pipeline.caption_tokenizer import save_tokenizer, train_caption_tokenizer
from data_pipeline.options import ToyDataOptions
from data_pipeline.toy_shards import write_ground_truth_captions, write_toy_dataset
from models.vae import build_vae
from train.stages import cache
from train.stages import train_t2i
from train.config.loading import load_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2, help="data.reader.num_workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        options = ToyDataOptions(train_shards=4, heldout_shards=1, samples_per_shard=max(64, args.batch * 8), seed=5)
        write_toy_dataset({"train": root / "train", "heldout": root / "heldout"}, options, progress=False)
        shards = write_ground_truth_captions(root / "train", root / "captioned")
        words = [f"a large striped {c} {s} in the top left" for c in ("red", "blue", "green") for s in ("star", "cross")]
        save_tokenizer(train_caption_tokenizer(words * 8, vocab_size=200, max_tokens=64), root / "tokenizer")
        base = load_experiment([])
        v = base.vae
        torch.manual_seed(0)
        build_vae(v.block_out_channels, layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
                  norm_num_groups=v.norm_num_groups).save_pretrained(root / "vae")
        stage = f"[{{resolution: {args.resolution}, steps: {args.steps}, global_batch_size: {args.batch}, " \
                f"micro_batch_size: {args.batch}}}]"
        overrides = [f"run.root={root}/runs", f"train_t2i.input={shards}", f"train_t2i.vae={root}/vae",
                     f"text_encoder.tokenizer={root}/tokenizer", f"train_t2i.stages={stage}",
                     "train_t2i.sampling.every_steps=null", "train_t2i.sampling.prompts=[]", "logger.progress=false",
                     "logger.wandb.mode=disabled", f"data.reader.num_workers={args.workers}",
                     f"cache.output={root}/cache", "checkpoint.every_steps=100000", "train_t2i.buckets.random_crop=false"]
        raw_cfg = load_experiment([*overrides, "run.name=raw", "train_t2i.cache=null"])
        raw = train_t2i.run(raw_cfg, raw_cfg.run.dir / "train_t2i")
        cache_cfg = load_experiment([*overrides, "run.name=cached", f"cache.num_workers={args.workers}"])
        built = cache.run(cache_cfg, cache_cfg.run.dir / "cache")
        cached_cfg = load_experiment([*overrides, "run.name=cached", f"train_t2i.cache={root}/cache"])
        cached = train_t2i.run(cached_cfg, cached_cfg.run.dir / "train_t2i")
    print(f"\ntrain-t2i, toy UNet/VAE/T5, {args.resolution}px, batch {args.batch}, {args.steps} steps, "
          f"{args.workers} reader workers ({torch.get_num_threads()} threads)")
    print("| input | train img/s | vs raw |\n|---|---:|---:|")
    print(f"| raw images | {raw['img_per_s']:.1f} | 1.00 |")
    print(f"| cache | {cached['img_per_s']:.1f} | {cached['img_per_s'] / raw['img_per_s']:.2f} |")
    print(f"building the cache: {built['samples_cached']} samples in {built['seconds']:.1f} s "
          f"({built['images_per_s']:.1f} img/s, resolutions {built['resolutions']}, {built['dtype']})")


if __name__ == "__main__":
    main()
