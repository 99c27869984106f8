"""launch/quick_exit.py: a recap process ends without the interpreter teardown but loses nothing
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
from launch.quick_exit import exit_now

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
