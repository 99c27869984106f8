"""Recaptioning on disk: which shards a rank owns, what is done, and the per-shard files.

One output shard per input shard, same file name, under the output directory:

    <out>/00042.tar              every input member byte-for-byte, plus KEY.<caption key>.txt,
                                 and KEY.json with a "recaption" object (the caption lineage)
    <out>/00042.recaption.json   the shard's stats; written last, it marks the shard done

A shard is written under a temporary name and renamed when complete; the stats file follows
it (also atomically). A shard without its stats file is not done and is redone from its
first sample, so a killed job leaves nothing half-done behind and a rerun produces the same
bytes. This module knows nothing of models or processes: the stage (train/stages/recaption.py)
captions the batches that `ShardBatches` yields and writes them with `ShardOutput`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import shard_io
from data_pipeline.cross_shard_keys import CrossShardKeys
from data_pipeline.workers import die_with_parent, leave_signals_to_parent

STATS_SUFFIX = ".recaption.json"
LINEAGE_FIELD = "recaption"  # the json field that records which captioner wrote which key
CAPTION_MEMBER = "{key}.txt"  # KEY.dsc.txt
STATS_VERSION = 1


def assign_shards(count: int, rank: int, world_size: int) -> list[int]:
    """Indices of the shards (of ``count``, in list order) that ``rank`` of ``world_size`` owns:
    every ``world_size``-th one from ``rank``. Disjoint and complete for any world size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return list(range(rank, count, world_size))


def stats_path(shard: Path, suffix: str = STATS_SUFFIX) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + suffix)


def read_stats(shard: Path, suffix: str = STATS_SUFFIX) -> dict[str, Any] | None:
    """The stats of a done shard (its output and stats file both present), else None."""
    path = stats_path(shard, suffix)
    if not (path.is_file() and shard.is_file()):
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None  # a damaged stats file: the shard is redone


def output_keys(shard: Path) -> set[str]:
    """Keys in a (complete) output shard."""
    with open(shard, "rb") as f:
        return {raw.key for raw in shard_io.iter_raw_samples(f) if isinstance(raw, shard_io.RawSample)}


@dataclass(frozen=True)
class ShardTask:
    """One input shard to (re)caption.

    ``keep`` names keys already captioned in an existing output (``only_failures`` reruns):
    they are copied from ``previous`` instead of being captioned again. ``stats_suffix`` names
    the done marker (another per-shard job, such as `recap cache`, has its own).
    """

    index: int
    url: str
    output: Path
    keep: frozenset[str] = frozenset()
    previous: Path | None = None
    stats_suffix: str = STATS_SUFFIX

    @property
    def stats(self) -> Path:
        return stats_path(self.output, self.stats_suffix)


@dataclass
class ShardBatch:
    """Up to batch_size decoded samples of one shard, in shard order, and what else happened
    since the previous batch of that shard.

    ``samples``: (key, members) to write, captioned from ``images`` (transform name -> the
    collated transform outputs, (B,3,H,W) by default) in the same order. ``copied``: (key, members) from a previous output, written as they are,
    before ``samples``. ``failures``: {"key", "reason", "detail"} entries. ``last``: the shard
    has no more batches; ``input_samples`` is then its total count of sample groups read.
    """

    task: ShardTask
    number: int
    samples: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    images: dict[str, Any] = field(default_factory=dict)
    copied: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    last: bool = False
    input_samples: int = 0


def _failure(key: str | None, reason: str, detail: str = "", offset: int | None = None) -> dict[str, Any]:
    return {"key": key, "reason": reason, "detail": detail, "offset": offset}


