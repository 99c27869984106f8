"""ShardReader fault handling: every skipped sample counted by reason, strict mode, fault budget.

Shards are built by hand so that each fault occurs a known number of times.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from data_pipeline import shard_io
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec, decode_sample
from data_pipeline.shard_io import DataError, RawSample
from dp_testlib import (
    SPEC_TXT, flat, good_members, huge_png, jpeg_bytes, json_roundtrip, make_reader, member_layout, take, write_tar,
)

EXPECTED_FAULTS = {"undecodable_image": 1, "empty_image": 1, "missing_caption": 1, "empty_caption": 1,
                   "duplicate_key": 1, "bad_json": 1, "missing_image": 1, "image_too_large": 1, "truncated_tar": 1}
GOOD_KEYS = ["000000", "000002", "000006", "000009", "000010", "000011", "000012"]


def key_text_collate(batch: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["__key__"], s["txt"]) for s in batch]


def without(members: list[tuple[str, bytes]], ext: str) -> list[tuple[str, bytes]]:
    return [(n, d) for n, d in members if not n.endswith("." + ext)]


def replaced(members: list[tuple[str, bytes]], ext: str, data: bytes) -> list[tuple[str, bytes]]:
    return [(n, data if n.endswith("." + ext) else d) for n, d in members]


@pytest.fixture(scope="module")
def fault_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """00000.tar: one sample per fault reason among 4 good ones; 00001.tar: cut inside its 4th sample."""
    d = tmp_path_factory.mktemp("faults")
    g = good_members
    a = [*g("000000"),
         *replaced(g("000001"), "jpg", b"\xff\xd8 this is not a jpeg"),  # undecodable_image
         *g("000002", "first"),
         *replaced(g("000003"), "jpg", b""),  # empty_image
         *without(g("000004"), "txt"),  # missing_caption
         *g("000005", "  \n\t "),  # empty_caption
         *g("000006"),
         *g("000002", "DUPLICATE"),  # duplicate_key (later in the same shard)
         *replaced(g("000007"), "json", b'{"key": "000007",'),  # bad_json
         *without(g("000008"), "jpg"),  # missing_image
         *[(n.replace(".jpg", ".png"), huge_png()) if n.endswith(".jpg") else (n, d) for n, d in g("000014")],  # too large
         *g("000009")]
    write_tar(d / "00000.tar", a)
    full = write_tar(d / "full_b.tar", [m for k in ("000010", "000011", "000012", "000013") for m in g(k)])
    jpg13 = member_layout(full)[9]
    assert jpg13.name == "000013.jpg"
    (d / "00001.tar").write_bytes(full.read_bytes()[:jpg13.offset_data + jpg13.size // 2])
    full.unlink()
    return [str(d / "00000.tar"), str(d / "00001.tar")]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_fault_is_counted_by_reason(fault_shards: list[str], workers: int) -> None:
    reader = make_reader(fault_shards, workers=workers, spec=SPEC_TXT, collate=key_text_collate, batch_size=2)
    samples = flat(reader)
    assert sorted(k for k, _ in samples) == GOOD_KEYS
    assert dict(samples)["000002"] == "first"  # the first of a duplicated key is the one kept
    assert reader.fault_counts() == EXPECTED_FAULTS
    assert reader.samples_read() == 7
    assert reader.filtered_counts() == {}


def test_fault_examples_name_shard_key_and_reason(fault_shards: list[str]) -> None:
    reader = make_reader(fault_shards, spec=SPEC_TXT, shuffle=False)
    list(reader)
    assert reader.fault_examples() == ["00000.tar 000001: undecodable_image", "00000.tar 000003: empty_image",
                                       "00000.tar 000004: missing_caption", "00000.tar 000005: empty_caption",
                                       "00000.tar 000002: duplicate_key"]


@pytest.mark.parametrize("workers", [0, 2])
def test_fault_counts_survive_a_resume(fault_shards: list[str], workers: int) -> None:
    def reader():
        return make_reader(fault_shards, workers=workers, spec=SPEC_TXT, batch_size=1)

    full = list(reader())
    first = reader()
    before = take(first, 3)
    second = reader()
    second.load_state_dict(json_roundtrip(first.state_dict()))
    assert before + list(second) == full
    assert second.fault_counts() == EXPECTED_FAULTS and second.samples_read() == 7


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_mode_raises_naming_shard_and_key(fault_shards: list[str], workers: int) -> None:
    reader = make_reader(fault_shards, workers=workers, spec=SPEC_TXT, shuffle=False, strict=True)
    with pytest.raises(DataError, match=r"^bad sample in strict mode: 00000\.tar 000001: undecodable_image$"):
        list(reader)


def test_strict_mode_delivers_what_came_before_a_truncation(fault_shards: list[str]) -> None:
    reader = make_reader(fault_shards[1:], spec=SPEC_TXT, strict=True)
    delivered = []
    with pytest.raises(DataError, match=r"^bad sample in strict mode: 00001\.tar after 3 samples: truncated_tar$"):
        for batch in reader:
            delivered.extend(batch)
    assert delivered == ["000010", "000011", "000012"]


@pytest.fixture(scope="module")
def mostly_bad_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2 good samples, 50 with an undecodable image, 2 good."""
    members = [*good_members("000000"), *good_members("000001")]
    for i in range(2, 52):
        members += replaced(good_members(f"{i:06d}"), "jpg", b"garbage " * 20)
    members += [*good_members("000052"), *good_members("000053")]
    return str(write_tar(tmp_path_factory.mktemp("bad") / "00000.tar", members))


