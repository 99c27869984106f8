"""img2dataset's webdataset output: our reader reads it, and toy_shards writes exactly its layout.

The reference layout (img2dataset, ``--output_format webdataset``): per shard ``NNNNN.tar`` holding
``KEY.jpg``, ``KEY.txt``, ``KEY.json`` (written by webdataset.TarWriter from a dict, so members
come sorted by extension), plus ``NNNNN_stats.json`` and ``NNNNN.parquet`` beside it. Failed
downloads appear only in the parquet file and the stats.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec
from data_pipeline.toy_shards import OOM_SHARD_COUNT, compute_key
from dp_testlib import flat, jpeg_bytes, make_reader, read_members

IMG2DATASET_JSON_KEYS = ["url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                         "original_height", "exif", "sha256"]
TOY_EXTRA_JSON_KEYS = ["gt_ssc", "gt_dsc", "curated", "objects", "text", "background"]
STATS_KEYS = {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
              "end_time", "status_dict"}


def img2dataset_key(key: int, shard_id: int, number_sample_per_shard: int, oom_shard_count: int = 5) -> str:
    """img2dataset's downloader: oom_sample_per_shard = ceil(log10(number_sample_per_shard)), then compute_key."""
    oom_sample_per_shard = math.ceil(math.log10(number_sample_per_shard))
    true_key = (10**oom_sample_per_shard) * shard_id + key
    key_format = oom_sample_per_shard + oom_shard_count
    return "{true_key:0{key_format}d}".format(key_format=key_format, true_key=true_key)


@pytest.mark.parametrize(("index", "shard_id", "per_shard"), [
    (3, 12, 10000), (0, 0, 10000), (9999, 99999, 10000), (5, 7, 8), (7, 3, 10), (10, 3, 11), (127, 4, 128),
    (0, 3, 1), (1, 3, 2), (99, 0, 100), (0, 1, 101)])
def test_compute_key_is_img2dataset_formula(index: int, shard_id: int, per_shard: int) -> None:
    assert compute_key(index, shard_id, per_shard) == img2dataset_key(index, shard_id, per_shard)


def test_compute_key_examples() -> None:
    assert compute_key(3, 12, 10000) == "000120003"
    assert compute_key(5, 2, 8) == "000025"
    assert compute_key(0, 3, 1) == "00003"  # one sample per shard: no sample digits
    assert OOM_SHARD_COUNT == 5


