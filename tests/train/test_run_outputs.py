"""What a training run leaves behind: JSONL metrics, logs, summary, wandb offline, no secrets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import run_recap

pytestmark = pytest.mark.slow
API_KEY = "dummy0wandb0key0f00dbabe1234567890"
PASSWORD = "Sup3rS3cretPw"


def test_one_run_writes_metrics_logs_summary_and_no_secrets(toy_data: Path, tmp_path: Path) -> None:
    root, home = tmp_path / "runs", tmp_path / "home"
    home.mkdir()
    secret_url = f"https://alice:{PASSWORD}@data.example.com/shards/{{00000..00003}}.tar"
    result = run_recap(
        ["train-vae", f"run.root={root}", f"data.train={toy_data}/train", f"data.heldout='{secret_url}'",
         "train_vae.steps=3", "checkpoint.every_steps=2", "train_vae.resolution=32", "train_vae.global_batch_size=4",
         "train_vae.micro_batch_size=2", "vae.block_out_channels=[8,16,16,16]", "vae.norm_num_groups=8",
         "data.reader.num_workers=0", "logger.wandb.mode=offline", "train_vae.heldout_images=0",  # the URL is not read
         f"logger.wandb.tags=['toy','https://bob:{PASSWORD}@tags.example.com/x']"],  # tags went to wandb in clear
        env={"WANDB_API_KEY": API_KEY, "HOME": str(home), "WANDB_DIR": str(tmp_path / "wandb_env")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = root / "toy" / "train_vae"

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["img_per_s"] > 0 for r in steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples_seen"] == 12 and summary["skipped_samples"] == {}
    assert "train-vae summary" in result.stderr and "train_vae: 100%" in result.stderr  # summary + progress bar
    assert (run_dir / "logs" / "train_vae.rank0.log").read_text().count(" saved (") == 2  # steps 2 and 3 (the last)
    assert (run_dir / "vae" / "config.json").is_file()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    assert "alice:***@data.example.com" in (run_dir / "config.yaml").read_text()

    written = [p for base in (root, home, tmp_path / "wandb_env") if base.exists() for p in base.rglob("*") if p.is_file()]
    assert len(written) > 20
    for secret in (PASSWORD, API_KEY):
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert leaks == [], f"{secret} found in {leaks}"
        assert secret not in result.stdout and secret not in result.stderr
