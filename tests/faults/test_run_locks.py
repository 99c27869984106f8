"""Two jobs on one run directory: the second is refused before any work (exit 2, one line naming
the holder), and a SIGKILLed holder's lock is taken over by the rerun with a warning."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.faults.runs import VAE_STEPS, start_recap, vae_args, vae_dir
from tests.helpers import run_recap
from train.runtime.run_lock import WHOLE, read_holder

pytestmark = pytest.mark.slow


def _wait_for(path: Path, proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_a_second_train_vae_on_the_same_run_directory_is_refused_and_a_killed_ones_lock_is_taken_over(
        tmp_path: Path, toy_data: Path) -> None:
    run_dir = vae_dir(tmp_path)
    first = start_recap(["train-vae", *vae_args(tmp_path, toy_data, "train_vae.steps=100000")])
    try:
        _wait_for(run_dir / WHOLE, first)
        holder = read_holder(run_dir / WHOLE)
        assert holder is not None and (holder.pid, holder.host, holder.stage) == (first.pid, socket.gethostname(),
                                                                                  "train-vae")
        before = sorted(p.name for p in run_dir.iterdir())
        second = run_recap(["train-vae", *vae_args(tmp_path, toy_data)], timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines() == [
            f"recap train-vae: error: run.name: run directory {run_dir} is in use by recap train-vae (host "
            f"{holder.host}, pid {first.pid}, started {holder.started}): wait for it to end, or use another "
            f"directory; if that job is gone, delete {run_dir / WHOLE}"]
        assert first.poll() is None  # the holder trains on, undisturbed
        assert not {p for p in before if p.startswith(".tmp-")}
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    assert read_holder(run_dir / WHOLE).pid == first.pid  # a SIGKILLed holder leaves its lock
    rerun = run_recap(["train-vae", *vae_args(tmp_path, toy_data)], timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(rf"{re.escape(str(run_dir / WHOLE))}: taking over the lock of recap train-vae \(host "
                     rf"{re.escape(holder.host)}, pid {first.pid}, started .*\), which is gone", rerun.stderr)
    assert not (run_dir / WHOLE).exists()  # released at the end
    assert (run_dir / "checkpoints" / f"step_{VAE_STEPS:09d}").is_dir()
