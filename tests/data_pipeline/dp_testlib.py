"""Helpers shared by the data_pipeline tests (importable: this folder is on sys.path under pytest).

Small and explicit: readers over tiny shard sets, hand-built tar files for fault injection,
and the raw metadata of a shard directory read straight from the tar files (no reader involved).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.shard_io import (
    BAD_JSON, DUPLICATE_KEY, EMPTY_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, TRUNCATED_TAR, UNDECODABLE_IMAGE,
)
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_reader import ShardReader

# Every sample qualifies (no caption required, no image decoding): the fast spec for order tests.
SPEC_ALL = SampleSpec(GroundTruthAccess.NONE, image=False)
# What a training stage reads: image + alt text, no ground truth.
SPEC_TXT = SampleSpec(GroundTruthAccess.NONE, captions=("txt",))


def key_collate(batch: list[dict[str, Any]]) -> list[str]:
    return [s["__key__"] for s in batch]


def key_seed_collate(batch: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(key, per-sample seed, shard id) per sample: order, seeds and shard assignment in one value."""
    return [(s["__key__"], s["seed"], s["__shard__"]) for s in batch]


def make_reader(shards: str | Sequence[str], *, workers: int = 0, batch_size: int = 3, seed: int = 0,
                epochs: int | None = 1, spec: SampleSpec = SPEC_ALL, collate: Any = key_collate, rank: int = 0,
                world_size: int = 1, drop_last: bool = False, transform: Any = None,
                **options: Any) -> ShardReader:
    extra = {} if transform is None else {"transform": transform}
    return ShardReader(shards, spec=spec, options=ReaderOptions(num_workers=workers, **options),
                       batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, epochs=epochs,
                       collate=collate, drop_last=drop_last, **extra)


def take(reader: ShardReader, n: int) -> list[Any]:
    """The first ``n`` batches of a (fresh or resumed) reader; stops iterating right after batch n."""
    out: list[Any] = []
    if n == 0:
        return out
    for batch in reader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def flat(batches: Iterable[Sequence[Any]]) -> list[Any]:
    return [item for batch in batches for item in batch]


def keys_of(items: Iterable[Any]) -> list[str]:
    """Keys from flat items of key_collate (str) or key_seed_collate (tuples)."""
    return [i if isinstance(i, str) else i[0] for i in items]


def json_roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint gives back: the state as written to and read from JSON."""
    return json.loads(json.dumps(state))


def jpeg_bytes(width: int = 12, height: int = 8, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def good_members(key: str, caption: str | None = None) -> list[tuple[str, bytes]]:
    """A well-formed img2dataset-like sample: KEY.jpg, KEY.json, KEY.txt (webdataset's sorted order)."""
    caption = f"caption of {key}" if caption is None else caption
    meta = {"key": key, "caption": caption, "status": "success"}
    return [(f"{key}.jpg", jpeg_bytes()), (f"{key}.json", json.dumps(meta).encode()), (f"{key}.txt", caption.encode())]


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members in this order (duplicates allowed), fixed mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    return path


def member_layout(path: Path) -> list[tarfile.TarInfo]:
    """The members of a complete tar file with their byte offsets (header and data)."""
    with tarfile.open(path) as tar:
        return tar.getmembers()


def read_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a complete tar file, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def raw_metadata(shard_dir: Path) -> dict[str, dict[str, Any]]:
    """key -> the sample's json, read straight from the tar files of a directory (no reader)."""
    out: dict[str, dict[str, Any]] = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        for name, data in read_members(shard):
            if name.endswith(".json"):
                out[name.split(".", 1)[0]] = json.loads(data)
    return out


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header announces width x height pixels (a decompression bomb's header; the
    file itself is ~60 bytes: nothing may try to decode it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def fault_members() -> list[tuple[str, bytes]]:
    """One sample of every failure kind between good ones (k0, k3, k6, k7), as tar members."""
    return [
        *good_members("k0"),
        ("k1.jpg", b"\xff\xd8 not really a jpeg"), ("k1.txt", b"garbage"),
        ("k2.jpg", b""), ("k2.txt", b"zero bytes"),
        *good_members("k3"),
        ("k0.txt", b"the same key again"),
        ("k4.txt", b"no image at all"),
        ("k5.jpg", jpeg_bytes()), ("k5.json", b"[1, 2"),
        ("k8.png", huge_png()), ("k8.txt", b"20000 x 20000"),
        *good_members("k6"),
        *good_members("k7"),
    ]


def fault_shard(path: Path) -> tuple[Path, dict[str, str]]:
    """`fault_members` in a shard cut inside its last sample's image. Returns it and {key: reason}
    of the expected failures (k0's duplicate group included)."""
    full = write_tar(path.with_suffix(".full"), fault_members())
    k7_jpg = next(m for m in member_layout(full) if m.name == "k7.jpg")
    path.write_bytes(full.read_bytes()[: k7_jpg.offset_data + 40])  # cut inside k7.jpg's data
    full.unlink()
    return path, {"k1": UNDECODABLE_IMAGE, "k2": EMPTY_IMAGE, "k0": DUPLICATE_KEY,
                  "k4": MISSING_IMAGE, "k5": BAD_JSON, "k8": IMAGE_TOO_LARGE, "k7": TRUNCATED_TAR}


def pid_collate(batch: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(worker pid, its parent's pid) per sample: which process read it, and who started that process."""
    return [(os.getpid(), os.getppid()) for _ in batch]
