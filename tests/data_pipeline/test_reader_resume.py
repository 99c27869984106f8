"""ShardReader exact resume: interrupted + resumed reads equal the uninterrupted read, batch for batch.

Batches are lists of (key, per-sample seed, shard id), so a resume has to reproduce the order,
the batch boundaries, the per-sample randomness and the shard assignment, not just the set of keys.
"""

from __future__ import annotations

from typing import Any

import pytest

from data_pipeline.seeding import derive_seed
from dp_testlib import flat, json_roundtrip, key_seed_collate, keys_of, make_reader, take

BATCH = 3
INFINITE_BATCHES = 14  # 42 samples: more than one 32-sample epoch, for every worker count


def reader(toy, workers: int, epochs: int | None = 1, **kw: Any):
    return make_reader(toy.train_shards, workers=workers, epochs=epochs, batch_size=BATCH,
                       collate=key_seed_collate, **kw)


def resumed(toy, workers: int, state: dict[str, Any], epochs: int | None = 1):
    r = reader(toy, workers, epochs)
    r.load_state_dict(json_roundtrip(state))
    return r


_FULL: dict[tuple[int, int | None], list[Any]] = {}


def full_read(toy, workers: int, epochs: int | None = 1) -> list[Any]:
    """The uninterrupted sequence (computed once per worker count and mode)."""
    if (workers, epochs) not in _FULL:
        r = reader(toy, workers, epochs)
        _FULL[workers, epochs] = list(r) if epochs else take(r, INFINITE_BATCHES)
    return _FULL[workers, epochs]


def test_uninterrupted_finite_read_is_every_sample_once(dp_toy) -> None:
    for workers, n_batches in ((0, 11), (2, 12)):  # 32 = 10*3+2; two streams of 16 = 2*(5*3+1)
        full = full_read(dp_toy, workers)
        assert len(full) == n_batches
        assert sorted(keys_of(flat(full))) == dp_toy.train_keys
        assert [len(b) for b in full].count(BATCH) == n_batches - (1 if workers == 0 else 2)


def test_per_sample_seed_depends_on_shard_and_offset_only(dp_toy) -> None:
    """sample["seed"] = derive_seed(seed, epoch, shard, offset): identical for any worker count."""
    by_workers = [{key: (seed, shard) for key, seed, shard in flat(full_read(dp_toy, w))} for w in (0, 2)]
    assert by_workers[0] == by_workers[1]
    spp = dp_toy.options.samples_per_shard
    for key, (seed, shard) in by_workers[0].items():
        assert shard == int(key) // 10 and int(key) % 10 < spp  # toy keys: shard * 10 + index
        assert seed == derive_seed(0, 0, shard, int(key) % 10)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["zero", "one", "mid", "second_last", "last"])
def test_finite_reader_resumes_exactly(dp_toy, workers: int, where: str) -> None:
    full = full_read(dp_toy, workers)
    n = len(full)
    k = {"zero": 0, "one": 1, "mid": n // 2, "second_last": n - 1, "last": n}[where]
    first = reader(dp_toy, workers)
    before = take(first, k)
    assert before == full[:k]
    assert first.samples_read() == len(flat(before))
    second = resumed(dp_toy, workers, first.state_dict())
    after = list(second)
    assert before + after == full
    assert second.samples_read() == 32  # counts carry over from the saved position
    assert list(second) == []  # a finished finite reader stays finished


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [0, 1, INFINITE_BATCHES // 2, INFINITE_BATCHES - 1])
def test_infinite_reader_resumes_exactly(dp_toy, workers: int, k: int) -> None:
    full = full_read(dp_toy, workers, epochs=None)
    assert len(full) == INFINITE_BATCHES and all(len(b) == BATCH for b in full)
    first = reader(dp_toy, workers, epochs=None)
    before = take(first, k)
    after = take(resumed(dp_toy, workers, first.state_dict(), epochs=None), INFINITE_BATCHES - k)
    assert before + after == full


def _open_epochs(state: dict[str, Any]) -> list[set[int]]:
    """Per stream: the epochs of the shards it has open."""
    return [{epoch for epoch, _index, _offset in p["open"]} for p in state["positions"].values()]


@pytest.mark.parametrize("workers", [0, 2])
def test_infinite_reader_resumes_across_an_epoch_boundary(dp_toy, workers: int) -> None:
    n = 20  # 60 samples: every stream gets well into its second epoch
    first = reader(dp_toy, workers, epochs=None)
    full, states = [], []
    for batch in first:
        full.append(batch)
        states.append(json_roundtrip(first.state_dict()))
        if len(full) == n:
            break
    epochs = [_open_epochs(s) for s in states]
    # open_shards=2: at the boundary a stream interleaves the last shard of epoch 0 with the
    # first of epoch 1. Resume right there, and once every stream is wholly in epoch 1.
    straddle = next(k for k, e in enumerate(epochs, 1) if any(s == {0, 1} for s in e))
    in_epoch_1 = next(k for k, e in enumerate(epochs, 1) if all(s == {1} for s in e))
    assert 0 < straddle < in_epoch_1 < n
    keys = keys_of(flat(full))
    assert len(keys) == 60 and sorted(set(keys)) == dp_toy.train_keys  # every key, some twice
    for k in (straddle, in_epoch_1):
        after = take(resumed(dp_toy, workers, states[k - 1], epochs=None), n - k)
        assert full[:k] + after == full, k


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("epochs", [1, None])
def test_resume_twice_in_a_row(dp_toy, workers: int, epochs: int | None) -> None:
    full = full_read(dp_toy, workers, epochs)
    total = len(full)
    first = reader(dp_toy, workers, epochs)
    part1 = take(first, 2)
    second = resumed(dp_toy, workers, first.state_dict(), epochs)
    part2 = take(second, 5)
    third = resumed(dp_toy, workers, second.state_dict(), epochs)
    part3 = list(third) if epochs else take(third, total - 7)
    assert part1 + part2 + part3 == full


def test_state_dict_is_json_and_describes_the_layout(dp_toy) -> None:
    r = reader(dp_toy, 2)
    take(r, 3)
    state = r.state_dict()
    assert json_roundtrip(state) == state
    assert (state["version"], state["rank"], state["world_size"], state["workers"], state["num_shards"],
            state["seed"]) == (1, 0, 1, 2, 4, 0)
    assert state["shards"] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert state["next_worker"] == 1  # batches alternate 0, 1, 0: worker 1 is next
    assert sorted(state["positions"]) == ["0", "1"]
    assert sum(p["emitted"] for p in state["positions"].values()) == 9


def test_load_state_dict_refuses_another_layout(dp_toy) -> None:
    r = reader(dp_toy, 2)
    take(r, 2)
    state = r.state_dict()
    with pytest.raises(ValueError, match=r"num_workers"):
        reader(dp_toy, 0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"rank 0 of 1 .* rank 1 of 2"):
        reader(dp_toy, 2, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"different shard list or seed"):
        reader(dp_toy, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"different shard list or seed"):
        make_reader(dp_toy.train_shards[::-1], workers=2, batch_size=BATCH).load_state_dict(state)


def test_drop_last_drops_the_short_batches_and_does_not_count_them(dp_toy) -> None:
    for workers, delivered in ((0, 30), (2, 30)):  # 32 -> 10 full batches; 2 x 16 -> 2 x 5 full batches
        r = reader(dp_toy, workers, drop_last=True)
        batches = list(r)
        assert [len(b) for b in batches] == [BATCH] * 10
        assert r.samples_read() == delivered == len(set(keys_of(flat(batches))))
