"""launch/quick_process.py: a recap process ends without the interpreter teardown but loses nothing
(exit code, exit handlers, a non-daemon thread's work, buffered stdout and stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from launch.quick_process import exit_now

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late():
    time.sleep(0.3)
    (out / "thread").write_text("done")

threading.Thread(target=late).start()  # not a daemon: exit waits for it, as Python's own exit does
sys.stdout.write("buffered, no newline")
sys.stderr.write("err, no newline")
exit_now(7)
"""


def test_exit_now_keeps_the_code_the_handlers_the_threads_and_the_buffers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (7, "buffered, no newline", "err, no newline")
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"


GC_SCRIPT = """
import gc, json
from launch.quick_process import defer_gc, resume_gc
resume_gc()  # not deferred: changes nothing
states = [(gc.isenabled(), gc.get_freeze_count())]
defer_gc()
import torch  # what a stage imports, without the collector
states.append((gc.isenabled(), gc.get_freeze_count()))
resume_gc()
states.append((gc.isenabled(), gc.get_freeze_count()))
print(json.dumps(states))
"""


def test_defer_and_resume_gc_switch_the_collector_off_for_the_imports_only() -> None:
    import json

    done = subprocess.run([sys.executable, "-c", GC_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (before, deferred, resumed) = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == [True, 0] and deferred == [False, 0]
    assert resumed[0] is True and resumed[1] > 100_000  # torch's objects now in the permanent generation
