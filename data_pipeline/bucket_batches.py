"""Batches of one aspect bucket from a streaming reader, with every rank on the same bucket.

A rank reads samples in stream order and queues each under its bucket (data_pipeline/
aspect_buckets.py). Before each step the ranks share how many full batches each bucket holds
(a tiny all-gather, done by the runtime) and `choose_bucket` picks, identically on every rank, a
bucket that all of them can fill; when there is none, every rank with room reads more and they
ask again. No rank waits on a bucket that is dry elsewhere, and none can fill its memory: a
bucket over ``capacity`` hands its oldest sample to the nearest bucket (in log-aspect) with room,
where it is fitted at batch time. So no sample is dropped, and a batch's samples are re-fitted
to its bucket whatever they were queued as.

Pure bookkeeping (no torch.distributed, no images): items are whatever the stage queues, and
`state_dict` holds them for a checkpoint, so a resumed run takes the same batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from data_pipeline.aspect_buckets import Bucket
from data_pipeline.seeding import derive_seed


def choose_bucket(ready: Sequence[Sequence[int]], *, step: int, seed: int) -> int | None:
    """The bucket for this step: drawn among those every rank can fill (``ready[rank][bucket]``:
    full batches queued), with probability proportional to the fewest any rank holds, seeded by
    (seed, step); None when no bucket is ready on every rank (read more, then ask again)."""
    common = [min(column) for column in zip(*ready, strict=True)]
    total = sum(common)
    if total == 0:
        return None
    pick = derive_seed(seed, step) % total
    for bucket, n in enumerate(common):
        if pick < n:
            return bucket
        pick -= n
    raise AssertionError("unreachable: pick < total")


class BucketQueues:
    """One rank's read-ahead samples, queued per bucket (FIFO), at most ``capacity`` each."""

    def __init__(self, table: Sequence[Bucket], *, batch_size: int, capacity: int) -> None:
        if capacity < batch_size:
            raise ValueError(f"capacity {capacity} must be >= batch_size {batch_size}")
        self.table, self.batch_size, self.capacity = list(table), batch_size, capacity
        self.queues: list[deque[Any]] = [deque() for _ in self.table]
        self.moved = 0  # samples handed to a neighbouring bucket (logged by the trainer)
        # neighbours of each bucket, nearest in log-aspect first (ties: the smaller index)
        self._nearest = [sorted((j for j in range(len(self.table)) if j != i),
                                key=lambda j, i=i: (abs(self.table[j].log_aspect - self.table[i].log_aspect), j))
                         for i in range(len(self.table))]

    def has_room(self) -> bool:
        """Whether another sample can be queued (some bucket is under capacity)."""
        return any(len(q) < self.capacity for q in self.queues)

    def add(self, bucket: int, item: Any) -> None:
        """Queue ``item`` under ``bucket``; an overflow moves that bucket's oldest item onwards."""
        if not self.has_room():
            raise RuntimeError("every bucket is at capacity; take a batch before adding (check has_room())")
        self.queues[bucket].append(item)
        if len(self.queues[bucket]) > self.capacity:
            target = next(j for j in self._nearest[bucket] if len(self.queues[j]) < self.capacity)
            self.queues[target].append(self.queues[bucket].popleft())
            self.moved += 1

    def ready(self) -> list[int]:
        """Full batches queued per bucket (what the ranks share before choosing)."""
        return [len(q) // self.batch_size for q in self.queues]

    def take(self, bucket: int) -> list[Any]:
        """The oldest ``batch_size`` items of ``bucket``."""
        queue = self.queues[bucket]
        if len(queue) < self.batch_size:
            raise ValueError(f"bucket {self.table[bucket]} holds {len(queue)} < batch_size {self.batch_size}")
        return [queue.popleft() for _ in range(self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"table": [[b.width, b.height] for b in self.table], "queues": [list(q) for q in self.queues],
                "moved": self.moved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["table"] != [[b.width, b.height] for b in self.table]:
            raise ValueError("the checkpoint's bucket table differs from this run's (base resolution, step or "
                             "max_aspect changed)")
        self.queues = [deque(q) for q in state["queues"]]
        self.moved = state["moved"]