def _check_image(raw: shard_io.RawSample, max_pixels: int) -> tuple[Any, dict[str, Any] | None]:
    """(PIL image, None) or (None, failure) for one sample group."""
    if raw.fault:
        detail = "a later group with a key seen before in this shard" if raw.fault == shard_io.DUPLICATE_KEY \
            else "the shard ends inside this sample"
        return None, _failure(raw.key, raw.fault, detail, raw.offset)
    ext = shard_io.image_member(raw.members)
    if ext is None:
        return None, _failure(raw.key, shard_io.MISSING_IMAGE, f"members: {', '.join(sorted(raw.members))}", raw.offset)
    if not raw.members[ext]:
        return None, _failure(raw.key, shard_io.EMPTY_IMAGE, f"{raw.key}.{ext} has 0 bytes", raw.offset)
    if "json" in raw.members and shard_io.decode_json(raw.members["json"]) is None:
        return None, _failure(raw.key, shard_io.BAD_JSON, f"{raw.key}.json is not a JSON object", raw.offset)
    try:
        return shard_io.decode_image(raw.members[ext], max_pixels), None
    except shard_io.ImageTooLarge as exc:
        return None, _failure(raw.key, shard_io.IMAGE_TOO_LARGE, str(exc)[:200], raw.offset)
    except ValueError as exc:
        return None, _failure(raw.key, shard_io.UNDECODABLE_IMAGE, str(exc)[:200], raw.offset)


def _previous_samples(task: ShardTask) -> dict[str, dict[str, bytes]]:
    if task.previous is None or not task.keep:
        return {}
    with open(task.previous, "rb") as f:
        return {raw.key: raw.members for raw in shard_io.iter_raw_samples(f)
                if isinstance(raw, shard_io.RawSample) and raw.key in task.keep and not raw.fault}


