"""SIGKILL at a random step (3 seeds), or in the middle of a checkpoint save, then rerun: the result
equals one uninterrupted run bit for bit (every loss, the final weights, optimizer, LR scheduler,
RNG states and reader position).

Cheap by construction: tiny single-process train-vae (8 steps, a checkpoint every 2). The killed
run is a real `recap` process (RECAP_FAULT=sigkill@..., train/runtime/failpoints.py) so the kill
lands in a live training process; the uninterrupted reference (session fixture) and the reruns
run in this process. The 2-process version, and the negative controls showing the comparison can
fail, are in test_sigkill_resume.py.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from tests.faults.runs import ONE_THREAD, VAE_STEPS, assert_same_run, one_thread, vae_args, vae_dir
from tests.helpers import logged_losses, run_recap, run_stage
from train.training import checkpoint_files as files

pytestmark = pytest.mark.slow
CHECKPOINT_EVERY = 2  # runs.vae_args


def _killed_then_rerun(root: Path, toy_data: Path, fault: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    killed = run_recap(["train-vae", *vae_args(root, toy_data)], env={"RECAP_FAULT": fault, **ONE_THREAD})
    assert killed.returncode == -signal.SIGKILL, (fault, killed.returncode, killed.stderr[-3000:])
    monkeypatch.delenv("RECAP_FAULT", raising=False)
    with one_thread():
        return run_stage("train_vae", vae_args(root, toy_data))


# Seeds whose draws are 7, 2 and 1: a step replayed after the resume, a kill just after a save,
# a kill before the first save (the rerun starts afresh).
@pytest.mark.parametrize("seed", [0, 1, 14])
def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(seed: int, vae_reference: Path, toy_data: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kill_at = random.Random(seed).randint(1, VAE_STEPS - 1)  # the failpoint runs after the step's checkpoint
    killed_dir = vae_dir(tmp_path)

    summary = _killed_then_rerun(tmp_path, toy_data, f"sigkill@step={kill_at}", monkeypatch)

    resumed_from = kill_at - kill_at % CHECKPOINT_EVERY
    assert summary["resumed"] is (resumed_from > 0), kill_at
    losses = logged_losses(killed_dir)
    replayed = [step for step, values in losses.items() if len(values) > 1]
    assert replayed == list(range(resumed_from + 1, kill_at + 1)), kill_at  # the steps lost with the process
    assert_same_run(killed_dir, vae_dir(vae_reference), VAE_STEPS)


def test_sigkill_in_the_middle_of_a_checkpoint_save_resumes_from_the_previous_one(
        vae_reference: Path, toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed inside the save of step 4 (its rank file written, no manifest, not committed): the
    rerun removes the partial directory, resumes from step 2 and still ends bit-identical."""
    checkpoints = vae_dir(tmp_path) / "checkpoints"
    killed = run_recap(["train-vae", *vae_args(tmp_path, toy_data)],
                       env={"RECAP_FAULT": "sigkill@save=4", **ONE_THREAD})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = checkpoints / f"{files.TMP_PREFIX}{files.step_dir_name(4)}"
    assert files.committed_steps(checkpoints) == [2] and partial.is_dir()
    assert not (partial / files.MANIFEST).exists()

    monkeypatch.delenv("RECAP_FAULT", raising=False)
    with one_thread():
        summary = run_stage("train_vae", vae_args(tmp_path, toy_data))

    assert summary["resumed"] is True
    assert not partial.exists() and not list(checkpoints.glob(f"{files.TMP_PREFIX}*"))
    log = (vae_dir(tmp_path) / "logs" / "train_vae.rank0.log").read_text()
    assert f"removed incomplete checkpoint directories: {partial.name}" in log
    assert f"resumed from {checkpoints / files.step_dir_name(2)} (step 2" in log
    assert [step for step, values in logged_losses(vae_dir(tmp_path)).items() if len(values) > 1] == [3, 4]
    assert_same_run(vae_dir(tmp_path), vae_dir(vae_reference), VAE_STEPS)
