"""Directory locks: one job at a time per run directory (and per shard-job output slot).

Two `recap train-vae` runs on one run directory shared `.tmp-step_*` directories and
interleaved `metrics.jsonl`; two `recap recaption` runs on one output deleted each other's done
markers. So every stage takes a lock on the directories it writes before any work, and a second
job is refused (exit 2) with one line naming the holder: host, pid, Slurm job, stage, start time.

Two kinds of lock file, both JSON naming their holder:

- ``<dir>/.recap.lock``: the whole directory (a stage's run directory). In a multi-process job
  rank 0 holds it for the job; the other ranks check that the holder is their own job (same
  Slurm job id, or the same launcher rendezvous), waiting a little for rank 0 to take it.
- ``<dir>/.recap.rank<R>of<W>.lock``: one process's share of a shard job (`recap recaption`,
  `recap cache`): the tasks of one Slurm array or torchrun job split the shards and so hold
  different slots of the same directory. A second job is refused when it wants a slot that is
  held, or a different world size (its shards would overlap), or the whole directory.

Taking a lock creates it with ``os.link`` of a fully written temporary file: atomic and
exclusive on local filesystems and on NFS (where ``O_EXCL`` was not, before NFSv3) and Lustre.
A holder that is gone is taken over with a warning: on the same host, a pid that no longer runs
(or runs another program: its start time differs); on any host, an earlier run of the same Slurm
job (a requeued job has a higher ``SLURM_RESTART_COUNT``). Takeovers are serialised with a
``flock`` of the directory. A holder on another host that is not this Slurm job cannot be checked: the
message says to delete the lock file if that job is gone. docs/slurm.md says what this
guarantees on shared filesystems.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from train.config.typed import ConfigError

WHOLE = ".recap.lock"
_SLOT = re.compile(r"^\.recap\.rank(\d+)of(\d+)\.lock$")
RANK_WAIT_S = 120.0  # how long ranks > 0 wait for rank 0 to take the job's lock


def slot_name(rank: int, world: int) -> str:
    return f".recap.rank{rank}of{world}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to name it to a user and to tell whether it is gone."""

    host: str
    pid: int
    pid_start: str | None  # /proc/<pid>/stat start time: a reused pid is not the holder
    job: str  # the job identity its ranks share (`job_identity`)
    slurm_job: str | None
    slurm_restart: int
    stage: str
    started: str  # UTC, ISO 8601
    token: str  # this acquisition (a release removes only its own lock)

    def describe(self) -> str:
        slurm = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"recap {self.stage} (host {self.host}, pid {self.pid}{slurm}, started {self.started})"


def job_identity(env: Mapping[str, str] | None = None) -> str:
    """What every process of one job has in common: its Slurm job id (an array task has its own),
    else the launcher's rendezvous (torchrun's run id and the master address), else this process."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if "RANK" in env and env.get("MASTER_ADDR"):
        return f"ranks:{env.get('TORCHELASTIC_RUN_ID', '')}@{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _pid_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _this_holder(stage: str) -> Holder:
    pid = os.getpid()
    return Holder(host=socket.gethostname(), pid=pid, pid_start=_pid_start(pid), job=job_identity(),
                  slurm_job=os.environ.get("SLURM_JOB_ID") or None,
                  slurm_restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), stage=stage,
                  started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), token=uuid.uuid4().hex)


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in lock file ``path``; None when there is none (or it is unreadable:
    a lock file is written whole before it is linked into place, so that means removed)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_gone(holder: Holder, me: Holder) -> bool:
    """Whether ``holder`` certainly no longer runs: an earlier run of this Slurm job, or a process
    of this host that is dead or another program."""
    if holder.slurm_job and holder.slurm_job == me.slurm_job and holder.slurm_restart < me.slurm_restart:
        return True
    if holder.host != me.host:
        return False
    if holder.pid == me.pid and holder.pid_start == me.pid_start:
        return False  # ours (another lock of this very process)
    start = _pid_start(holder.pid)
    if start is None:
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return sys.platform.startswith("linux")  # no /proc entry on Linux: gone
    return holder.pid_start is not None and start != holder.pid_start


@contextmanager
def _serialised(directory: Path) -> Iterator[None]:
    """One takeover at a time in ``directory``: an exclusive flock of the directory itself (no
    file left behind). Where the filesystem refuses flock on a directory (NFS maps flock to POSIX
    locks, which need a file open for writing), takeovers are not serialised: two processes that
    find the same gone holder at the same moment may both proceed (docs/slurm.md)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


