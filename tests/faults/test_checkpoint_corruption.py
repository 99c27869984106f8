"""A flipped byte in a checkpoint: a clear error naming the file (exit 3), and a fallback to the
previous checkpoint only when resume.fallback_to_previous=true, which then continues bit for bit.

Works on a copy of the finished tiny train-vae reference run (session fixture) whose newest
checkpoint (step 8) gets one byte of its weights flipped. The unit-level versions are
tests/train/test_checkpointing.py::test_corrupt_newest_fails_naming_the_file_or_falls_back and
tests/train/test_checkpoint_files.py::test_flipped_byte_is_reported_with_the_file_name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults.runs import ONE_THREAD, VAE_STEPS, assert_same_run, one_thread, vae_args, vae_dir
from tests.helpers import logged_losses, run_recap, run_stage
from train.training import checkpoint_files as files

pytestmark = pytest.mark.slow


def test_a_flipped_byte_names_the_file_and_falls_back_only_when_configured(vae_reference: Path, toy_data: Path,
                                                                           tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(vae_reference, root)
    checkpoints = vae_dir(root) / "checkpoints"
    weights = checkpoints / files.step_dir_name(VAE_STEPS) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    metrics_before = (vae_dir(root) / "metrics.jsonl").read_text()

    refused = run_recap(["train-vae", *vae_args(root, toy_data)], env=ONE_THREAD)
    assert refused.returncode == 3, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert errors == [f"recap train-vae: error: checkpoint {weights.parent} is corrupt: {weights}: checksum mismatch "
                      "(the file is corrupt or was modified). Delete it, or set resume.fallback_to_previous=true to "
                      "resume from the one before"]
    assert "Traceback" not in refused.stderr
    assert files.committed_steps(checkpoints) == [2, 4, 6, 8] and weights.read_bytes() == bytes(data)  # untouched
    assert (vae_dir(root) / "metrics.jsonl").read_text() == metrics_before  # no step ran

    with one_thread():
        summary = run_stage("train_vae", vae_args(root, toy_data, "resume.fallback_to_previous=true"))
    assert summary["resumed"] is True
    log = (vae_dir(root) / "logs" / "train_vae.rank0.log").read_text()
    assert f"checkpoint {weights.parent} is corrupt ({weights}: checksum mismatch" in log
    assert f"resumed from {checkpoints / files.step_dir_name(6)} (step 6" in log
    assert [step for step, values in logged_losses(vae_dir(root)).items() if len(values) > 1] == [7, 8]
    assert_same_run(vae_dir(root), vae_dir(vae_reference), VAE_STEPS)  # step 8 rewritten whole
