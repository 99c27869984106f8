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
