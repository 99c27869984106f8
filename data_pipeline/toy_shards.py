"""Write the synthetic scenes as WebDataset shards in the layout img2dataset writes.

Per split directory: ``NNNNN.tar`` holding ``KEY.jpg``, ``KEY.txt`` (alt-text) and ``KEY.json``
(img2dataset's fields plus the ground truth), and ``NNNNN_stats.json`` like img2dataset's.
Keys follow img2dataset: shard id * 10**ceil(log10(samples_per_shard)) + index, zero-padded.
Sample i of a split depends only on (seed, split, i): any process count gives identical bytes.
A shard whose tar and stats both exist is skipped, so an interrupted run continues.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.options import ToyDataOptions
from data_pipeline.shard_io import AtomicShardWriter, write_json_atomic
from data_pipeline.toy_captions import alt_text, descriptive_caption, short_caption
from data_pipeline.toy_scenes import ASPECT_RATIOS, WORLDS, render_scene, sample_scene, scene_ground_truth

SPLITS = {"train": 0, "heldout": 1}
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names 00000.tar ...
DATASET_MARKER = "_toy_dataset.json"


def compute_key(index: int, shard_id: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard_id * 10**oom + index, zero-padded to OOM_SHARD_COUNT + oom digits."""
    oom = math.ceil(math.log10(samples_per_shard))  # img2dataset's oom_sample_per_shard (0 for 1)
    return f"{shard_id * 10**oom + index:0{OOM_SHARD_COUNT + oom}d}"


def make_sample(seed: int, split: str, index: int, shard_id: int, options: ToyDataOptions) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    """One toy sample: (key, tar members, metadata). Deterministic in (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    world = WORLDS[options.world]
    scene = sample_scene(rng, text_probability=options.text_probability, world=world)
    buf = io.BytesIO()
    render_scene(scene).save(buf, format="JPEG", quality=options.jpeg_quality)
    jpg = buf.getvalue()
    caption = alt_text(scene, rng)
    key = compute_key(index % options.samples_per_shard, shard_id, options.samples_per_shard)
    meta = {
        "url": f"synthetic://toy-scenes/seed-{seed}/{split}/{index}.jpg",
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": scene.width,
        "height": scene.height,
        "original_width": scene.width,
        "original_height": scene.height,
        "exif": None,
        "sha256": hashlib.sha256(jpg).hexdigest(),
        "gt_ssc": short_caption(scene),
        "gt_dsc": descriptive_caption(scene, rng, world),
        "curated": bool(rng.random() < options.curated_fraction),
        **scene_ground_truth(scene),
    }
    members = {"jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}
    return key, members, meta


@dataclass(frozen=True)
class _ShardJob:
    out_dir: str
    split: str
    shard_id: int
    options: ToyDataOptions


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """Write one shard and its stats; returns counts for the summary."""
    opts, start = job.options, time.time()
    name = f"{job.shard_id:0{OOM_SHARD_COUNT}d}"
    writer = AtomicShardWriter(Path(job.out_dir) / f"{name}.tar")
    counts: Counter = Counter()
    for i in range(opts.samples_per_shard):
        index = job.shard_id * opts.samples_per_shard + i
        key, members, meta = make_sample(opts.seed, job.split, index, job.shard_id, opts)
        writer.write(key, members)
        counts.update({"samples": 1, "curated": int(meta["curated"]), "with_text": int(meta["text"] is not None),
                       "empty_alt_text": int(not meta["caption"].strip()),
                       f"aspect_{aspect_name(meta['width'], meta['height'])}": 1,
                       f"objects_{len(meta['objects'])}": 1})
    writer.commit()
    end = time.time()
    n = opts.samples_per_shard
    stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0, "duration": end - start,
             "start_time": start, "end_time": end, "status_dict": {"success": n}}
    write_json_atomic(Path(job.out_dir) / f"{name}_stats.json", stats)
    return {k: v for k, v in counts.items() if v}


def aspect_name(width: int, height: int) -> str:
    """The nominal aspect ratio ("16:9") nearest to width/height in log space."""
    a, b = min(ASPECT_RATIOS, key=lambda r: abs(math.log(width / height) - math.log(r[0] / r[1])))
    return f"{a}:{b}"


def shard_done(out_dir: Path, shard_id: int) -> bool:
    name = f"{shard_id:0{OOM_SHARD_COUNT}d}"
    return (out_dir / f"{name}.tar").exists() and (out_dir / f"{name}_stats.json").exists()


def check_marker(root: Path, options: ToyDataOptions) -> None:
    """Refuse to mix shards generated with different settings in one directory."""
    marker = root / DATASET_MARKER
    wanted = {k: v for k, v in asdict(options).items() if k != "processes"}
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != wanted:
            diff = ", ".join(f"{k}: {found.get(k)} -> {v}" for k, v in wanted.items() if found.get(k) != v)
            raise ValueError(f"{root} holds toy data generated with other settings ({diff}); delete it or use "
                             "another run.name")
    else:
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, wanted)


def write_toy_dataset(split_dirs: dict[str, Path], options: ToyDataOptions, progress: bool = True,
                      on_shard: Callable[[str, int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write every missing shard of every split in ``split_dirs`` ({"train": dir, "heldout": dir}).

    ``on_shard(split, shard_id, counts)`` is called as each shard completes (in shard order).
    Returns a summary: shards written/skipped, samples, curated count, samples/s, per-split counts.
    """
    from tqdm import tqdm

    for split, d in split_dirs.items():
        check_marker(d, options)
    shards = {"train": options.train_shards, "heldout": options.heldout_shards}
    jobs = [_ShardJob(str(d), split, s, options) for split, d in split_dirs.items() for s in range(shards[split])
            if not shard_done(d, s)]
    skipped = sum(shards[s] for s in split_dirs) - len(jobs)
    totals: dict[str, Counter] = {split: Counter() for split in split_dirs}
    start = time.perf_counter()
    bar = tqdm(total=len(jobs) * options.samples_per_shard, unit="img", desc="make-toy-data", disable=not progress)
    for job, counts in zip(jobs, _map(jobs, options.processes)):
        totals[job.split].update(counts)
        bar.update(options.samples_per_shard)
        if on_shard is not None:
            on_shard(job.split, job.shard_id, counts)
    bar.close()
    elapsed = time.perf_counter() - start
    written = sum(t["samples"] for t in totals.values())
    return {"shards_written": len(jobs), "shards_skipped": skipped, "samples_written": written,
            "seconds": round(elapsed, 3), "samples_per_s": round(written / elapsed, 1) if written else 0.0,
            "splits": {split: dict(sorted(c.items())) for split, c in totals.items()}}


