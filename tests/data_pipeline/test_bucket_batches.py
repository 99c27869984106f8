"""Bucketed batches across ranks: one bucket per step on every rank, nothing lost, bounded memory,
and a resumed run that takes the same batches."""

from __future__ import annotations

import json
import random

import pytest

from data_pipeline.aspect_buckets import bucket_table, nearest_bucket
from data_pipeline.bucket_batches import BucketQueues, choose_bucket

TABLE = bucket_table(256)  # 128x512, 192x320, 256x256, 320x192, 512x128
BATCH, CAPACITY = 4, 8


def _streams(ranks: int, n: int) -> list[list[tuple[str, int]]]:
    """Per rank, (sample id, bucket) in read order; rank 0 sees mostly tall images, rank 1 wide."""
    rng = random.Random(0)
    out = []
    for r in range(ranks):
        items = []
        for i in range(n):
            w, h = rng.choice([(300, 1000), (600, 1000), (512, 512), (1000, 600), (1000, 300)])
            if r == 0 and rng.random() < 0.6:
                w, h = 300, 1000
            if r == 1 and rng.random() < 0.6:
                w, h = 1000, 300
            items.append((f"r{r}-{i}", nearest_bucket(w, h, TABLE)))
        out.append(items)
    return out


def _run(streams, steps: int, queues=None, positions=None, start: int = 0, chunk: int = 2):
    """Lockstep steps as the trainer would run them; returns (batches per step, queues, positions)."""
    queues = queues or [BucketQueues(TABLE, batch_size=BATCH, capacity=CAPACITY) for _ in streams]
    positions = positions or [0] * len(streams)
    taken = []
    for step in range(start, start + steps):
        while (bucket := choose_bucket([q.ready() for q in queues], step=step, seed=7)) is None:
            for r, q in enumerate(queues):  # every rank with room reads a chunk, then they ask again
                for _ in range(chunk):
                    if q.has_room() and positions[r] < len(streams[r]):
                        sample, b = streams[r][positions[r]]
                        q.add(b, sample)
                        positions[r] += 1
        assert all(q.ready()[bucket] >= 1 for q in queues)
        taken.append((bucket, [q.take(bucket) for q in queues]))
    return taken, queues, positions


def test_every_step_takes_one_bucket_on_every_rank_and_loses_nothing() -> None:
    streams = _streams(3, 400)
    taken, queues, positions = _run(streams, 60)
    buckets = {b for b, _ in taken}
    assert len(buckets) >= 3  # not stuck on one bucket
    consumed = [s for _, per_rank in taken for batch in per_rank for s in batch]
    queued = [s for q in queues for queue in q.queues for s in queue]
    read = [s for r, p in enumerate(positions) for s, _ in streams[r][:p]]
    assert sorted(consumed + queued) == sorted(read) and len(set(consumed)) == len(consumed)  # exactly once
    assert all(len(queue) <= CAPACITY for q in queues for queue in q.queues)
    assert all(len(batch) == BATCH for _, per_rank in taken for batch in per_rank)
    assert sum(q.moved for q in queues) > 0  # skewed ranks overflowed into neighbours


def test_overflow_moves_the_oldest_to_the_nearest_bucket_with_room() -> None:
    q = BucketQueues(TABLE, batch_size=2, capacity=2)
    for i in range(3):
        q.add(0, f"tall{i}")  # 128x512
    assert list(q.queues[0]) == ["tall1", "tall2"] and list(q.queues[1]) == ["tall0"] and q.moved == 1
    for i in range(2):
        q.add(0, f"more{i}")
    assert list(q.queues[1]) == ["tall0", "tall1"] and list(q.queues[2]) == ["tall2"]  # 192x320 full: on to 256x256
    full = BucketQueues(TABLE[:1], batch_size=1, capacity=1)
    full.add(0, "x")
    assert not full.has_room()
    with pytest.raises(RuntimeError, match="at capacity"):
        full.add(0, "y")


def test_choose_bucket_is_shared_seeded_and_proportional() -> None:
    assert choose_bucket([[0, 1], [1, 0]], step=0, seed=0) is None
    assert choose_bucket([[2, 1], [1, 3]], step=5, seed=0) in (0, 1)
    picks = [choose_bucket([[3, 1], [5, 1]], step=s, seed=1) for s in range(4000)]
    assert abs(picks.count(0) / 4000 - 0.75) < 0.03  # min over ranks: 3 vs 1
    assert picks == [choose_bucket([[3, 1], [5, 1]], step=s, seed=1) for s in range(4000)]


def test_a_resumed_run_takes_the_same_batches() -> None:
    streams = _streams(2, 300)
    uninterrupted, _, _ = _run(streams, 40)
    first, queues, positions = _run(streams, 17)
    saved = [json.loads(json.dumps(q.state_dict())) for q in queues]  # as a checkpoint holds it
    restored = [BucketQueues(TABLE, batch_size=BATCH, capacity=CAPACITY) for _ in streams]
    for q, state in zip(restored, saved):
        q.load_state_dict(state)
    rest, _, _ = _run(streams, 23, restored, list(positions), start=17)
    assert first + rest == uninterrupted
    other = BucketQueues(bucket_table(512), batch_size=BATCH, capacity=CAPACITY)
    with pytest.raises(ValueError, match="bucket table differs"):
        other.load_state_dict(saved[0])


def test_capacity_below_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity 2 must be >= batch_size 4"):
        BucketQueues(TABLE, batch_size=4, capacity=2)
