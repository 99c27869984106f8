"""`recap sweep-report`: points gathered from a sweep directory into a table, JSON and a plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import export_tiny_pipeline, run_stage
from train.config.loading import load_experiment
from train.config.typed import ConfigError
from train.evaluation.heldout import read_prompted
from train.outputs.image_grids import _LABEL_LINES
from train.stages.sweep_report import aggregate, collect, metric_columns, plot, split_constant, table

POINTS = {0: (0.95, 61.0, 70.5, 0.80), 1: (0.0, 60.0, 55.25, 0.30), 2: (0.5, 60.5, 66.0, 0.65)}


def _sweep(root: Path, missing: int | None = None) -> Path:
    sweep = root / "sweeps" / "pipeline"
    for num, (dsc, clip_txt, clip_dsc, acc) in POINTS.items():
        point = sweep / str(num)
        (point / "evaluate").mkdir(parents=True)
        (point / "config.yaml").write_text(yaml.safe_dump({"caption_mix": {"dsc": dsc, "ssc": 0.0}}))
        (point / "evaluate" / "summary.json").write_text(json.dumps(
            {"clip_score_txt": clip_txt, "clip_score_dsc": clip_dsc, "attribute_accuracy": acc, "samples": 32,
             "pipeline": "x/pipeline", "resumed": False, "seconds": 30.0 + num}))
    if missing is not None:
        (sweep / str(missing) / "evaluate").mkdir(parents=True)
        (sweep / str(missing) / "config.yaml").write_text(yaml.safe_dump({"caption_mix": {"dsc": 0.8}}))
    return sweep


def test_collect_sorts_by_the_swept_value_and_lists_missing_points(tmp_path: Path) -> None:
    points, missing = collect(_sweep(tmp_path, missing=3), "caption_mix.dsc")
    assert [p["caption_mix.dsc"] for p in points] == [0.0, 0.5, 0.95]
    assert [p["point"] for p in points] == [1, 2, 0]
    assert missing == ["3"]
    columns = metric_columns(points, "caption_mix.dsc")
    # strings, bools and the evaluation's wall time are not metrics
    assert columns == ["attribute_accuracy", "clip_score_dsc", "clip_score_txt", "samples"]
    rows = table(aggregate(points, "caption_mix.dsc", columns), "caption_mix.dsc", columns).splitlines()
    assert rows[0] == "| caption_mix.dsc | n | attribute_accuracy | clip_score_dsc | clip_score_txt | samples |"
    assert rows[2] == "| 0 | 1 | 0.3 | 55.25 | 60 | 32 |" and rows[4] == "| 0.95 | 1 | 0.8 | 70.5 | 61 | 32 |"


def test_points_of_one_value_with_several_seeds_become_one_row_with_their_range(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    for num, (seed, acc, clip) in {3: (1, 0.70, 66.5), 4: (1, 0.40, 57.25)}.items():  # 0.95 and 0.0 again
        (sweep / str(num) / "evaluate").mkdir(parents=True)
        dsc = {3: 0.95, 4: 0.0}[num]
        (sweep / str(num) / "config.yaml").write_text(yaml.safe_dump({"caption_mix": {"dsc": dsc},
                                                                      "train_t2i": {"seed": seed}}))
        (sweep / str(num) / "evaluate" / "summary.json").write_text(json.dumps(
            {"clip_score_txt": 60.0, "clip_score_dsc": clip, "attribute_accuracy": acc, "samples": 32}))
    points, _ = collect(sweep, "caption_mix.dsc")
    columns = metric_columns(points, "caption_mix.dsc")
    rows = aggregate(points, "caption_mix.dsc", columns)
    assert [(r["caption_mix.dsc"], r["n"], r["points"]) for r in rows] == [(0.0, 2, [1, 4]), (0.5, 1, [2]),
                                                                          (0.95, 2, [0, 3])]
    assert rows[2]["attribute_accuracy"] == pytest.approx({"mean": 0.75, "min": 0.70, "max": 0.80})
    assert rows[0]["clip_score_dsc"] == pytest.approx({"mean": 56.25, "min": 55.25, "max": 57.25})
    lines = table(rows, "caption_mix.dsc", columns).splitlines()
    assert lines[2] == "| 0 | 2 | 0.35 (0.3-0.4) | 56.25 (55.25-57.25) | 60 (60-60) | 32 (32-32) |"
    assert lines[3] == "| 0.5 | 1 | 0.65 | 66 | 60.5 | 32 |"
    # samples is 32 at every point: listed once, not as a column; clip_score_txt varies (60.5 at 0.5)
    varying, constant = split_constant(rows, columns)
    assert varying == ["attribute_accuracy", "clip_score_dsc", "clip_score_txt"] and constant == {"samples": 32}
    assert split_constant(rows[:1], columns) == (columns, {})  # one row: nothing to compare with


def test_stage_lists_metrics_equal_at_every_point_under_the_table(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={sweep}", "logger.wandb.mode=disabled"])
    text = (tmp_path / "toy" / "sweep_report" / "sweep.md").read_text()
    assert "| caption_mix.dsc | n | attribute_accuracy | clip_score_dsc | clip_score_txt |\n" in text
    assert "The same at every point: samples 32" in text


def test_stage_writes_table_json_and_plot(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, missing=3)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "report.md").write_text("# toy: the recipe end to end\n")  # the pipeline's, written before
    summary = run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={sweep}",
                                         "logger.wandb.mode=disabled"])
    out = tmp_path / "toy" / "sweep_report"
    assert summary["points"] == 3 and summary["missing"] == ["3"]
    report = (tmp_path / "toy" / "report.md").read_text()  # the experiment's report now ends with the sweep
    assert summary["report"] == str(tmp_path / "toy" / "report.md")
    assert report.startswith("# toy: the recipe end to end\n\n## Caption-mix sweep\n\nSweep over caption_mix.dsc")
    assert "| 0.95 | 1 | 0.8 | 70.5 | 61 |\n" in report and "![sweep](sweep_report/sweep.png)" in report
    assert summary["grid"] is None  # the toy's sample prompts, but these points exported no pipeline
    data = json.loads((out / "sweep.json").read_text())
    assert [p["clip_score_dsc"] for p in data["points"]] == [55.25, 66.0, 70.5]
    assert "Points without an evaluation: 3" in (out / "sweep.md").read_text()
    width, height = Image.open(out / "sweep.png").size
    assert width > 2 * height  # two panels side by side: CLIP scores, accuracy


def test_the_plot_draws_the_majority_floor_on_the_accuracy_panel(tmp_path: Path) -> None:
    points, _ = collect(_sweep(tmp_path), "caption_mix.dsc")
    columns = metric_columns(points, "caption_mix.dsc")
    rows = aggregate(points, "caption_mix.dsc", columns)
    without = np.asarray(Image.open(plot(rows, "caption_mix.dsc", columns, tmp_path / "a.png")).convert("L"))
    with_floor = np.asarray(Image.open(plot(rows, "caption_mix.dsc", columns, tmp_path / "b.png", floor=0.5)).convert("L"))
    assert without.shape == with_floor.shape
    half = without.shape[1] // 2  # the CLIP panel (left) is unchanged, the accuracy panel (right) is not
    assert np.array_equal(without[:, :half - 20], with_floor[:, :half - 20])
    assert not np.array_equal(without[:, half:], with_floor[:, half:])


def test_stage_refuses_an_empty_or_missing_sweep(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep_report.sweep.*not a directory"):
        run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={tmp_path / 'none'}"])
    (tmp_path / "empty" / "0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no point.*points without: \\['0'\\]"):
        run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={tmp_path / 'empty'}"])


def test_stage_draws_the_prompts_with_each_values_first_point_from_the_same_noise(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    for num in POINTS:  # the same random model everywhere: every column must then be the same image
        export_tiny_pipeline(sweep / str(num) / "train_t2i" / "pipeline")
    summary = run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={sweep}",
                                         "sweep_report.prompts=[a red circle,a blue star]", "sweep_report.size=32",
                                         "sweep_report.steps=2", "sweep_report.heldout_examples=0",
                                         "logger.wandb.mode=disabled"])
    grid = np.asarray(Image.open(summary["grid"]).convert("RGB"))
    assert summary["grid"].endswith("grid.png") and "grid.png" in Path(summary["table"]).read_text()
    assert grid.shape[1] == 4 + 3 * (32 + 4)  # a column per swept value (0, 0.5, 0.95)
    cells = [[grid[4 + r * (grid.shape[0] - 4) // 2:][:32, 4 + c * 36:][:, :32] for c in range(3)] for r in range(2)]
    for row in cells:  # one prompt, one noise, one model: identical in every column
        assert np.array_equal(row[0], row[1]) and np.array_equal(row[0], row[2])
    assert not np.array_equal(cells[0][0], cells[1][0])  # another prompt and noise
    unguided = run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={sweep}",
                                          "sweep_report.prompts=[a red circle,a blue star]", "sweep_report.size=32",
                                          "sweep_report.steps=2", "sweep_report.heldout_examples=0",
                                          "sweep_report.guidance_scale=1.0", "logger.wandb.mode=disabled"])
    other = np.asarray(Image.open(unguided["grid"]).convert("RGB"))
    assert other.shape == grid.shape and not np.array_equal(other, grid)  # the configured guidance draws them


def test_no_prompts_no_grid(tmp_path: Path) -> None:
    summary = run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={_sweep(tmp_path)}",
                                         "sweep_report.prompts=[]", "logger.wandb.mode=disabled"])
    assert summary["grid"] is None and not (tmp_path / "toy" / "sweep_report" / "grid.png").exists()
    assert summary["report"] is None and not (tmp_path / "toy" / "report.md").exists()  # no pipeline report to add to


def test_stage_draws_held_out_dsc_prompts_beside_their_real_images(toy_data: Path, tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    for num in POINTS:  # the same random model everywhere
        export_tiny_pipeline(sweep / str(num) / "train_t2i" / "pipeline")
    overrides = [f"run.root={tmp_path}", f"sweep_report.sweep={sweep}", "sweep_report.prompts=[]",
                 "sweep_report.heldout_examples=2", "sweep_report.size=32", "sweep_report.steps=2",
                 f"evaluate.input={toy_data / 'heldout'}", "logger.wandb.mode=disabled"]
    summary = run_stage("sweep_report", overrides)
    assert summary["grid"] is None and summary["heldout_grid"].endswith("heldout.png")
    assert "](heldout.png)" in Path(summary["table"]).read_text()
    grid = np.asarray(Image.open(summary["heldout_grid"]).convert("RGB"))
    cell_h = 32 + 12 * _LABEL_LINES + 6
    assert grid.shape == (4 + 2 * cell_h, 4 + 4 * 36, 3)  # a row per example: real, then the values 0, 0.5, 0.95
    cells = [[grid[4 + r * cell_h:][:32, 4 + c * 36:][:, :32] for c in range(4)] for r in range(2)]
    cfg = load_experiment(overrides)
    real = read_prompted(dataclasses.replace(cfg.evaluate, samples=2, size=32), cfg.data.reader, cfg.seed, False)
    for r, row in enumerate(cells):
        assert np.array_equal(row[0], real.pixels[r].permute(1, 2, 0).numpy())  # the example's own image
        assert np.array_equal(row[1], row[2]) and np.array_equal(row[1], row[3])  # one model, one noise per row
        assert not np.array_equal(row[0], row[1])
    assert not np.array_equal(cells[0][1], cells[1][1])  # another DSC and noise


def test_held_out_examples_from_a_missing_input_fail_before_anything_is_written(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    for num in POINTS:
        export_tiny_pipeline(sweep / str(num) / "train_t2i" / "pipeline")
    with pytest.raises(ConfigError, match="evaluate.input"):
        run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={sweep}", "sweep_report.size=32",
                                   f"evaluate.input={tmp_path / 'none'}", "logger.wandb.mode=disabled"])
    assert not (tmp_path / "toy" / "sweep_report" / "sweep.md").exists()
