"""Preemption (issue 7, part 2): SIGTERM or SIGUSR1 to any rank -> every rank saves a checkpoint at
the same step and `recap` exits 75 (requeue); the rerun of the same command continues bit for bit.

In-process single-process runs of train-vae check the protocol cheaply (the checkpoint is of the
signalled step, a signal in the middle of a save leaves it whole, the continuation equals an
uninterrupted run); one 2-process torchrun run sends SIGUSR1 to rank 1's whole process group
(its DataLoader workers included) and checks the exit code through torchrun and the agreement
of both ranks.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from launch.supervise import EXIT_REQUEUE, combine_exit_codes, read_exit_codes, record_exit
from tests.helpers import logged_losses, run_recap, run_stage
from train.training import checkpoint_files as files
from train.runtime.preemption import Preempted, PreemptionWatch

STEPS = 6


def _args(root: Path, toy_data: Path, *extra: str) -> list[str]:
    return [f"run.root={root}", f"data.train={toy_data}/train", f"data.heldout={toy_data}/heldout",
            f"train_vae.steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=5",
            "train_vae.resolution=32", "train_vae.global_batch_size=4", "train_vae.micro_batch_size=2",
            "vae.block_out_channels=[8,8,8,8]", "vae.norm_num_groups=8", "data.reader.num_workers=2",
            "logger.wandb.mode=disabled", "logger.progress=false", *extra]


def _run_dir(root: Path) -> Path:
    return root / "toy" / "train_vae"


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(_run_dir(root) / "checkpoints" / files.step_dir_name(STEPS) / "model.safetensors")


def _assert_same_run(root: Path, reference: Path) -> None:
    """Same final weights and optimizer state, and the same loss at every step (a replayed step
    logged twice must repeat its value)."""
    a, b = _final_weights(root), _final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = lambda r: _run_dir(r) / "checkpoints" / files.step_dir_name(STEPS) / "optimizer.pt"  # noqa: E731
    opt_a, opt_b = files.safe_torch_load(ckpt(root)), files.safe_torch_load(ckpt(reference))
    for k, state in opt_b["state"].items():
        assert all(torch.equal(state[n], opt_a["state"][k][n]) for n in state)
    losses, expected = logged_losses(_run_dir(root)), logged_losses(_run_dir(reference))
    assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
    for step, values in losses.items():
        assert set(values) == set(expected[step]), step


def _in_process(root: Path, toy_data: Path, fault: str | None, monkeypatch: pytest.MonkeyPatch) -> Any:
    if fault:
        monkeypatch.setenv("RECAP_FAULT", fault)
    else:
        monkeypatch.delenv("RECAP_FAULT", raising=False)
    return run_stage("train_vae", _args(root, toy_data, "runtime=single"))


@pytest.fixture(scope="module")
def reference(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        _in_process(root, toy_data, None, mp)
    return root


# ---- the watch and the exit codes ------------------------------------------------------------
class _OneRank:
    def max_int(self, value: int) -> int:
        return value


def test_watch_records_the_first_signal_and_restores_the_handlers() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionWatch() as watch:
        assert watch.agreed(_OneRank()) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal; the first one is kept
        assert watch.received == signal.SIGUSR1 and watch.agreed(_OneRank()) == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_the_job_exit_code_prefers_a_failure_then_a_requeue(tmp_path: Path) -> None:
    assert combine_exit_codes({0: 75, 1: 75}, launcher_code=1) == EXIT_REQUEUE
    assert combine_exit_codes({0: 75, 1: 3}, launcher_code=1) == 3  # a real failure wins
    assert combine_exit_codes({0: 0, 1: 75}, launcher_code=1) == EXIT_REQUEUE
    assert combine_exit_codes({}, launcher_code=-9) == -9  # nobody recorded: SIGKILL
    assert combine_exit_codes({0: 75}, launcher_code=0) == 0
    env = {"RECAP_EXIT_DIR": str(tmp_path), "RANK": "1"}
    record_exit(75, env)
    record_exit(None, {**env, "RANK": "0"})
    assert read_exit_codes(tmp_path) == {0: 0, 1: 75}
    record_exit(3, {"RANK": "0"})  # outside a supervised launch: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0.code", "rank_1.code"]


# ---- in process: the checkpoint is the signalled step's, and the rerun continues exactly ------
@pytest.mark.parametrize("fault, step", [("sigusr1@step=3", 3), ("sigterm@save=4", 4)],
                         ids=["sigusr1-between-saves", "sigterm-in-the-middle-of-a-save"])
def test_signal_saves_at_that_step_and_the_rerun_is_bit_identical(fault: str, step: int, reference: Path,
                                                                  toy_data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Preempted) as info:
        _in_process(tmp_path, toy_data, fault, monkeypatch)
    assert info.value.step == step and info.value.signal_name == fault[:7].upper()
    checkpoints = _run_dir(tmp_path) / "checkpoints"
    assert files.committed_steps(checkpoints) == [step]  # the signalled step's, whole
    directory = checkpoints / files.step_dir_name(step)
    assert files.verify_files(directory, files.list_files(directory)) == []
    assert json.loads((directory / "train_state.json").read_text())["step"] == step
    events = [json.loads(line) for line in (_run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["signal"]) for e in events if e.get("event") == "preempted"] == [(step, fault[:7].upper())]
    assert max(e["step"] for e in events) == step  # no step after the signalled one ran

    summary = _in_process(tmp_path, toy_data, None, monkeypatch)
    assert summary["resumed"] is True and summary["steps"] == STEPS
    _assert_same_run(tmp_path, reference)


# ---- two processes under torchrun: one rank's process group is signalled ---------------------
@pytest.mark.slow
def test_sigusr1_to_one_ranks_process_group_checkpoints_every_rank_and_exits_75(toy_data: Path, tmp_path: Path) -> None:
    """rank 1 and its two DataLoader workers get SIGUSR1 after step 2: both ranks save step 2, the
    workers ignore it, `recap` exits 75 although torchrun
    itself reports 1, and the rerun ends like an uninterrupted 2-process run, bit for bit."""
    def args(root: Path) -> list[str]:
        return ["train-vae", *_args(root, toy_data, "runtime=ddp", "launcher=torchrun", "launcher.nproc_per_node=2",
                                    "train_vae.micro_batch_size=1")]

    uninterrupted = tmp_path / "uninterrupted"
    assert run_recap(args(uninterrupted)).returncode == 0
    tmp_path = tmp_path / "preempted"
    killed = run_recap(args(tmp_path), env={"RECAP_FAULT": "sigusr1@step=2,rank=1,group=1"})
    assert killed.returncode == EXIT_REQUEUE, killed.stderr[-3000:]
    assert "preempted by SIGUSR1 at step 2" in killed.stderr and "killed by signal" not in killed.stderr, killed.stderr[-6000:]
    assert "Traceback" not in killed.stderr and "torchrun: " in killed.stderr, killed.stderr[-6000:]  # one line
    # Only rank 1 itself reacted: its DataLoader workers ignored the signal (a worker that ran the
    # rank's handler would log it too; one that kept the default action would die of it).
    (rank1_log,) = (_run_dir(tmp_path) / "logs").glob("*.rank1.log")
    assert rank1_log.read_text().count("received SIGUSR1") == 1
    directory = _run_dir(tmp_path) / "checkpoints" / files.step_dir_name(2)
    assert files.committed_steps(directory.parent) == [2]
    assert sorted(p.name for p in directory.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert json.loads((directory / "train_state.json").read_text())["world_size"] == 2

    rerun = run_recap(args(tmp_path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["resumed"] is True and summary["steps"] == STEPS and summary["processes"] == 2
    _assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigusr1_to_recap_under_deepspeeds_launcher_checkpoints_and_exits_75(toy_data: Path, tmp_path: Path) -> None:
    """The cluster's signal reaches `recap` itself (as srun delivers it), here with DeepSpeed's
    launcher, which has no SIGUSR1 handler and dies of it: recap signals the launcher's whole
    process group, both ranks save the same step, and recap waits for them (their subreaper) and
    exits 75; nothing is left running."""
    import subprocess
    import sys
    import time

    from tests.faults.runs import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    args = ["launch", "train-vae", *_args(tmp_path, toy_data, "runtime=ddp", "launcher=deepspeed",
                                          f"launcher.hostfile={hostfile}", "launcher.nproc_per_node=2",
                                          f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}", "train_vae.steps=200",
                                          "checkpoint.every_steps=100")]
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = _run_dir(tmp_path) / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_REQUEUE, output[-3000:]
    (step,) = files.committed_steps(_run_dir(tmp_path) / "checkpoints")
    directory = _run_dir(tmp_path) / "checkpoints" / files.step_dir_name(step)
    assert 1 <= step < 100 and sorted(p.name for p in directory.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert output.count(f"preempted by SIGUSR1 at step {step}") == 2  # each rank's own line
    assert str(tmp_path) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
