"""shard_io: listing shards (dirs, braces, pipe:), raw sample grouping with faults, atomic writing."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from data_pipeline import shard_io
from data_pipeline.shard_io import AtomicShardWriter, NoShardsError, RawSample, iter_raw_samples, list_shards
from dp_testlib import flat, good_members, jpeg_bytes, make_reader, member_layout, write_tar


def groups(data: bytes) -> list[object]:
    """iter_raw_samples over bytes: RawSample keys, or the fault string."""
    return [g.key if isinstance(g, RawSample) else g for g in iter_raw_samples(io.BytesIO(data))]


# ------------------------------------------------------------------ list_shards


def test_list_shards_forms_give_the_same_urls(dp_toy) -> None:
    plain = dp_toy.train_shards
    d = dp_toy.train
    assert len(plain) == 4 and all(Path(u).name == f"{i:05d}.tar" for i, u in enumerate(plain))
    assert list_shards(str(d)) == plain  # a directory: its *.tar, sorted (stats and marker ignored)
    assert list_shards(f"{d}/{{00000..00003}}.tar") == plain
    assert list_shards(plain) == plain
    assert list_shards(f"{d}/{{00000..00001}}.tar::{d}/{{00002..00003}}.tar") == plain
    assert list_shards([f"{d}/00000.tar", f"{d}/{{00001..00003}}.tar"]) == plain
    pipes = list_shards(f"pipe:cat {d}/{{00000..00003}}.tar")
    assert pipes == [f"pipe:cat {u}" for u in plain]


def test_list_shards_ignores_everything_but_tar_files(tmp_path: Path) -> None:
    write_tar(tmp_path / "00001.tar", good_members("000010"))
    write_tar(tmp_path / "00000.tar", good_members("000000"))
    for name in ("00000_stats.json", "00000.parquet", ".00002.tar.partial", "notes.txt", "_toy_dataset.json"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    write_tar(tmp_path / "sub" / "00005.tar", good_members("000050"))  # not recursive
    assert list_shards(str(tmp_path)) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]


def test_list_shards_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(NoShardsError, match=r"^shard directory .*/nope does not exist$"):
        list_shards(str(tmp_path / "nope"))


def test_list_shards_directory_without_tar_files_says_so(tmp_path: Path) -> None:
    (tmp_path / "00000_stats.json").write_text("{}")
    with pytest.raises(NoShardsError, match=r"^shard directory .* has no \.tar files$"):
        list_shards(str(tmp_path))


def test_list_shards_missing_files_are_counted(dp_toy) -> None:
    with pytest.raises(NoShardsError, match=r"^2 of 6 shards do not exist, e\.g\. .*/00004\.tar$"):
        list_shards(f"{dp_toy.train}/{{00000..00005}}.tar")
    with pytest.raises(NoShardsError, match=r"^1 of 1 shards do not exist, e\.g\. .*/00009\.tar$"):
        list_shards(f"{dp_toy.train}/00009.tar")
    with pytest.raises(NoShardsError, match=r"no shards found"):
        list_shards([])


def test_shard_name_is_the_last_path_component_without_secrets() -> None:
    assert shard_io.shard_name("/data/train/00012.tar") == "00012.tar"
    assert shard_io.shard_name("pipe:cat /data/00003.tar") == "pipe:00003.tar"
    # The documented S3 form ends in "-" (stdout): the name is still the shard's.
    assert shard_io.shard_name("pipe:aws s3 cp s3://bucket/key/00012.tar -") == "pipe:00012.tar"
    assert shard_io.shard_name("pipe:curl -s -L 'https://h/d/00005.tar?X-Sig=SECRET' ") == "pipe:00005.tar"
    assert shard_io.shard_name("https://host/x/00007.tar?token=SECRET") == "00007.tar"
    assert shard_io.shard_name("pipe:") == "pipe:"


# ------------------------------------------------------------------ reading the forms


def test_reader_reads_every_url_form_identically(dp_toy) -> None:
    d = dp_toy.train
    forms = [dp_toy.train_shards, str(d), f"{d}/{{00000..00003}}.tar", f"pipe:cat {d}/{{00000..00003}}.tar",
             [f"pipe:cat {u}" for u in dp_toy.train_shards]]
    reads = [flat(make_reader(f, seed=5, batch_size=4)) for f in forms]
    assert sorted(reads[0]) == dp_toy.train_keys
    assert all(r == reads[0] for r in reads[1:])  # same shard list -> same shuffled order
    unshuffled = flat(make_reader(f"pipe:cat {d}/{{00000..00003}}.tar", shuffle=False, workers=2))
    assert sorted(unshuffled) == dp_toy.train_keys


def test_a_failing_pipe_command_is_a_counted_fault_not_a_crash(dp_toy, tmp_path: Path) -> None:
    urls = [f"pipe:cat {tmp_path}/missing.tar 2>/dev/null", *dp_toy.train_shards[:1]]
    reader = make_reader(urls, shuffle=False)
    assert flat(reader) == dp_toy.train_keys[:8]
    assert reader.fault_counts() == {"truncated_tar": 1}


# ------------------------------------------------------------------ grouping raw samples


def test_groups_consecutive_members_by_key_with_offsets(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [*good_members("k0"), ("k1.jpg", b"J"), ("k1.gt_dsc.txt", b"G"),
                                          ("k1.TXT", b"T"), ("__index__", b"meta"), ("noext", b"?")])
    with open(path, "rb") as f:
        out = list(iter_raw_samples(f))
    assert [(g.key, sorted(g.members), g.offset, g.fault) for g in out] == [
        ("k0", ["jpg", "json", "txt"], 0, None), ("k1", ["gt_dsc.txt", "jpg", "txt"], 1, None)]
    assert out[1].members == {"jpg": b"J", "gt_dsc.txt": b"G", "txt": b"T"}  # extensions lower-cased


def test_duplicate_key_later_in_shard_and_duplicate_member(tmp_path: Path) -> None:
    seen: set[str] = set()
    path = write_tar(tmp_path / "a.tar", [*good_members("a"), *good_members("b"), *good_members("a", "second"),
                                          ("c.jpg", b"1"), ("c.jpg", b"2"), ("c.txt", b"t"), *good_members("d")])
    with open(path, "rb") as f:
        out = list(iter_raw_samples(f, seen))
    assert [(g.key, g.offset, g.fault) for g in out] == [
        ("a", 0, None), ("b", 1, None), ("a", 2, "duplicate_key"), ("c", 3, "duplicate_key"), ("d", 4, None)]
    assert out[0].members["txt"] == b"caption of a"  # the first occurrence is the kept one
    assert seen == {"a", "b", "c", "d"}


@pytest.fixture
def four_sample_tar(tmp_path: Path) -> tuple[bytes, list]:
    path = write_tar(tmp_path / "four.tar", [m for i in range(4) for m in good_members(f"{i:06d}")])
    return path.read_bytes(), member_layout(path)


def test_complete_tar_reads_all_groups(four_sample_tar) -> None:
    data, layout = four_sample_tar
    assert len(layout) == 12
    assert groups(data) == ["000000", "000001", "000002", "000003"]


@pytest.mark.parametrize("where", ["data", "later_member_data", "padding", "header", "member_boundary",
                                   "group_boundary", "no_end_marker"])
def test_truncated_tar_is_detected_wherever_it_is_cut(four_sample_tar, where: str) -> None:
    """A shard cut anywhere in sample 2 (or just before the end-of-archive marker) ends with
    TRUNCATED_TAR; the whole samples before the cut are kept, the cut sample is dropped."""
    data, layout = four_sample_tar
    jpg2, json2 = layout[6], layout[7]  # 000002.jpg, 000002.json
    last = layout[-1]
    cut = {"data": jpg2.offset_data + jpg2.size // 2,  # sample 2's first member: sample 1 is whole
           "later_member_data": json2.offset_data + json2.size // 2,
           "padding": jpg2.offset_data + jpg2.size + 1,  # inside the zero padding after the jpg data
           "header": json2.offset + 100,
           "member_boundary": json2.offset,  # after 000002.jpg, before 000002.json
           "group_boundary": jpg2.offset,  # after 000001.txt: sample 1 may have had more members
           "no_end_marker": last.offset_data + (last.size + 511) // 512 * 512}[where]
    assert jpg2.size % 512 and cut < len(data)
    expected = ["000000", "000001"] if where != "no_end_marker" else ["000000", "000001", "000002"]
    if where == "group_boundary":
        expected = ["000000"]
    assert groups(data[:cut]) == [*expected, "truncated_tar"]


def test_end_of_archive_block_without_padding_is_complete(four_sample_tar) -> None:
    data, layout = four_sample_tar
    last = layout[-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    assert data[end:] == bytes(len(data) - end)
    assert groups(data[:end + 1024]) == ["000000", "000001", "000002", "000003"]


def test_garbage_is_not_a_tar_archive_and_an_empty_stream_is_truncated() -> None:
    assert groups(b"this is not a tar file" * 100) == ["not_a_tar"]
    assert groups(b"<html>short</html>") == ["not_a_tar"]  # less than one 512-byte header
    assert groups(b"") == ["truncated_tar"]  # what a failed `pipe:` command gives


# ------------------------------------------------------------------ decoding helpers


def test_decode_json_and_image() -> None:
    assert shard_io.decode_json(b'{"a": 1}') == {"a": 1}
    assert shard_io.decode_json(b"[1, 2]") is None
    assert shard_io.decode_json(b"{broken") is None
    assert shard_io.decode_json(b"\xff\xfe") is None
    img = shard_io.decode_image(jpeg_bytes(12, 8))
    assert (img.mode, img.size) == ("RGB", (12, 8))
    with pytest.raises(ValueError):
        shard_io.decode_image(b"not an image")
    with pytest.raises(ValueError):
        shard_io.decode_image(jpeg_bytes(64, 64)[:200])  # truncated JPEG fails at load, not later
    assert shard_io.image_member({"txt": b"", "png": b"", "jpg": b""}) == "jpg"
    assert shard_io.image_member({"txt": b""}) is None


# ------------------------------------------------------------------ writing


def test_atomic_writer_is_invisible_until_commit_and_deterministic(tmp_path: Path) -> None:
    samples = [("000000", {"jpg": b"J0", "txt": b"t0"}), ("000001", {"jpg": b"J1", "json": b"{}"})]
    paths = []
    for name in ("a", "b"):
        writer = AtomicShardWriter(tmp_path / name / "00000.tar")
        for key, members in samples:
            writer.write(key, members)
        assert writer.count == 2
        assert not (tmp_path / name / "00000.tar").exists()
        assert (tmp_path / name / ".00000.tar.partial").exists()
        with pytest.raises(NoShardsError):  # a reader never sees the partial shard
            list_shards(str(tmp_path / name))
        paths.append(writer.commit())
        assert not (tmp_path / name / ".00000.tar.partial").exists()
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with open(paths[0], "rb") as f:
        out = list(iter_raw_samples(f))
    assert [(g.key, g.members) for g in out] == [(k, m) for k, m in samples]


def test_atomic_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = AtomicShardWriter(tmp_path / "00003.tar")
    writer.write("000030", {"jpg": b"x"})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic(tmp_path: Path) -> None:
    shard_io.write_json_atomic(tmp_path / "s.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_copied_toy_directory_reads_the_same(dp_toy, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(dp_toy.train, tmp_path / "copy"))
    assert flat(make_reader(str(copy), seed=2)) == flat(make_reader(dp_toy.train_shards, seed=2))
