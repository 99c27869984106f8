"""report.md of a `recap pipeline` run, from what the stages left on disk.

Sections: the stages with their status and time; caption examples (held-out images with their
alt-text, SSC and DSC, from evaluate-captioner: the images evaluate draws first); the captioners'
attribute scores (evaluate-captioner); the sample grids (train-t2i's last training grid, `recap sample`'s grid);
the evaluation tables (`recap evaluate`'s evaluation.md); in the experiment's report (not a sweep
point's), last, the caption-mix sweep (`recap sweep-report`'s table, plot and same-noise grid), which
`recap sweep-report` rewrites when it runs after the pipeline (`make sweep`). A section whose stage has
not run says so. Image links are relative, so the report can be opened in place or copied with its
folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline.shard_io import image_member, iter_raw_samples, list_shards, open_shard
from train.outputs.markdown import cell

CAPTION_SOURCES = ("alt-text", "SSC", "DSC")  # evaluate-captioner's sources, lowercased
REPORT_FILE = "report.md"
SWEEP_DIR = "sweep_report"  # `recap sweep-report`'s run directory under the experiment's
SWEEP_HEADING = "## Caption-mix sweep"  # the report's last section
_RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:|/)([^)]+)\)")  # ](target) with a relative target


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _stage_table(steps: Sequence[Any], times: dict[str, Any]) -> list[str]:
    lines = ["| stage | status | seconds | output |", "|---|---|---:|---|"]
    total = 0.0
    for step in steps:
        entry = times.get(step.spec, {})
        seconds = entry.get("seconds")
        total += seconds or 0.0
        lines.append(f"| `{step.spec}` | {entry.get('status', 'not run')} | "
                     f"{'' if seconds is None else f'{seconds:.1f}'} | `{step.out_dir}` |")
    lines.append(f"| **all** | | **{total:.1f}** | |")
    return lines


def _caption_examples(caption_eval: Path, shards: str, count: int, report_dir: Path) -> list[str]:
    """The first ``count`` samples `recap evaluate-captioner` captioned (``caption_eval``: its
    caption_eval.json; ``shards``: its input, where the images are found by key): each image with
    its alt-text, SSC and DSC side by side."""
    if not caption_eval.is_file():
        return ["_`recap evaluate-captioner` has not run._"]
    examples = json.loads(caption_eval.read_text())["examples"]
    keys = [row["key"] for row in examples.get("alt-text", [])][:count]
    captions = {name: {row["key"]: row["caption"] for row in examples.get(name.lower(), [])}
                for name in CAPTION_SOURCES}
    images = _images_by_key(shards, set(keys), report_dir / "report_assets")
    lines = [f"The first {len(keys)} held-out images `recap evaluate-captioner` captioned (`evaluate_captioner.input`;"
             " by default evaluate's input, whose first images are also in evaluate's examples and the sweep's "
             "heldout.png):", "", "| image | " + " | ".join(CAPTION_SOURCES) + " |", "|---|---|---|---|"]
    for key in keys:
        image = f"![{key}]({_rel(images[key], report_dir)})" if key in images else f"_(image {key} not found)_"
        texts = [cell(captions[name].get(key, "–")) for name in CAPTION_SOURCES]
        lines.append(f"| {image} | " + " | ".join(texts) + " |")
    return lines


def _images_by_key(shards: str, keys: set[str], assets: Path) -> dict[str, Path]:
    """Copy the images of ``keys`` from ``shards`` into ``assets``: key -> file (missing keys are left out)."""
    found: dict[str, Path] = {}
    try:
        urls = list_shards(shards)
    except ValueError:
        return found
    assets.mkdir(parents=True, exist_ok=True)
    for url in urls:
        with open_shard(url) as stream:
            for sample in iter_raw_samples(stream):
                if isinstance(sample, str) or len(found) == len(keys):
                    break
                image = image_member(sample.members)
                if sample.key in keys and not sample.fault and image is not None:
                    found[sample.key] = assets / f"{sample.key}.{image}"
                    found[sample.key].write_bytes(sample.members[image])
        if len(found) == len(keys):
            break
    return found


def _captioner_scores(summary_path: Path) -> list[str]:
    if not summary_path.is_file():
        return ["_`recap evaluate-captioner` has not run._"]
    summary = json.loads(summary_path.read_text())
    sources = [k[: -len("_recall")] for k in summary if k.endswith("_recall") and not k.endswith("_shape_recall")]
    n = summary.get("samples")
    lines = [f"Attribute precision / recall of each caption source on {n} held-out images (and recall against "
             "another image's ground truth: what a caption gets without looking); colour-shape: recall of the "
             "(colour, shape) pairs; distinct: different captions; stutters: captions with a word repeated "
             "within two words (docs/captioner.md):", "",
             "| source | precision | recall | recall vs other image | colour-shape recall | distinct | stutters |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def count(source: str, name: str) -> str:
        return f"{summary[f'{source}_{name}']} / {n}" if f"{source}_{name}" in summary else "–"

    lines += [f"| {s} | {summary.get(f'{s}_precision', float('nan')):.3f} | {summary[f'{s}_recall']:.3f} | "
              f"{summary.get(f'{s}_recall_other_image', float('nan')):.3f} | "
              f"{summary.get(f'{s}_colour_shape_recall', float('nan')):.3f} | {count(s, 'distinct')} | "
              f"{count(s, 'stutters')} |" for s in sources]
    return lines


def _grids(experiment: Path, report_dir: Path) -> list[str]:
    lines = []
    training = sorted((experiment / "train_t2i" / "samples").glob("step_*.png"))
    if training:
        lines += [f"Training samples at {training[-1].stem.replace('_', ' ')} (DDIM, EMA weights):", "",
                  f"![training samples]({_rel(training[-1], report_dir)})", ""]
    grid = experiment / "sample" / "grid.png"
    if grid.is_file():
        prompts = [json.loads(line)["rewritten"] for line in (experiment / "sample" / "prompts.jsonl")
                   .read_text().splitlines()]
        lines += ["`recap sample` (prompts under each image):", "", f"![samples]({_rel(grid, report_dir)})", ""]
        lines += [f"{i + 1}. {cell(p)}" for i, p in enumerate(prompts)]
    return lines or ["_No samples yet (`recap train-t2i`, `recap sample`)._"]


def _evaluation(experiment: Path) -> list[str]:
    table = experiment / "evaluate" / "evaluation.md"
    return [table.read_text().strip()] if table.is_file() else ["_`recap evaluate` has not run._"]


def _sweep(experiment: Path, report_dir: Path) -> list[str]:
    """The experiment's last sweep report (sweep.md: its table, plot and grid), its title a
    sentence and its links relative to ``report_dir``."""
    table = experiment / SWEEP_DIR / "sweep.md"
    if not table.is_file():
        return ["_No sweep yet: `make sweep` (`recap pipeline -m caption_mix.dsc=...`, then `recap sweep-report`)._"]
    base = _rel(table.parent, report_dir)
    first, _, rest = table.read_text().strip().partition("\n")
    title, body = (first[2:], rest.splitlines()) if first.startswith("# ") else ("Sweep", [first, *rest.splitlines()])
    return [f"{title}, from `recap sweep-report` (`{_rel(table, report_dir)}`):",
            *(_RELATIVE_LINK.sub(lambda m: f"]({base}/{m.group(1)})", line) for line in body)]


def refresh_sweep_section(experiment: Path) -> Path | None:
    """Rewrite the last section of the experiment's report.md from the sweep report now under
    ``experiment``/SWEEP_DIR (`recap sweep-report` runs after the pipeline wrote the report).
    Returns the report's path, or None when the pipeline has written none yet."""
    path = experiment / REPORT_FILE
    if not path.is_file():
        return None
    text = path.read_text()
    cut = text.find(f"\n{SWEEP_HEADING}\n")
    head = text[: cut + 1] if cut >= 0 else text.rstrip("\n") + "\n\n"
    path.write_text(head + "\n".join([SWEEP_HEADING, "", *_sweep(experiment, experiment), ""]))
    return path


