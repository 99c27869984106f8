"""Resumes that must be refused, end to end: a config that drifted in a key that changes what the
stage computes (the error lists every changed key), and a world size changed from 2 to 1 (exit 3,
both sizes named). Nothing is trained or overwritten by a refused run.

Unit-level versions: tests/train/test_checkpointing.py::test_config_drift_is_refused_with_the_differences
and ::test_world_size_change_is_refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults.runs import ONE_THREAD, one_thread, t2i_args, t2i_dir, vae_args, vae_dir
from tests.helpers import run_recap, run_stage
from train.training import checkpoint_files as files
from train.config.typed import ConfigError

pytestmark = pytest.mark.slow


def test_config_drift_on_resume_is_refused_with_the_changed_keys(vae_reference: Path, toy_data: Path,
                                                                 tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(vae_reference, root)
    metrics_before = (vae_dir(root) / "metrics.jsonl").read_text()
    # seed and the reader's worker count change the data order; train_vae.steps may change (a longer run)
    drifted = vae_args(root, toy_data, "seed=1", "data.reader.num_workers=1", "train_vae.steps=10")
    with one_thread(), pytest.raises(ConfigError) as info:
        run_stage("train_vae", drifted)
    message = str(info.value)
    assert info.value.key == "resume"
    changes = message.split("was saved: ", 1)[1].split(". Restore", 1)[0].split("; ")
    assert changes == ["data.reader.num_workers: 2 -> 1", "seed: 0 -> 1"], message
    assert "resume.allow_config_change=true" in message
    assert (vae_dir(root) / "metrics.jsonl").read_text() == metrics_before


def test_world_size_changed_from_2_to_1_is_refused(two_process_t2i: Path, t2i_inputs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """The 2-process run of test_multinode.py, rerun with one process in the same run directory."""
    root = tmp_path / "run"
    shutil.copytree(two_process_t2i.parent.parent, root)
    checkpoints = t2i_dir(root) / "checkpoints"
    before = files.committed_steps(checkpoints)

    result = run_recap(t2i_args(root, t2i_inputs, "launcher=local", "runtime=single"), env=ONE_THREAD, timeout=300)

    assert result.returncode == 3, result.stderr[-3000:]
    newest = checkpoints / files.step_dir_name(before[-1])
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"recap train-t2i: error: {newest} was written by 2 processes and this run has 1; the data "
                      "order and optimizer shards depend on it. Resume with the same number of processes"]
    assert files.committed_steps(checkpoints) == before
