"""`recap evaluate-captioner`: how much of each picture do alt-text, SSC and DSC captions say?

On held-out toy samples (evaluate_captioner.input, by default evaluate's; EVALUATION access: the
only stage kind that reads ground truth), every captioner in evaluate_captioner.captioners writes a caption per image; those and
the shards' own alt-text are scored by data_pipeline/caption_attributes.py: precision and recall
of the colours, shapes, colour-shape bindings, textures, sizes, positions, object count and
written word they mention, plus mean length. The ground-truth SSC and DSC are scored too: the
DSC row (recall 1.0) shows that the scorer can read everything a caption may say.

Control: every caption is also scored against ANOTHER image's ground truth (the next held-out
sample). What a source gets that way comes from scene statistics, not from looking ("two
shapes", "a gradient background"); recall above it is what the captioner actually sees.

Writes <run_dir>/caption_eval.json (per source: summary + example captions) and prints a table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from data_pipeline.caption_attributes import CaptionScorer, score_table
from models.caption_decoding import decode_text, generate_tokens
from models.captioner import image_transform
from train.captioning.exported import load_captioner
from train.config.captioning import EvaluateCaptionerConfig
from train.config.experiment import ExperimentConfig
from train.config.typed import ConfigError
from train.evaluation.heldout import CaptionerEvalItem, heldout_batches
from train.outputs.run_logging import finish_stage, progress, setup_logging, write_config_snapshot
from train.runtime.placement import inference_placement

EXAMPLES = 8  # captions kept per source for reports
HELDOUT_FIX = "Run `recap make-toy-data` first or point evaluate_captioner.input at held-out shards with ground truth"


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Score every source on up to evaluate_captioner.samples held-out images."""
    e = cfg.evaluate_captioner
    log = setup_logging(run_dir, "evaluate_captioner")
    write_config_snapshot(run_dir, cfg)
    models = {name: load_captioner(path, f"evaluate_captioner.captioners.{name}")
              for name, path in e.captioners.items()}  # name -> (model, its tokenizer)
    device, _ = inference_placement(cfg.runtime)  # fp32 (as before): bf16 only where measured
    transform = _shared_preprocessing([model for model, _ in models.values()], device)
    bar = progress(total=e.samples, desc="evaluate-captioner", unit="img", enabled=cfg.logger.progress)
    batches = heldout_batches(e.input, "evaluate_captioner.input", CaptionerEvalItem(transform), reader=cfg.data.reader,
                              seed=cfg.seed, batch_size=e.batch_size, fix=HELDOUT_FIX, texts=("txt",))
    keys, truths, captions = _caption_heldout(batches, models, e, device, bar)
    bar.close()

    results = {name: {**_score(texts, truths), "other_image": _other_image(texts, truths)}
               for name, texts in captions.items()}
    examples = {name: [{"key": key, "caption": text} for key, text in zip(keys[:EXAMPLES], texts)]
                for name, texts in captions.items()}
    seen = len(keys)
    table = score_table(results)
    (run_dir / "caption_eval.json").write_text(json.dumps(
        {"samples": seen, "results": results, "examples": examples}, indent=2) + "\n")
    log.info("caption quality on %d held-out samples (precision / recall of mentioned attributes):\n%s", seen, table)
    summary = {"samples": seen, **{f"{name}_recall": round(r["overall"]["recall"], 4) for name, r in results.items()},
               **{f"{name}_recall_other_image": round(r["other_image"]["recall"], 4) for name, r in results.items()},
               **{f"{name}_precision": round(r["overall"]["precision"], 4) for name, r in results.items()},
               **{f"{name}_colour_shape_recall": round(r["per_attribute"]["colour_shape"]["recall"], 4)
                  for name, r in results.items()},
               **{f"{name}_{count}": r[count] for name, r in results.items() for count in ("distinct", "stutters")}}
    finish_stage(run_dir, "evaluate-captioner", summary)
    return summary


def _shared_preprocessing(models: list[Any], device: torch.device) -> Any:
    """The image transform of the first captioner, after moving every captioner to ``device``;
    ConfigError when there is none or their image sizes differ (one batch feeds all)."""
    first = next(iter(models), None)
    if first is None:
        raise ConfigError("evaluate_captioner.captioners", "names no captioner to evaluate")
    for model in models:
        model.to(device)
        if model.visual.image_size != first.visual.image_size:
            raise ConfigError("evaluate_captioner.captioners", "captioners with different image sizes")
    return image_transform(first)


def _caption_heldout(batches: Iterable[list[Any]], models: dict[str, tuple[Any, Any]], e: EvaluateCaptionerConfig,
                     device: torch.device, bar: Any) -> tuple[list[str], list[dict[str, Any]], dict[str, list[str]]]:
    """(keys, ground truths, captions) of the first ``e.samples`` (None: all) held-out samples;
    captions maps each source (alt-text, every captioner, gt_ssc, gt_dsc) to one caption per
    sample; ``models``: name -> (captioner, its tokenizer)."""
    keys: list[str] = []
    truths: list[dict[str, Any]] = []
    captions: dict[str, list[str]] = {name: [] for name in ("alt-text", *models, "gt_ssc", "gt_dsc")}
    for batch in batches:
        batch = batch[: None if e.samples is None else e.samples - len(keys)]
        images = torch.stack([img for _, img, _, _ in batch]).to(device)  # (B, 3, S, S)
        keys += [key for key, *_ in batch]
        truths += [gt for *_, gt in batch]
        captions["alt-text"] += [alt for _, _, alt, _ in batch]
        captions["gt_ssc"] += [gt["gt_ssc"] for *_, gt in batch]
        captions["gt_dsc"] += [gt["gt_dsc"] for *_, gt in batch]
        for name, (model, tok) in models.items():
            ids = generate_tokens(model, images, e.decoding, **tok.generation_ids())
            captions[name] += [decode_text(row, tok) for row in ids]
        bar.update(len(batch))
        if e.samples is not None and len(keys) >= e.samples:
            break
    return keys, truths, captions


def _score(captions: list[str], truths: list[dict[str, Any]]) -> dict[str, Any]:
    """Precision/recall of each caption against its own sample's ground truth (CaptionScorer's summary)."""
    scorer = CaptionScorer()
    for caption, truth in zip(captions, truths):
        scorer.add(caption, truth)
    return scorer.summary()


def _other_image(captions: list[str], truths: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall precision/recall of each caption against the next sample's ground truth (cyclic)."""
    scorer = CaptionScorer()
    for i, caption in enumerate(captions):
        scorer.add(caption, truths[(i + 1) % len(truths)])
    return scorer.summary()["overall"]
