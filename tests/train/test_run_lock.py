"""Directory locks (train/runtime/run_lock.py): one job per run directory or output slot, a clear
refusal naming the holder, and takeover of a holder that is gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from train.config.typed import ConfigError
from train.runtime import run_lock
from train.runtime.run_lock import WHOLE, DirLock, Holder, locked, read_holder, slot_name


def _holder(**changes: object) -> Holder:
    """A holder record: by default this host's parent process (alive, with its real start time)."""
    pid = os.getppid()
    base = Holder(host=socket.gethostname(), pid=pid, pid_start=run_lock._pid_start(pid), job="slurm:77",
                  slurm_job="77", slurm_restart=0, stage="train-vae", started="2026-12-07 09:00:00 UTC", token="t0")
    return replace(base, **changes)


def _plant(directory: Path, holder: Holder, name: str = WHOLE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(asdict(holder)))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_refuses_with_one_line_naming_it(tmp_path: Path) -> None:
    holder = _holder()
    path = _plant(tmp_path, holder)
    with pytest.raises(ConfigError) as info:
        DirLock(tmp_path, "train-vae", "run.name").acquire()
    assert str(info.value) == (
        f"run.name: run directory {tmp_path} is in use by recap train-vae (host {holder.host}, pid {holder.pid}, "
        f"Slurm job 77, started 2026-12-07 09:00:00 UTC): wait for it to end, or use another directory; if that job "
        f"is gone, delete {path}")
    assert read_holder(path) == holder  # untouched


@pytest.mark.parametrize("gone", ["dead pid", "reused pid", "earlier run of this Slurm job"])
def test_a_gone_holder_is_taken_over_with_a_warning(tmp_path: Path, gone: str, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    holder = {"dead pid": _holder(pid=_dead_pid()), "reused pid": _holder(pid_start="1"),
              "earlier run of this Slurm job": _holder(host="node-elsewhere")}[gone]
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    path = _plant(tmp_path, holder)
    lock = DirLock(tmp_path, "train-vae", "run.name")
    lock.acquire()
    mine = read_holder(path)
    assert mine is not None and (mine.pid, mine.slurm_restart, mine.token) == (os.getpid(), 1, lock.me.token)
    assert capsys.readouterr().err == \
        f"recap train-vae: warning: {path}: taking over the lock of {holder.describe()}, which is gone\n"
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind


def test_a_holder_on_another_host_is_not_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same Slurm job but not an earlier restart (two runs in one allocation), or another job:
    a pid on another host cannot be checked, so it is refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    for holder in (_holder(host="node-elsewhere", pid=1), _holder(host="node-elsewhere", slurm_job="12", job="slurm:12")):
        _plant(tmp_path, holder)
        with pytest.raises(ConfigError, match="in use by recap train-vae .host node-elsewhere"):
            DirLock(tmp_path, "train-vae", "run.name").acquire()


def test_release_removes_only_its_own_lock(tmp_path: Path) -> None:
    with locked(tmp_path, "sample", "run.name") as lock:
        assert read_holder(tmp_path / WHOLE).token == lock.me.token
        with pytest.raises(ConfigError, match="is in use by recap sample"):  # the same process again: refused
            DirLock(tmp_path, "sample", "run.name").acquire()
        other = _plant(tmp_path, _holder(token="someone-else"))  # replaced behind its back
    assert read_holder(other).token == "someone-else"


def test_shard_job_slots_of_one_split_coexist_and_conflicting_ones_are_refused(tmp_path: Path) -> None:
    """The tasks of one Slurm array (or torchrun job) hold slots r of W; another job wanting a
    held slot, another world size or the whole directory is refused, and so is a slot while the
    whole directory is held."""
    key = "recaption.output"
    with locked(tmp_path, "recaption", key, slot=(0, 3)):
        _plant(tmp_path, _holder(stage="recaption"), slot_name(1, 3))  # a live array task
        with locked(tmp_path, "recaption", key, slot=(2, 3)):
            assert sorted(p.name for p in tmp_path.iterdir()) == [slot_name(r, 3) for r in range(3)]
        _plant(tmp_path, _holder(stage="recaption", token="t1"), slot_name(2, 3))
        for slot, match in (((2, 3), "in use by recap recaption"), ((0, 2), "in use by recap recaption"),
                            (None, "in use by recap recaption")):
            with pytest.raises(ConfigError, match=match):
                DirLock(tmp_path, "recaption", key, slot).acquire()
        assert sorted(p.name for p in tmp_path.iterdir()) == [slot_name(r, 3) for r in range(3)]
    whole = tmp_path / "whole"
    _plant(whole, _holder(stage="cache"))
    with pytest.raises(ConfigError, match="in use by recap cache"):
        DirLock(whole, "recaption", key, (0, 1)).acquire()
    assert sorted(p.name for p in whole.iterdir()) == [WHOLE]


def test_a_gone_neighbour_slot_is_removed_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    holder = _holder(pid=_dead_pid(), stage="recaption")
    stale = _plant(tmp_path, holder, slot_name(0, 2))
    with locked(tmp_path, "recaption", "recaption.output", slot=(0, 4)):
        assert not stale.exists()
    assert capsys.readouterr().err == \
        f"recap recaption: warning: {stale}: removing the lock of {holder.describe()}, which is gone\n"


def test_other_ranks_wait_for_their_jobs_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    _plant(tmp_path, _holder(job="slurm:77"))
    with locked(tmp_path, "train-t2i", "run.name", rank=1):
        pass
    assert (tmp_path / WHOLE).exists()  # rank 1 neither takes nor removes the job's lock
    _plant(tmp_path, _holder(job="slurm:12", slurm_job="12"))
    with pytest.raises(ConfigError, match="in use by recap train-vae"):
        DirLock(tmp_path, "train-t2i", "run.name").wait_for_job(timeout_s=1)
    (tmp_path / WHOLE).unlink()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"rank 0 of this job did not lock .* within 0.5 s: is it on a filesystem"):
        DirLock(tmp_path, "train-t2i", "run.name").wait_for_job(timeout_s=0.5)
    assert time.monotonic() - start < 5


def test_a_directory_that_refuses_files_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=rf"^recaption.output: cannot write to {blocker}/out: "):
        DirLock(blocker / "out", "recaption", "recaption.output", (0, 1)).acquire()
