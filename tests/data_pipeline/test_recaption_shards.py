"""Recaptioning on disk (data_pipeline/recaption.py): shard assignment, accounting of every key,
batches per shard, and the output members."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dp_testlib import fault_shard, good_members, write_tar

from data_pipeline import recaption as rc
from data_pipeline import shard_io


def _tensor(image) -> torch.Tensor:
    return torch.tensor([image.width, image.height], dtype=torch.float32)


@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_assignment_covers_every_shard_once(count: int, world: int) -> None:
    owned = [rc.assign_shards(count, rank, world) for rank in range(world)]
    flat = sorted(i for share in owned for i in share)
    assert flat == list(range(count))
    assert max(len(s) for s in owned) - min(len(s) for s in owned) <= 1  # balanced
    assert owned == [rc.assign_shards(count, rank, world) for rank in range(world)]  # deterministic


def test_assignment_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match=r"rank 3 is not in \[0, world_size=3\)"):
        rc.assign_shards(5, 3, 3)


def test_report_cut_names_the_sample_at_the_cut(tmp_path: Path) -> None:
    shard, _ = fault_shard(tmp_path / "cut.tar")
    with open(shard, "rb") as f:
        plain = list(shard_io.iter_raw_samples(f))
    with open(shard, "rb") as f:
        reported = list(shard_io.iter_raw_samples(f, report_cut=True))
    assert plain[-1] == shard_io.TRUNCATED_TAR and [r.key for r in plain[:-1]][-1] == "k6"  # the reader's view
    cut = reported[-2]
    assert (cut.key, cut.fault, reported[-1]) == ("k7", shard_io.TRUNCATED_TAR, shard_io.TRUNCATED_TAR)
    assert reported[:-2] == plain[:-1]


def _run(tasks: list[rc.ShardTask], batch_size: int, workers: int = 0) -> list[rc.ShardBatch]:
    return list(rc.batch_loader(tasks, {"size": _tensor}, batch_size=batch_size, num_workers=workers))


def test_every_key_is_written_or_failed_with_its_reason(tmp_path: Path) -> None:
    shard, expected = fault_shard(tmp_path / "in" / "00000.tar")
    batches = _run([rc.ShardTask(0, str(shard), tmp_path / "out" / "00000.tar")], batch_size=2)
    written = [key for b in batches for key, _ in b.samples]
    failures = {f["key"]: f["reason"] for b in batches for f in b.failures}
    assert written == ["k0", "k3", "k6"]
    assert failures == expected
    assert [b.last for b in batches] == [False, True] and batches[-1].input_samples == 10
    assert [b.number for b in batches] == [0, 1]
    duplicate = next(f for b in batches for f in b.failures if f["reason"] == shard_io.DUPLICATE_KEY)
    assert duplicate["offset"] == 4  # the later group; the first k0 is the one written
    assert batches[0].images["size"].tolist() == [[12, 8], [12, 8]]  # the transform ran on the decoded images


def test_an_unreadable_shard_is_one_failure(tmp_path: Path) -> None:
    batches = _run([rc.ShardTask(0, str(tmp_path / "gone.tar"), tmp_path / "out" / "gone.tar")], batch_size=4)
    assert len(batches) == 1 and batches[0].last and not batches[0].samples
    assert [f["reason"] for f in batches[0].failures] == [shard_io.UNREADABLE_SHARD]


def test_batches_stay_within_a_shard_and_do_not_depend_on_workers(tmp_path: Path) -> None:
    tasks = []
    for i, n in enumerate([5, 3, 4]):
        shard = write_tar(tmp_path / f"{i:05d}.tar", [m for k in range(n) for m in good_members(f"s{i}k{k}")])
        tasks.append(rc.ShardTask(i, str(shard), tmp_path / "out" / shard.name))

    def per_shard(batches: list[rc.ShardBatch]) -> dict[int, list[list[str]]]:
        out: dict[int, list[list[str]]] = {}
        for b in batches:
            out.setdefault(b.task.index, []).append([k for k, _ in b.samples])
        return out

    serial, parallel = per_shard(_run(tasks, 2)), per_shard(_run(tasks, 2, workers=2))
    assert serial == parallel == {0: [["s0k0", "s0k1"], ["s0k2", "s0k3"], ["s0k4"]],
                                  1: [["s1k0", "s1k1"], ["s1k2"]], 2: [["s2k0", "s2k1"], ["s2k2", "s2k3"], []]}


def test_output_members_keep_the_input_and_add_captions_and_lineage() -> None:
    members = dict((name.split(".", 1)[1], data) for name, data in good_members("k0"))
    lineage = {"dsc": {"captioner_sha256": "ab" * 32, "decoding": {"strategy": "greedy"}}}
    out = rc.with_lineage(members, {"dsc": "a red circle", "ssc": "circle"}, lineage)
    assert set(out) == {"jpg", "json", "txt", "dsc.txt", "ssc.txt"}
    assert out["jpg"] == members["jpg"] and out["txt"] == members["txt"]
    assert (out["dsc.txt"], out["ssc.txt"]) == (b"a red circle", b"circle")
    meta = json.loads(out["json"])
    assert meta.pop("recaption") == lineage and meta == json.loads(members["json"])
    bare = rc.with_lineage({"png": b"\x89PNG"}, {"dsc": "x"}, lineage)
    assert json.loads(bare["json"]) == {"recaption": lineage}


def test_only_failures_copies_what_was_written_and_redoes_the_rest(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "00000.tar", [m for k in range(4) for m in good_members(f"k{k}")])
    previous = write_tar(tmp_path / "prev" / "00000.tar",
                         [("k0.dsc.txt", b"old 0"), *good_members("k0"), ("k2.dsc.txt", b"old 2"), *good_members("k2")])
    task = rc.ShardTask(0, str(shard), tmp_path / "out" / "00000.tar", frozenset({"k0", "k2"}), previous)
    batches = _run([task], batch_size=4)
    assert [k for b in batches for k, _ in b.copied] == ["k0", "k2"]
    assert [k for b in batches for k, _ in b.samples] == ["k1", "k3"]
    assert [k for b in batches for k, _ in [*b.copied, *b.samples]] == ["k0", "k1", "k2", "k3"]  # write order
    assert batches[0].copied[0][1]["dsc.txt"] == b"old 0"


def test_shard_output_commits_then_marks_done(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "00000.tar", [m for k in range(3) for m in good_members(f"k{k}")])
    task = rc.ShardTask(0, str(shard), tmp_path / "out" / "00000.tar")
    (batch,) = _run([task], batch_size=8)
    output = rc.ShardOutput(task)
    output.add(batch, [rc.with_lineage(m, {"dsc": f"caption {k}"}, {}) for k, m in batch.samples])
    assert not task.output.exists() and rc.read_stats(task.output) is None
    output.commit_shard()
    assert task.output.exists() and rc.read_stats(task.output) is None  # renamed, not yet done
    stats = output.write_stats(batch, {"rank": 0})
    assert rc.read_stats(task.output) == json.loads(json.dumps(stats))
    assert (stats["input_samples"], stats["written"], stats["failures"], stats["rank"]) == (3, 3, [], 0)
    assert rc.output_keys(task.output) == {"k0", "k1", "k2"}
    with open(task.output, "rb") as f:
        texts = {r.key: r.members["dsc.txt"] for r in shard_io.iter_raw_samples(f)}
    assert texts == {f"k{k}": f"caption k{k}".encode() for k in range(3)}
    assert not list((tmp_path / "out").glob(".*partial"))


def test_expected_samples_come_from_img2dataset_stats(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "00003.tar", good_members("a"))
    assert rc.expected_samples(str(shard)) is None
    (tmp_path / "00003_stats.json").write_text(json.dumps({"successes": 1, "count": 2}))
    assert rc.expected_samples(str(shard)) == 1
    assert rc.expected_samples("pipe:cat " + str(shard)) is None
