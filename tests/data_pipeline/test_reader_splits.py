"""ShardReader splits by rank and worker, and its deterministic shuffle."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.options import ReaderOptions
from dp_testlib import flat, key_seed_collate, keys_of, make_reader, take


def shard_of(key: str) -> int:
    return int(key) // 10  # toy keys with 8 samples per shard: shard * 10 + index


def read_keys(shards, **kw) -> list[str]:
    return keys_of(flat(make_reader(shards, **kw)))


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_split_the_samples_without_overlap(dp_toy, workers: int) -> None:
    per_rank = [read_keys(dp_toy.train_shards, workers=workers, rank=r, world_size=2) for r in (0, 1)]
    assert all(len(keys) == len(set(keys)) == 16 for keys in per_rank)  # 4 shards -> 2 whole shards per rank
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == dp_toy.train_keys
    # Whole shards go to one rank (then to one worker): no shard is split between readers.
    shards = [{shard_of(k) for k in keys} for keys in per_rank]
    assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]


def test_workers_of_a_rank_read_disjoint_shards(dp_toy) -> None:
    batches = list(make_reader(dp_toy.train_shards, workers=2, rank=1, world_size=2, batch_size=2))
    assert [len(b) for b in batches] == [2] * 8
    # Batches alternate between the two workers; each worker reads one whole shard of its own
    # (2 ranks x 2 workers = 4 streams over 4 shards).
    worker0, worker1 = flat(batches[0::2]), flat(batches[1::2])
    assert len({shard_of(k) for k in worker0}) == len({shard_of(k) for k in worker1}) == 1
    assert shard_of(worker0[0]) != shard_of(worker1[0])
    assert len(set(worker0 + worker1)) == 16


def test_same_seed_same_order_different_seed_different_order(dp_toy) -> None:
    a = read_keys(dp_toy.train_shards, seed=11)
    assert read_keys(dp_toy.train_shards, seed=11) == a
    b = read_keys(dp_toy.train_shards, seed=12)
    assert sorted(a) == sorted(b) == dp_toy.train_keys
    assert a != b
    assert a != dp_toy.train_keys  # actually shuffled


def test_shuffle_order_is_the_same_for_any_batch_size(dp_toy) -> None:
    assert read_keys(dp_toy.train_shards, seed=3, batch_size=1) == read_keys(dp_toy.train_shards, seed=3,
                                                                            batch_size=5)


def test_epochs_are_shuffled_differently(dp_toy) -> None:
    reader = make_reader(dp_toy.train_shards, epochs=None, batch_size=4, open_shards=1)
    keys = keys_of(flat(take(reader, 16)))  # open_shards=1: epochs do not interleave
    epoch0, epoch1 = keys[:32], keys[32:]
    assert sorted(epoch0) == sorted(epoch1) == dp_toy.train_keys
    assert epoch0 != epoch1
    # Shard order differs between the epochs too (the permutation depends on (seed, epoch)).
    order = lambda ks: list(dict.fromkeys(shard_of(k) for k in ks))  # noqa: E731
    assert order(epoch0) != order(epoch1)


def test_finite_reader_with_two_epochs_reads_every_sample_twice(dp_toy) -> None:
    keys = read_keys(dp_toy.train_shards, epochs=2, batch_size=4)
    assert sorted(keys) == sorted(dp_toy.train_keys * 2)
    assert keys[:32] != keys[32:]


def test_no_shuffle_reads_shards_and_samples_in_order(dp_toy) -> None:
    assert read_keys(dp_toy.train_shards, shuffle=False) == dp_toy.train_keys
    # Two workers: worker 0 has shards 0 and 2, worker 1 has 1 and 3, each read in order.
    batches = list(make_reader(dp_toy.train_shards, shuffle=False, workers=2, batch_size=4))
    keys = dp_toy.train_keys
    assert flat(batches[0::2]) == keys[0:8] + keys[16:24]
    assert flat(batches[1::2]) == keys[8:16] + keys[24:32]


def test_per_sample_seeds_do_not_depend_on_the_split(dp_toy) -> None:
    single = {k: s for k, s, _ in flat(make_reader(dp_toy.train_shards, collate=key_seed_collate))}
    split = {k: s for r in (0, 1)
             for k, s, _ in flat(make_reader(dp_toy.train_shards, collate=key_seed_collate, workers=2, rank=r,
                                             world_size=2))}
    assert split == single
    assert len(set(single.values())) == 32


@pytest.mark.parametrize(("shards", "workers", "world_size"), [(4, 3, 2), (1, 2, 1), (3, 0, 4)])
def test_too_few_shards_for_ranks_times_workers(dp_toy, shards: int, workers: int, world_size: int) -> None:
    with pytest.raises(ValueError, match=r"num_workers") as info:
        make_reader(dp_toy.train_shards[:shards], workers=workers, world_size=world_size)
    streams = world_size * max(1, workers)
    assert f"{shards} shards cannot feed {world_size} ranks x {max(1, workers)} workers = {streams}" in str(info.value)


def test_reader_options_validate() -> None:
    ReaderOptions().validate()
    for bad, field in ((dict(num_workers=-1), "num_workers"), (dict(open_shards=0), "open_shards"),
                       (dict(max_fault_fraction=1.5), "max_fault_fraction"),
                       (dict(fault_check_after=0), "fault_check_after"), (dict(prefetch_factor=0), "prefetch_factor")):
        with pytest.raises(ValueError, match=field):
            ReaderOptions(**bad).validate()


def _tuple_collate(batch):
    return tuple(s["__key__"] for s in batch), np.arange(len(batch))


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_output_is_delivered_as_is(dp_toy, workers: int) -> None:
    """No default_convert on the way: tuples stay tuples, numpy arrays stay numpy arrays."""
    batches = list(make_reader(dp_toy.train_shards, workers=workers, batch_size=5, collate=_tuple_collate))
    assert all(type(b) is tuple and type(b[0]) is tuple and type(b[1]) is np.ndarray for b in batches)
    assert sorted(k for keys, _ in batches for k in keys) == dp_toy.train_keys
    assert [a.tolist() for _, a in batches] == [list(range(len(keys))) for keys, _ in batches]
