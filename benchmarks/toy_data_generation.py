"""Synthetic-scenes generation throughput (samples/s), with the scene renderer alone as the peer.

`write_toy_dataset` does everything `recap make-toy-data` does per sample: sample the scene,
render it, JPEG-encode it, write the three captions and the ground truth, and write tar shards
and stats files. The peer measured in the same run is sampling + rendering alone (no captions,
JPEG or IO), so "of render-only" shows what the dataset writing costs on top. With 2
processes the speed-up over 1 process is printed as well.

    python benchmarks/toy_data_generation.py [--samples 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.options import ToyDataOptions
from data_pipeline.toy_scenes import render_scene, sample_scene
from data_pipeline.toy_shards import write_toy_dataset


def render_only(n: int, seed: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        render_scene(sample_scene(np.random.default_rng([seed, 0, i])))
    return n / (time.perf_counter() - start)


def full(n: int, processes: int, seed: int) -> float:
    shards = 8
    options = ToyDataOptions(train_shards=shards, heldout_shards=1, samples_per_shard=n // shards, seed=seed,
                             processes=processes)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = write_toy_dataset({"train": Path(tmp) / "train"}, options, progress=False)
        elapsed = time.perf_counter() - start
    assert summary["samples_written"] == n
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="samples per measurement (multiple of 8)")
    args = parser.parse_args()
    peer = render_only(args.samples, seed=1)
    one = full(args.samples, processes=1, seed=2)
    two = full(args.samples, processes=2, seed=3)
    print(f"{'pipeline':<34} {'samples/s':>10} {'ratio':>22}")
    print(f"{'render only (peer, 1 process)':<34} {peer:>10.1f} {'1.00':>22}")
    print(f"{'make-toy-data, 1 process':<34} {one:>10.1f} {one / peer:>15.2f} of peer")
    print(f"{'make-toy-data, 2 processes':<34} {two:>10.1f} {two / one:>11.2f}x 1 process")


if __name__ == "__main__":
    main()
