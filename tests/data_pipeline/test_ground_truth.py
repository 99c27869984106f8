"""The ground-truth guard: what each GroundTruthAccess level lets a stage see, end to end."""

from __future__ import annotations

import json
from typing import Any

import pytest

from data_pipeline.ground_truth import (
    GT_FIELDS, GroundTruthAccess, allowed_members, filter_metadata, is_curated, is_ground_truth_member,
)
from data_pipeline.samples import SampleSpec
from dp_testlib import flat, jpeg_bytes, make_reader, raw_metadata, write_tar

NONE, CURATED, EVALUATION = GroundTruthAccess.NONE, GroundTruthAccess.CURATED_CAPTIONS, GroundTruthAccess.EVALUATION


def as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def read_samples(shards, spec: SampleSpec, workers: int = 0):
    reader = make_reader(shards, spec=spec, workers=workers, collate=as_list, batch_size=4)
    return flat(reader), reader


def test_toy_data_has_curated_and_uncurated_samples(dp_toy) -> None:
    curated = [k for k, m in dp_toy.meta.items() if m["curated"]]
    assert 0 < len(curated) < len(dp_toy.meta) == 32
    assert len(curated) == dp_toy.summary["splits"]["train"]["curated"]


@pytest.mark.parametrize("workers", [0, 2])
def test_no_access_never_yields_ground_truth(dp_toy, workers: int) -> None:
    spec = SampleSpec(NONE, captions=("txt",))
    split_meta = {d: raw_metadata(d) for d in (dp_toy.train, dp_toy.heldout)}
    secrets = {m["gt_dsc"] for meta in split_meta.values() for m in meta.values()}
    assert len(secrets) == 40  # every scene has its own description
    n_read = 0
    for d, meta in split_meta.items():
        samples, reader = read_samples(str(d), spec, workers=min(workers, 1) if d == dp_toy.heldout else workers)
        with_alt_text = {k for k, m in meta.items() if m["caption"].strip()}
        assert sorted(s["__key__"] for s in samples) == sorted(with_alt_text)
        n_empty = len(meta) - len(with_alt_text)  # empty alt text is a counted fault, not a leak
        assert reader.fault_counts() == ({"empty_caption": n_empty} if n_empty else {})
        for s in samples:
            assert not set(s["json"]) & set(GT_FIELDS)
            assert set(s) == {"__key__", "__shard__", "seed", "json", "txt", "image"}
            assert s["json"] == {k: v for k, v in meta[s["__key__"]].items() if k not in GT_FIELDS}
            text = str(s) + json.dumps(s["json"])
            assert not any(secret in text for secret in secrets), s["__key__"]
        n_read += len(samples)
    assert n_read > 30


@pytest.mark.parametrize("workers", [0, 2])
def test_curated_captions_yields_exactly_the_curated_samples(dp_toy, workers: int) -> None:
    spec = SampleSpec(CURATED, captions=("json.gt_dsc",), optional_texts=("json.gt_ssc",))
    samples, reader = read_samples(dp_toy.train_shards, spec, workers)
    curated = {k for k, m in dp_toy.meta.items() if m["curated"] is True}
    assert {s["__key__"] for s in samples} == curated
    assert reader.filtered_counts() == {"not_curated": 32 - len(curated)}
    assert reader.fault_counts() == {}
    assert reader.samples_read() == len(curated)
    for s in samples:
        raw = dp_toy.meta[s["__key__"]]
        assert s["json.gt_dsc"] == raw["gt_dsc"] and s["json.gt_ssc"] == raw["gt_ssc"]
        assert s["json"]["gt_dsc"] == raw["gt_dsc"]
        assert not {"objects", "text", "background"} & set(s["json"])
        assert s["json"] == {k: v for k, v in raw.items() if k not in ("objects", "text", "background")}


def test_curated_access_without_ground_truth_captions_reads_everything_but_hides_it(dp_toy) -> None:
    spec = SampleSpec(CURATED, image=False, optional_texts=("json.gt_dsc",))
    samples, reader = read_samples(dp_toy.train_shards, spec)
    assert sorted(s["__key__"] for s in samples) == dp_toy.train_keys
    assert reader.filtered_counts() == {}
    for s in samples:
        raw = dp_toy.meta[s["__key__"]]
        if raw["curated"]:
            assert s["json.gt_dsc"] == raw["gt_dsc"] and {"gt_ssc", "gt_dsc"} <= set(s["json"])
        else:
            assert s["json.gt_dsc"] == "" and not set(s["json"]) & set(GT_FIELDS)
        assert not {"objects", "text", "background"} & set(s["json"])


def test_evaluation_sees_everything(dp_toy) -> None:
    spec = SampleSpec(EVALUATION, captions=("json.gt_dsc", "json.gt_ssc"))
    samples, reader = read_samples(dp_toy.train_shards, spec, workers=2)
    assert sorted(s["__key__"] for s in samples) == dp_toy.train_keys
    assert reader.filtered_counts() == {} and reader.fault_counts() == {}
    for s in samples:
        assert s["json"] == dp_toy.meta[s["__key__"]]
        assert s["json.gt_dsc"] == s["json"]["gt_dsc"]


