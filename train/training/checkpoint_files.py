"""Checkpoint directories on disk: atomic commit, checksums, discovery, safe loading, RNG states.

A checkpoint is ``<root>/step_<N>/``. It is written as ``<root>/.tmp-step_<N>/``, every file
is fsynced, ``MANIFEST.json`` (sha256 and size of every file) is written, the directory is
renamed into place and ``COMMITTED`` is written last. Only directories with ``COMMITTED`` are
checkpoints; anything else is debris of an interrupted save and is removed on the next start.
A write that fails (disk full, quota, I/O error) raises WriteFailed naming the file and the errno.
Nothing is ever unpickled beyond tensors and plain containers (safetensors, or torch.load with
weights_only=True plus the few classes a caller allows: the runtime's allowlist of DeepSpeed's
own small bookkeeping classes, train/runtime/processes.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from data_pipeline.shard_io import fsync_dir, sha256_file

MANIFEST = "MANIFEST.json"
COMMITTED = "COMMITTED"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, from another config or world size)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint that could not be written (disk full, quota, I/O error); the checkpoints
    committed before it are untouched."""


class WriteFailed(Exception):
    """The write of one file (or folder) of a checkpoint failed: ``str`` is
    "writing <path>: [Errno 28] No space left on device"."""

    def __init__(self, path: Path | str, reason: str, doing: str = "writing") -> None:
        super().__init__(f"{doing} {path}: {reason}")


@contextlib.contextmanager
def writing(path: Path, doing: str = "writing") -> Iterator[None]:
    """Around the write of ``path``: its failure becomes WriteFailed naming the file (the one the
    OSError names, else ``path``) and the errno. torch's and safetensors' writers report the same
    causes as RuntimeError and SafetensorError (torch's without the errno: use save_torch)."""
    try:
        yield
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
        raise WriteFailed(exc.filename or path, reason, doing) from None
    except (RuntimeError, SafetensorError) as exc:
        raise WriteFailed(path, (str(exc).strip().splitlines() or [type(exc).__name__])[0], doing) from None


class _KeepsWriteError:
    """The file torch.save writes through, keeping the OSError of a failed write: torch's writer
    swallows it and raises RuntimeError("unexpected pos ...") instead, which names no cause."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path``; a failed write is WriteFailed with the errno."""
    with writing(path), open(path, "wb") as f:
        out = _KeepsWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def save_module(module: torch.nn.Module, path: Path) -> None:
    """A module's weights as safetensors at ``path``; a failed write is WriteFailed."""
    with writing(path):
        save_model(module, str(path))


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path``; a failed write is WriteFailed."""
    with writing(path):
        path.write_text(text)


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so a rename after it is durable)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def list_files(root: Path) -> list[str]:
    """Every file under ``root``, relative, sorted; the manifest and marker excluded."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMMITTED))


def hash_files(root: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in names}


def write_manifest(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    with writing(root / MANIFEST), open(root / MANIFEST, "w") as f:
        json.dump(dict(sorted(entries.items())), f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_files(root: Path, names: Iterable[str]) -> list[str]:
    """Problems ("<file>: checksum mismatch", "<file>: missing") among ``names`` of the manifest."""
    manifest = read_manifest(root)
    problems = []
    for name in names:
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != manifest[name]["bytes"] or sha256_file(path) != manifest[name]["sha256"]:
            problems.append(f"{path}: checksum mismatch (the file is corrupt or was modified)")
    return problems


def read_manifest(root: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{root / MANIFEST}: unreadable manifest ({exc})") from None


def commit(tmp: Path, final: Path, step: int) -> None:
    """Rename a fully written ``tmp`` directory to ``final`` (replacing a committed checkpoint of
    the same step only now), fsynced, and mark it committed. A failure is WriteFailed."""
    with writing(tmp):
        fsync_tree(tmp)
        if final.exists():  # a committed checkpoint of this step (a step repeated after a fallback)
            (final / COMMITTED).unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    with writing(final / COMMITTED), open(final / COMMITTED, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    with writing(final):
        fsync_dir(final)


def discard(tmp: Path, final: Path) -> bool:
    """Remove what a failed save left (``tmp``, and ``final`` if it has no COMMITTED); True when
    nothing is left (else the next start removes it as debris)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists() and not (final / COMMITTED).exists():
        shutil.rmtree(final, ignore_errors=True)
    return not tmp.exists() and (not final.exists() or (final / COMMITTED).exists())


def committed_steps(root: Path) -> list[int]:
    """Steps of committed checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / COMMITTED).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def remove_debris(root: Path) -> list[str]:
    """Delete temp dirs and uncommitted step dirs left by an interrupted save; returns their names."""
    if not root.is_dir():
        return []
    removed = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and (d.name.startswith(TMP_PREFIX) or (_STEP_DIR.match(d.name) and not (d / COMMITTED).exists())):
            shutil.rmtree(d)
            removed.append(d.name)
    return removed


def prune(root: Path, keep_last: int) -> list[int]:
    """Delete all but the newest ``keep_last`` committed checkpoints (marker first, then files)."""
    steps = committed_steps(root)
    doomed = steps[:-keep_last] if keep_last > 0 else steps
    for step in doomed:
        d = root / step_dir_name(step)
        (d / COMMITTED).unlink()
        shutil.rmtree(d)
    return doomed


def safe_torch_load(path: str | Path, map_location: Any = "cpu", allow: Sequence[Any] = ()) -> Any:
    """torch.load that only rebuilds tensors and plain containers (never arbitrary pickles), plus
    the classes in ``allow`` (an engine's small bookkeeping classes, whose loading runs no code).
    Anything else, or an unreadable file, is a CheckpointError naming the file."""
    try:
        if allow:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError ...
        raise CheckpointError(f"{path}: refused or unreadable: {str(exc).splitlines()[0]}") from None


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as tensors and plain values."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
