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

from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from data_pipeline.aspect_buckets import Bucket
from data_pipeline.caption_mix import MixCounter
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


class BucketedBatches:
    """One rank's stream of one-bucket batches, in lockstep with the other ranks.

    Args:
        reader: a ShardReader whose transform gives items with a ``bucket`` index (or None for a
            sample without a usable caption, counted) and whose collate is ``list``.
        table: the current stage's buckets.
        batch_size: items per batch (this rank's micro-batch).
        queue_batches: read-ahead per bucket, in batches; capacity is (queue_batches + 1) x
            batch_size so that a chunk always fits once no bucket is ready here.
        seed: seeds the bucket choice (with the batch count).
        gather: this rank's ``ready()`` -> every rank's, in rank order (the runtime's all-gather;
            ``lambda x: [x]`` on one process).
        collate: (items, bucket) -> batch.

    Yields collated batches forever (training readers are endless). ``state_dict`` holds the
    reader position, the queued items, the batch count and the caption-mix counts: a resumed
    run takes the same batches. `set_stage` switches to another stage's table.
    """

    def __init__(self, reader: Any, table: Sequence[Bucket], *, batch_size: int, queue_batches: int, seed: int,
                 gather: Any, collate: Any) -> None:
        self.reader, self.seed, self.gather, self.collate = reader, seed, gather, collate
        self.queue_batches = queue_batches
        self.queues = self._queues(table, batch_size)
        self.taken = 0  # batches taken so far (the bucket draw's step)
        self.discarded = 0  # read-ahead dropped at resolution-stage switches
        self.mix = MixCounter()

    def _queues(self, table: Sequence[Bucket], batch_size: int) -> BucketQueues:
        return BucketQueues(table, batch_size=batch_size, capacity=(self.queue_batches + 1) * batch_size)

    @property
    def table(self) -> list[Bucket]:
        return self.queues.table

    def set_stage(self, table: Sequence[Bucket], batch_size: int, transform: Any) -> int:
        """Use another stage's table, batch size and worker transform from the next iteration.

        Items queued for a different table were fitted at the old resolution; they are dropped
        (counted in ``discarded``, returned): at most the read-ahead, once per stage switch. The
        same table and batch size (a resumed run's first call) keep the queues.
        """
        self.reader.set_transform(transform, batch_size)
        if list(table) == self.queues.table and batch_size == self.queues.batch_size:
            return 0
        dropped = sum(len(q) for q in self.queues.queues)
        self.queues = self._queues(table, batch_size)
        self.discarded += dropped
        return dropped

    def _free(self) -> int:
        return sum(self.queues.capacity - len(q) for q in self.queues.queues)

    def __iter__(self) -> Any:
        chunks = iter(self.reader)
        while True:
            bucket = choose_bucket(self.gather(self.queues.ready()), step=self.taken, seed=self.seed)
            if bucket is None:
                if self._free() >= self.reader.batch_size:  # else: ready everywhere here; ask again
                    for item in next(chunks):
                        if item is None:
                            self.mix.add(None)
                        else:
                            self.queues.add(item["bucket"], item)
                continue
            items = self.queues.take(bucket)
            self.taken += 1
            for item in items:
                self.mix.add((item["drawn"], item["used"], ""))
            yield self.collate(items, self.queues.table[bucket])

    def fault_counts(self) -> dict[str, int]:
        return self.reader.fault_counts()

    def filtered_counts(self) -> dict[str, int]:
        return self.reader.filtered_counts()

    def state_dict(self) -> dict[str, Any]:
        return {"reader": self.reader.state_dict(), "queues": self.queues.state_dict(), "taken": self.taken,
                "discarded": self.discarded, "batch_size": self.queues.batch_size,
                "mix": {"drawn": dict(self.mix.drawn), "used": dict(self.mix.used),
                        "fell_back": self.mix.fell_back, "dropped": self.mix.dropped}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; the saved table may be another stage's (the trainer then calls set_stage)."""
        self.reader.load_state_dict(state["reader"])
        table = [Bucket(w, h) for w, h in state["queues"]["table"]]
        self.queues = self._queues(table, state["batch_size"])
        self.queues.load_state_dict(state["queues"])
        self.taken, self.discarded = state["taken"], state["discarded"]
        mix = state["mix"]
        self.mix.drawn, self.mix.used = Counter(mix["drawn"]), Counter(mix["used"])
        self.mix.fell_back, self.mix.dropped = mix["fell_back"], mix["dropped"]