# ------------------------------------------------------------------ ground truth as tar members


@pytest.fixture(scope="module")
def gt_member_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Samples with KEY.gt_dsc.txt members; 000001 and 000003 are curated."""
    d = tmp_path_factory.mktemp("gt_members")
    shards = []
    for shard in range(2):
        members = []
        for i in range(2):
            key = f"00000{shard * 2 + i}"
            meta = {"key": key, "curated": key in ("000001", "000003"), "gt_dsc": f"SECRET-json-{key}"}
            members += [(f"{key}.gt_dsc.txt", f"SECRET-member-{key}".encode()), (f"{key}.jpg", jpeg_bytes()),
                        (f"{key}.json", json.dumps(meta).encode()), (f"{key}.txt", f"alt {key}".encode())]
        shards.append(str(write_tar(d / f"{shard:05d}.tar", members)))
    return shards


def test_ground_truth_members_are_hidden_without_access(gt_member_shards: list[str]) -> None:
    spec = SampleSpec(NONE, captions=("txt",), optional_texts=("gt_dsc.txt", "json.gt_dsc"))
    samples, _ = read_samples(gt_member_shards, spec, workers=2)
    assert sorted(s["__key__"] for s in samples) == ["000000", "000001", "000002", "000003"]
    for s in samples:
        assert s["gt_dsc.txt"] == "" and s["json.gt_dsc"] == ""
        assert "SECRET" not in str(s)
    samples, reader = read_samples(gt_member_shards, SampleSpec(NONE, captions=("gt_dsc.txt",)))
    assert samples == [] and reader.fault_counts() == {"missing_caption": 4}


def test_curated_access_reads_ground_truth_members_of_curated_samples_only(gt_member_shards: list[str]) -> None:
    samples, reader = read_samples(gt_member_shards, SampleSpec(CURATED, captions=("gt_dsc.txt",)))
    assert sorted((s["__key__"], s["gt_dsc.txt"]) for s in samples) == [
        ("000001", "SECRET-member-000001"), ("000003", "SECRET-member-000003")]
    # Not curated is a filter, not a fault (a fault would trip max_fault_fraction on real data).
    assert reader.filtered_counts() == {"not_curated": 2}
    assert reader.fault_counts() == {}


def test_evaluation_reads_ground_truth_members(gt_member_shards: list[str]) -> None:
    samples, _ = read_samples(gt_member_shards, SampleSpec(EVALUATION, captions=("gt_dsc.txt",)))
    assert sorted((s["__key__"], s["gt_dsc.txt"]) for s in samples) == [
        (f"00000{i}", f"SECRET-member-00000{i}") for i in range(4)]


# ------------------------------------------------------------------ the policy functions


def test_filter_metadata_per_access_level() -> None:
    meta = {"url": "u", "caption": "c", "curated": True, "gt_ssc": "s", "gt_dsc": "d", "objects": [1],
            "text": None, "background": "white"}
    assert filter_metadata(meta, NONE) == {"url": "u", "caption": "c", "curated": True}
    assert filter_metadata(meta, CURATED) == {"url": "u", "caption": "c", "curated": True, "gt_ssc": "s",
                                              "gt_dsc": "d"}
    assert filter_metadata({**meta, "curated": False}, CURATED) == {"url": "u", "caption": "c", "curated": False}
    assert filter_metadata(meta, EVALUATION) == meta and filter_metadata(meta, EVALUATION) is not meta
    assert "gt_dsc" in meta  # the input is not modified


def test_curated_means_exactly_true() -> None:
    assert is_curated({"curated": True})
    for value in (False, 1, "true", "yes", None):
        assert not is_curated({"curated": value}), value
    assert not is_curated({})


def test_allowed_members() -> None:
    exts = ["jpg", "txt", "json", "gt_dsc.txt", "gt_objects.json"]
    assert allowed_members(exts, NONE, curated=True) == ["jpg", "txt", "json"]
    assert allowed_members(exts, CURATED, curated=False) == ["jpg", "txt", "json"]
    assert allowed_members(exts, CURATED, curated=True) == exts
    assert allowed_members(exts, EVALUATION, curated=False) == exts
    assert is_ground_truth_member("gt_ssc.txt") and not is_ground_truth_member("txt")


def test_sample_spec_needs_curated() -> None:
    assert SampleSpec(CURATED, captions=("json.gt_dsc",)).needs_curated()
    assert SampleSpec(CURATED, captions=("txt", "gt_ssc.txt")).needs_curated()
    assert not SampleSpec(CURATED, captions=("txt", "json.caption")).needs_curated()
    with pytest.raises(TypeError):
        SampleSpec()  # type: ignore[call-arg]  # no default access level


def test_gt_fields_are_the_documented_ones() -> None:
    assert GT_FIELDS == ("gt_ssc", "gt_dsc", "objects", "text", "background")
