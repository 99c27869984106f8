"""`recap train-eval-clip` (toy): train the judges of `recap evaluate` on held-out ground truth.

The paper judges prompt following with CLIP ViT-B/32 (CLIP score) and BLIP-VQA (T2I-CompBench
attribute binding). Neither knows the toy world, so the pipeline trains its own:

- a small open_clip CLIP, contrastive loss (open_clip's ClipLoss), on real held-out images and
  their ground-truth DSC;
- the attribute probe (models/attribute_probe.py) on the same images and their ground truth.

Both learn from ``train_eval_clip.train`` (held-out shards) plus ``extra_scenes`` more held-out
scenes rendered in memory (the held-out split's scenes after the ones written to shards: the
judges need more than one shard of data, and no other stage ever sees these). Their accuracy is
then measured on the real images of ``train_eval_clip.test``, the shards evaluate prompts from:
CLIP top-1 retrieval among ``retrieval_candidates`` pairs (both ways), CLIP score of matched vs
mismatched pairs, and the probe's per-attribute accuracy against the majority-class baseline.

Reads: seed, data.reader, data.toy, train_eval_clip, logger.
Writes: <run_dir>/clip/ (open_clip folder: open_clip_config.json + open_clip_model.safetensors,
loadable with ``open_clip.create_model("local-dir:<run_dir>/clip")``), probe/ (probe.safetensors +
probe.json), each with judge_accuracy.json (its numbers on the test images); judges.json,
metrics.jsonl, summary.json. A plain loop (no checkpoints): the stage takes about a minute.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from data_pipeline.options import ReaderOptions, ToyDataOptions
from data_pipeline.toy_shards import make_sample
from models.attribute_probe import (
    ATTRIBUTES, CLASSES, AttributeProbe, ProbeSpec, binding_accuracy, majority_classes, mirror_scenes, predict,
    probe_loss, save_probe, varying_attributes,
)
from models.clip_score import pair_scores, retrieval_top1, score_matrix, to_clip_input, tokenize_references
from train.config.evaluation import TrainEvalClipConfig
from train.config.experiment import ExperimentConfig
from train.config.typed import ConfigError
from train.evaluation.clip_judge import MEAN, STD, build_clip, export_clip, write_judge_accuracy
from train.evaluation.heldout import JudgeItem, read_items
from train.outputs.run_logging import (MetricsLogger, config_snapshot, finish_stage, progress, setup_logging,
                                       write_config_snapshot)
from train.runtime.placement import inference_placement
from train.runtime.processes import seed_everything
from train.training.optimization import build_optimizer, build_scheduler

STAGE = "train_eval_clip"
CLIP_DIR, PROBE_DIR = "clip", "probe"


@dataclass
class JudgeData:
    """Held-out scenes in memory: pixels at each judge's input size (uint8), the ground-truth
    DSC and the probe's targets."""

    clip_pixels: torch.Tensor  # (N, 3, clip size, clip size) uint8
    probe_pixels: torch.Tensor  # (N, 3, probe size, probe size) uint8
    captions: list[str]
    targets: dict[str, torch.Tensor]  # attribute -> (N,) int64

    def __len__(self) -> int:
        return len(self.captions)


def stack_items(items: list[tuple[np.ndarray, np.ndarray, str, dict[str, int]]]) -> JudgeData:
    """JudgeItem outputs -> one JudgeData."""
    targets = [t for *_, t in items]
    return JudgeData(torch.from_numpy(np.stack([c for c, *_ in items])),
                     torch.from_numpy(np.stack([p for _, p, *_ in items])),
                     [caption for _, _, caption, _ in items],
                     {name: torch.tensor([t[name] for t in targets], dtype=torch.long) for name in ATTRIBUTES})


