"""`recap evaluate`: how well does the trained model follow its prompts? (DALL-E 3, section 5)

For the first ``evaluate.samples`` held-out samples of ``evaluate.input`` the model draws one image
from the sample's alt-text and one from its descriptive caption (the shard's ``KEY.dsc.txt``
written by `recap recaption` when present, else the toy ground truth ``gt_dsc``), at
``size`` x ``size``. Both images of sample i start from the same noise (seed + i, as `recap
sample`), so they differ only by their prompt. Then, with the judges:

- CLIP score (models/clip_score.py: mean of 100 x cosine) of each image against its own prompt,
  as the paper's Fig. 4 reads it: alt-text images vs the alt-text, DSC images vs the DSC; and DSC
  images vs ANOTHER sample's DSC (the next one), the level a prompt-blind model would reach.
- attribute-binding accuracy of the DSC images (``evaluate.probe`` and toy ground truth): per
  attribute, the fraction whose probe prediction equals the scene's truth (models/attribute_probe.py).
- the same on the real held-out images (squashed to ``size`` x ``size`` like the generated ones): the
  ceiling the judges allow, i.e. how far they can be trusted; and the majority-class floor.

Empty alt-texts (about 10% of toy alt-text; web data has them too) stay in: the paper scores every
held-out sample, and an empty prompt is the unconditional model.

Reads: evaluate, data.reader, seed, runtime.device/precision, logger.
Writes: <run_dir>/evaluation.json, evaluation.md (markdown table), examples.png (the first samples:
real, from alt-text, from DSC), summary.json.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from data_pipeline.options import ReaderOptions
from models.attribute_probe import ATTRIBUTES, AttributeProbe, binding_accuracy, load_probe, predict, probe_targets
from models.clip_score import pair_scores, to_clip_input, tokenize_references
from train.config_evaluation import ClipJudgeConfig, EvaluateConfig
from train.config_schema import ExperimentConfig
from train.recaption import inference_placement
from train.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.sample import generate, labelled_grid
from train.t2i_export import load_sampler
from train.train_eval_clip import ACCURACY_FILE, CLIP_CONFIG_FILE, read_items, square_pixels
from train.typed_config import ConfigError

STAGE = "evaluate"
log = logging.getLogger("recap")
DSC_MEMBER, GT_DSC = "dsc.txt", "json.gt_dsc"  # the DSC reference: recaption's member, else toy ground truth
SOURCE_NAMES = {DSC_MEMBER: "dsc.txt", GT_DSC: "gt_dsc"}
ROWS = ("generated_from_alt_text", "generated_from_dsc", "real", "majority_class")
EXAMPLES, EXAMPLES_FILE = 6, "examples.png"  # samples shown: real | from alt-text | from DSC


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
        if not s[source].strip():
            raise ValueError(f"{s['__key__']}: no DSC reference (neither KEY.dsc.txt nor a toy gt_dsc)")
        targets = None
        if self.with_targets:
            try:
                targets = probe_targets(s["json"])
            except ValueError as exc:
                raise ValueError(f"{s['__key__']}: evaluate.probe is set but {exc}") from None
        return square_pixels(s["image"], self.size), s["txt"], s[source], source, targets


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


@dataclass
class ClipJudge:
    """An open_clip model and what it needs: its tokenizer, input size, mean/std."""

    model: Any
    tokenizer: Any
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    @torch.no_grad()
    def images(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) image embeddings."""
        device = next(self.model.parameters()).device
        return torch.cat([self.model.encode_image(to_clip_input(images[i: i + batch_size].to(device), self.size,
                                                                self.mean, self.std))
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        """N captions -> (N, D) text embeddings (long ones truncated inside the context, EOT kept)."""
        device = next(self.model.parameters()).device
        tokens = tokenize_references(self.tokenizer, texts, self.tokenizer.context_length)
        return torch.cat([self.model.encode_text(tokens[i: i + batch_size].to(device))
                          for i in range(0, len(texts), batch_size)])


def load_clip(c: ClipJudgeConfig, device: torch.device) -> ClipJudge:
    """The judge CLIP from an exported open_clip folder, or an open_clip name + local checkpoint
    file (never a download). ConfigError naming the key when it is not there."""
    if c.folder is not None:
        folder = Path(c.folder)
        if not (folder / CLIP_CONFIG_FILE).is_file() or not any(folder.glob("*.safetensors")):
            raise ConfigError("evaluate.clip.folder", f"{folder} is not an exported open_clip folder "
                              f"({CLIP_CONFIG_FILE} + weights); run `recap train-eval-clip` first (toy) or set "
                              "clip.model_name and clip.pretrained")
        name, pretrained = f"local-dir:{folder}", None
    else:
        if not Path(str(c.pretrained)).is_file():
            raise ConfigError("evaluate.clip.pretrained", f"{c.pretrained} is not a file: point it at a local "
                              f"open_clip checkpoint of {c.model_name} (e.g. OpenAI's ViT-B/32 weights)")
        if open_clip.get_model_config(c.model_name) is None:
            raise ConfigError("evaluate.clip.model_name", f"{c.model_name!r} is not an open_clip model config; e.g. "
                              "ViT-B-32-quickgelu (OpenAI's weights) or ViT-B-32")
        name, pretrained = c.model_name, c.pretrained
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device).eval()
    except (RuntimeError, ValueError) as exc:  # open_clip's errors for weights that do not fit the config
        key = "evaluate.clip.folder" if c.folder is not None else "evaluate.clip.pretrained"
        raise ConfigError(key, f"open_clip could not load {c.folder or c.pretrained}: {exc}") from None
    pp = model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    return ClipJudge(model, open_clip.get_tokenizer(name), size, tuple(pp["mean"]), tuple(pp["std"]),
                     c.folder or f"{c.model_name} ({c.pretrained})")


def _load_probe(path: str | None) -> AttributeProbe | None:
    if path is None:
        return None
    try:
        return load_probe(Path(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError("evaluate.probe", f"{exc}; run `recap train-eval-clip` first (toy) or set "
                          "evaluate.probe=null") from None


def judge_images(judge: ClipJudge, probe: AttributeProbe | None, images: torch.Tensor, prompts: dict[str, list[str]],
                 targets: dict[str, torch.Tensor] | None, batch_size: int) -> dict[str, Any]:
    """Mean CLIP score of ``images`` (N, 3, H, W) in [0, 1] against each reference list in
    ``prompts`` (``alt_text``/``dsc``, N each; ``other_dsc``: image i vs DSC i+1, when N > 1) and,
    with a probe and targets, attribute-binding accuracy."""
    features = judge.images(images, batch_size)
    out: dict[str, Any] = {}
    for name, texts in prompts.items():
        text_features = judge.texts(texts, batch_size)
        out[f"clip_score_{name}"] = round(pair_scores(features, text_features).mean().item(), 3)
        if name == "dsc" and len(texts) > 1:
            out["clip_score_other_dsc"] = round(pair_scores(features, text_features.roll(-1, dims=0)).mean().item(), 3)
    if probe is not None and targets is not None:
        device = next(probe.parameters()).device
        chunks = [predict(probe, images[i: i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
        predicted = {name: torch.cat([c[name] for c in chunks]) for name in ATTRIBUTES}
        out["attributes"] = {k: round(v, 4) for k, v in binding_accuracy(predicted, targets).items()}
    return out


def score_all(judge: ClipJudge, probe: AttributeProbe | None, data: Prompted, drawn: dict[str, torch.Tensor],
              batch_size: int) -> dict[str, Any]:
    """The table's rows: each generated set against its own prompts, the real images against both
    references, and (with a probe) the majority-class floor."""
    both = {"alt_text": data.alt_texts, "dsc": data.dscs}
    results = {
        "generated_from_alt_text": judge_images(judge, None, drawn["alt_text"], {"alt_text": data.alt_texts}, None,
                                                batch_size),
        "generated_from_dsc": judge_images(judge, probe, drawn["dsc"], {"dsc": data.dscs}, data.targets, batch_size),
        "real": judge_images(judge, probe, data.pixels.float() / 255, both, data.targets, batch_size),
    }
    if probe is not None and data.targets is not None:
        majority = {name: torch.full_like(t, probe.spec.majority[name]) for name, t in data.targets.items()}
        results["majority_class"] = {"attributes": {k: round(v, 4)
                                                    for k, v in binding_accuracy(majority, data.targets).items()}}
    return results


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Generate from alt-text and DSC prompts, judge both and the real images, write the tables."""
    e = cfg.evaluate
    setup_logging(run_dir, STAGE)
    write_config_snapshot(run_dir, cfg)
    device, bf16 = inference_placement(cfg)
    judge = load_clip(e.clip, device)
    probe = _load_probe(e.probe)
    pipe = load_sampler(e.sampler, device, torch.bfloat16 if bf16 else torch.float32, key="evaluate.sampler",
                        size=(e.size, e.size), size_key="evaluate.size")
    data = read_prompted(e, cfg.data.reader, cfg.seed, with_targets=probe is not None)
    n = len(data.alt_texts)
    if probe is not None:
        probe.to(device)
    log.info("%s: %d held-out samples of %s at %dx%d (DSC references: %s), %s x %d steps, guidance %g; judges: "
             "CLIP %s, probe %s", STAGE, n, e.input, e.size, e.size, data.dsc_sources, e.sampler.scheduler,
             e.sampler.steps, e.sampler.guidance_scale, judge.name, e.probe)

    start = time.perf_counter()
    drawn = {prompt: generate(pipe, texts, height=e.size, width=e.size, steps=e.sampler.steps,
                              guidance_scale=e.sampler.guidance_scale, seed=e.sampler.seed,
                              batch_size=e.sampler.batch_size, show_progress=cfg.logger.progress)
             for prompt, texts in (("alt_text", data.alt_texts), ("dsc", data.dscs))}  # (N, 3, size, size) in [0, 1]
    generated_s = time.perf_counter() - start
    results = score_all(judge, probe, data, drawn, e.sampler.batch_size)
    evaluation = {
        "samples": n, "size": e.size, "input": e.input, "dsc_references": data.dsc_sources,
        "generator": {"pipeline": e.sampler.pipeline, "weights": e.sampler.weights, "scheduler": e.sampler.scheduler,
                      "steps": e.sampler.steps, "guidance_scale": e.sampler.guidance_scale, "seed": e.sampler.seed},
        "clip": judge.name, "probe": e.probe, "results": results,
        "judges": {"clip": _trust(e.clip.folder), "probe": _trust(e.probe)},
        "seconds": {"generate": round(generated_s, 2), "total": round(time.perf_counter() - start, 2)},
    }
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    _examples(run_dir / EXAMPLES_FILE, data, drawn)
    table = markdown_report(evaluation)
    (run_dir / "evaluation.md").write_text(table)
    log.info("\n%s", table)
    summary = _summary(evaluation, run_dir)
    finish_stage(run_dir, STAGE, summary)
    return summary


def _examples(path: Path, data: Prompted, drawn: dict[str, torch.Tensor]) -> None:
    """A grid of the first samples: the real image, the one drawn from its alt-text, the one from its DSC."""
    k = min(EXAMPLES, len(data.alt_texts))
    images = torch.stack([x for i in range(k) for x in (data.pixels[i].float() / 255, drawn["alt_text"][i],
                                                         drawn["dsc"][i])])
    labels = [x for i in range(k) for x in ("real", f"alt-text: {data.alt_texts[i]}", f"DSC: {data.dscs[i]}")]
    labelled_grid(images, labels, columns=3).save(path)


def _trust(folder: str | None) -> dict[str, Any] | None:
    """A judge's own accuracy on real held-out images, as train-eval-clip measured it (if known)."""
    path = None if folder is None else Path(folder) / ACCURACY_FILE
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _summary(evaluation: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    r = evaluation["results"]
    out = {"samples": evaluation["samples"], "size": evaluation["size"],
           "clip_score_alt_text": r["generated_from_alt_text"]["clip_score_alt_text"],
           "clip_score_dsc": r["generated_from_dsc"]["clip_score_dsc"],
           "real_clip_score_alt_text": r["real"]["clip_score_alt_text"],
           "real_clip_score_dsc": r["real"]["clip_score_dsc"]}
    if "attributes" in r["generated_from_dsc"]:
        out["attribute_accuracy"] = r["generated_from_dsc"]["attributes"]["mean"]
        out["real_attribute_accuracy"] = r["real"]["attributes"]["mean"]
    return {**out, "seconds": evaluation["seconds"]["total"], "evaluation": str(run_dir / "evaluation.json"),
            "table": str(run_dir / "evaluation.md")}


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_report(evaluation: dict[str, Any]) -> str:
    """evaluation.json as a markdown table (one row per image set) and a line on each judge."""
    results = evaluation["results"]
    with_attributes = "attributes" in results["real"]
    head = ["images", "prompted with", "CLIP vs alt-text", "CLIP vs DSC", "CLIP vs other DSC"]
    head += [*ATTRIBUTES, "attributes (mean)"] if with_attributes else []
    labels = {"generated_from_alt_text": ("generated", "alt-text"), "generated_from_dsc": ("generated", "DSC"),
              "real": ("real (ceiling)", "–"), "majority_class": ("majority class (floor)", "–")}
    lines = [f"# Evaluation: {evaluation['samples']} held-out samples, {evaluation['size']} px", "",
             f"Generator `{evaluation['generator']['pipeline']}` ({evaluation['generator']['weights']} weights, "
             f"{evaluation['generator']['scheduler']} x {evaluation['generator']['steps']}, guidance "
             f"{evaluation['generator']['guidance_scale']}); CLIP judge `{evaluation['clip']}`; CLIP score = mean of "
             "100 x cosine (docs/evaluation.md).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in ROWS:
        if row not in results:
            continue
        r = results[row]
        cells = [*labels[row], _cell(r.get("clip_score_alt_text"), 2), _cell(r.get("clip_score_dsc"), 2),
                 _cell(r.get("clip_score_other_dsc"), 2)]
        if with_attributes:
            cells += [_cell(r.get("attributes", {}).get(k), 3) for k in (*ATTRIBUTES, "mean")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_judge_lines(evaluation["judges"])]
    return "\n".join(lines) + "\n"


def _judge_lines(judges: dict[str, Any]) -> list[str]:
    out = []
    clip, probe = judges.get("clip"), judges.get("probe")
    if clip is not None:
        c = clip["clip"]
        out.append(f"Judge CLIP on {clip['samples']} real held-out images (train-eval-clip): top-1 retrieval among "
                   f"{c['retrieval_candidates']} image->text {c['image_to_text_top1']:.3f}, text->image "
                   f"{c['text_to_image_top1']:.3f} (chance {c['chance']:.3f}); CLIP score matched "
                   f"{c['clip_score_matched']:.1f} vs mismatched {c['clip_score_mismatched']:.1f}.")
    if probe is not None:
        p = probe["probe"]
        scores = ", ".join(f"{k} {p['accuracy'][k]:.3f} ({p['majority_baseline'][k]:.3f})" for k in ATTRIBUTES)
        out.append(f"Judge probe on {probe['samples']} real held-out images: accuracy (majority class) {scores}.")
    return out