def _map(jobs: list[_ShardJob], processes: int) -> Iterator[dict[str, Any]]:
    """Results in job order (imap keeps order, so summaries are deterministic)."""
    if processes == 1 or len(jobs) <= 1:
        yield from map(_write_shard, jobs)
        return
    # fork: workers inherit the imported modules (spawn would re-import webdataset and with it
    # torch, ~3 s per worker). Safe here: the parent has not started torch's thread pools.
    with get_context("fork").Pool(min(processes, len(jobs))) as pool:
        yield from pool.imap(_write_shard, jobs)


def write_ground_truth_captions(src: Path, out: Path) -> Path:
    """Copy the toy shards in ``src`` to ``out``, adding ``KEY.ssc.txt``/``KEY.dsc.txt`` written from
    each scene's ground-truth captions: the layout `recap recaption` produces, with perfect
    captioners (for tests and benchmarks of the diffusion side, and as an oracle reference)."""
    import tarfile

    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as tin, tarfile.open(out / shard.name, "w") as tout:
            for member in tin.getmembers():
                data = tin.extractfile(member).read()
                tout.addfile(member, io.BytesIO(data))
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    key = member.name[: -len(".json")]
                    for style in ("ssc", "dsc"):
                        text = meta[f"gt_{style}"].encode()
                        info = tarfile.TarInfo(f"{key}.{style}.txt")
                        info.size = len(text)
                        tout.addfile(info, io.BytesIO(text))
        for extra in src.glob(f"{shard.stem}_stats.json"):  # img2dataset's per-shard stats
            (out / extra.name).write_bytes(extra.read_bytes())
    return out