def test_fault_fraction_over_the_limit_aborts_with_counts_and_key(mostly_bad_shard: str) -> None:
    reader = make_reader(mostly_bad_shard, spec=SPEC_TXT, batch_size=2, shuffle=False, max_fault_fraction=0.2,
                         fault_check_after=10)
    delivered = []
    with pytest.raises(DataError) as info:
        for batch in reader:
            delivered.append(batch)
    assert delivered == [["000000", "000001"]]  # checked on the next batch: 50 bad of 54 read
    message = str(info.value)
    assert message.startswith("50 of 54 samples read were bad (92.6% > data.reader.max_fault_fraction=0.2): "
                              "undecodable_image=50. Examples: 00000.tar 000002: undecodable_image; ")
    assert message.endswith("Fix or drop these shards, or raise data.reader.max_fault_fraction")


def test_fault_fraction_is_not_checked_before_fault_check_after(mostly_bad_shard: str) -> None:
    reader = make_reader(mostly_bad_shard, spec=SPEC_TXT, batch_size=2, max_fault_fraction=0.2,
                         fault_check_after=55)
    assert sorted(flat(reader)) == ["000000", "000001", "000052", "000053"]
    assert reader.fault_counts() == {"undecodable_image": 50}


def test_bad_samples_are_skipped_without_sleeping(mostly_bad_shard: str) -> None:
    """webdataset's warn_and_continue sleeps 0.5 s per error; 50 errors must cost nothing like 25 s."""
    reader = make_reader(mostly_bad_shard, spec=SPEC_TXT, batch_size=4, max_fault_fraction=1.0)
    start = time.perf_counter()
    keys = flat(reader)
    elapsed = time.perf_counter() - start
    assert sorted(keys) == ["000000", "000001", "000052", "000053"]
    assert reader.fault_counts() == {"undecodable_image": 50}
    assert elapsed < 2.0, elapsed


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_that_cannot_be_opened_is_counted(tmp_path: Path, workers: int) -> None:
    paths = [write_tar(tmp_path / f"{i:05d}.tar", [*good_members(f"{i}0"), *good_members(f"{i}1")])
             for i in range(3)]
    reader = make_reader([str(p) for p in paths], workers=workers, batch_size=1, shuffle=False)
    paths[1].unlink()  # listed, then gone: open() fails
    assert sorted(flat(reader)) == ["00", "01", "20", "21"]
    assert reader.fault_counts() == {"unreadable_shard": 1}
    assert len(reader.fault_examples()) == 1
    assert re.match(r"^00001\.tar\s*: unreadable_shard \(.*No such file", reader.fault_examples()[0])


# ------------------------------------------------------------------ decode_sample on its own


