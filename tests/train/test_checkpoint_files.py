"""Checkpoint directories: commit protocol, checksums, discovery, pruning, safe loading, RNG."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from train.training import checkpoint_files as files


def _write_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    tmp = root / f"{files.TMP_PREFIX}{files.step_dir_name(step)}"
    tmp.mkdir(parents=True)
    (tmp / "model.bin").write_bytes(payload + str(step).encode())
    (tmp / "sub").mkdir()
    (tmp / "sub" / "part.bin").write_bytes(b"x" * 100)
    files.write_manifest(tmp, files.hash_files(tmp, files.list_files(tmp)))
    final = root / files.step_dir_name(step)
    files.commit(tmp, final, step)
    return final


def test_commit_writes_manifest_marker_and_renames(tmp_path: Path) -> None:
    final = _write_checkpoint(tmp_path, 7)
    assert final.name == "step_000000007"
    assert (final / files.COMMITTED).read_text() == "7\n"
    assert not any(p.name.startswith(files.TMP_PREFIX) for p in tmp_path.iterdir())
    manifest = files.read_manifest(final)
    assert sorted(manifest) == ["model.bin", "sub/part.bin"]
    assert manifest["sub/part.bin"]["bytes"] == 100
    assert files.verify_files(final, manifest) == []


def test_flipped_byte_is_reported_with_the_file_name(tmp_path: Path) -> None:
    final = _write_checkpoint(tmp_path, 3)
    target = final / "sub" / "part.bin"
    data = bytearray(target.read_bytes())
    data[50] ^= 0x01
    target.write_bytes(bytes(data))
    problems = files.verify_files(final, files.read_manifest(final))
    assert problems == [f"{target}: checksum mismatch (the file is corrupt or was modified)"]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    final = _write_checkpoint(tmp_path, 3)
    (final / "model.bin").unlink()
    assert files.verify_files(final, ["model.bin"]) == [f"{final / 'model.bin'}: missing"]


def test_only_committed_directories_count_and_debris_is_removed(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path, 1)
    _write_checkpoint(tmp_path, 2)
    (tmp_path / ".tmp-step_000000003").mkdir()  # crash before rename
    (tmp_path / "step_000000004").mkdir()  # crash between rename and COMMITTED
    (tmp_path / "notes").mkdir()  # unrelated: left alone
    assert files.committed_steps(tmp_path) == [1, 2]
    assert files.remove_debris(tmp_path) == [".tmp-step_000000003", "step_000000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_000000001", "step_000000002"]


class _FillingDisk(io.BytesIO):
    """A file on a disk that fills up after ``room`` bytes: a write past it raises ENOSPC."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: Any) -> int:
        if self.tell() + len(memoryview(data).cast("B")) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_during_torch_save_names_the_file_and_the_errno(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's writer turns the OSError of a failed write into RuntimeError('unexpected pos ...');
    save_torch reports the OSError itself."""
    monkeypatch.setattr(files, "open", lambda path, mode: _FillingDisk(room=1000), raising=False)
    target = tmp_path / "optimizer.pt"
    with pytest.raises(files.WriteFailed) as caught:
        files.save_torch({"state": torch.zeros(10_000)}, target)
    assert str(caught.value) == f"writing {target}: [Errno 28] No space left on device"


def test_a_failed_commit_or_text_write_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_disk(root: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "fsync_tree", failing_disk)
    tmp = tmp_path / ".tmp-step_000000002"
    tmp.mkdir()
    with pytest.raises(files.WriteFailed, match=f"^writing {tmp}: \\[Errno 5\\] Input/output error$"):
        files.commit(tmp, tmp_path / "step_000000002", 2)
    assert files.discard(tmp, tmp_path / "step_000000002") and list(tmp_path.iterdir()) == []
    with pytest.raises(files.WriteFailed, match=f"^writing {tmp_path / 'no' / 'x.json'}: \\[Errno 2\\] No such file"):
        files.write_text(tmp_path / "no" / "x.json", "{}")


def test_commit_replaces_a_committed_checkpoint_of_the_same_step_only_then(tmp_path: Path) -> None:
    old = _write_checkpoint(tmp_path, 5, payload=b"old")
    assert (old / "model.bin").read_bytes() == b"old5"
    new = _write_checkpoint(tmp_path, 5, payload=b"new")  # a step repeated after a fallback
    assert new == old and (new / "model.bin").read_bytes() == b"new5" and files.committed_steps(tmp_path) == [5]


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        _write_checkpoint(tmp_path, step)
    assert files.prune(tmp_path, keep_last=2) == [5, 10]
    assert files.committed_steps(tmp_path) == [15, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000015", "step_000000020"]


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "optimizer.pt"
    torch.save({"state": _Exploit(marker)}, evil)
    with pytest.raises(files.CheckpointError, match="optimizer.pt: refused or unreadable"):
        files.safe_torch_load(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # a plain pickle stream, not torch's zip format
    raw.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(files.CheckpointError):
        files.safe_torch_load(raw)
    assert not marker.exists()


def test_safe_load_round_trips_tensors_and_containers(tmp_path: Path) -> None:
    state = {"a": torch.arange(5), "b": [1, 2.5, "x", None, (3, 4)], "c": {"d": torch.ones(2, 2)}}
    torch.save(state, tmp_path / "s.pt")
    loaded = files.safe_torch_load(tmp_path / "s.pt")
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["c"]["d"], state["c"]["d"])
    assert loaded["b"] == [1, 2.5, "x", None, (3, 4)]


def test_rng_capture_restore_replays_every_generator(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # noqa: B018 (advance; numpy caches a gaussian)
    state = files.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    files.restore_rng(files.safe_torch_load(tmp_path / "rng.pt"))
    got = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])
