"""launch/supervise.py: the launching parent explains a failed rendezvous in one line and keeps
the workers' own exit codes. A stand-in for torchrun (a tiny Python script) writes what torchrun
writes; the real multi-node timeout is tests/faults/test_multinode.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launch.supervise import EXIT_REQUEUE, launcher_failure, run_supervised

RDZV = ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.2.3:29400", "--rdzv-id=job",
        "--rdzv-conf=join_timeout=7"]
# Writes torchrun's error file ($TORCHELASTIC_ERROR_FILE, as its @record entry point does) and/or
# rank 0's recorded exit code, then exits with the given code.
FAKE_TORCHRUN = """
import json, os, sys
message, rank0, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
if message:
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        json.dump({"message": {"message": message, "extraInfo": {"py_callstack": "...", "timestamp": "0"}}}, f)
if rank0:
    open(os.path.join(os.environ["RECAP_EXIT_DIR"], "rank_0.code"), "w").write(rank0)
sys.exit(code)
"""


def _run(message: str, rank0: str, code: int) -> int:
    return run_supervised([sys.executable, "-c", FAKE_TORCHRUN, message, rank0, str(code), *RDZV])


def test_a_rendezvous_timeout_ends_with_one_line_naming_endpoint_nodes_and_timeout(capfd) -> None:
    assert _run("RendezvousTimeoutError: ", "", 1) == 1
    assert capfd.readouterr().err.splitlines() == [
        "recap: error: the 2 nodes did not join the rendezvous at 10.1.2.3:29400 within 7 s (launcher.rdzv_timeout_s); "
        "start every node with the same launcher.nnodes and launcher.rdzv_endpoint, and check that node 0 can be "
        "reached there"]


@pytest.mark.parametrize(("message", "rank0", "code", "expected"), [
    ("ChildFailedError: worker 1 failed", "", 1, 1),  # the workers already printed their error
    ("", "3", 1, 3),  # a worker's recorded failure wins over torchrun's 1
    ("", str(EXIT_REQUEUE), 1, EXIT_REQUEUE),
    ("", "", 0, 0),
])
def test_other_outcomes_add_no_line_and_keep_the_combined_code(message: str, rank0: str, code: int, expected: int,
                                                              capfd) -> None:
    assert _run(message, rank0, code) == expected
    assert capfd.readouterr().err == ""


def test_other_rendezvous_failures_are_named_with_their_detail(tmp_path: Path) -> None:
    error = tmp_path / "error.json"
    error.write_text(json.dumps({"message": {"message": "RendezvousConnectionError: The connection to the C10d "
                                                        "store has failed."}}))
    assert launcher_failure(error, RDZV) == (
        "the rendezvous at 10.1.2.3:29400 (2 nodes, join timeout 7 s) failed: RendezvousConnectionError: The "
        "connection to the C10d store has failed.; check launcher.rdzv_endpoint and that node 0 can be reached there")
    assert launcher_failure(tmp_path / "missing.json", RDZV) is None
    error.write_text("not json")
    assert launcher_failure(error, RDZV) is None


# ---- launchers that die before their workers (DeepSpeed's on SIGUSR1, torchrun on a second signal) ----
# A stand-in launcher: starts one worker (in a new session like torchrun's, or in its own process
# group like DeepSpeed's), then either exits at once with 1 or waits for it.
LAUNCHER = """
import os, subprocess, sys
worker, new_session, wait = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
proc = subprocess.Popen([sys.executable, "-c", worker], start_new_session=new_session)
sys.exit(proc.wait() if wait else 1)
"""
# A worker: records 75 after the signal (or after 1 s without one: "slow save"), like a preempted rank.
WORKER = """
import os, signal, sys, time
code_file = os.path.join(os.environ["RECAP_EXIT_DIR"], "rank_0.code")
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
open(os.environ["READY_FILE"], "w").close()
deadline = time.monotonic() + (30 if "{wait_for_signal}" == "1" else 1)
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
open(code_file, "w").write("75" if got or "{wait_for_signal}" != "1" else "0")
"""


def test_workers_a_dead_launcher_left_behind_are_waited_for(tmp_path: Path) -> None:
    """The launcher exits 1 at once; its worker (another session) records 75 a second later: the
    supervisor, their subreaper, waits for it and reports 75, not the launcher's 1."""
    import os

    worker = WORKER.format(wait_for_signal="0")
    env = {**os.environ, "READY_FILE": str(tmp_path / "ready")}
    assert run_supervised([sys.executable, "-c", LAUNCHER, worker, "1", "0"], env=env) == EXIT_REQUEUE


def test_a_signal_reaches_every_process_of_the_launchers_group(tmp_path: Path) -> None:
    """SIGUSR1 to the supervisor goes to the launcher's whole group: the launcher dies of it (as
    DeepSpeed's does), the worker in its group records it and exits 75, and that is the result."""
    import os
    import signal
    import threading
    import time

    ready = tmp_path / "ready"

    def signal_when_ready() -> None:
        for _ in range(400):
            if ready.exists():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=signal_when_ready)
    thread.start()
    start = time.monotonic()
    code = run_supervised([sys.executable, "-c", LAUNCHER, WORKER.format(wait_for_signal="1"), "0", "1"],
                          env={**os.environ, "READY_FILE": str(ready)})
    thread.join()
    assert code == EXIT_REQUEUE and time.monotonic() - start < 20
