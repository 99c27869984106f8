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
  ceiling the judges allow, i.e. how far they can be trusted; the same real images encoded and
  decoded by the generator's own VAE (what its latents can hold: a generated image cannot keep
  what the round trip loses); and the majority-class floor.

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
from pathlib import Path
from typing import Any

import torch

from models.attribute_probe import AttributeProbe, binding_accuracy, load_probe, predict
from models.clip_score import pair_scores
from models.vae import reconstruct
from train.config.experiment import ExperimentConfig
from train.config.typed import ConfigError
from train.evaluation.clip_judge import ClipJudge, load_clip, read_judge_accuracy
from train.evaluation.heldout import Prompted, read_prompted
from train.outputs.evaluation_report import markdown_report
from train.outputs.image_grids import labelled_grid
from train.outputs.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.runtime.placement import inference_placement
from train.t2i.sampling import generate, load_sampler

STAGE = "evaluate"
log = logging.getLogger("recap")
EXAMPLES, EXAMPLES_FILE = 6, "examples.png"  # samples shown: real | from alt-text | from DSC


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
        predicted = {name: torch.cat([c[name] for c in chunks]) for name in probe.spec.attributes}
        out["attributes"] = {k: round(v, 4) for k, v in binding_accuracy(predicted, targets).items()}
    return out


@torch.no_grad()
def round_trip(vae: Any, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The real images (N, 3, H, W) uint8 through the generator's VAE (encode, decode the posterior
    mean) -> (N, 3, H, W) float in [0, 1] on the CPU: what the VAE lets the diffusion model draw."""
    device = next(vae.parameters()).device
    chunks = [reconstruct(vae, pixels[i: i + batch_size].to(device).float() / 127.5 - 1.0).float().cpu()
              for i in range(0, len(pixels), batch_size)]
    return (torch.cat(chunks) + 1.0) / 2.0


def score_all(judge: ClipJudge, probe: AttributeProbe | None, data: Prompted, drawn: dict[str, torch.Tensor],
              batch_size: int) -> dict[str, Any]:
    """The table's rows: each generated set against its own prompts, the real images and their VAE
    round trips (``drawn["vae_round_trip"]``) against both references, and (with a probe) the
    majority-class floor."""
    both = {"alt_text": data.alt_texts, "dsc": data.dscs}
    results = {
        "generated_from_alt_text": judge_images(judge, None, drawn["alt_text"], {"alt_text": data.alt_texts}, None,
                                                batch_size),
        "generated_from_dsc": judge_images(judge, probe, drawn["dsc"], {"dsc": data.dscs}, data.targets, batch_size),
        "real": judge_images(judge, probe, data.pixels.float() / 255, both, data.targets, batch_size),
        "vae_round_trip": judge_images(judge, probe, drawn["vae_round_trip"], both, data.targets, batch_size),
    }
    if probe is not None and data.targets is not None:
        majority = {name: torch.full_like(data.targets[name], probe.spec.majority[name])
                    for name in probe.spec.attributes}
        results["majority_class"] = {"attributes": {k: round(v, 4)
                                                    for k, v in binding_accuracy(majority, data.targets).items()}}
    return results


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Generate from alt-text and DSC prompts, judge both and the real images, write the tables."""
    e = cfg.evaluate
    setup_logging(run_dir, STAGE)
    write_config_snapshot(run_dir, cfg)
    device, bf16 = inference_placement(cfg.runtime)
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
    drawn["vae_round_trip"] = round_trip(pipe.vae, data.pixels, e.sampler.batch_size)
    results = score_all(judge, probe, data, drawn, e.sampler.batch_size)
    evaluation = {
        "samples": n, "size": e.size, "input": e.input, "dsc_references": data.dsc_sources,
        "generator": {"pipeline": e.sampler.pipeline, "weights": e.sampler.weights, "scheduler": e.sampler.scheduler,
                      "steps": e.sampler.steps, "guidance_scale": e.sampler.guidance_scale, "seed": e.sampler.seed},
        "clip": judge.name, "probe": e.probe, "results": results,
        "judges": {"clip": read_judge_accuracy(e.clip.folder), "probe": read_judge_accuracy(e.probe)},
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
        out["vae_round_trip_attribute_accuracy"] = r["vae_round_trip"]["attributes"]["mean"]
        out["majority_attribute_accuracy"] = r["majority_class"]["attributes"]["mean"]  # the floor
    return {**out, "seconds": evaluation["seconds"]["total"], "evaluation": str(run_dir / "evaluation.json"),
            "table": str(run_dir / "evaluation.md")}
