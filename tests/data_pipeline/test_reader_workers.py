"""DataLoader workers started by a fork server (what a rank uses while its process group is up,
data_pipeline/workers.py): the same batches as forked workers; they end when their reader's
process is SIGKILLed; SIGTERM and SIGUSR1 to the whole process group (torchrun's) leave them,
the fork server and its resource tracker running.

The reason for the fork server, a forked worker that deadlocks when a gloo thread held CPython's
interpreter lock at the fork, is a race: tests/train/test_train_t2i.py's 2-process runs are
where it showed (one CI run in many); these tests pin the behaviour the fix must keep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.workers import set_worker_start_method
from dp_testlib import flat, key_seed_collate, make_reader
from tests.helpers import REPO

HERE = Path(__file__).resolve().parent

# Run in a fresh process of its own session: reads batch 1, then does ACTION, then reads the rest.
SCRIPT = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from dp_testlib import make_reader, pid_collate
from data_pipeline.workers import set_worker_start_method

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
set_worker_start_method("forkserver")
reader = make_reader(sys.argv[2:], workers=2, batch_size=2, collate=pid_collate)
batches = iter(reader)
first = next(batches)
print(json.dumps({"workers": sorted({pid for pid, _ in first} | {pid for pid, _ in next(batches)})}), flush=True)
if os.environ["ACTION"] == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
def group() -> list[int]:  # the live (not zombie) processes of this process group
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == os.getpgid(0) and fields[0] != "Z":
            pids.append(int(pid))
    return sorted(pids)

before = group()
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
os.killpg(0, signal.SIGTERM)
os.killpg(0, signal.SIGUSR1)
time.sleep(1)  # a rank trains on for a while: time for a dying fork server to take its workers along
after = group()
rest = list(batches)
print(json.dumps({"batches": 2 + len(rest), "received": sorted(received), "group": [len(before), after == before]}),
      flush=True)
"""


@pytest.fixture
def forkserver():
    set_worker_start_method("forkserver")
    yield
    set_worker_start_method(None)


def test_forkserver_workers_read_exactly_what_forked_workers_read(dp_toy) -> None:
    forked = list(make_reader(dp_toy.train_shards, workers=2, collate=key_seed_collate))
    set_worker_start_method("forkserver")
    try:
        served = list(make_reader(dp_toy.train_shards, workers=2, collate=key_seed_collate))
    finally:
        set_worker_start_method(None)
    assert served == forked and len(flat(served)) == 32


def test_forkserver_workers_are_not_children_of_the_reader(dp_toy, forkserver) -> None:
    from dp_testlib import pid_collate

    items = flat(make_reader(dp_toy.train_shards, workers=2, collate=pid_collate))
    workers, parents = {pid for pid, _ in items}, {ppid for _, ppid in items}
    assert len(workers) == 2 and os.getpid() not in workers
    assert len(parents) == 1 and os.getpid() not in parents  # the fork server's children


def _run(action: str, shards: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(HERE), *shards], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "ACTION": action, "OMP_NUM_THREADS": "1"})


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_their_reader_is_sigkilled(dp_toy) -> None:
    proc = _run("sigkill", dp_toy.train_shards)
    workers = json.loads(proc.stdout.readline())["workers"]
    proc.wait(timeout=60)
    assert proc.returncode == -9 and len(workers) == 2
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a fork-server worker outlived its SIGKILLed reader"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_and_sigusr1_to_the_process_group_leave_the_workers_reading(dp_toy) -> None:
    proc = _run("sigterm", dp_toy.train_shards)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines()]
    # 32 samples in 2 worker streams of 16 = 8 batches of 2 each; the reader got both signals itself,
    # and its group (reader, fork server, resource tracker, 2 workers) lived through them
    assert lines[1] == {"batches": 16, "received": [signal.SIGUSR1, signal.SIGTERM], "group": [5, True]}
