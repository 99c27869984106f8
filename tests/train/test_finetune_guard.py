"""finetune-captioner may only ever see the ground truth of curated samples.

The real stage runs in this process on the toy shards; a spy on the transform that turns samples
into training pairs records every sample the stage receives. Every one must be curated, carry its
own gt caption, and no other sample's ground truth may appear anywhere in what the stage saw.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from data_pipeline import transforms
from models.captioner import build_captioner, export_captioner
from tests.helpers import TINY_COCA as ARCH
from train.stages import finetune_captioner
from train.config.loading import load_experiment


def _raw_metadata(shard_dir: Path) -> dict[str, dict[str, Any]]:
    metas = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    metas[meta["key"]] = meta
    return metas


@pytest.mark.parametrize("style", ["dsc", "ssc"])
def test_finetune_sees_only_curated_ground_truth(style: str, toy_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    export_captioner(build_captioner("coca_test", ARCH), ARCH, tmp_path / "init", "coca_test")
    seen: list[dict[str, Any]] = []
    original = transforms.CaptionPairs.__call__

    def spy(self: transforms.CaptionPairs, sample: dict[str, Any]) -> Any:
        seen.append({k: v for k, v in sample.items() if k != "image"})
        return original(self, sample)

    monkeypatch.setattr(transforms.CaptionPairs, "__call__", spy)
    cfg = load_experiment([f"run.root={tmp_path}", f"data.train={toy_data}/train", f"style={style}",
                           f"finetune_captioner.init_from={tmp_path / 'init'}", "finetune_captioner.steps=3",
                           "finetune_captioner.global_batch_size=4", "finetune_captioner.micro_batch_size=4",
                           "captioner.model_name=coca_test", "data.reader.num_workers=0",  # the spy runs in-process
                           "logger.wandb.mode=disabled", "logger.progress=false"])
    summary = finetune_captioner.run(cfg, tmp_path / "run")

    metas = _raw_metadata(toy_data / "train")
    curated = {k for k, m in metas.items() if m["curated"]}
    assert 0 < len(curated) < len(metas) // 5  # the guard is tested against a real mix
    assert len(seen) >= 12  # 3 steps x 4, plus what the export took
    assert {s["__key__"] for s in seen} <= curated
    for sample in seen:
        meta = metas[sample["__key__"]]
        assert sample[f"json.gt_{style}"] == meta[f"gt_{style}"]
        assert not {"objects", "text", "background"} & set(sample["json"])  # no other ground truth
    others = {m[f"gt_{kind}"] for k, m in metas.items() if k not in curated for kind in ("ssc", "dsc")}
    blob = repr(seen)
    assert not [text for text in others if text in blob]
    assert summary["filtered_samples"]["not_curated"] > 0
    assert (tmp_path / "run" / style / "captioner" / "open_clip_config.json").is_file()
