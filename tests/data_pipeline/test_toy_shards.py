"""toy_shards: deterministic shards, exact summaries, resumable writing, refusal to mix settings."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.options import ToyDataOptions
from data_pipeline.toy_shards import DATASET_MARKER, aspect_name, make_sample, write_toy_dataset
from dp_testlib import raw_metadata, read_members

TINY = ToyDataOptions(train_shards=2, heldout_shards=1, samples_per_shard=4, curated_fraction=0.25, seed=3,
                      processes=1, world="full", text_probability=0.4)


def write(root: Path, options: ToyDataOptions, splits: tuple[str, ...] = ("train", "heldout")) -> dict:
    return write_toy_dataset({s: root / s for s in splits}, options, progress=False)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: bytes and modification time (ns)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_process_count_does_not_change_a_byte(dp_toy, tmp_path: Path) -> None:
    """The session dataset was written with processes=1; the same settings with 2 processes."""
    options = dataclasses.replace(dp_toy.options, processes=2)
    summary = write(tmp_path, options)
    for split in ("train", "heldout"):
        ours, theirs = sorted((tmp_path / split).glob("*.tar")), sorted((dp_toy.root / split).glob("*.tar"))
        assert [p.name for p in ours] == [p.name for p in theirs] == [f"{i:05d}.tar" for i in range(len(ours))]
        for a, b in zip(ours, theirs):
            assert a.read_bytes() == b.read_bytes(), a.name
    drop_timing = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "samples_per_s")}  # noqa: E731
    assert drop_timing(summary) == drop_timing(dp_toy.summary)


def test_summary_counts_are_exact(dp_toy) -> None:
    s = dp_toy.summary
    assert (s["shards_written"], s["shards_skipped"], s["samples_written"]) == (5, 0, 40)
    assert sorted(s["splits"]) == ["heldout", "train"]
    for split, n in (("train", 32), ("heldout", 8)):
        counts, meta = s["splits"][split], raw_metadata(dp_toy.root / split)
        assert len(meta) == counts["samples"] == n
        expected = Counter({"samples": n})
        for m in meta.values():
            expected.update({"curated": int(m["curated"]), "with_text": int(m["text"] is not None),
                             "empty_alt_text": int(not m["caption"].strip()),
                             f"aspect_{aspect_name(m['width'], m['height'])}": 1,
                             f"objects_{len(m['objects'])}": 1})
        assert counts == {k: v for k, v in sorted(expected.items()) if v}
        assert sum(v for k, v in counts.items() if k.startswith("aspect_")) == n
        assert sum(v for k, v in counts.items() if k.startswith("objects_")) == n


def test_curated_fraction_is_roughly_right(tmp_path: Path) -> None:
    options = ToyDataOptions(train_shards=1, heldout_shards=1, samples_per_shard=200, curated_fraction=0.25,
                             seed=11, processes=1, world="full", text_probability=0.4)
    summary = write(tmp_path, options, splits=("train",))
    meta = raw_metadata(tmp_path / "train")
    curated = sum(m["curated"] for m in meta.values())
    assert summary["splits"]["train"]["curated"] == curated
    assert 0.18 <= curated / 200 <= 0.32, curated  # binomial sd ~0.031


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (1.0, 4)])
def test_curated_fraction_extremes(tmp_path: Path, fraction: float, expected: int) -> None:
    options = dataclasses.replace(TINY, train_shards=1, curated_fraction=fraction)
    summary = write(tmp_path, options, splits=("train",))
    assert sum(m["curated"] for m in raw_metadata(tmp_path / "train").values()) == expected
    assert summary["splits"]["train"].get("curated", 0) == expected


def test_rerun_skips_complete_shards(tmp_path: Path) -> None:
    first = write(tmp_path, TINY)
    assert (first["shards_written"], first["shards_skipped"], first["samples_written"]) == (3, 0, 12)
    before = snapshot(tmp_path)
    again = write(tmp_path, dataclasses.replace(TINY, processes=2))  # processes may differ
    assert (again["shards_written"], again["shards_skipped"], again["samples_written"]) == (0, 3, 0)
    assert again["splits"] == {"train": {}, "heldout": {}}
    assert snapshot(tmp_path) == before  # nothing rewritten


def test_shard_without_stats_is_rewritten(tmp_path: Path) -> None:
    write(tmp_path, TINY)
    good = (tmp_path / "train" / "00001.tar").read_bytes()
    (tmp_path / "train" / "00001_stats.json").unlink()
    (tmp_path / "train" / "00001.tar").write_bytes(good[: len(good) // 3])  # cut short by a crash
    (tmp_path / "train" / ".00001.tar.partial").write_bytes(b"stale")
    summary = write(tmp_path, TINY)
    assert (summary["shards_written"], summary["shards_skipped"], summary["samples_written"]) == (1, 2, 4)
    assert summary["splits"]["train"]["samples"] == 4 and summary["splits"]["heldout"] == {}
    assert (tmp_path / "train" / "00001.tar").read_bytes() == good
    assert json.loads((tmp_path / "train" / "00001_stats.json").read_text())["count"] == 4
    assert not (tmp_path / "train" / ".00001.tar.partial").exists()


def test_different_settings_are_refused_naming_the_key(tmp_path: Path) -> None:
    write(tmp_path, TINY)
    with pytest.raises(ValueError, match=r"other settings \(samples_per_shard: 4 -> 5\)"):
        write(tmp_path, dataclasses.replace(TINY, samples_per_shard=5))
    with pytest.raises(ValueError, match=r"seed: 3 -> 4, jpeg_quality: 90 -> 80"):
        write(tmp_path, dataclasses.replace(TINY, seed=4, jpeg_quality=80))
    marker = json.loads((tmp_path / "train" / DATASET_MARKER).read_text())
    assert marker == {k: v for k, v in dataclasses.asdict(TINY).items() if k != "processes"}


def test_make_sample_depends_only_on_seed_split_and_index() -> None:
    a = make_sample(5, "train", 9, 2, TINY)
    assert make_sample(5, "train", 9, 2, TINY) == a
    key, members, meta = a
    assert key == "000021" and meta["key"] == key  # index 9 is the 2nd of shard 2 (4 per shard)
    assert make_sample(5, "heldout", 9, 2, TINY)[1]["jpg"] != members["jpg"]
    assert make_sample(6, "train", 9, 2, TINY)[1]["jpg"] != members["jpg"]
    assert make_sample(5, "train", 10, 2, TINY)[1]["jpg"] != members["jpg"]
    assert json.loads(members["json"]) == meta and members["txt"] == meta["caption"].encode()


def test_every_written_sample_is_make_sample(dp_toy) -> None:
    spp = dp_toy.options.samples_per_shard
    for shard in sorted(dp_toy.train.glob("*.tar")):
        shard_id = int(shard.stem)
        members = read_members(shard)
        for i in range(spp):
            key, expected, _ = make_sample(dp_toy.options.seed, "train", shard_id * spp + i, shard_id, dp_toy.options)
            assert members[3 * i:3 * i + 3] == [(f"{key}.{ext}", expected[ext]) for ext in ("jpg", "json", "txt")]


def test_toy_options_validate() -> None:
    ToyDataOptions().validate()
    for bad, field in ((dict(train_shards=0), "train_shards"), (dict(samples_per_shard=0), "samples_per_shard"),
                       (dict(processes=0), "processes"), (dict(world="cubes"), "world"), (dict(curated_fraction=1.1), "curated_fraction"),
                       (dict(text_probability=-0.1), "text_probability"), (dict(jpeg_quality=96), "jpeg_quality")):
        with pytest.raises(ValueError, match=field):
            ToyDataOptions(**bad).validate()