def write_report(steps: Sequence[Any], times: dict[str, Any], report_dir: Path, *, run_name: str,
                 experiment_dir: Path, captioned: str, examples: int) -> Path:
    """Write ``report_dir``/report.md (``report_dir``: the experiment's directory ``experiment_dir``,
    or a sweep point's, whose per-point stages live under it); ``captioned``: evaluate-captioner's
    input shards, where the images of its first ``examples`` examples are. Returns the report's path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {run_name}: the recipe end to end", "",
             "Written by `recap pipeline` from the stages' outputs; rerun it to refresh.", "",
             "## Stages", "", *_stage_table(steps, times), "",
             "## Captions: alt-text vs SSC vs DSC", "",
             *_caption_examples(experiment_dir / "evaluate_captioner" / "caption_eval.json", captioned, examples,
                                report_dir), "",
             "## Captioners", "", *_captioner_scores(experiment_dir / "evaluate_captioner" / "summary.json"), "",
             "## Samples", "", *_grids(report_dir, report_dir), "",
             "## Evaluation", "", *_evaluation(report_dir), ""]
    if report_dir.resolve() == experiment_dir.resolve():  # a sweep point's report has no sweep section
        lines += [SWEEP_HEADING, "", *_sweep(experiment_dir, report_dir), ""]
    path = report_dir / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