def raw(members: dict[str, bytes], key: str = "k", fault: str | None = None) -> RawSample:
    return RawSample(key, members, 0, fault)


def test_decode_sample_fields_and_reasons() -> None:
    spec = SampleSpec(GroundTruthAccess.NONE, captions=("txt",), optional_texts=("dsc.txt",))
    meta = json.dumps({"caption": "c", "gt_dsc": "secret"}).encode()
    ok = decode_sample(raw({"jpg": jpeg_bytes(5, 4), "txt": b"hello", "json": meta}), spec)
    assert isinstance(ok, dict)
    assert sorted(ok) == ["__key__", "dsc.txt", "image", "json", "txt"]
    assert (ok["__key__"], ok["txt"], ok["dsc.txt"], ok["json"]) == ("k", "hello", "", {"caption": "c"})
    assert ok["image"].size == (5, 4)
    png = decode_sample(raw({"png": _png(), "txt": b"x", "dsc.txt": b"long"}), spec)
    assert isinstance(png, dict) and png["dsc.txt"] == "long" and png["json"] == {}
    assert decode_sample(raw({"jpg": b"", "txt": b"x"}, fault="duplicate_key"), spec) == "duplicate_key"
    assert decode_sample(raw({"jpg": jpeg_bytes(), "txt": b"x", "json": b"[]"}), spec) == "bad_json"
    assert decode_sample(raw({"txt": b"x"}), spec) == "missing_image"
    assert decode_sample(raw({"txt": b"x"}), SampleSpec(GroundTruthAccess.NONE, image=False)) != "missing_image"
    assert decode_sample(raw({"jpg": jpeg_bytes()}), spec) == "missing_caption"
    assert decode_sample(raw({"jpg": jpeg_bytes(), "txt": b" "}), spec) == "empty_caption"
    assert decode_sample(raw({"jpg": b"", "txt": b"x"}), spec) == "empty_image"
    assert decode_sample(raw({"jpg": jpeg_bytes()[:100], "txt": b"x"}), spec) == "undecodable_image"
    assert decode_sample(raw({"png": huge_png(), "txt": b"x"}), spec) == "image_too_large"  # PIL's own limit
    assert decode_sample(raw({"jpg": jpeg_bytes(12, 8), "txt": b"x"}), spec, max_image_pixels=96) != "image_too_large"
    assert decode_sample(raw({"jpg": jpeg_bytes(12, 8), "txt": b"x"}), spec, max_image_pixels=95) == "image_too_large"
    assert set(shard_io.FAULT_REASONS) == {"truncated_tar", "unreadable_shard", "not_a_tar", *EXPECTED_FAULTS}


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_cheap_checks_run_before_the_image_is_decoded() -> None:
    spec = SampleSpec(GroundTruthAccess.NONE, captions=("txt",))
    # Both the caption and the image are bad: the caption is reported (no decode attempted).
    assert decode_sample(raw({"jpg": b"garbage"}), spec) == "missing_caption"
    assert decode_sample(raw({"jpg": b"garbage", "txt": b" "}), spec) == "empty_caption"
    assert decode_sample(raw({"jpg": b"garbage", "txt": b"x", "json": b"{"}), spec) == "bad_json"


# ------------------------------------------------------------------ endless readers with nothing to read


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_endless_reader_with_no_openable_shard_raises_instead_of_hanging(tmp_path: Path, workers: int) -> None:
    paths = [write_tar(tmp_path / f"{i:05d}.tar", good_members(f"{i}0")) for i in range(2)]
    reader = make_reader([str(p) for p in paths], workers=workers, epochs=None)
    for p in paths:
        p.unlink()
    with pytest.raises(DataError, match=r"^none of the (2|1) shards of reader stream \d has a sample this stage can "
                                        r"read \(unreadable_shard=\d+\), e\.g\. 0000[01]\.tar"):
        next(iter(reader))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shuffle", [True, False])