class ShardBatches(IterableDataset):
    """Batches of decoded, preprocessed images per shard; runs in DataLoader workers.

    Worker w of W takes tasks w, w+W, ...: a shard is read by one worker from start to end, so
    its batches (and therefore its captions) are the same on every run whatever else runs.
    ``transforms`` maps a name to a PIL -> tensor transform; every image goes through each, and
    ``collate`` joins a batch's outputs (``torch.stack``; ``list`` for outputs of varying size).
    """

    def __init__(self, tasks: Sequence[ShardTask], transforms: dict[str, Callable[[Any], Any]],
                 batch_size: int, collate: Callable[[list[Any]], Any] = torch.stack,
                 max_image_pixels: int = shard_io.DEFAULT_MAX_IMAGE_PIXELS) -> None:
        super().__init__()
        self.tasks, self.transforms, self.batch_size, self.collate = list(tasks), transforms, batch_size, collate
        self.max_image_pixels = max_image_pixels

    def __iter__(self) -> Iterator[ShardBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for task in self.tasks[worker::workers]:
            yield from self._shard(task)

    def _shard(self, task: ShardTask) -> Iterator[ShardBatch]:
        previous = _previous_samples(task)
        number, batch, pil = 0, ShardBatch(task, 0), []
        count = 0
        try:
            stream = shard_io.open_shard(task.url)
        except OSError as exc:
            batch.failures.append(_failure(None, shard_io.UNREADABLE_SHARD, str(exc)[:200]))
            batch.last = True
            yield batch
            return
        with stream:
            for raw in shard_io.iter_raw_samples(stream, report_cut=True):
                if raw == shard_io.NOT_A_TAR:
                    batch.failures.append(_failure(None, shard_io.NOT_A_TAR, shard_io.NOT_A_TAR_DETAIL))
                elif raw == shard_io.TRUNCATED_TAR and count == 0:  # an empty file: as the reader counts it
                    batch.failures.append(_failure(None, shard_io.TRUNCATED_TAR, "the shard ends before its first sample"))
                if isinstance(raw, str):  # TRUNCATED_TAR after a sample: its key was reported just before
                    continue
                count += 1
                if raw.key in previous and not raw.fault:
                    if pil:  # copies go before a batch's captioned samples: close it to keep shard order
                        yield self._finish(batch, pil)
                        number += 1
                        batch, pil = ShardBatch(task, number), []
                    batch.copied.append((raw.key, previous.pop(raw.key)))
                    continue
                image, failure = _check_image(raw, self.max_image_pixels)
                if failure is not None:
                    batch.failures.append(failure)
                    continue
                batch.samples.append((raw.key, raw.members))
                pil.append(image)
                if len(pil) == self.batch_size:
                    yield self._finish(batch, pil)
                    number += 1
                    batch, pil = ShardBatch(task, number), []
        batch.last, batch.input_samples = True, count
        yield self._finish(batch, pil)

    def _finish(self, batch: ShardBatch, pil: list[Any]) -> ShardBatch:
        if pil:
            batch.images = {name: self.collate([t(img) for img in pil]) for name, t in self.transforms.items()}
        return batch


def batch_loader(tasks: Sequence[ShardTask], transforms: dict[str, Callable[[Any], Any]], *,
                 batch_size: int, num_workers: int, collate: Callable[[list[Any]], Any] = torch.stack,
                 max_image_pixels: int = shard_io.DEFAULT_MAX_IMAGE_PIXELS) -> DataLoader:
    """A DataLoader over ``ShardBatches``: decoding and preprocessing happen in its workers."""
    workers = min(num_workers, len(tasks))
    return DataLoader(ShardBatches(tasks, transforms, batch_size, collate, max_image_pixels), batch_size=None,
                      num_workers=workers,
                      prefetch_factor=4 if workers else None, worker_init_fn=_init_worker if workers else None)


def _init_worker(worker_id: int) -> None:
    die_with_parent()
    leave_signals_to_parent()  # a preempted job's signal is the main process's to handle (stop between batches)


def with_lineage(members: dict[str, bytes], captions: dict[str, str], lineage: dict[str, Any]) -> dict[str, bytes]:
    """The output members of one sample: the input's, the new caption members, and the json
    (the input's fields unchanged, plus ``"recaption": lineage``; created when absent)."""
    out = dict(members)
    for key, text in captions.items():
        out[CAPTION_MEMBER.format(key=key)] = text.encode("utf-8")
    meta = shard_io.decode_json(members["json"]) if "json" in members else {}
    meta = {**(meta or {}), LINEAGE_FIELD: lineage}
    out["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return out


class ShardOutput:
    """The output of one shard while it is written: samples in, then `commit_shard` renames the
    shard into place and, last, `write_stats` writes its stats file."""

    def __init__(self, task: ShardTask) -> None:
        self.task = task
        self.writer = shard_io.AtomicShardWriter(task.output)
        self.failures: list[dict[str, Any]] = []
        self.keys: list[str] = []  # written, in order: for counting keys across shards
        self.captioned = self.copied = 0
        self.started = time.perf_counter()

    def add(self, batch: ShardBatch, captioned: list[dict[str, bytes]]) -> None:
        """Write a batch: its copied samples, then its captioned ones (``captioned`` in order)."""
        for key, members in batch.copied:
            self.writer.write(key, members)
        for (key, _), members in zip(batch.samples, captioned, strict=True):
            self.writer.write(key, members)
        self.keys.extend(key for key, _ in batch.copied)
        self.keys.extend(key for key, _ in batch.samples)
        self.copied += len(batch.copied)
        self.captioned += len(batch.samples)
        self.failures.extend(batch.failures)

    def commit_shard(self) -> None:
        """Rename the complete shard into place (not done yet: `write_stats` marks it)."""
        # A rewrite (only_failures) drops the old marker first: a kill before the new one
        # lands leaves the shard not done, to be redone whole.
        self.task.stats.unlink(missing_ok=True)
        self.writer.commit()

    def write_stats(self, batch: ShardBatch, extra: dict[str, Any]) -> dict[str, Any]:
        """Write the shard's stats file, the done marker, after `commit_shard`; returns them."""
        seconds = time.perf_counter() - self.started
        stats = {
            "version": STATS_VERSION,
            "input": shard_io.shard_name(self.task.url),
            "input_samples": batch.input_samples,
            "written": self.captioned + self.copied,
            "captioned": self.captioned,
            "copied_from_previous": self.copied,
            "failures": self.failures,
            "failures_by_reason": dict(sorted(Counter(f["reason"] for f in self.failures).items())),
            "seconds": round(seconds, 3),
            "images_per_s": round(self.captioned / seconds, 2) if seconds > 0 else 0.0,
            **extra,
        }
        shard_io.write_json_atomic(self.task.stats, stats)
        return stats

    def abort(self) -> None:
        self.writer.abort()


SHARD_FAILURES = (shard_io.UNREADABLE_SHARD, shard_io.NOT_A_TAR)  # nothing of the shard could be read


class Stopped(Exception):
    """`write_all` left between two batches because its ``stop()`` said so. ``done``: shards
    completed (written and marked done) before that; ``abandoned``: the input shards that were in
    progress, whose partial outputs were removed (not done: a rerun writes them from the start)."""

    def __init__(self, done: int, abandoned: list[str]) -> None:
        super().__init__(f"stopped after {done} shard(s); abandoned: {', '.join(abandoned) or 'none'}")
        self.done, self.abandoned = done, abandoned


def write_all(loader: Any, process: Callable[[ShardBatch], list[dict[str, bytes]]], extra: dict[str, Any], *,
              bar: Any, total_tasks: int, on_batch: Callable[[int], None] | None = None,
              on_shard: Callable[[int], None] | None = None,
              seen: CrossShardKeys | None = None,
              stop: Callable[[], bool] | None = None) -> tuple[Counter, Counter, dict[str, str]]:
    """Write every task's output shard from ``loader``'s batches (batches of several shards
    interleave; each shard's come in order). ``process(batch)`` gives each sample's output
    members; ``extra`` goes into every stats file; ``on_batch(n)``/``on_shard(n)`` are
    failpoints after the n-th batch written and between the n-th shard's rename and its stats;
    ``seen`` gets each done shard's keys (counting keys written to several shards).
    Returns (totals: shards, images, copied; failures by reason; {input shard: "reason: detail"} of
    the shards that could not be read at all, which are neither written nor marked done, so a
    rerun tries them again). An error leaves no partial file. ``stop()`` is asked before each batch
    is processed (and before the first): when it answers True, the shards in progress are abandoned
    and `Stopped` is raised (a preempted job leaves only done shards behind).
    """
    open_shards: dict[int, ShardOutput] = {}
    totals: Counter = Counter()
    reasons: Counter = Counter()
    failed: dict[str, str] = {}
    written = 0
    try:
        for batch in loader:
            if stop is not None and stop():
                urls = {o.task.url for o in open_shards.values()} | {batch.task.url}
                raise Stopped(totals["shards"], sorted(shard_io.shard_name(u) for u in urls))
            if batch.task.index not in open_shards:
                open_shards[batch.task.index] = ShardOutput(batch.task)
            output = open_shards[batch.task.index]
            output.add(batch, process(batch))
            bar.update(len(batch.samples) + len(batch.copied))
            written += 1
            if on_batch is not None:
                on_batch(written)
            if batch.last and (lost := [f for f in output.failures if f["reason"] in SHARD_FAILURES]):
                output.abort()
                del open_shards[batch.task.index]
                failed[shard_io.shard_name(batch.task.url)] = f"{lost[0]['reason']}: {lost[0]['detail']}"
                reasons.update(f["reason"] for f in lost)
                bar.set_postfix(shards=f"{totals['shards']}/{total_tasks}", failed=sum(reasons.values()))
            elif batch.last:
                output.commit_shard()
                if on_shard is not None:
                    on_shard(totals["shards"] + 1)
                stats = output.write_stats(batch, extra)
                if seen is not None:
                    seen.add_shard(batch.task.output.name, output.keys)
                del open_shards[batch.task.index]
                totals.update(shards=1, images=stats["captioned"], copied=stats["copied_from_previous"])
                reasons.update(stats["failures_by_reason"])
                bar.set_postfix(shards=f"{totals['shards']}/{total_tasks}", failed=sum(reasons.values()))
    finally:
        for output in open_shards.values():
            output.abort()
        bar.close()
    return totals, reasons, failed


def expected_samples(url: str) -> int | None:
    """Samples an img2dataset (or toy) shard holds per its ``NAME_stats.json``, if present."""
    if not shard_io.is_local(url):
        return None
    path = Path(url)
    stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
    try:
        value = json.loads(stats.read_text()).get("successes")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None