def _render(job: tuple[ToyDataOptions, int, JudgeItem]) -> tuple[np.ndarray, np.ndarray, str, dict[str, int]]:
    options, index, item = job
    key, members, meta = make_sample(options.seed, "heldout", index, index // options.samples_per_shard, options)
    image = Image.open(io.BytesIO(members["jpg"]))  # the JPEG bytes make-toy-data would write for this index
    return item({"__key__": key, "json": meta, "image": image})


def render_extra_scenes(options: ToyDataOptions, count: int, item: JudgeItem) -> list[Any]:
    """``count`` held-out scenes past the written shards (indices heldout_shards x samples_per_shard
    onwards), rendered in ``options.processes`` processes. Call before torch starts its threads
    (the workers are forked)."""
    first = options.heldout_shards * options.samples_per_shard
    jobs = [(options, first + i, item) for i in range(count)]
    if options.processes == 1 or count < 64:
        return [_render(job) for job in jobs]
    with get_context("fork").Pool(options.processes) as pool:
        return pool.map(_render, jobs, chunksize=32)


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 at the CLIP's input size -> its input (OpenAI mean/std), as evaluate does."""
    return to_clip_input(pixels.float() / 255, pixels.shape[-1], MEAN, STD)


def train_judges(clip: open_clip.CLIP, probe: AttributeProbe, data: JudgeData, tokens: torch.Tensor,
                 tc: TrainEvalClipConfig, metrics: MetricsLogger, *, seed: int, log_every: int,
                 show_progress: bool) -> dict[str, float]:
    """The CLIP for ``tc.steps`` steps and the probe for ``tc.probe.steps`` (null: the same), on the
    same batches (a fresh permutation per epoch). Returns the mean losses of each judge's last 10 steps."""
    device = next(clip.parameters()).device
    contrastive = open_clip.ClipLoss()
    steps = {"clip_loss": tc.steps, "probe_loss": tc.probe.steps or tc.steps}
    optimizers = [build_optimizer(m.parameters(), tc.optimizer) for m in (clip, probe)]
    schedulers = [build_scheduler(o, tc.optimizer, n) for o, n in zip(optimizers, steps.values())]
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    recent: dict[str, list[float]] = {"clip_loss": [], "probe_loss": []}
    clip.train(), probe.train()
    total = max(steps.values())
    for step in progress(range(1, total + 1), desc=STAGE, unit="step", enabled=show_progress):
        if len(order) < tc.global_batch_size:
            order = torch.randperm(len(data), generator=generator)
        batch, order = order[: tc.global_batch_size], order[tc.global_batch_size:]
        flip = (torch.rand(len(batch), generator=generator) < 0.5).to(device) if tc.probe.hflip else None
        losses = {}
        if step <= steps["clip_loss"]:
            image_features, text_features, scale = clip(_normalize(data.clip_pixels[batch].to(device)),
                                                        tokens[batch].to(device))  # (B, D) each, normalised
            losses["clip_loss"] = contrastive(image_features, text_features, scale)
        if step <= steps["probe_loss"]:
            probe_pixels = data.probe_pixels[batch].to(device).float() / 255
            probe_targets = {name: data.targets[name][batch].to(device) for name in probe.spec.attributes}
            if flip is not None:
                probe_pixels, probe_targets = mirror_scenes(probe_pixels, probe_targets, flip)
            losses["probe_loss"] = probe_loss(probe(probe_pixels), probe_targets)
        for model, optimizer, scheduler, name in zip((clip, probe), optimizers, schedulers, steps):
            if name not in losses:
                continue
            optimizer.zero_grad(set_to_none=True)
            losses[name].backward()
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
        for name, loss in losses.items():
            recent[name] = (recent[name] + [loss.item()])[-10:]
        if step % log_every == 0 or step == total:
            first = list(steps).index(next(iter(losses)))  # the first judge still training gives the lr
            metrics.log(step, {**{name: recent[name][-1] for name in losses},
                               "lr": schedulers[first].get_last_lr()[0]})
    clip.eval(), probe.eval()
    return {name: round(sum(v) / len(v), 4) for name, v in recent.items()}


@torch.no_grad()
def measure_judges(clip: open_clip.CLIP, probe: AttributeProbe, data: JudgeData, tokens: torch.Tensor,
                   candidates: int) -> dict[str, Any]:
    """The judges on real images: CLIP retrieval top-1 among ``candidates`` pairs (consecutive
    groups; a last incomplete group is left out) and mean CLIP score of matched pairs and of each
    image with the next sample's caption; the probe's accuracy and the majority-class baseline."""
    device = next(clip.parameters()).device
    images = torch.cat([clip.encode_image(_normalize(data.clip_pixels[i: i + 64].to(device)))
                        for i in range(0, len(data), 64)])
    texts = torch.cat([clip.encode_text(tokens[i: i + 64].to(device)) for i in range(0, len(data), 64)])
    n = min(candidates, len(data))
    groups = [retrieval_top1(score_matrix(images[i: i + n], texts[i: i + n])) for i in range(0, len(data) - n + 1, n)]
    chunks = [predict(probe, data.probe_pixels[i: i + 64].to(device).float() / 255) for i in range(0, len(data), 64)]
    predicted = {name: torch.cat([c[name] for c in chunks]) for name in probe.spec.attributes}
    majority = {name: torch.full_like(data.targets[name], probe.spec.majority[name]) for name in probe.spec.attributes}
    return {
        "samples": len(data),
        "clip": {
            "retrieval_candidates": n, "chance": round(1 / n, 4), "retrieval_groups": len(groups),
            "image_to_text_top1": round(float(np.mean([g[0] for g in groups])), 4),
            "text_to_image_top1": round(float(np.mean([g[1] for g in groups])), 4),
            "clip_score_matched": round(pair_scores(images, texts).mean().item(), 3),
            "clip_score_mismatched": round(pair_scores(images, texts.roll(-1, dims=0)).mean().item(), 3),
        },
        "probe": {"accuracy": _rounded(binding_accuracy(predicted, data.targets)),
                  "majority_baseline": _rounded(binding_accuracy(majority, data.targets))},
    }


def probe_spec(tc: TrainEvalClipConfig, targets: dict[str, torch.Tensor]) -> ProbeSpec:
    """The probe's architecture, with heads for the attributes that vary in the training ``targets``."""
    attributes = varying_attributes(targets)
    if not attributes:
        raise ConfigError(f"{STAGE}.train", "every training scene has the same attributes: nothing for the probe to learn")
    return ProbeSpec(image_size=tc.probe.image_size, channels=tuple(tc.probe.channels), stem=tc.probe.stem,
                     attributes=attributes,
                     classes={name: CLASSES[name] for name in attributes},
                     majority=majority_classes({name: targets[name] for name in attributes}))


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in scores.items()}


