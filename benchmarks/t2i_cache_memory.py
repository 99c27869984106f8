"""Peak memory of `recap train-t2i` from a cache: without T5 and the VAE's encoder (now) against
the same run holding them (before: train-t2i loaded the frozen encoders even from a cache).

Writes toy shards with ground-truth captions, a toy tokenizer, a random VAE of the toy preset and
a cache made with a larger random T5 (default d_model 1024, d_ff 2816, 12 layers, 16 heads: about
155 M parameters, 0.6 GB in fp32), then runs the real stage from that cache, each peer in a fresh
process (one at a time, one compute thread, no reader workers):

- before: the stage with its frozen side built as it was before the cache held the empty
  caption's and the sampling prompts' states (``load_frozen(...).to(device)``: tokenizer, T5 and
  the whole VAE on every rank, for the empty caption, the sample grids and the export);
- after: the stage as it is (no T5, the VAE's decoder on the rank that draws grids; the main rank
  loads T5 and the whole VAE on the CPU for the export, after training).

Each prints its peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) through its last
training step and over the whole run (the final sample grid and the export included), plus peak
CUDA memory when the run is on a GPU; the two peers' losses must be bit-identical (the empty
caption's states come from the cache now).

    python benchmarks/t2i_cache_memory.py                # d_model 1024, 12 layers, 4 steps
    python benchmarks/t2i_cache_memory.py --d-model 2048 --layers 24
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

MB = 1024  # ru_maxrss is in KiB on Linux


def _overrides(root: Path, args: argparse.Namespace) -> list[str]:
    t5 = f"{{d_model: {args.d_model}, d_kv: 64, d_ff: {args.d_ff}, num_layers: {args.layers}, num_heads: {args.heads}}}"
    stage = f"[{{resolution: 64, steps: {args.steps}, global_batch_size: 4, micro_batch_size: 4}}]"
    return [f"run.root={root}/runs", f"train_t2i.input={root}/captioned", f"train_t2i.vae={root}/vae",
            f"text_encoder.tokenizer={root}/tokenizer", f"text_encoder.architecture={t5}", f"train_t2i.stages={stage}",
            "train_t2i.sampling.prompts=[a large red star in the top left]", "train_t2i.sampling.every_steps=null",
            "train_t2i.sampling.steps=2", "logger.progress=false", "logger.wandb.mode=disabled",
            "data.reader.num_workers=0", "cache.num_workers=0", "cache.dtype=float32", f"cache.output={root}/cache",
            f"train_t2i.cache={root}/cache", "checkpoint.every_steps=100000", "train_t2i.buckets.random_crop=false"]


def _inputs(root: Path) -> None:
    from data_pipeline.caption_tokenizer import save_tokenizer, train_caption_tokenizer
    from data_pipeline.options import ToyDataOptions
    from data_pipeline.toy_shards import write_ground_truth_captions, write_toy_dataset
    from models.vae import build_vae
    from train.config.loading import load_experiment

    options = ToyDataOptions(train_shards=2, heldout_shards=1, samples_per_shard=16, seed=5, processes=1)
    write_toy_dataset({"train": root / "train", "heldout": root / "heldout"}, options, progress=False)
    write_ground_truth_captions(root / "train", root / "captioned")
    words = [f"a large striped {c} {s} in the top left" for c in ("red", "blue", "green") for s in ("star", "cross")]
    save_tokenizer(train_caption_tokenizer(words * 8, vocab_size=200, max_tokens=64), root / "tokenizer")
    v = load_experiment([]).vae
    torch.manual_seed(0)
    build_vae(v.block_out_channels, layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
              norm_num_groups=v.norm_num_groups).save_pretrained(root / "vae")


def _peer(name: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one peer in this (fresh) process; returns its peaks in MiB and its losses."""
    from train.config.loading import load_experiment
    from train.stages import cache, train_t2i
    from train.t2i.parts import load_frozen

    cfg = load_experiment([*_overrides(root, args), f"run.name={name}"])
    if name == "cache":
        return cache.run(cfg, cfg.run.dir / "cache")
    if name == "before":  # the frozen side as train-t2i built it before, whatever the input
        train_t2i._frozen = lambda c, rt: load_frozen(c.text_encoder, c.train_t2i.vae, c.seed).to(rt.device)
    peaks: dict[str, float] = {}
    train_steps = train_t2i.train_steps

    def measured_steps(*a: Any, **kw: Any) -> Any:  # the peaks through the last step (before the export)
        result = train_steps(*a, **kw)
        peaks["training_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB
        if torch.cuda.is_available():
            peaks["training_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return result

    train_t2i.train_steps = measured_steps
    train_t2i.run(cfg, cfg.run.dir / "train_t2i")
    peaks["run_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB
    if torch.cuda.is_available():
        peaks["run_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    metrics = (cfg.run.dir / "train_t2i" / "metrics.jsonl").read_text().splitlines()
    return {**peaks, "losses": [r["loss"] for r in map(json.loads, metrics) if "loss" in r]}


def _child(name: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    sizes = {"--d-model": args.d_model, "--d-ff": args.d_ff, "--layers": args.layers, "--heads": args.heads,
             "--steps": args.steps}
    argv = [sys.executable, __file__, "--peer", name, "--root", str(root), *(str(x) for kv in sizes.items() for x in kv)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--peer", choices=("cache", "before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.peer:
        print(json.dumps(_peer(args.peer, args.root, args), default=str))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _inputs(root)
        built = _child("cache", root, args)
        before, after = _child("before", root, args), _child("after", root, args)
    if before["losses"] != after["losses"]:
        sys.exit(f"the peers' losses differ: {before['losses']} vs {after['losses']}")
    from models.text_conditioning import build_t5_encoder

    with torch.device("meta"):
        t5 = build_t5_encoder(pretrained=None, vocab_size=200, architecture={
            "d_model": args.d_model, "d_kv": 64, "d_ff": args.d_ff, "num_layers": args.layers, "num_heads": args.heads})
    params = sum(p.numel() for p in t5.parameters())
    device = "cuda" if "run_cuda_mib" in after else "cpu"
    print(f"\ntrain-t2i from a float32 cache ({built['samples_cached']} samples), toy UNet/VAE, T5 d_model "
          f"{args.d_model} x {args.layers} layers ({params / 1e6:.0f} M parameters, {4 * params / 2**20:.0f} MiB "
          f"fp32), 64 px, batch 4, {args.steps} steps, one sample grid, on {device}; losses bit-identical: yes")
    rows = [("peak RSS through the last training step (MiB)", "training_rss_mib"),
            ("peak RSS, whole run with the export (MiB)", "run_rss_mib")]
    if device == "cuda":
        rows += [("peak CUDA memory through the last training step (MiB)", "training_cuda_mib"),
                 ("peak CUDA memory, whole run with the export (MiB)", "run_cuda_mib")]
    print("| measure | before (T5 + VAE loaded) | after (from the cache) | after/before |\n|---|---:|---:|---:|")
    for label, key in rows:
        print(f"| {label} | {before[key]:.0f} | {after[key]:.0f} | {after[key] / before[key]:.2f} |")


if __name__ == "__main__":
    main()
