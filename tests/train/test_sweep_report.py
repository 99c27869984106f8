"""`recap sweep-report`: points gathered from a sweep directory into a table, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import run_stage
from train.stages.sweep_report import collect, metric_columns, table
from train.config.typed import ConfigError

POINTS = {0: (0.95, 61.0, 70.5, 0.80), 1: (0.0, 60.0, 55.25, 0.30), 2: (0.5, 60.5, 66.0, 0.65)}


def _sweep(root: Path, missing: int | None = None) -> Path:
    sweep = root / "sweeps" / "pipeline"
    for num, (dsc, clip_txt, clip_dsc, acc) in POINTS.items():
        point = sweep / str(num)
        (point / "evaluate").mkdir(parents=True)
        (point / "config.yaml").write_text(yaml.safe_dump({"caption_mix": {"dsc": dsc, "ssc": 0.0}}))
        (point / "evaluate" / "summary.json").write_text(json.dumps(
            {"clip_score_txt": clip_txt, "clip_score_dsc": clip_dsc, "attribute_accuracy": acc, "samples": 32,
             "pipeline": "x/pipeline", "resumed": False}))
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
    assert columns == ["attribute_accuracy", "clip_score_dsc", "clip_score_txt", "samples"]  # strings/bools dropped
    rows = table(points, "caption_mix.dsc", columns).splitlines()
    assert rows[0] == "| caption_mix.dsc | attribute_accuracy | clip_score_dsc | clip_score_txt | samples |"
    assert rows[2] == "| 0 | 0.3 | 55.25 | 60 | 32 |" and rows[4] == "| 0.95 | 0.8 | 70.5 | 61 | 32 |"


def test_stage_writes_table_json_and_plot(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, missing=3)
    summary = run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={sweep}",
                                         "logger.wandb.mode=disabled"])
    out = tmp_path / "toy" / "sweep_report"
    assert summary["points"] == 3 and summary["missing"] == ["3"]
    data = json.loads((out / "sweep.json").read_text())
    assert [p["clip_score_dsc"] for p in data["points"]] == [55.25, 66.0, 70.5]
    assert "Points without an evaluation: 3" in (out / "sweep.md").read_text()
    width, height = Image.open(out / "sweep.png").size
    assert width > 2 * height  # two panels side by side: CLIP scores, accuracy


def test_stage_refuses_an_empty_or_missing_sweep(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep_report.sweep.*not a directory"):
        run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={tmp_path / 'none'}"])
    (tmp_path / "empty" / "0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no point.*points without: \\['0'\\]"):
        run_stage("sweep_report", [f"run.root={tmp_path}", f"sweep_report.sweep={tmp_path / 'empty'}"])
