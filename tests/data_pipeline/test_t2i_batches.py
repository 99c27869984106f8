"""Bucketed text-to-image batches from real shards: fitted pixels, tokenized captions, one bucket
per batch on every rank, exact resume, and resolution-stage switches."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from data_pipeline.aspect_buckets import bucket_table
from data_pipeline.bucket_batches import BucketedBatches
from data_pipeline.caption_mix import CaptionMix
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_reader import ShardReader
from data_pipeline.t2i_samples import FitToBucket, caption_members, collate_bucket, pad_token_ids, refit
from tests.helpers import toy_tokenizer, write_captioned_shards

MIX = CaptionMix({"dsc": 0.8, "txt": 0.2}, fallback=("dsc", "txt"))
BATCH = 4


@pytest.fixture(scope="module")
def shards(dp_toy, tmp_path_factory) -> Path:
    return write_captioned_shards(dp_toy.train, tmp_path_factory.mktemp("captioned"))


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer(max_tokens=16)


def _batches(shards: Path, tokenizer, *, resolution: int = 64, rank: int = 0, world: int = 1, gather=None,
             workers: int = 0) -> BucketedBatches:
    table = bucket_table(resolution, step=16)
    spec = SampleSpec(GroundTruthAccess.NONE, optional_texts=caption_members(MIX))
    reader = ShardReader(str(shards), spec=spec, options=ReaderOptions(num_workers=workers), batch_size=BATCH,
                         seed=3, rank=rank, world_size=world, transform=FitToBucket(table, MIX, tokenizer, 16),
                         collate=list)
    return BucketedBatches(reader, table, batch_size=BATCH, queue_batches=1, seed=5,
                           gather=gather or (lambda ready: [ready]), collate=collate_bucket)


def _take(batches: BucketedBatches, n: int) -> list[dict]:
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("endless reader ended")


def test_batches_hold_one_bucket_of_fitted_pixels_and_tokenized_captions(shards, tokenizer) -> None:
    batches = _batches(shards, tokenizer)
    taken = _take(batches, 12)
    sizes = {tuple(b["pixels"].shape) for b in taken}
    assert len(sizes) >= 2  # the toy images have several aspect ratios
    for b in taken:
        n, c, h, w = b["pixels"].shape
        assert (n, c) == (BATCH, 3) and b["pixels"].dtype == torch.uint8
        assert (w, h) in {(x.width, x.height) for x in batches.table} and w * h <= 64 * 64
        assert b["input_ids"].shape == b["mask"].shape and b["input_ids"].shape[1] <= 16
        lengths = b["mask"].sum(1)
        assert all(b["input_ids"][i, lengths[i] - 1] == tokenizer.eos_token_id for i in range(n))
        assert set(b["used"]) <= {"dsc", "txt"}
    used = sum(batches.mix.used.values())
    assert used == 12 * BATCH and batches.mix.dropped == 0
    assert batches.mix.ratios()["caption_mix/dsc"] > 0.5


def test_resumed_batches_equal_uninterrupted_ones(shards, tokenizer) -> None:
    whole = _take(_batches(shards, tokenizer), 10)
    first = _batches(shards, tokenizer)
    head = _take(first, 4)
    state = first.state_dict()
    resumed = _batches(shards, tokenizer)
    resumed.load_state_dict(state)
    tail = _take(resumed, 6)
    for a, b in zip(whole, head + tail, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["seeds"], b["seeds"]) and a["used"] == b["used"]
    assert resumed.mix.used == _run_counts(whole)


def _run_counts(batches: list[dict]):
    from collections import Counter

    return Counter(key for b in batches for key in b["used"])


def test_workers_give_the_same_batches_as_the_main_process(shards, tokenizer) -> None:
    # each worker reads its own streams, so the order differs; the per-sample content does not
    solo = _take(_batches(shards, tokenizer, workers=0), 6)
    pooled = _take(_batches(shards, tokenizer, workers=2), 6)
    by_seed = {int(s): (b["pixels"][i], b["used"][i]) for b in solo for i, s in enumerate(b["seeds"])}
    common = [(int(s), b["pixels"][i], b["used"][i]) for b in pooled for i, s in enumerate(b["seeds"])
              if int(s) in by_seed and by_seed[int(s)][0].shape == b["pixels"][i].shape]
    assert len(common) >= 4
    for seed, pixels, used in common:
        assert torch.equal(by_seed[seed][0], pixels) and by_seed[seed][1] == used


def test_two_ranks_take_the_same_bucket_at_every_step(shards, tokenizer) -> None:
    barrier, slots = threading.Barrier(2), [None, None]

    def gather_for(rank: int):
        def gather(ready):
            slots[rank] = ready
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        return gather

    results: list = [None, None]

    def run(rank: int) -> None:
        results[rank] = _take(_batches(shards, tokenizer, rank=rank, world=2, gather=gather_for(rank)), 8)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    shapes = [[tuple(b["pixels"].shape) for b in results[r]] for r in range(2)]
    assert shapes[0] == shapes[1]
    seeds = [{int(s) for b in results[r] for s in b["seeds"]} for r in range(2)]
    assert not seeds[0] & seeds[1]  # the ranks read disjoint samples


def test_stage_switch_drops_the_read_ahead_and_uses_the_new_table(shards, tokenizer) -> None:
    batches = _batches(shards, tokenizer)
    _take(batches, 3)
    queued = sum(len(q) for q in batches.queues.queues)
    table = bucket_table(128, step=16)
    assert batches.set_stage(list(batches.table), BATCH, batches.reader.transform) == 0  # same stage: kept
    dropped = batches.set_stage(table, 2, FitToBucket(table, MIX, tokenizer, 16))
    assert dropped == queued and batches.discarded == queued
    after = _take(batches, 4)
    assert all(b["pixels"].shape[0] == 2 and b["pixels"].shape[2] * b["pixels"].shape[3] > 64 * 64 for b in after)


def test_refit_and_padding() -> None:
    from data_pipeline.aspect_buckets import Bucket

    pixels = torch.arange(3 * 32 * 64, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(3, 32, 64)
    assert refit(pixels, Bucket(64, 32)) is pixels
    assert refit(pixels, Bucket(48, 48)).shape == (3, 48, 48)
    ids, mask = pad_token_ids([[5, 1], [7, 8, 9, 1]])
    assert ids.tolist() == [[5, 1, 0, 0], [7, 8, 9, 1]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