def load_judge_data(tc: TrainEvalClipConfig, toy: ToyDataOptions | None, reader: ReaderOptions,
                    seed: int) -> tuple[JudgeData, JudgeData, int]:
    """(training scenes, test images, how many training scenes were rendered). The extra scenes
    are rendered first: their worker processes are forked before torch starts its thread pools."""
    if tc.extra_scenes and toy is None:
        raise ConfigError(f"{STAGE}.extra_scenes", "renders toy scenes, but data.toy is not set (not the toy "
                          "world); set it to 0")
    item = JudgeItem(_square(tc.clip["vision_cfg"].get("image_size", 224)), tc.probe.image_size)
    extra = render_extra_scenes(toy, tc.extra_scenes, item) if tc.extra_scenes else []
    fix = "Run `recap make-toy-data` first, or point it at held-out toy shards (with ground truth)"
    train = read_items(tc.train, f"{STAGE}.train", item, reader=reader, seed=seed, fix=fix)
    test = read_items(tc.test, f"{STAGE}.test", item, reader=reader, seed=seed, fix=fix)
    return stack_items(train + extra), stack_items(test), len(extra)


def export_judges(clip: open_clip.CLIP, probe: AttributeProbe, clip_config: dict[str, Any], trust: dict[str, Any],
                  run_dir: Path) -> tuple[Path, Path]:
    """clip/ and probe/ under ``run_dir``, each with its own numbers (judge_accuracy.json), and judges.json."""
    clip_dir = export_clip(clip.cpu(), clip_config, run_dir / CLIP_DIR)
    probe_dir = save_probe(probe.cpu(), run_dir / PROBE_DIR)
    for folder, judge in ((clip_dir, "clip"), (probe_dir, "probe")):
        write_judge_accuracy(folder, {k: trust[k] for k in ("samples", "test_shards", judge)})
    (run_dir / "judges.json").write_text(json.dumps(trust, indent=2) + "\n")
    return clip_dir, probe_dir


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Train both judges on held-out ground truth, measure them on the test shards, export them."""
    tc = cfg.train_eval_clip
    log = setup_logging(run_dir, STAGE)
    write_config_snapshot(run_dir, cfg)
    train, test, rendered = load_judge_data(tc, cfg.data.toy, cfg.data.reader, cfg.seed)
    log.info("%s: %d training scenes (%d rendered, the rest from %s), %d test images from %s", STAGE, len(train),
             rendered, tc.train, len(test), tc.test)

    device, _ = inference_placement(cfg.runtime)  # fp32 (as before): bf16 only where measured
    seed_everything(cfg.seed)
    clip = build_clip(tc.clip, f"{STAGE}.clip").to(device)
    probe = AttributeProbe(probe_spec(tc, train.targets)).to(device)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)
    train_tokens = tokenize_references(tokenizer, train.captions, clip.context_length)  # (N, context)
    test_tokens = tokenize_references(tokenizer, test.captions, clip.context_length)

    metrics = MetricsLogger(run_dir, cfg.logger, stage=STAGE, run_name=cfg.run.name, config=config_snapshot(cfg))
    losses = train_judges(clip, probe, train, train_tokens, tc, metrics, seed=cfg.seed,
                          log_every=cfg.logger.log_every_steps, show_progress=cfg.logger.progress)
    trust = {**measure_judges(clip, probe, test, test_tokens, tc.retrieval_candidates), "test_shards": tc.test}
    clip_dir, probe_dir = export_judges(clip, probe, tc.clip, trust, run_dir)
    c, p = trust["clip"], trust["probe"]
    log.info("judges on %d real test images: CLIP top-1 among %d image->text %.3f, text->image %.3f (chance %.3f); "
             "CLIP score matched %.1f vs mismatched %.1f; probe accuracy %s (majority baseline %s)", len(test),
             c["retrieval_candidates"], c["image_to_text_top1"], c["text_to_image_top1"], c["chance"],
             c["clip_score_matched"], c["clip_score_mismatched"], p["accuracy"], p["majority_baseline"])
    summary = {"train_scenes": len(train), "rendered_scenes": rendered, "test_images": len(test), "steps": tc.steps,
               "probe_steps": tc.probe.steps or tc.steps,
               **losses, **{k if k.startswith("clip_") else f"clip_{k}": v for k, v in c.items()},
               **{f"probe_{k}": v for k, v in p["accuracy"].items()},
               **{f"probe_majority_{k}": v for k, v in p["majority_baseline"].items()},
               "clip": str(clip_dir), "probe": str(probe_dir)}
    metrics.close(summary)
    finish_stage(run_dir, "train-eval-clip", summary)
    return summary


def _square(size: int | list[int]) -> int:
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ConfigError(f"{STAGE}.clip", f"vision_cfg.image_size must be square, got {list(size)}")
    return size[0]
