"""The bad-input corpus: every kind of broken input the data-reading stages must survive, in one
directory of img2dataset-layout shards, with what each stage must count (issue 17, item 8).

New bad inputs found later go here (a member list or a whole file below, and its count in
``SAMPLE_FAULTS`` / ``SHARD_FAULTS``), not into one-off tests; tests/faults/test_bad_input_corpus.py
runs every stage over it. The shards, in the order a reader with ``shuffle=false`` and
``open_shards=1`` reads them:

    00000.tar  one sample per per-sample fault among good ones (and a 16-bit greyscale PNG, which
               is good: it is scaled to 8 bits), ending with a good sample
    00001.tar  random bytes                                   not_a_tar
    00002.tar  an HTML error page saved as .tar               not_a_tar (what a failed download leaves)
    00003.tar  0 bytes                                        truncated_tar (a failed `pipe:` gives one)
    00004.tar  3 good samples, cut inside the 4th one's image truncated_tar
    00005.tar  3 good samples, one of them with a key of 00000.tar (a key repeated across shards:
               counted by recaption and cache, which see one shard set per process, not a fault)

Every fault lies before a shard's last good sample or in a shard before the last one, so a
training reader that has delivered every good sample once has met every fault exactly once.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tests.data_pipeline.dp_testlib import good_members, huge_png, member_layout, write_tar

# Per-sample faults of 00000.tar, counted by every stage that decodes images.
IMAGE_FAULTS = {"undecodable_image": 1, "empty_image": 1, "duplicate_key": 1, "bad_json": 1, "missing_image": 1,
                "image_too_large": 1}
# Counted by the reader of stages that need the sample's caption (pretrain-captioner); train-t2i
# reads captions through its caption mix and counts such samples as `samples_without_caption`.
CAPTION_FAULTS = {"missing_caption": 1, "empty_caption": 1}
# Whole shards that are not tar archives: the shard jobs write nothing for them and exit 3.
NOT_TAR_SHARDS = ("00001.tar", "00002.tar")
SHARD_FAULTS = {"not_a_tar": 2, "truncated_tar": 2}
CROSS_SHARD_REPEATS = 1
GOOD_WITH_CAPTION = 10  # 4 in 00000.tar, 3 + 3 in 00004/00005.tar
GOOD_IMAGES = 12  # also the 2 of 00000.tar whose caption is missing or empty


@dataclass(frozen=True)
class Corpus:
    shards: Path  # the directory of .tar files

    def reader_faults(self, *, captions: bool) -> dict[str, int]:
        """What a training reader counts after one pass (``captions``: the stage needs them)."""
        return dict(sorted({**IMAGE_FAULTS, **SHARD_FAULTS, **(CAPTION_FAULTS if captions else {})}.items()))

    def per_shard_faults(self) -> dict[str, dict[str, int]]:
        """failures_by_reason of each done output shard of recaption and cache."""
        return {"00000.tar": dict(sorted(IMAGE_FAULTS.items())), "00003.tar": {"truncated_tar": 1},
                "00004.tar": {"truncated_tar": 1}, "00005.tar": {}}


def _grey16_png(key: str) -> tuple[str, bytes]:
    image = Image.new("I;16", (12, 8), 40000)  # 61% grey: clipped to white if not scaled
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f"{key}.png", buf.getvalue()


def _without(members: list[tuple[str, bytes]], ext: str) -> list[tuple[str, bytes]]:
    return [(n, d) for n, d in members if not n.endswith("." + ext)]


def _replaced(members: list[tuple[str, bytes]], ext: str, data: bytes) -> list[tuple[str, bytes]]:
    return [(n, data if n.endswith("." + ext) else d) for n, d in members]


def _sample_faults() -> list[tuple[str, bytes]]:
    g = good_members
    return [
        *g("a00"),
        *_replaced(g("a01"), "jpg", b"\xff\xd8 not really a jpeg"),  # undecodable_image
        *g("a02"),
        *_replaced(g("a03"), "jpg", b""),  # empty_image
        *_without(g("a04"), "txt"),  # missing_caption (a good image)
        *g("a05", "  \n\t "),  # empty_caption (a good image)
        *g("a00", "the same key again"),  # duplicate_key
        *_replaced(g("a06"), "json", b'{"key": "a06",'),  # bad_json
        *_without(g("a07"), "jpg"),  # missing_image
        *[(n.replace(".jpg", ".png"), huge_png()) if n.endswith(".jpg") else (n, d) for n, d in g("a08")],  # too large
        *[_grey16_png("a09") if n.endswith(".jpg") else (n, d) for n, d in g("a09")],  # 16-bit PNG: good
        *g("a10"),
    ]


def write_corpus(root: Path) -> Corpus:
    """Write the corpus under ``root`` (``root/shards``)."""
    shards = root / "shards"
    write_tar(shards / "00000.tar", _sample_faults())
    (shards / "00001.tar").write_bytes(random.Random(1).randbytes(4096))
    (shards / "00002.tar").write_bytes(b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head>"
                                       b"<body><h1>Forbidden</h1></body></html>\n")
    (shards / "00003.tar").write_bytes(b"")
    full = write_tar(root / "cut.full", [m for k in ("b00", "b01", "b02", "b03") for m in good_members(k)])
    image = next(m for m in member_layout(full) if m.name == "b03.jpg")
    (shards / "00004.tar").write_bytes(full.read_bytes()[: image.offset_data + image.size // 2])
    full.unlink()
    write_tar(shards / "00005.tar", [m for k in ("c00", "a02", "c01") for m in good_members(k)])
    return Corpus(shards)