def test_endless_reader_over_only_bad_samples_raises_with_counts(tmp_path: Path, shuffle: bool) -> None:
    bad = [m for i in range(3) for m in replaced(good_members(f"00000{i}"), "jpg", b"junk")]
    shard = write_tar(tmp_path / "00000.tar", bad)
    reader = make_reader(str(shard), spec=SPEC_TXT, epochs=None, shuffle=shuffle, max_fault_fraction=1.0)
    with pytest.raises(DataError, match=r"^none of the 1 shards of reader stream 0 has a sample this stage can read "
                                        r"\(undecodable_image=\d+\), e\.g\. 00000\.tar 000000: undecodable_image"):
        next(iter(reader))


@pytest.mark.timeout(60)
def test_endless_curated_reader_without_curated_samples_raises(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "00000.tar", [m for i in range(2) for m in good_members(f"00000{i}")])
    spec = SampleSpec(GroundTruthAccess.CURATED_CAPTIONS, captions=("json.gt_dsc",))
    with pytest.raises(DataError, match=r"can read \(not_curated=\d+\), e\.g\. -$"):
        next(iter(make_reader(str(shard), spec=spec, epochs=None)))


@pytest.mark.timeout(60)
def test_endless_reader_with_a_worker_that_can_never_read_raises(tmp_path: Path) -> None:
    """shuffle=False: worker 1 always gets shard 1, whose samples are all bad."""
    good = write_tar(tmp_path / "00000.tar", good_members("000000"))
    bad = write_tar(tmp_path / "00001.tar", replaced(good_members("000010"), "jpg", b""))
    reader = make_reader([str(good), str(bad)], spec=SPEC_TXT, workers=2, epochs=None, shuffle=False,
                         max_fault_fraction=1.0)
    with pytest.raises(DataError, match=r"none of the 1 shards of reader stream 1 .*\(empty_image=1\)"):
        take(reader, 5)


def test_endless_reader_with_some_good_samples_keeps_going(mostly_bad_shard: str) -> None:
    reader = make_reader(mostly_bad_shard, spec=SPEC_TXT, epochs=None, batch_size=4, max_fault_fraction=1.0)
    keys = flat(take(reader, 6))  # 24 samples: 6 passes over the 4 good ones
    assert sorted(set(keys)) == ["000000", "000001", "000052", "000053"] and len(keys) == 24
    assert reader.fault_counts()["undecodable_image"] >= 250


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    import io

    import numpy as np
    from PIL import Image

    values = np.array([[0, 257 * 61, 257 * 156, 65535]], dtype=np.uint16)  # 0, 61, 156, 255 in 8 bits
    data = io.BytesIO()
    Image.fromarray(values).save(data, format="PNG")
    assert Image.open(io.BytesIO(data.getvalue())).mode.startswith("I")  # what PIL gives a 16-bit PNG
    decoded = np.asarray(shard_io.decode_image(data.getvalue()))
    assert decoded.shape == (1, 4, 3)
    assert decoded[0, :, 0].tolist() == [0, 61, 156, 255] and (decoded == decoded[..., :1]).all()
    clipped = np.asarray(Image.open(io.BytesIO(data.getvalue())).convert("RGB"))  # PIL's own convert: the control
    assert clipped[0, :, 0].tolist() == [0, 255, 255, 255]


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html>404</html>\n", bytes(range(256)) * 12],
                         ids=["html", "random"])
def test_a_file_that_is_not_a_tar_is_one_not_a_tar_fault(tmp_path: Path, content: bytes) -> None:
    good = write_tar(tmp_path / "00000.tar", [*good_members("a0"), *good_members("a1")])
    (tmp_path / "00001.tar").write_bytes(content)
    with open(tmp_path / "00001.tar", "rb") as f:
        assert list(shard_io.iter_raw_samples(f)) == [shard_io.NOT_A_TAR]
    with open(good, "rb") as f:  # the control: a real tar cut inside its first member is truncated
        assert list(shard_io.iter_raw_samples(io.BytesIO(f.read()[:700])))[-1] == shard_io.TRUNCATED_TAR
    reader = make_reader([str(good), str(tmp_path / "00001.tar")], spec=SPEC_TXT, shuffle=False)
    assert sorted(flat(reader)) == ["a0", "a1"]
    assert reader.fault_counts() == {"not_a_tar": 1}
    assert reader.fault_examples() == ["00001.tar : not_a_tar (its first 512 bytes are not a tar header)"]