class DirLock:
    """The lock of ``directory`` (``slot``: a shard job's rank and world size, else the whole
    directory) for ``stage``; ``key`` names the config key a refusal points at."""

    def __init__(self, directory: Path, stage: str, key: str, slot: tuple[int, int] | None = None) -> None:
        self.directory, self.stage, self.key, self.slot = Path(directory), stage, key, slot
        self.path = self.directory / (slot_name(*slot) if slot else WHOLE)
        self.me: Holder | None = None

    def acquire(self) -> None:
        """Take the lock (ConfigError naming the holder when another live job has it, or one that
        conflicts with it); a gone holder's lock is taken over with a warning."""
        me = _this_holder(self.stage)
        tmp = self.directory / f".recap.lock.{me.token}.tmp"
        try:  # the first write into the directory: one that refuses files is said here, before any work
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(me)))
        except OSError as exc:
            raise ConfigError(self.key, f"cannot write to {self.directory}: {exc.strerror or exc}") from None
        try:
            if not self._link(tmp):
                self._take_over(tmp, me)
        finally:
            tmp.unlink(missing_ok=True)
        self.me = me
        try:
            self._check_neighbours(me)
        except ConfigError:
            self.release()
            raise

    def _link(self, tmp: Path) -> bool:
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        return True

    def _take_over(self, tmp: Path, me: Holder) -> None:
        with _serialised(self.directory):
            for _ in range(3):  # the holder released it meanwhile: try to link again
                holder = read_holder(self.path)
                if holder is not None:
                    break
                if self._link(tmp):
                    return
            else:
                raise ConfigError(self.key, f"{self.path} is not a lock recap can read: if no job uses "
                                  f"{self.directory}, delete it")
            if holder.token == me.token:
                return  # our link went through after all (NFS can report EEXIST for a retried link)
            if not is_gone(holder, me):
                raise self._busy(holder, self.path)
            self._warn(f"{self.path}: taking over the lock of {holder.describe()}, which is gone")
            os.replace(tmp, self.path)

    def _check_neighbours(self, me: Holder) -> None:
        """No other live lock in the directory conflicts with ours: a whole-directory lock
        conflicts with any other; a slot with the whole directory or another world size."""
        for path in sorted(self.directory.glob(".recap*.lock")):
            if path == self.path:
                continue
            match = _SLOT.match(path.name)
            if self.slot is not None and match is not None and int(match.group(2)) == self.slot[1]:
                continue  # another task of a job of the same split (an array, torchrun ranks)
            holder = read_holder(path)
            if holder is None or holder.token == me.token:
                continue
            if is_gone(holder, me):
                self._warn(f"{path}: removing the lock of {holder.describe()}, which is gone")
                path.unlink(missing_ok=True)
                continue
            raise self._busy(holder, path)

    def _warn(self, message: str) -> None:
        """One warning line on stderr (a lock is taken before the stage sets up its log)."""
        from train.commands.exit_codes import warn

        warn(self.stage, message)

    def _busy(self, holder: Holder, path: Path) -> ConfigError:
        what = "run directory" if self.key == "run.name" else "directory"
        return ConfigError(self.key, f"{what} {self.directory} is in use by {holder.describe()}: wait for it to "
                           f"end, or use another directory; if that job is gone, delete {path}")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.me is None:
            return
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)
        self.me = None

    def wait_for_job(self, timeout_s: float = RANK_WAIT_S) -> None:
        """For ranks > 0 of a job whose rank 0 holds the whole-directory lock: wait until the lock
        names this job (ConfigError when another live job holds it, or none appears in time)."""
        me, deadline = _this_holder(self.stage), time.monotonic() + timeout_s
        while True:
            holder = read_holder(self.path)
            if holder is not None and holder.job == me.job:
                return
            if holder is not None and not is_gone(holder, me):
                raise self._busy(holder, self.path)
            if time.monotonic() >= deadline:
                raise ConfigError(self.key, f"rank 0 of this job did not lock {self.directory} within "
                                  f"{timeout_s:g} s: is it on a filesystem every node shares?")
            time.sleep(0.2)


@contextmanager
def locked(directory: Path, stage: str, key: str, *, slot: tuple[int, int] | None = None,
           rank: int = 0) -> Iterator[DirLock]:
    """Hold ``directory``'s lock while the block runs. A whole-directory lock is taken by rank 0;
    other ranks check that it is their job's (`DirLock.wait_for_job`)."""
    lock = DirLock(directory, stage, key, slot)
    if slot is None and rank != 0:
        lock.wait_for_job()
        yield lock
        return
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
