"""Reading held-out shards with EVALUATION ground-truth access: only the evaluation stages do.

One reader path (`heldout_batches` streams, `read_items` collects) and what each evaluation stage
makes of a held-out sample:

- `JudgeItem` (train-eval-clip): pixels at each judge's input size, the toy ground-truth DSC and
  the probe's targets;
- `EvalItem` / `read_prompted` (evaluate): real pixels, the alt-text and the DSC reference the
  model is prompted with, the probe's targets;
- `CaptionerEvalItem` (evaluate-captioner): the captioner's input image, the alt-text and the
  ground truth its captions are scored against.

Pixels cross the reader's worker processes as numpy arrays, not tensors (see `square_pixels`);
every item class is picklable (the reader's workers run it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.options import ReaderOptions
from data_pipeline.recaption import LINEAGE_FIELD
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError, list_shards
from data_pipeline.shard_reader import ShardReader
from models.attribute_probe import ATTRIBUTES, probe_targets
from train.config.evaluation import EvaluateConfig
from train.config.typed import ConfigError

DSC_MEMBER, GT_DSC = "dsc.txt", "json.gt_dsc"  # the DSC reference: recaption's member, else toy ground truth
EMPTY_DSC = "empty"  # recaptioned, but the DSC captioner wrote nothing (it stopped at once)
SOURCE_NAMES = {DSC_MEMBER: "dsc.txt", GT_DSC: "gt_dsc", EMPTY_DSC: "empty dsc.txt"}
PROMPT_TEXTS = ("txt", DSC_MEMBER, GT_DSC)  # alt-text and both DSC references ("" when a sample lacks one)


def square_pixels(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> (3, size, size) uint8 array, squashed (bicubic): the whole scene, as evaluate
    sees it. numpy rather than torch: it crosses process boundaries, where a tensor would go
    through shared memory (several times slower for many small images)."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def _reader(shards: str, transform: Any, *, reader: ReaderOptions, seed: int, batch_size: int,
            texts: tuple[str, ...]) -> ShardReader:
    """One pass over ``shards`` (in the reader's seeded order) with ground-truth access EVALUATION:
    batches are lists of ``transform(sample)``."""
    spec = SampleSpec(GroundTruthAccess.EVALUATION, image=True, optional_texts=texts)
    workers = min(reader.num_workers, len(list_shards(shards)))  # each worker needs a shard of its own
    return ShardReader(shards, spec=spec, options=replace(reader, num_workers=workers), batch_size=batch_size,
                       seed=seed, epochs=1, transform=transform, collate=list)


def heldout_batches(shards: str, key: str, transform: Any, *, reader: ReaderOptions, seed: int, batch_size: int,
                    fix: str, texts: tuple[str, ...] = PROMPT_TEXTS) -> ShardReader:
    """The held-out samples of ``shards`` streamed in batches (lists of ``transform`` outputs).
    ConfigError naming ``key`` and saying ``fix`` when the shards are missing; a sample that
    ``transform`` refuses raises its own error while iterating."""
    try:
        return _reader(shards, transform, reader=reader, seed=seed, batch_size=batch_size, texts=texts)
    except (NoShardsError, ValueError) as exc:
        raise ConfigError(key, f"{exc}. {fix}") from None


def read_items(shards: str, key: str, transform: Any, *, reader: ReaderOptions, seed: int, fix: str,
               limit: int | None = None) -> list[Any]:
    """The first ``limit`` (None: all) samples of ``shards``, decoded by ``transform``, with
    ground-truth access EVALUATION (only evaluation stages read ground truth). ConfigError naming
    ``key`` and saying ``fix`` when the shards are missing or not what ``transform`` needs."""
    items: list[Any] = []
    try:
        batches = _reader(shards, transform, reader=reader, seed=seed, batch_size=32, texts=PROMPT_TEXTS)
        for batch in batches:
            items += batch
            if limit is not None and len(items) >= limit:
                break
    except (NoShardsError, ValueError) as exc:
        raise ConfigError(key, f"{exc}. {fix}") from None
    if not items:
        raise ConfigError(key, f"{shards} holds no readable sample. {fix}")
    return items[:limit]


class JudgeItem:
    """Held-out sample -> (clip pixels, probe pixels, ground-truth DSC, probe targets). Picklable."""

    def __init__(self, clip_size: int, probe_size: int) -> None:
        self.clip_size, self.probe_size = clip_size, probe_size

    def __call__(self, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str, dict[str, int]]:
        meta = sample["json"]
        if not meta.get("gt_dsc") or "objects" not in meta:
            raise ValueError(f"{sample['__key__']}: no toy ground truth (gt_dsc, objects) in its json; "
                             "train-eval-clip needs the toy world's held-out shards")
        image = sample["image"]
        clip_pixels = square_pixels(image, self.clip_size)
        probe_pixels = clip_pixels if self.probe_size == self.clip_size else square_pixels(image, self.probe_size)
        return clip_pixels, probe_pixels, meta["gt_dsc"], probe_targets(meta)


@dataclass
class Prompted:
    """Held-out samples: real pixels (N, 3, size, size) uint8, prompts, probe targets (or None)."""

    pixels: torch.Tensor
    alt_texts: list[str]
    dscs: list[str]
    dsc_sources: dict[str, int]
    targets: dict[str, torch.Tensor] | None


class EvalItem:
    """Held-out sample -> (pixels, alt-text, DSC reference, its source, probe targets or None). Picklable."""

    def __init__(self, size: int, with_targets: bool) -> None:
        self.size, self.with_targets = size, with_targets

    def __call__(self, s: dict[str, Any]) -> tuple[np.ndarray, str, str, str, dict[str, int] | None]:
        source = DSC_MEMBER if s[DSC_MEMBER].strip() else GT_DSC
        dsc = s[source]
        if not dsc.strip():
            # A DSC captioner that stopped at once wrote an empty KEY.dsc.txt (its lineage is in KEY.json):
            # the sample stays in with an empty prompt, as an empty alt-text does. Never recaptioned: an error.
            if "dsc" not in ((s.get("json") or {}).get(LINEAGE_FIELD) or {}):
                raise ValueError(f"{s['__key__']}: no DSC reference (neither KEY.dsc.txt nor a toy gt_dsc)")
            source, dsc = EMPTY_DSC, ""
        targets = None
        if self.with_targets:
            try:
                targets = probe_targets(s["json"])
            except ValueError as exc:
                raise ValueError(f"{s['__key__']}: evaluate.probe is set but {exc}") from None
        return square_pixels(s["image"], self.size), s["txt"], dsc, source, targets


def read_prompted(e: EvaluateConfig, reader: ReaderOptions, seed: int, with_targets: bool) -> Prompted:
    """The first ``e.samples`` samples of ``e.input`` (in the reader's seeded order), real images
    squashed to ``e.size``; probe targets from the toy ground truth when ``with_targets``."""
    items = read_items(e.input, "evaluate.input", EvalItem(e.size, with_targets), reader=reader, seed=seed,
                       limit=e.samples,
                       fix="Point evaluate.input at held-out shards with alt-text and a DSC per sample (KEY.dsc.txt "
                       "from `recap recaption`, or toy shards from `recap make-toy-data`); without toy ground truth "
                       "set evaluate.probe=null")
    sources = [src for *_, src, _ in items]
    targets = None
    if with_targets:
        targets = {name: torch.tensor([t[name] for *_, t in items], dtype=torch.long) for name in ATTRIBUTES}
    return Prompted(pixels=torch.from_numpy(np.stack([p for p, *_ in items])), alt_texts=[alt for _, alt, *_ in items],
                    dscs=[dsc for _, _, dsc, *_ in items],
                    dsc_sources={SOURCE_NAMES[k]: sources.count(k) for k in SOURCE_NAMES}, targets=targets)


class CaptionerEvalItem:
    """Held-out sample -> (key, preprocessed image, alt-text, ground truth dict). Picklable when
    ``transform`` is."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, s: dict[str, Any]) -> tuple[str, torch.Tensor, str, dict[str, Any]]:
        meta = s["json"]
        if "objects" not in meta:
            raise ValueError(f"{s['__key__']}: no ground truth ('objects') in its json; evaluate-captioner needs the "
                             "toy world's held-out shards")
        gt = {"objects": meta["objects"], "text": meta.get("text"), "background": meta.get("background"),
              "gt_ssc": meta.get("gt_ssc", ""), "gt_dsc": meta.get("gt_dsc", "")}
        return s["__key__"], self.transform(s["image"]), s["txt"], gt
