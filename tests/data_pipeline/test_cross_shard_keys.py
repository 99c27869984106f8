"""Counting keys written to more than one shard of a process (data_pipeline/cross_shard_keys.py):
exact counts in any shard order, examples naming both shards, and the runs staying sorted."""

from __future__ import annotations

import itertools
import random

import numpy as np

from data_pipeline.cross_shard_keys import EXAMPLES, CrossShardKeys, key_hashes

SHARDS = {"a.tar": ["k1", "k2", "k3"], "b.tar": ["k4", "k1", "k2"], "c.tar": ["k5", "k4"]}


def test_a_key_in_k_shards_counts_k_minus_1_in_any_order() -> None:
    for order in itertools.permutations(SHARDS):
        seen = CrossShardKeys()
        counts = [seen.add_shard(name, SHARDS[name]) for name in order]
        assert seen.repeated == sum(counts) == 3, order  # k1, k2 twice; k4 twice


def test_examples_name_the_earlier_shard_and_the_repeat() -> None:
    seen = CrossShardKeys()
    assert [seen.add_shard(name, keys) for name, keys in SHARDS.items()] == [0, 2, 1]
    assert seen.examples == [("k1", "a.tar", "b.tar"), ("k2", "a.tar", "b.tar"), ("k4", "b.tar", "c.tar")]
    assert seen.warning() == ("3 key(s) were written to more than one of the 3 output shards this process wrote "
                              "(each shard keeps its copy; shards done before are not compared), e.g. k1 (a.tar, "
                              "b.tar), k2 (a.tar, b.tar), k4 (b.tar, c.tar)")


def test_no_repeats_count_0_and_warn_nothing() -> None:
    seen = CrossShardKeys()
    assert [seen.add_shard(f"{s}.tar", [f"{s}-{i}" for i in range(4)]) for s in range(5)] == [0] * 5
    assert (seen.repeated, seen.examples, seen.warning()) == (0, [], None)
    assert seen.add_shard("empty.tar", []) == 0


def test_many_shards_match_a_set_and_keep_few_sorted_runs() -> None:
    """64 shards of 50 keys drawn from 1500: the count equals what a set of strings gives; the
    runs stay sorted, hold every key once per shard, and number at most log2(shards) + 1."""
    rng = random.Random(0)
    seen, plain, expected, written = CrossShardKeys(), set(), 0, {}
    for s in range(64):
        names = [f"{k:06d}" for k in rng.sample(range(1500), 50)]
        expected += sum(n in plain for n in names)
        plain.update(names)
        written[f"{s:05d}.tar"] = names
        seen.add_shard(f"{s:05d}.tar", names)
    assert seen.repeated == expected > 0
    assert len(seen.examples) == EXAMPLES
    assert len(seen.runs) <= 7 and sum(len(h) for h, _ in seen.runs) == 64 * 50
    for hashes, shards in seen.runs:
        assert hashes.dtype == np.uint64 and shards.dtype == np.uint32 and np.all(hashes[1:] >= hashes[:-1])
        assert np.array_equal(np.sort(hashes), hashes)
    pairs = {(int(h), int(o)) for hashes, shards in seen.runs for h, o in zip(hashes, shards)}
    assert pairs == {(int(h), o) for o, names in enumerate(written.values()) for h in key_hashes(names)}
    for key, first, again in seen.examples:  # the ordinals stayed with their hashes through the merges
        assert first < again and key in written[first] and key in written[again]


def test_hashes_are_64_bit_blake2b() -> None:
    import hashlib

    assert key_hashes(["000000123"])[0] == int.from_bytes(hashlib.blake2b(b"000000123", digest_size=8).digest(), "little")
    assert key_hashes([]).dtype == np.uint64 and key_hashes([]).shape == (0,)
