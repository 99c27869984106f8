"""Reader throughput: our resumable ShardReader against plain webdataset, same shards, same decoding.

Both pipelines read every sample of the same shards once and decode KEY.jpg to a fully loaded
PIL RGB image, KEY.txt to str and KEY.json to a dict; ours additionally tracks its resume
position, counts faults and applies the ground-truth guard. Measured alternately in one run
(best of --repeats) on one core (num_workers=0), and with 2 worker processes. Prints
samples/s and the ratio ours/webdataset (goal: >= 0.9).

    python benchmarks/reader_throughput.py                 # generates toy shards in a temp dir
    python benchmarks/reader_throughput.py --shards DIR    # or reads yours
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import webdataset as wds

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.options import ReaderOptions, ToyDataOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import list_shards
from data_pipeline.shard_reader import ShardReader
from data_pipeline.toy_shards import write_toy_dataset


def _as_list(items: list) -> list:
    return items


def ours(urls: list[str], workers: int) -> int:
    options = ReaderOptions(num_workers=workers, open_shards=2, shuffle=True, fault_check_after=10**9)
    spec = SampleSpec(GroundTruthAccess.NONE, image=True, captions=(), optional_texts=("txt",))
    reader = ShardReader(urls, spec=spec, options=options, batch_size=32, seed=0, epochs=1, collate=_as_list)
    return sum(len(batch) for batch in reader)


def plain_webdataset(urls: list[str], workers: int) -> int:
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
               .decode("pilrgb")  # PIL open + load + convert("RGB"); txt and json by its default handlers
               .to_tuple("jpg", "txt", "json")
               .batched(32, collation_fn=_as_list))
    if workers == 0:
        return sum(len(batch) for batch in dataset)
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(batch) for batch in loader)


def measure(fn, urls: list[str], workers: int) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn(urls, workers)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="shard spec (directory, brace pattern); default: generate toy shards")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards
        if spec is None:
            options = ToyDataOptions(train_shards=args.num_shards, heldout_shards=1,
                                     samples_per_shard=args.samples_per_shard, processes=2)
            write_toy_dataset({"train": Path(tmp) / "train"}, options, progress=False)
            spec = str(Path(tmp) / "train")
        urls = list_shards(spec)
        print(f"{len(urls)} shards; decoding jpg -> PIL RGB (loaded), txt -> str, json -> dict; best of {args.repeats}")
        print(f"{'workers':>8} {'samples':>8} {'webdataset/s':>13} {'ours/s':>9} {'ratio':>6}")
        for workers in (0, 2):
            best = {"wds": 0.0, "ours": 0.0}
            counts = set()
            for _ in range(args.repeats):  # alternate so drift in machine load hits both
                for name, fn in (("wds", plain_webdataset), ("ours", ours)):
                    n, seconds = measure(fn, urls, workers)
                    counts.add(n)
                    best[name] = max(best[name], n / seconds)
            assert len(counts) == 1, f"the two readers saw different sample counts: {counts}"
            per = "" if workers else " (1 core)"
            print(f"{workers:>8} {counts.pop():>8} {best['wds']:>13.1f} {best['ours']:>9.1f} "
                  f"{best['ours'] / best['wds']:>6.2f}{per}")


if __name__ == "__main__":
    main()
