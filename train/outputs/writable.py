"""The folders a run writes into, checked before any work: one that refuses new files was a
traceback from deep inside a stage, and a read-only checkpoints/ let training run and lost every
step at the first save.

A folder is probed by making an unnamed temporary file in it and closing it (nothing is left, even
after a kill); permissions alone would not do (a read-only mount, root, ACLs, quotas).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from train.config.typed import ConfigError


def probe(folder: Path) -> None:
    """Raise the OSError that making a file in ``folder`` raises (NotADirectoryError when it is
    not a folder)."""
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    with tempfile.TemporaryFile(dir=folder):
        pass


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (absolute)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def run_folders(run_dir: Path) -> Iterator[Path]:
    """``run_dir`` and every folder below it; a linked folder (checkpoints/ on another disk) is
    listed but not entered. A folder that cannot be listed raises its OSError."""
    def fail(exc: OSError) -> None:
        raise exc

    for here, folders, _ in os.walk(run_dir, onerror=fail):
        yield Path(here)
        yield from (Path(here) / name for name in folders if os.path.islink(os.path.join(here, name)))


def reason(exc: OSError) -> str:
    """'[Errno 13] Permission denied' (without the temporary file's name)."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)


def check_run_dir(run_dir: Path) -> None:
    """Every folder of an existing ``run_dir`` takes a new file: the stage writes its logs, config,
    checkpoints and outputs there and replaces or prunes what earlier runs left. The first one
    that does not is a ConfigError naming it and the errno."""
    try:
        for folder in run_folders(run_dir):
            try:
                probe(folder)
            except OSError as exc:
                where = f"the run directory '{folder}'" if folder == run_dir else f"'{folder}' in the run directory"
                raise ConfigError("", f"cannot write to {where}: {reason(exc)}. Make it writable, or choose "
                                  "another run.root or run.name") from None
    except OSError as exc:  # a folder that cannot even be listed
        raise ConfigError("", f"cannot read '{exc.filename}' in the run directory: {reason(exc)}") from None