@pytest.fixture(scope="module")
def img2dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards the way img2dataset writes them (5 URLs per shard, the 3rd of each failed)."""
    out = tmp_path_factory.mktemp("img2dataset")
    for shard_id in range(2):
        with open(out / f"{shard_id:05d}.tar", "wb") as fd:
            writer = wds.TarWriter(fd)  # img2dataset's WebDatasetSampleWriter: default TarWriter
            for i in range(5):
                key = img2dataset_key(i, shard_id, 5)
                if i == 2:
                    continue  # failed_to_download: parquet and stats only
                img = jpeg_bytes(20 + i, 10)
                meta = {"url": f"https://example.com/{key}.jpg", "caption": f"photo {key}", "key": key,
                        "status": "success", "error_message": None, "width": 20 + i, "height": 10,
                        "original_width": 40 + i, "original_height": 20, "exif": "{}",
                        "sha256": hashlib.sha256(img).hexdigest()}
                writer.write({"__key__": key, "jpg": img, "txt": meta["caption"], "json": json.dumps(meta, indent=4)})
            writer.close()
        stats = {"count": 5, "successes": 4, "failed_to_download": 1, "failed_to_resize": 0, "duration": 1.5,
                 "start_time": 1700000000.0, "end_time": 1700000001.5,
                 "status_dict": {"success": 4, "<urlopen error timed out>": 1}}
        (out / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        (out / f"{shard_id:05d}.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    return out


def test_img2dataset_members_are_what_the_reader_expects(img2dataset_dir: Path) -> None:
    names = [n for n, _ in read_members(img2dataset_dir / "00001.tar")]
    assert names == [f"0000{i}{j}.{ext}" for j in (0, 1, 3, 4) for i in (1,) for ext in ("jpg", "json", "txt")]


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_reads_img2dataset_output(img2dataset_dir: Path, workers: int) -> None:
    def collate(batch):
        return [(s["__key__"], s["txt"], s["image"].size, s["json"]["sha256"], s["json"]["key"]) for s in batch]

    reader = make_reader(str(img2dataset_dir), workers=workers, collate=collate,
                         spec=SampleSpec(GroundTruthAccess.NONE, captions=("txt",)))
    samples = flat(reader)
    keys = [img2dataset_key(i, s, 5) for s in range(2) for i in (0, 1, 3, 4)]
    assert sorted(s[0] for s in samples) == keys == ["000000", "000001", "000003", "000004",
                                                     "000010", "000011", "000013", "000014"]
    for key, txt, size, _sha, json_key in samples:
        assert txt == f"photo {key}" and json_key == key and size == (20 + int(key[-1]), 10)
    assert reader.fault_counts() == {} and reader.samples_read() == 8
    assert reader.num_shards == 2  # stats/parquet files are not shards


# ------------------------------------------------------------------ toy output has that layout


def test_toy_directory_holds_exactly_img2dataset_files(dp_toy) -> None:
    n = dp_toy.options.train_shards
    expected = {f"{i:05d}{suffix}" for i in range(n) for suffix in (".tar", "_stats.json")} | {"_toy_dataset.json"}
    assert {p.name for p in dp_toy.train.iterdir()} == expected
    assert {p.name for p in dp_toy.heldout.iterdir()} == {"00000.tar", "00000_stats.json", "_toy_dataset.json"}


def test_toy_members_keys_and_json_follow_img2dataset(dp_toy) -> None:
    spp = dp_toy.options.samples_per_shard
    for shard in sorted(dp_toy.train.glob("*.tar")):
        shard_id = int(shard.stem)
        members = read_members(shard)
        keys = [img2dataset_key(i, shard_id, spp) for i in range(spp)]
        assert [n for n, _ in members] == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
        for key, (jpg, js, txt) in zip(keys, zip(*[iter(d for _, d in members)] * 3)):
            meta = json.loads(js)
            assert list(meta) == IMG2DATASET_JSON_KEYS + TOY_EXTRA_JSON_KEYS
            assert meta["key"] == key and meta["caption"] == txt.decode()
            assert (meta["status"], meta["error_message"], meta["exif"]) == ("success", None, None)
            assert meta["sha256"] == hashlib.sha256(jpg).hexdigest()
            with Image.open(io.BytesIO(jpg)) as img:
                assert img.format == "JPEG" and img.size == (meta["width"], meta["height"])
            assert (meta["original_width"], meta["original_height"]) == (meta["width"], meta["height"])
            index = shard_id * spp + int(key) % 10
            assert meta["url"] == f"synthetic://toy-scenes/seed-{dp_toy.options.seed}/train/{index}.jpg"
            assert isinstance(meta["curated"], bool) and isinstance(meta["gt_dsc"], str) and meta["gt_dsc"]
            assert js.decode() == json.dumps(meta, indent=4)  # img2dataset writes indent=4


def test_toy_stats_follow_img2dataset(dp_toy) -> None:
    spp = dp_toy.options.samples_per_shard
    for stats_file in sorted(dp_toy.train.glob("*_stats.json")) + sorted(dp_toy.heldout.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        assert set(stats) == STATS_KEYS
        assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (
            spp, spp, 0, 0)
        assert stats["status_dict"] == {"success": spp}
        assert stats["start_time"] <= stats["end_time"]
        assert stats["duration"] == pytest.approx(stats["end_time"] - stats["start_time"])


def test_reader_reads_toy_and_img2dataset_shards_together(dp_toy, img2dataset_dir: Path) -> None:
    urls = [*dp_toy.train_shards[:1], f"{img2dataset_dir}/{{00000..00001}}.tar"]
    keys = flat(make_reader(urls, shuffle=False))
    assert keys == dp_toy.train_keys[:8] + ["000000", "000001", "000003", "000004", "000010", "000011", "000013",
                                            "000014"]
