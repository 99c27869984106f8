"""Counting keys that one process writes to more than one output shard (a shard job's rank).

Within a shard a repeated key is a ``duplicate_key`` fault (data_pipeline/shard_io.py). Across
shards nothing is dropped: each output shard keeps its copy. But a shard job (`recap recaption`,
`recap cache`) sees every key of its shards in one process, so it can count them cheaply and
say so. A rank may write ~10M keys, so they are not kept as strings (a Python set costs ~100
bytes per key): each key is a 64-bit blake2b hash in sorted numpy runs, with the ordinal of the
shard it came from to name it in examples.

Memory: 12 bytes per key held (8 for the hash, 4 for the shard ordinal), 12 MB per million
keys; merging the two largest runs briefly needs up to ~30 MB per million. Runs are merged like
a binary counter (a run is merged into the one before it while it is at least as long), so a
key is merged O(log shards) times and a lookup searches O(log shards) runs. Two different keys
share a hash with probability ~n^2 / 2^65 for n keys (~3e-6 for 10M): a false count, never a
dropped sample.

The count does not depend on the order shards finish in (DataLoader workers interleave them):
a key in k shards is counted k - 1 times. Examples do: "earlier" is the order of completion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

EXAMPLES = 5


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of each key's blake2b digest."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little")
                     for k in keys], dtype=np.uint64)


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted (hashes, shard ordinals) runs as one, in O(len) (no re-sort); ``b`` the shorter."""
    at = np.searchsorted(a[0], b[0])
    at += np.arange(len(b[0]))  # where b's items land: strictly increasing
    from_a = np.ones(len(a[0]) + len(b[0]), dtype=bool)
    from_a[at] = False
    hashes, shards = np.empty(len(from_a), dtype=np.uint64), np.empty(len(from_a), dtype=np.uint32)
    hashes[at], shards[at] = b
    hashes[from_a], shards[from_a] = a
    return hashes, shards


class CrossShardKeys:
    """The keys of the shards added so far; `add_shard` counts a new shard's keys seen before.

    ``repeated``: keys counted so far; ``examples``: up to ``EXAMPLES`` (key, earlier shard,
    shard) for the warning.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # sorted hashes, their shard ordinals
        self.shards: list[str] = []
        self.repeated = 0
        self.examples: list[tuple[str, str, str]] = []

    def add_shard(self, shard: str, keys: Sequence[str]) -> int:
        """Record ``keys`` (those written to output shard ``shard``) and return how many of them
        an earlier shard already had."""
        hashes = key_hashes(keys)
        earlier = np.full(len(hashes), -1, dtype=np.int64)  # the shard ordinal of a first hit
        for run_hashes, run_shards in self.runs:
            at = np.minimum(np.searchsorted(run_hashes, hashes), len(run_hashes) - 1)
            hit = (run_hashes[at] == hashes) & (earlier < 0)
            earlier[hit] = run_shards[at[hit]]
        repeats = np.flatnonzero(earlier >= 0)
        for i in repeats[: EXAMPLES - len(self.examples)]:
            self.examples.append((keys[i], self.shards[earlier[i]], shard))
        self.repeated += len(repeats)
        self._push(hashes, len(self.shards))
        self.shards.append(shard)
        return len(repeats)

    def _push(self, hashes: np.ndarray, ordinal: int) -> None:
        if not len(hashes):
            return
        run = (np.sort(hashes), np.full(len(hashes), ordinal, dtype=np.uint32))
        while self.runs and len(self.runs[-1][0]) <= len(run[0]):
            run = _merge(run, self.runs.pop())
        self.runs.append(run)

    def warning(self) -> str | None:
        """One line with the count and the examples; None when no key was repeated."""
        if not self.repeated:
            return None
        shown = ", ".join(f"{key} ({first}, {again})" for key, first, again in self.examples)
        return (f"{self.repeated} key(s) were written to more than one of the {len(self.shards)} output shards this "
                f"process wrote (each shard keeps its copy; shards done before are not compared), e.g. {shown}")
