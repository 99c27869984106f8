"""A streaming WebDataset reader that resumes exactly and counts every skipped sample.

Layout: the shards of epoch ``e`` are permuted by (seed, e); with R ranks and W DataLoader
workers there are R*max(W,1) *streams*, and stream s reads the shards at positions s,
s+R*W, ... of that permutation. A stream keeps ``open_shards`` shards open and draws its
next sample from one of them chosen by a stateless hash of (seed, stream, draw), so its
position is just a few integers: per open shard (epoch, list index, samples consumed).

Exactness: each worker batches its own samples and sends the stream position with every
batch. The main process keeps the position of the last batch it *delivered* per worker (not
of prefetched ones) and which worker is next. PyTorch's DataLoader serves workers in strict
round-robin starting at worker 0, so on resume logical workers are rotated to make the next
expected one physical worker 0. Per-sample randomness comes from ``sample["seed"]``, derived
from (seed, epoch, shard, offset): the same whatever the worker count or restarts.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from data_pipeline import shard_io
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec, decode_sample
from data_pipeline.seeding import derive_seed
from data_pipeline.workers import die_with_parent, leave_signals_to_parent, worker_context

STATE_VERSION = 1
MAX_FAULT_EXAMPLES = 5


def _fresh_state() -> dict[str, Any]:
    return {"epoch": 0, "next_index": 0, "open": [], "draws": 0, "emitted": 0, "finished": False,
            "faults": {}, "filtered": {}, "examples": []}


class _Cursor:
    """An open shard, positioned after ``offset`` raw groups."""

    def __init__(self, url: str, epoch: int, index: int, shard_id: int, offset: int) -> None:
        self.epoch, self.index, self.shard_id, self.offset = epoch, index, shard_id, 0
        self.whole, self.used = offset == 0, False  # read from its start / yielded a sample
        self.name = shard_io.shard_name(url)
        self._stream = shard_io.open_shard(url)
        self._groups = shard_io.iter_raw_samples(self._stream)
        for _ in range(offset):  # replay (no decoding) to rebuild the duplicate-key set
            if self.next() is None:
                break

    def next(self) -> shard_io.RawSample | str | None:
        """The next raw group, TRUNCATED_TAR or NOT_A_TAR, or None at the end of the shard."""
        item = next(self._groups, None)
        if isinstance(item, shard_io.RawSample):
            self.offset += 1
        return item

    def close(self) -> None:
        self._groups.close()
        try:
            self._stream.close()
        except OSError:
            # A `pipe:` shard reports its command's exit status on close. A failed command
            # already ended the read (counted as a fault); after a complete read, or when the
            # stream stops early (SIGPIPE), the status says nothing about the samples read.
            pass


class _Stream:
    """The samples of one stream, with its JSON-able position in ``self.state``."""

    def __init__(self, reader: ShardStreams, stream_id: int, state: dict[str, Any]) -> None:
        self.r, self.stream_id, self.state = reader, stream_id, state
        # Shards read whole (or not openable) since this stream last yielded a sample; once that is
        # every shard the stream can get, an endless reader would spin forever without yielding.
        self.barren: set[int] = set()
        n = len(reader.urls)
        self.reachable = set(range(n)) if reader.options.shuffle else set(reader.stream_shards(stream_id, 0))
        self.cursors = [self._open(*pos) for pos in state["open"]]

    def _open(self, epoch: int, index: int, offset: int) -> _Cursor | None:
        shard_id = self.r.stream_shards(self.stream_id, epoch)[index]
        try:
            return _Cursor(self.r.urls[shard_id], epoch, index, shard_id, offset)
        except OSError as exc:
            self._fault(shard_io.UNREADABLE_SHARD, shard_io.shard_name(self.r.urls[shard_id]), "", str(exc))
            self._no_samples(shard_id)
            return None

    def _no_samples(self, shard_id: int) -> None:
        """Note that ``shard_id`` gave nothing; raise once none of the stream's shards can."""
        self.barren.add(shard_id)
        if self.r.epochs is None and self.barren >= self.reachable:
            skipped = {**self.state["faults"], **self.state["filtered"]}
            counts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
            raise shard_io.DataError(
                f"none of the {len(self.reachable)} shards of reader stream {self.stream_id} has a sample this stage "
                f"can read ({counts or 'all empty'}), e.g. {'; '.join(self.state['examples']) or '-'}"
            )

    def _fault(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        table = "filtered" if reason == "not_curated" else "faults"
        self.state[table][reason] = self.state[table].get(reason, 0) + 1
        if table == "faults" and len(self.state["examples"]) < MAX_FAULT_EXAMPLES:
            self.state["examples"].append(f"{shard} {key}: {reason}{' (' + detail + ')' if detail else ''}".strip())
        if table == "faults" and self.r.options.strict:
            raise shard_io.DataError(f"bad sample in strict mode: {self.state['examples'][-1]}")

    def _refill(self) -> None:
        st = self.state
        while len([c for c in self.cursors if c]) < self.r.options.open_shards:
            if self.r.epochs is not None and st["epoch"] >= self.r.epochs:
                break
            shards = self.r.stream_shards(self.stream_id, st["epoch"])
            self.cursors.append(self._open(st["epoch"], st["next_index"], 0))
            st["next_index"] += 1
            if st["next_index"] == len(shards):
                st["epoch"], st["next_index"] = st["epoch"] + 1, 0
        self.cursors = [c for c in self.cursors if c]

    def _sync_open(self) -> None:
        self.state["open"] = [[c.epoch, c.index, c.offset] for c in self.cursors]

    def samples(self) -> Iterator[dict[str, Any]]:
        """Decoded samples; ``self.state`` is exact after each one is yielded."""
        st = self.state
        while True:
            self._refill()
            if not self.cursors:
                st["finished"] = True
                self._sync_open()
                return
            pick = derive_seed(self.r.seed, self.stream_id, st["draws"]) % len(self.cursors) if self.r.options.shuffle else 0
            st["draws"] += 1
            cursor = self.cursors[pick]
            raw = cursor.next()
            if not isinstance(raw, shard_io.RawSample):
                if raw == shard_io.TRUNCATED_TAR:
                    self._fault(shard_io.TRUNCATED_TAR, cursor.name, f"after {cursor.offset} samples")
                elif raw == shard_io.NOT_A_TAR:
                    self._fault(shard_io.NOT_A_TAR, cursor.name, "", shard_io.NOT_A_TAR_DETAIL)
                cursor.close()
                self.cursors.remove(cursor)
                if cursor.whole and not cursor.used:
                    self._no_samples(cursor.shard_id)
                continue
            sample = decode_sample(raw, self.r.spec, self.r.options.max_image_pixels)
            self._sync_open()
            if isinstance(sample, str):
                self._fault(sample, cursor.name, raw.key)
                continue
            st["emitted"] += 1
            cursor.used = True
            self.barren.clear()
            sample["__shard__"] = cursor.shard_id
            sample["seed"] = derive_seed(self.r.seed, cursor.epoch, cursor.shard_id, raw.offset)
            yield sample

    def close(self) -> None:
        for c in self.cursors:
            if c:  # None: a shard that could not be opened, left by an interrupted _refill
                c.close()


class ShardStreams(IterableDataset):
    """The worker side: yields (batch or None, stream meta). Use ShardReader, not this."""

    def __init__(self, urls: list[str], spec: SampleSpec, options: ReaderOptions, *, batch_size: int, seed: int,
                 rank: int, world_size: int, epochs: int | None, transform: Callable[[dict[str, Any]], Any],
                 collate: Callable[[list[Any]], Any], drop_last: bool) -> None:
        self.urls, self.spec, self.options, self.batch_size, self.seed = urls, spec, options, batch_size, seed
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.transform, self.collate, self.drop_last = transform, collate, drop_last
        self.workers = max(1, options.num_workers)
        self.num_streams = world_size * self.workers
        self.rotation = 0
        self.start_states: dict[int, dict[str, Any]] = {}
        if len(urls) < self.num_streams:
            raise ValueError(
                f"{len(urls)} shards cannot feed {world_size} ranks x {self.workers} workers = {self.num_streams} "
                "readers (each needs at least one shard per epoch); write more shards or lower data.reader.num_workers"
            )

    def stream_shards(self, stream_id: int, epoch: int) -> list[int]:
        """Shard ids stream ``stream_id`` reads in ``epoch``, in order."""
        n = len(self.urls)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.options.shuffle else np.arange(n)
        return [int(i) for i in order[stream_id :: self.num_streams]]

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.workers
        state = copy.deepcopy(self.start_states.get(logical) or _fresh_state())
        if state["finished"]:
            return
        stream = _Stream(self, self.rank * self.workers + logical, state)
        meta = lambda: {"worker": logical, "state": copy.deepcopy(state)}  # noqa: E731
        batch: list[Any] = []
        try:
            for sample in stream.samples():
                batch.append(self.transform(sample))
                if len(batch) == self.batch_size:
                    yield self.collate(batch), meta()
                    batch = []
            if batch and not self.drop_last:
                yield self.collate(batch), meta()
            elif batch:
                state["emitted"] -= len(batch)  # dropped, never delivered
        except shard_io.DataError as exc:
            yield None, {**meta(), "error": str(exc)}
            return
        finally:
            stream.close()
        yield None, meta()  # end of a finite stream: carries its final fault counts


def _as_is(item: Any) -> Any:
    """The DataLoader's per-item hook: without it (batch_size=None) DataLoader applies
    default_convert, turning the stage's tuples into lists and numpy arrays into tensors."""
    return item


def _seed_worker(worker_id: int) -> None:
    """Seed a worker's global generators from (seed, rank, logical worker): the same worker
    stream gets the same seeds after a resume rotates the physical workers."""
    import random

    die_with_parent()
    leave_signals_to_parent()

    ds: ShardStreams = get_worker_info().dataset
    seed = derive_seed(ds.seed, ds.rank, (worker_id + ds.rotation) % ds.workers)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    random.seed(seed)


def _identity(sample: dict[str, Any]) -> dict[str, Any]:
    return sample


class ShardReader:
    """Batches from shards, split by rank and worker, resumable with state_dict/load_state_dict.

    Args:
        shards: shard spec (see shard_io.list_shards) or a list of URLs.
        spec: which members to decode and what ground truth the stage may see.
        options: worker count, interleaving, fault policy (config node data.reader).
        batch_size: samples per batch (per rank).
        seed: shuffle and per-sample seed.
        rank / world_size: this process's place among the data-parallel ranks (plain ints).
        epochs: passes over the data; None streams forever (training).
        transform: sample dict -> item (runs in the workers; must be picklable).
        collate: list of items -> batch (default: torch's default_collate).
        drop_last: drop the final short batch of a finite reader.
    """

    def __init__(self, shards: str | Sequence[str], *, spec: SampleSpec, options: ReaderOptions, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, epochs: int | None = None,
                 transform: Callable[[dict[str, Any]], Any] = _identity,
                 collate: Callable[[list[Any]], Any] = default_collate, drop_last: bool = False) -> None:
        urls = shard_io.list_shards(shards)
        self.options = options
        self.dataset = ShardStreams(urls, spec, options, batch_size=batch_size, seed=seed, rank=rank,
                                    world_size=world_size, epochs=epochs, transform=transform, collate=collate,
                                    drop_last=drop_last)
        self._positions: dict[int, dict[str, Any]] = {}
        self._next_worker = 0

    @property
    def num_shards(self) -> int:
        return len(self.dataset.urls)

    @property
    def batch_size(self) -> int:
        """Items per batch (this rank's)."""
        return self.dataset.batch_size

    @property
    def transform(self) -> Callable[[dict[str, Any]], Any]:
        """The worker transform: sample dict -> item."""
        return self.dataset.transform

    def set_transform(self, transform: Callable[[dict[str, Any]], Any], batch_size: int) -> None:
        """Use ``transform`` and ``batch_size`` for the batches of the next ``iter(reader)`` (a
        resolution-stage switch); the position is kept."""
        self.dataset.transform, self.dataset.batch_size = transform, batch_size

    def __iter__(self) -> Iterator[Any]:
        ds, workers = self.dataset, self.options.num_workers
        ds.start_states, ds.rotation = copy.deepcopy(self._positions), self._next_worker
        loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=workers,
                            worker_init_fn=_seed_worker,
                            prefetch_factor=self.options.prefetch_factor if workers else None,
                            multiprocessing_context=worker_context() if workers else None,
                            generator=torch.Generator().manual_seed(ds.seed))  # never draws from the global RNG
        for batch, meta in loader:
            self._positions[meta["worker"]] = meta["state"]
            self._next_worker = (meta["worker"] + 1) % ds.workers
            if "error" in meta:
                raise shard_io.DataError(meta["error"])
            self._check_fault_budget()
            if batch is not None:
                yield batch

    def _totals(self, table: str) -> Counter:
        total: Counter = Counter()
        for state in self._positions.values():
            total.update(state[table])
        return total

    def fault_counts(self) -> dict[str, int]:
        """Skipped samples by reason, over all workers of this rank, since the start of the run."""
        return dict(self._totals("faults"))

    def filtered_counts(self) -> dict[str, int]:
        """Samples this stage may not read (e.g. not curated), by reason."""
        return dict(self._totals("filtered"))

    def samples_read(self) -> int:
        """Samples delivered to the stage so far (all workers of this rank)."""
        return sum(s["emitted"] for s in self._positions.values())

    def fault_examples(self) -> list[str]:
        return [e for s in self._positions.values() for e in s["examples"]][:MAX_FAULT_EXAMPLES]

    def _check_fault_budget(self) -> None:
        faults = sum(self._totals("faults").values())
        seen = faults + self.samples_read()
        limit = self.options.max_fault_fraction
        if seen >= self.options.fault_check_after and faults > limit * seen:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(self.fault_counts().items()))
            raise shard_io.DataError(
                f"{faults} of {seen} samples read were bad ({faults / seen:.1%} > data.reader.max_fault_fraction="
                f"{limit}): {detail}. Examples: {'; '.join(self.fault_examples())}. Fix or drop these shards, "
                "or raise data.reader.max_fault_fraction"
            )

    def state_dict(self) -> dict[str, Any]:
        """The position after the last delivered batch (JSON-able)."""
        ds = self.dataset
        return {"version": STATE_VERSION, "rank": ds.rank, "world_size": ds.world_size, "workers": ds.workers,
                "num_shards": len(ds.urls), "shards": [shard_io.shard_name(u) for u in ds.urls], "seed": ds.seed,
                "next_worker": self._next_worker, "positions": {str(k): v for k, v in self._positions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; refuses a different layout with the fix."""
        ds = self.dataset
        saved = (state.get("world_size"), state.get("workers"), state.get("rank"))
        if saved != (ds.world_size, ds.workers, ds.rank):
            raise ValueError(
                f"reader position was saved by rank {saved[2]} of {saved[0]} with {saved[1]} workers; this is rank "
                f"{ds.rank} of {ds.world_size} with {ds.workers}. Resume with the same number of processes and "
                "data.reader.num_workers"
            )
        if state.get("shards") != [shard_io.shard_name(u) for u in ds.urls] or state.get("seed") != ds.seed:
            raise ValueError("reader position was saved for a different shard list or seed; the data changed")
        self._positions = {int(k): copy.deepcopy(v) for k, v in state["positions"].items()}
        self._next_worker = int(state["next_worker"])
