"""A NaN loss on one rank of two (torchrun, DDP, train-t2i): both ranks take the same decision.

Every rank decides from the loss averaged over ranks and the all-reduced gradient norm
(train/training/loop.py), so a NaN on rank 1 alone is seen by rank 0 too:
- nan_policy=skip: both ranks skip that update and go on in step (the next step's loss is finite
  on both, which it could not be had rank 1 applied a NaN update); max_consecutive_skips skips
  in a row abort the run on both ranks (exit 4);
- nan_policy=fail: both ranks stop at that step (exit 4).
Neither may hang: each subprocess runs under a timeout well above its normal duration.
The single-process versions are tests/train/test_train_t2i.py::test_a_nan_loss_fails_or_skips_the_step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.runs import ONE_THREAD, t2i_args, t2i_dir
from tests.helpers import run_recap
from train.training import checkpoint_files as files

pytestmark = pytest.mark.slow
TWO_PROCESSES = ("launcher=torchrun", "launcher.nproc_per_node=2", "runtime=ddp")
NO_HANG_S = 300  # a run of these sizes takes well under a minute


def _rank_logs(run_dir: Path) -> dict[int, str]:
    return {rank: (run_dir / "logs" / f"train_t2i.rank{rank}.log").read_text() for rank in (0, 1)}


def test_skips_on_both_ranks_then_aborts_after_k_in_a_row(t2i_inputs: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1's loss is NaN at step 3, and from step 5 on; max_consecutive_skips=2: step 3 is
    skipped, step 4 trains, steps 5 and 6 are skipped and the run stops there (of 8)."""
    args = t2i_args(tmp_path, t2i_inputs, *TWO_PROCESSES, "train_t2i.nan_policy=skip",
                    "train_t2i.max_consecutive_skips=2", steps=8)
    result = run_recap(args, env={"RECAP_FAULT": "nan@step=3,rank=1;nan@from_step=5,rank=1", **ONE_THREAD},
                       timeout=NO_HANG_S)

    assert result.returncode == 4, result.stderr[-4000:]
    abort = ("2 steps in a row had a non-finite loss or gradient (max_consecutive_skips=2); last at step 6: loss nan")
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2 and all(line.startswith(f"recap train-t2i: error: {abort}") for line in errors), errors
    run_dir = t2i_dir(tmp_path)
    for rank, log in _rank_logs(run_dir).items():  # the same decisions, in each rank's own log
        skipped = [int(line.split("skipped the update of step ")[1].split(":")[0])
                   for line in log.splitlines() if "skipped the update of step" in line]
        assert skipped == [3, 5, 6], (rank, log[-2000:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # nothing after the abort
    assert [s for s, v in losses.items() if not math.isfinite(float(v))] == [3, 5, 6]  # JSON: "NaN" as a string
    assert [r["step"] for r in records if r.get("event") == "skipped_step"] == [3, 5, 6]
    checkpoints = run_dir / "checkpoints"
    assert files.committed_steps(checkpoints) == [2, 4]  # none of the aborted step
    weights = load_file(checkpoints / files.step_dir_name(4) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_fail_policy_stops_both_ranks_at_that_step(t2i_inputs: dict[str, Path], tmp_path: Path) -> None:
    args = t2i_args(tmp_path, t2i_inputs, *TWO_PROCESSES, "train_t2i.nan_policy=fail")
    result = run_recap(args, env={"RECAP_FAULT": "nan@step=3,rank=1", **ONE_THREAD}, timeout=NO_HANG_S)

    assert result.returncode == 4, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2, errors  # one per rank: both decided, neither was left waiting
    assert all(line.startswith("recap train-t2i: error: non-finite loss or gradient at step 3: loss nan")
               for line in errors), errors
    run_dir = t2i_dir(tmp_path)
    assert files.committed_steps(run_dir / "checkpoints") == [2]  # "the last checkpoint is intact"
    assert max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()) <= 3
