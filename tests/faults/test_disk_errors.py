"""A checkpoint save that fails (disk full, quota exceeded, I/O error) through the CLI: exit 3 with
one line naming the file and the errno, the previous checkpoint intact, no partial checkpoint left,
and a rerun that resumes from it, bit for bit; with two ZeRO-2 ranks, one rank's failure inside
DeepSpeed's own save ends both ranks alike (neither waits for the other).

The failures are injected with RECAP_FAULT=enospc|edquot|eio@save=N[,rank=R]
(train/runtime/failpoints.py): the first file the rank writes into step N's checkpoint fails after
its first bytes. The unit-level versions are in tests/train/test_checkpointing.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults.runs import ONE_THREAD, VAE_STEPS, assert_same_run, vae_args, vae_dir
from tests.helpers import run_recap
from train.training import checkpoint_files as files

pytestmark = pytest.mark.slow
NO_HANG_S = 180  # these runs take well under a minute


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_a_full_disk_fails_the_save_with_exit_3_and_the_rerun_resumes(vae_reference: Path, toy_data: Path,
                                                                       tmp_path: Path) -> None:
    """The reference run, cut back to its checkpoints of steps 2 and 4 (as if stopped after step
    4): the save of step 6 fails, the rerun resumes from step 4 and ends as the reference did."""
    root = tmp_path / "run"
    shutil.copytree(vae_reference, root)
    checkpoints = vae_dir(root) / "checkpoints"
    for step in (6, 8):
        shutil.rmtree(checkpoints / files.step_dir_name(step))
    before = _files(checkpoints)

    failed = run_recap(["train-vae", *vae_args(root, toy_data)], env={"RECAP_FAULT": "enospc@save=6", **ONE_THREAD},
                       timeout=NO_HANG_S)
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert _errors(failed.stderr) == [
        f"recap train-vae: error: checkpoint save of step 6 failed writing {checkpoints}/.tmp-step_000000006/"
        f"model.safetensors: [Errno 28] No space left on device. The previous checkpoint ({checkpoints}/"
        "step_000000004) is intact: free space (or fix the disk) and rerun the same command to resume from it"]
    assert "Traceback" not in failed.stderr
    assert _files(checkpoints) == before  # steps 2 and 4 byte for byte, nothing of step 6 left

    rerun = run_recap(["train-vae", *vae_args(root, toy_data)], env=ONE_THREAD, timeout=NO_HANG_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (vae_dir(root) / "logs" / "train_vae.rank0.log").read_text()
    assert f"resumed from {checkpoints / files.step_dir_name(4)} (step 4" in log
    assert files.committed_steps(checkpoints) == [2, 4, 6, 8]
    assert_same_run(vae_dir(root), vae_dir(vae_reference), VAE_STEPS)


def test_one_zero2_rank_failing_inside_deepspeeds_save_ends_both_ranks(toy_data: Path, tmp_path: Path) -> None:
    """Rank 1's optimizer partition (written by DeepSpeed itself) fails with EIO at step 4: both
    ranks report it and exit 3 (rank 0's writes succeeded: it must not wait in DeepSpeed's barrier)."""
    args = ["train-vae", *vae_args(tmp_path, toy_data, "launcher=torchrun", "launcher.nproc_per_node=2",
                                   "runtime=zero2", "data.reader.num_workers=1")]
    failed = run_recap(args, env={"RECAP_FAULT": "eio@save=4,rank=1", **ONE_THREAD}, timeout=NO_HANG_S)
    assert failed.returncode == 3, failed.stderr[-3000:]
    checkpoints = vae_dir(tmp_path) / "checkpoints"
    line = (f"recap train-vae: error: checkpoint save of step 4 failed writing {checkpoints}/.tmp-step_000000004/"
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt: [Errno 5] Input/output error. The previous "
            f"checkpoint ({checkpoints}/step_000000002) is intact: free space (or fix the disk) and rerun the same "
            "command to resume from it")
    assert _errors(failed.stderr) == [line, line]  # one per rank: both decided, neither was left waiting
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000000002"]
    step2 = checkpoints / files.step_dir_name(2)
    assert files.verify_files(step2, files.read_manifest(step2)) == []  # intact (the rerun: the test above)
