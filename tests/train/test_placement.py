"""One device policy for every inference stage (train/runtime/placement.py), and the stages
honour it: caption, evaluate-captioner and train-eval-clip used to pick "cuda" whenever a GPU was
visible, so `runtime.device=cpu` was silently ignored there."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.captioner import build_captioner, export_captioner
from tests.helpers import REPO, TINY_COCA, run_stage
from train.config.execution import RuntimeConfig
from train.config.typed import ConfigError
from train.runtime.placement import inference_placement

INFERENCE_STAGES = ("caption", "evaluate_captioner", "recaption", "cache", "sample", "train_eval_clip", "evaluate")
QUIET = ["logger.wandb.mode=disabled", "logger.progress=false", "data.reader.num_workers=0"]


def test_placement_follows_runtime_device_and_precision(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_placement(RuntimeConfig(device="cpu")) == (torch.device("cpu"), False)
    assert inference_placement(RuntimeConfig(device="auto")) == (torch.device("cpu"), False)
    with pytest.raises(ConfigError, match="cuda requested but no GPU is visible") as info:
        inference_placement(RuntimeConfig(device="cuda"))
    assert info.value.key == "runtime.device"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU visible: the policy, not a device
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert inference_placement(RuntimeConfig(device="auto")) == (torch.device("cuda:1"), True)
    assert inference_placement(RuntimeConfig(device="auto", precision="fp32")) == (torch.device("cuda:1"), False)
    assert inference_placement(RuntimeConfig(device="cpu")) == (torch.device("cpu"), False)


@pytest.mark.parametrize("stage", INFERENCE_STAGES)
def test_every_inference_stage_places_itself_through_the_policy(stage: str) -> None:
    source = (REPO / "train" / "stages" / f"{stage}.py").read_text()
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "inference_placement"]
    assert len(calls) == 1 and ast.unparse(calls[0].args[0]) == "cfg.runtime", stage
    assert "cuda.is_available" not in source, stage


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_captioner(build_captioner("coca_test", TINY_COCA), TINY_COCA,
                            tmp_path_factory.mktemp("captioner") / "captioner", "coca_test")


def _gpu_visible_but_unusable(monkeypatch) -> None:
    """As on a node whose GPU is visible: a stage that ignored runtime.device=cpu would move its
    model to CUDA, which fails here (no driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.slow
def test_caption_and_evaluate_captioner_stay_on_the_cpu_when_told(monkeypatch, captioner: Path, toy_data: Path,
                                                                  tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "red.png")
    _gpu_visible_but_unusable(monkeypatch)
    common = [f"run.root={tmp_path}", f"data.heldout={toy_data}/heldout", "runtime.device=cpu", *QUIET]
    out = tmp_path / "captions.jsonl"
    summary = run_stage("caption", [*common, f"caption.captioner={captioner}", f"caption.input={images}",
                                    f"caption.output={out}", "caption.decoding.max_length=8"])
    assert summary["images"] == 1 and len(out.read_text().splitlines()) == 1
    run_stage("evaluate_captioner", [*common, f"evaluate_captioner.captioners.ssc={captioner}", f"evaluate_captioner.captioners.dsc={captioner}",
                                     "evaluate_captioner.samples=4", "evaluate_captioner.batch_size=4",
                                     "evaluate_captioner.decoding.max_length=8"])
    report = json.loads((tmp_path / "toy" / "evaluate_captioner" / "caption_eval.json").read_text())
    assert report["samples"] == 4
