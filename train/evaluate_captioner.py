"""`recap evaluate-captioner`: how much of each picture do alt-text, SSC and DSC captions say?

On held-out toy samples (data.heldout, EVALUATION access: the only stage kind that reads ground
truth), every captioner in evaluate_captioner.captioners writes a caption per image; those and
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
from pathlib import Path
from typing import Any

import torch

from data_pipeline.caption_attributes import CaptionScorer, score_table
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError
from data_pipeline.shard_reader import ShardReader
from models.caption_decoding import decode_text, generate_tokens
from models.captioner import image_transform, tokenizer
from train.caption import load_captioner
from train.config_schema import ExperimentConfig
from train.run_logging import finish_stage, progress, setup_logging, write_config_snapshot
from train.typed_config import ConfigError

EXAMPLES = 8  # captions kept per source for reports


def _heldout(cfg: ExperimentConfig, transform: Any, batch_size: int) -> ShardReader:
    spec = SampleSpec(GroundTruthAccess.EVALUATION, image=True, optional_texts=("txt",))
    item = _EvalItem(transform)
    options = cfg.data.reader
    try:
        return ShardReader(cfg.data.heldout, spec=spec, options=options, batch_size=batch_size, seed=cfg.seed,
                           epochs=1, transform=item, collate=list)
    except (NoShardsError, ValueError) as exc:
        raise ConfigError("data.heldout", f"{exc}. Run `recap make-toy-data` first or point data.heldout at "
                          "held-out shards with ground truth") from None


class _EvalItem:
    """Held-out sample -> (key, preprocessed image, alt-text, ground truth dict)."""

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


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Score every source on up to evaluate_captioner.samples held-out images."""
    e = cfg.evaluate_captioner
    log = setup_logging(run_dir, "evaluate_captioner")
    write_config_snapshot(run_dir, cfg)
    models = {name: load_captioner(path, f"evaluate_captioner.captioners.{name}") for name, path in e.captioners.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first = next(iter(models.values()), None)
    if first is None:
        raise ConfigError("evaluate_captioner.captioners", "names no captioner to evaluate")
    transform, tok = image_transform(first), tokenizer(first)
    for model in models.values():
        model.to(device)
        if model.visual.image_size != first.visual.image_size:
            raise ConfigError("evaluate_captioner.captioners", "captioners with different image sizes")
    sources = ["alt-text", *models, "gt_ssc", "gt_dsc"]
    scorers = {name: CaptionScorer() for name in sources}
    written: dict[str, list[str]] = {name: [] for name in sources}
    truths: list[dict[str, Any]] = []
    examples: dict[str, list[dict[str, str]]] = {name: [] for name in sources}
    seen = 0
    bar = progress(total=e.samples, desc="evaluate-captioner", unit="img", enabled=cfg.logger.progress)
    for batch in _heldout(cfg, transform, e.batch_size):
        batch = batch[: None if e.samples is None else e.samples - seen]
        images = torch.stack([img for _, img, _, _ in batch]).to(device)
        captions = {"alt-text": [alt for _, _, alt, _ in batch],
                    "gt_ssc": [gt["gt_ssc"] for *_, gt in batch], "gt_dsc": [gt["gt_dsc"] for *_, gt in batch]}
        for name, model in models.items():
            captions[name] = [decode_text(ids, tok) for ids in generate_tokens(model, images, e.decoding)]
        for name in sources:
            written[name] += captions[name]
            for (key, _, _, gt), text in zip(batch, captions[name]):
                scorers[name].add(text, gt)
                if len(examples[name]) < EXAMPLES:
                    examples[name].append({"key": key, "caption": text})
        truths += [gt for *_, gt in batch]
        seen += len(batch)
        bar.update(len(batch))
        if e.samples is not None and seen >= e.samples:
            break
    bar.close()
    results = {name: {**scorers[name].summary(), "other_image": _other_image(written[name], truths)}
               for name in sources}
    table = score_table(results)
    (run_dir / "caption_eval.json").write_text(json.dumps(
        {"samples": seen, "results": results, "examples": examples}, indent=2) + "\n")
    log.info("caption quality on %d held-out samples (precision / recall of mentioned attributes):\n%s", seen, table)
    summary = {"samples": seen, **{f"{name}_recall": round(results[name]["overall"]["recall"], 4) for name in sources},
               **{f"{name}_recall_other_image": round(results[name]["other_image"]["recall"], 4) for name in sources},
               **{f"{name}_precision": round(results[name]["overall"]["precision"], 4) for name in sources}}
    finish_stage(run_dir, "evaluate-captioner", summary)
    return summary


def _other_image(captions: list[str], truths: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall precision/recall of each caption against the next sample's ground truth (cyclic)."""
    scorer = CaptionScorer()
    for i, caption in enumerate(captions):
        scorer.add(caption, truths[(i + 1) % len(truths)])
    return scorer.summary()["overall"]
