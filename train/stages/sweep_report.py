"""`recap sweep-report`: one table and one plot over the points of a sweep (the paper's Figure 4).

Reads: sweep_report; evaluate and data.reader for the held-out examples. A sweep directory holds one folder per point (Hydra's job
number), as `recap pipeline -m caption_mix.dsc=...` writes them: <point>/config.yaml (the point's
redacted config, where the swept value is read) and <point>/evaluate/summary.json (or
<point>/summary.json for a sweep of `recap evaluate` itself). Writes <run_dir>/sweep.md (a
markdown table), sweep.json and sweep.png: CLIP score against alt-text and DSC references, and
attribute accuracy, against the swept value; grid.png: ``sweep_report.prompts`` drawn by the first
point of every swept value (its <point>/train_t2i/pipeline) from the same noise; heldout.png: the
first ``sweep_report.heldout_examples`` samples of evaluate.input, each row its real image and then
what every swept value's model draws from its DSC (the paper's comparison on descriptive prompts,
next to the images they describe). Points that share
the swept value (a sweep that also varies ``train_t2i.seed``) are one row: their mean, with the
min-max range as the uncertainty (table cells and the plot's error bars). Points whose evaluation
is missing are listed, not silently dropped. When it runs in the experiment's sweep_report/ (the
default), it also rewrites the sweep section of the experiment's report.md
(train/outputs/pipeline_report.py), which the pipeline wrote before the sweep was reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from train.config.experiment import ExperimentConfig
from train.config.sampling import SamplerConfig, SweepReportConfig
from train.config.typed import ConfigError
from train.evaluation.heldout import Prompted, read_prompted
from train.outputs.image_grids import labelled_grid
from train.outputs.pipeline_report import SWEEP_DIR, refresh_sweep_section
from train.outputs.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.runtime.placement import inference_placement
from train.t2i.sampling import generate, load_sampler

STAGE = "sweep-report"
GRID_FILE = "grid.png"
HELDOUT_FILE = "heldout.png"
log = logging.getLogger("recap")
PANELS = (("CLIP score", "clip_score"), ("attribute accuracy", "accuracy"))  # (axis title, key fragment)


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def collect(sweep: Path, x: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(points sorted by ``x``: {"point", x, metric: value ...}, point folders without an evaluation)."""
    import yaml

    points, missing = [], []
    folders = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for folder in folders:
        config = folder / "config.yaml"
        summary = next((s for s in (folder / "evaluate" / "summary.json", folder / "summary.json") if s.is_file()), None)
        value = _lookup(yaml.safe_load(config.read_text()), x) if config.is_file() else None
        if summary is None or value is None:
            missing.append(folder.name)
            continue
        metrics = {k: v for k, v in json.loads(summary.read_text()).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        points.append({"point": int(folder.name), x: value, **metrics})
    return sorted(points, key=lambda p: (p[x], p["point"])), missing


def metric_columns(points: list[dict[str, Any]], x: str) -> list[str]:
    """Metrics every point has (CLIP scores and accuracies first), in a stable order; not the
    evaluation's wall time (``seconds``), which measures the machine, not the model."""
    common = set.intersection(*(set(p) for p in points)) - {"point", x, "seconds"}
    key = lambda m: (not any(f in m for _, f in PANELS), m)  # noqa: E731
    return sorted(common, key=key)


def aggregate(points: list[dict[str, Any]], x: str, columns: list[str]) -> list[dict[str, Any]]:
    """One row per value of ``x`` (sorted): ``n`` points (e.g. seeds: train_t2i.seed=0,1), their
    folder numbers, and per metric the mean, min and max over those points."""
    rows = []
    for value in sorted({p[x] for p in points}):
        same = [p for p in points if p[x] == value]
        stats = {c: {"mean": sum(p[c] for p in same) / len(same), "min": min(p[c] for p in same),
                     "max": max(p[c] for p in same)} for c in columns}
        rows.append({x: value, "n": len(same), "points": [p["point"] for p in same], **stats})
    return rows


def split_constant(rows: list[dict[str, Any]], columns: list[str]) -> tuple[list[str], dict[str, float]]:
    """(the columns that vary between points, {column: value} of those with one value at every
    point: the real images' scores, the sample count, the image size). With one row every column
    is kept: nothing to compare it with."""
    if len(rows) < 2:
        return columns, {}
    first = rows[0]
    constant = {c: first[c]["min"] for c in columns
                if all(r[c]["min"] == r[c]["max"] == first[c]["min"] for r in rows)}
    return [c for c in columns if c not in constant], constant


def table(rows: list[dict[str, Any]], x: str, columns: list[str]) -> str:
    """Markdown: a row per value of ``x``; a cell is the mean, with (min-max) when n > 1."""
    def cell(stats: dict[str, float], n: int) -> str:
        return f"{stats['mean']:.4g}" + (f" ({stats['min']:.4g}-{stats['max']:.4g})" if n > 1 else "")

    lines = [f"| {x} | n | " + " | ".join(columns) + " |", "|---:|---:|" + "---:|" * len(columns)]
    lines += [f"| {r[x]:g} | {r['n']} | " + " | ".join(cell(r[c], r["n"]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], x: str, columns: list[str], path: Path, floor: float | None = None) -> Path:
    """One panel per metric family of PANELS that the points have; one line per metric: the mean
    over the points of each value of ``x``, error bars from their min to their max. ``floor``: the
    majority-class attribute accuracy (the same prompts at every point), a dashed line on the
    accuracy panel: what always answering the commonest class scores."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    panels = [(title, [c for c in columns if fragment in c]) for title, fragment in PANELS]
    panels = [(title, cols) for title, cols in panels if cols] or [("metrics", columns)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    xs = [r[x] for r in rows]
    for ax, (title, cols) in zip(axes[0], panels):
        for c in cols:
            means = [r[c]["mean"] for r in rows]
            spread = [[m - r[c]["min"] for m, r in zip(means, rows)], [r[c]["max"] - m for m, r in zip(means, rows)]]
            ax.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=c)
        if floor is not None and title == "attribute accuracy":
            ax.axhline(floor, linestyle="--", color="gray", label=f"majority-class floor ({floor:.3g})")
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def first_pipeline(sweep: Path, row: dict[str, Any]) -> Path:
    """The exported pipeline of the first point (lowest folder number) of an ``aggregate`` row."""
    return sweep / str(min(row["points"])) / "train_t2i" / "pipeline"


def _drawn(sweep: Path, rows: list[dict[str, Any]], r: SweepReportConfig, device: torch.device,
           prompt_lists: list[list[str]]) -> list[torch.Tensor | None]:
    """Per list of prompts, (P, values, 3, size, size) (None for an empty list): each prompt drawn
    by the first point of every swept value from the same noise (image i of a list from seed i),
    so that what changes along a row is the model alone. Each pipeline is loaded once."""
    drawn: list[list[torch.Tensor]] = [[] for _ in prompt_lists]
    for row in rows:
        pipe = load_sampler(SamplerConfig(pipeline=str(first_pipeline(sweep, row)), steps=r.steps), device,
                            key="sweep_report.sweep", size=(r.size, r.size), size_key="sweep_report.size")
        for images, prompts in zip(drawn, prompt_lists):
            if prompts:
                images.append(generate(pipe, prompts, height=r.size, width=r.size, steps=r.steps,
                                       guidance_scale=r.guidance_scale, seed=0, batch_size=8))  # (P, 3, size, size)
    return [torch.stack(columns, dim=1) if columns else None for columns in drawn]


def side_by_side(drawn: torch.Tensor, prompts: list[str], rows: list[dict[str, Any]], x: str) -> Image.Image:
    """grid.png: a row per prompt, a column per swept value."""
    labels = [f"{x}={row[x]:g}: {prompt}" for prompt in prompts for row in rows]
    return labelled_grid(drawn.flatten(0, 1), labels, columns=len(rows))  # prompt-major


def heldout_side_by_side(drawn: torch.Tensor, examples: Prompted, rows: list[dict[str, Any]], x: str) -> Image.Image:
    """heldout.png: a row per held-out example, its real image (its DSC under it) first, then what
    every swept value's model draws from that DSC."""
    real = examples.pixels.float().div(255).unsqueeze(1)  # (N, 1, 3, size, size)
    labels = [label for dsc in examples.dscs for label in (f"real: {dsc}", *(f"{x}={row[x]:g}" for row in rows))]
    return labelled_grid(torch.cat([real, drawn], dim=1).flatten(0, 1), labels, columns=1 + len(rows))


def _figures(cfg: ExperimentConfig, sweep: Path, rows: list[dict[str, Any]]) -> tuple[bool, Prompted | None, str]:
    """(draw grid.png, the held-out examples for heldout.png or None, their markdown links): what
    the points' exported pipelines allow. The examples are read now: a bad evaluate.input fails
    before the table is written."""
    r = cfg.sweep_report
    lacking = [str(p) for p in (first_pipeline(sweep, row) for row in rows) if not (p / "model_index.json").is_file()]
    if (r.prompts or r.heldout_examples) and lacking:
        log.warning("no %s or %s: these points have no exported pipeline: %s", GRID_FILE, HELDOUT_FILE,
                    ", ".join(lacking))
    if lacking:
        return False, None, ""
    examples = None
    if r.heldout_examples:
        e = dataclasses.replace(cfg.evaluate, samples=r.heldout_examples, size=r.size)
        examples = read_prompted(e, cfg.data.reader, cfg.seed, with_targets=False)
    links = (f"\n![each value's first point, same noise per prompt]({GRID_FILE})\n" if r.prompts else "") + (
        f"\n![held-out DSC prompts: the real image, then each value's first point, same noise per row]({HELDOUT_FILE})\n"
        if examples else "")
    return bool(r.prompts), examples, links


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    r = cfg.sweep_report
    sweep = Path(r.sweep)
    if not sweep.is_dir():
        raise ConfigError("sweep_report.sweep", f"{sweep} is not a directory; run a sweep first, e.g. "
                          "`recap pipeline -m caption_mix.dsc=0.5,0.95`, and point sweep_report.sweep at its "
                          "runs/<experiment>/sweeps/pipeline folder")
    points, missing = collect(sweep, r.x)
    if not points:
        raise ConfigError("sweep_report.sweep", f"no point of {sweep} has both a config.yaml with {r.x} and an "
                          f"evaluate summary (points without: {missing or 'none found'})")
    columns = metric_columns(points, r.x)
    rows = aggregate(points, r.x, columns)
    setup_logging(run_dir, STAGE)
    write_config_snapshot(run_dir, cfg)
    grid, examples, links = _figures(cfg, sweep, rows)
    varying, constant = split_constant(rows, columns)
    markdown = table(rows, r.x, varying)
    if constant:
        markdown += "\n\nThe same at every point: " + ", ".join(f"{c} {v:.4g}" for c, v in constant.items())
    (run_dir / "sweep.md").write_text(f"# Sweep over {r.x} ({sweep})\n\n{markdown}\n\n![sweep](sweep.png)\n" + links
                                      + (f"\nPoints without an evaluation: {', '.join(missing)}\n" if missing else ""))
    (run_dir / "sweep.json").write_text(json.dumps({"x": r.x, "points": points, "by_x": rows, "missing": missing},
                                                   indent=2) + "\n")
    plot(rows, r.x, varying, run_dir / "sweep.png", floor=constant.get("majority_attribute_accuracy"))
    if grid or examples:
        drawn = _drawn(sweep, rows, r, inference_placement(cfg.runtime)[0],
                       [r.prompts if grid else [], examples.dscs if examples else []])
        if grid:
            side_by_side(drawn[0], r.prompts, rows, r.x).save(run_dir / GRID_FILE)
        if examples:
            heldout_side_by_side(drawn[1], examples, rows, r.x).save(run_dir / HELDOUT_FILE)
    log.info("sweep over %s, %d point(s):\n%s", r.x, len(points), markdown)
    in_place = run_dir.resolve() == (cfg.run.dir / SWEEP_DIR).resolve()  # elsewhere: not the experiment's sweep
    report = refresh_sweep_section(cfg.run.dir) if in_place else None
    summary = {"points": len(points), "missing": missing, "x": r.x, "table": str(run_dir / "sweep.md"),
               "plot": str(run_dir / "sweep.png"), "grid": str(run_dir / GRID_FILE) if grid else None,
               "heldout_grid": str(run_dir / HELDOUT_FILE) if examples else None,
               "report": str(report) if report else None}
    finish_stage(run_dir, STAGE, summary)
    return summary
