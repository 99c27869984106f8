"""Aspect buckets: the tables, nearest-bucket assignment, and resize-to-cover + crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from data_pipeline.aspect_buckets import Bucket, bucket_table, fit, nearest_bucket, place


@pytest.mark.parametrize("base", [256, 512, 1024])
def test_tables_have_equal_area_multiple_of_64_sides_within_1_to_4(base: int) -> None:
    table = bucket_table(base)
    assert Bucket(base, base) in table
    for b in table:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.9 * base * base <= b.width * b.height <= base * base  # about equal area, never more
        assert 1 / 4 <= b.width / b.height <= 4
        assert Bucket(b.height, b.width) in table  # portrait mirrors landscape
    assert [b.log_aspect for b in table] == sorted(b.log_aspect for b in table)
    assert (table[0], table[-1]) == (Bucket(base // 2, base * 2), Bucket(base * 2, base // 2))  # 1:4 and 4:1


def test_the_1024_table_is_the_familiar_one() -> None:
    assert [str(b) for b in bucket_table(1024)[6:11]] == ["896x1152", "960x1088", "1024x1024", "1088x960", "1152x896"]
    assert len(bucket_table(1024)) == 17


def test_toy_tables_and_bad_arguments() -> None:
    assert bucket_table(64) == [Bucket(64, 64)]
    assert [str(b) for b in bucket_table(128, step=32)] == ["64x256", "96x160", "128x128", "160x96", "256x64"]
    assert [str(b) for b in bucket_table(256, max_aspect=2)] == ["192x320", "256x256", "320x192"]
    with pytest.raises(ValueError, match="must be >= step"):
        bucket_table(32)
    with pytest.raises(ValueError, match="max_aspect must be >= 1"):
        bucket_table(256, max_aspect=0.5)


def test_nearest_bucket_in_log_aspect() -> None:
    table = bucket_table(512)  # 256x1024 ... 512x512 ... 1024x256
    assert str(table[nearest_bucket(300, 300, table)]) == "512x512"
    assert str(table[nearest_bucket(1600, 900, table)]) == "640x384"  # 16:9 -> 5:3, |log| gap 0.065
    assert str(table[nearest_bucket(900, 1600, table)]) == "384x640"
    assert str(table[nearest_bucket(5000, 100, table)]) == "1024x256"  # beyond 4:1: the widest
    for w, h in [(640, 480), (480, 640), (1000, 333), (123, 457)]:
        best = nearest_bucket(w, h, table)
        gaps = [abs(math.log(w / h) - b.log_aspect) for b in table]
        assert gaps[best] == min(gaps)
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 10, table)


def test_place_covers_the_bucket_and_crops_inside_the_image() -> None:
    bucket = Bucket(384, 640)
    centred = place(900, 1600, bucket)
    assert centred.resized == (384, 683) and (centred.left, centred.top) == (0, 21)
    offsets = {(p.left, p.top) for p in (place(900, 1600, bucket, seed=s) for s in range(2000))}
    assert {left for left, _ in offsets} == {0} and {top for _, top in offsets} == set(range(44))  # 683 - 640 + 1
    assert place(900, 1600, bucket, seed=5) == place(900, 1600, bucket, seed=5)
    small = place(10, 10, Bucket(64, 64))
    assert small.resized == (64, 64) and (small.left, small.top) == (0, 0)  # upscaled to cover


def test_fit_returns_the_crop_of_the_resized_image() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 400, 3), dtype=np.uint8))
    placement = place(400, 150, Bucket(256, 64), seed=3)
    out = fit(image, placement)
    assert out.size == (256, 64)
    resized = np.asarray(image.resize(placement.resized, Image.Resampling.BICUBIC))
    expected = resized[placement.top:placement.top + 64, placement.left:placement.left + 256]
    assert np.array_equal(np.asarray(out), expected)
