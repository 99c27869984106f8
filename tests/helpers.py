"""Helpers for tests that run the `recap` CLI in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_recap(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the `recap` CLI in a subprocess from the repository root; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def logged_losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it in metrics.jsonl (a replayed step appears twice)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out
