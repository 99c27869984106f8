"""Checkpointer in one process: exact continuation, refusal of drift, corruption, crashes mid-save."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from train.outputs.run_logging import MetricsLogger
from train.training import checkpoint_files as files
from train.training.checkpointing import Checkpointer, TrainState, resume_fingerprint
from train.training.loop import Parts, Schedule, train_steps
from train.config.training import OptimizerConfig
from train.config.execution import LoggerConfig, ResumeConfig, RuntimeConfig, WandbConfig
from train.training.optimization import build_optimizer, build_scheduler
from train.runtime.processes import Runtime, start_runtime
from train.config.typed import ConfigError


class CountingReader:
    """Stands in for ShardReader's resumable-position contract (state_dict/load_state_dict)."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        self.position += 1
        g = torch.Generator().manual_seed(self.position)
        return torch.randn(4, 3, generator=g)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = start_runtime(RuntimeConfig(kind="single", device="cpu"), micro_batch_size=4, grad_accum=1, grad_clip=1.0)
    yield rt
    rt.close()


def _parts(rt: Runtime, seed: int) -> tuple[Any, Any, Any, CountingReader]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    cfg = OptimizerConfig(lr=1e-2, warmup_steps=3, schedule="cosine")
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=20)
    model, optimizer = rt.prepare(model, optimizer)
    return model, optimizer, scheduler, CountingReader()


def _train(rt: Runtime, parts: tuple[Any, ...], state: TrainState, steps: int) -> list[float]:
    model, optimizer, scheduler, reader = parts
    losses = []
    for _ in range(steps):
        x = reader.next_batch()
        # Dropout draws from the global torch RNG: exact continuation needs the RNG restored too.
        losses.append(rt.micro_step(model, lambda m: m(x).pow(2).mean(), last=True)["loss"].item())
        rt.optimizer_step(model, optimizer, scheduler)
        state.step += 1
    return losses


def _checkpointer(rt: Runtime, root: Path, fingerprint: dict[str, Any] | None = None, **resume: bool) -> Checkpointer:
    return Checkpointer(root, rt, fingerprint=fingerprint or {"seed": 0, "lr": 0.01}, config={}, keep_last=2,
                        resume=ResumeConfig(**resume))


def _save(ckpt: Checkpointer, parts: tuple[Any, ...], state: TrainState) -> Path:
    model, optimizer, scheduler, reader = parts
    return ckpt.save(state, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader)


def _restore(ckpt: Checkpointer, parts: tuple[Any, ...], state: TrainState) -> bool:
    model, optimizer, scheduler, reader = parts
    return ckpt.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader)


def _rewrite_manifest(directory: Path) -> None:
    files.write_manifest(directory, files.hash_files(directory, files.list_files(directory)))


def test_resume_continues_bit_identically(runtime: Runtime, tmp_path: Path) -> None:
    original, state = _parts(runtime, seed=0), TrainState()
    _train(runtime, original, state, 4)
    ckpt = _checkpointer(runtime, tmp_path)
    _save(ckpt, original, state)
    expected = _train(runtime, original, state, 5)
    expected_weights = {k: v.clone() for k, v in original[0].state_dict().items()}

    fresh, resumed_state = _parts(runtime, seed=123), TrainState()  # different init, RNG and position
    assert _restore(ckpt, fresh, resumed_state)
    assert resumed_state.step == 4 and fresh[3].position == 4
    assert fresh[2].get_last_lr() == pytest.approx([1e-2 * (0.5 * (1 + torch.cos(torch.tensor(3.1415926535 * 1 / 17)).item()))])
    assert _train(runtime, fresh, resumed_state, 5) == expected
    for key, value in fresh[0].state_dict().items():
        assert torch.equal(value, expected_weights[key]), key
    for a, b in zip(fresh[1].state_dict()["state"].values(), original[1].state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_no_checkpoint_means_fresh_start(runtime: Runtime, tmp_path: Path) -> None:
    state = TrainState()
    assert not _restore(_checkpointer(runtime, tmp_path / "none"), _parts(runtime, 0), state)
    assert state.step == 0


def test_keep_last_and_newest_is_used(runtime: Runtime, tmp_path: Path) -> None:
    parts, state = _parts(runtime, 0), TrainState()
    ckpt = _checkpointer(runtime, tmp_path)
    for _ in range(4):
        _train(runtime, parts, state, 1)
        _save(ckpt, parts, state)
    assert files.committed_steps(tmp_path) == [3, 4]
    restored = TrainState()
    _restore(ckpt, _parts(runtime, 0), restored)
    assert restored.step == 4


def test_config_drift_is_refused_with_the_differences(runtime: Runtime, tmp_path: Path) -> None:
    parts, state = _parts(runtime, 0), TrainState()
    _train(runtime, parts, state, 1)
    _save(_checkpointer(runtime, tmp_path, {"seed": 0, "lr": 0.01, "batch": 8}), parts, state)
    drifted = {"seed": 1, "lr": 0.01, "width": 64}
    with pytest.raises(ConfigError) as info:
        _restore(_checkpointer(runtime, tmp_path, drifted), _parts(runtime, 0), TrainState())
    message = str(info.value)
    assert info.value.key == "resume"
    assert "batch: 8 -> '<absent>'" in message and "seed: 0 -> 1" in message and "width: '<absent>' -> 64" in message
    assert "resume.allow_config_change=true" in message
    allowed = TrainState()
    assert _restore(_checkpointer(runtime, tmp_path, drifted, allow_config_change=True), _parts(runtime, 0), allowed)
    assert allowed.step == 1


def test_corrupt_newest_fails_naming_the_file_or_falls_back(runtime: Runtime, tmp_path: Path) -> None:
    parts, state = _parts(runtime, 0), TrainState()
    ckpt = _checkpointer(runtime, tmp_path)
    for _ in range(2):
        _train(runtime, parts, state, 1)
        newest = _save(ckpt, parts, state)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(files.CheckpointError, match=f"{weights}: checksum mismatch"):
        _restore(ckpt, _parts(runtime, 0), TrainState())
    fallback, restored = _checkpointer(runtime, tmp_path, fallback_to_previous=True), TrainState()
    assert _restore(fallback, _parts(runtime, 0), restored)
    assert restored.step == 1


def test_crash_during_save_resumes_from_previous_and_cleans_up(runtime: Runtime, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    parts, state = _parts(runtime, 0), TrainState()
    ckpt = _checkpointer(runtime, tmp_path)
    _train(runtime, parts, state, 1)
    _save(ckpt, parts, state)
    _train(runtime, parts, state, 1)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed while committing")

    monkeypatch.setattr(files, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(ckpt, parts, state)
    monkeypatch.undo()
    assert (tmp_path / ".tmp-step_000000002").is_dir()
    restored = TrainState()
    assert _restore(ckpt, _parts(runtime, 0), restored)
    assert restored.step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000001"]


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("fault", "reason"), [("enospc", "[Errno 28] No space left on device"),
                                               ("edquot", "[Errno 122] Disk quota exceeded"),
                                               ("eio", "[Errno 5] Input/output error")])
def test_a_failed_write_names_the_file_and_leaves_the_previous_checkpoint_intact(
        runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, reason: str) -> None:
    parts, state = _parts(runtime, 0), TrainState()
    ckpt = _checkpointer(runtime, tmp_path)
    _train(runtime, parts, state, 1)
    previous = _save(ckpt, parts, state)
    before = _listing(tmp_path)
    _train(runtime, parts, state, 1)
    monkeypatch.setenv("RECAP_FAULT", f"{fault}@save=2")
    with pytest.raises(files.CheckpointSaveError) as caught:
        _save(ckpt, parts, state)
    failed_file = tmp_path / ".tmp-step_000000002" / "model.safetensors"  # the first file of the save
    assert str(caught.value) == (f"checkpoint save of step 2 failed writing {failed_file}: {reason}. The previous "
                                 f"checkpoint ({previous}) is intact: free space (or fix the disk) and rerun the same "
                                 "command to resume from it")
    assert _listing(tmp_path) == before  # the same files, byte for byte; no partial checkpoint left
    monkeypatch.delenv("RECAP_FAULT")
    assert _save(ckpt, parts, state) == tmp_path / "step_000000002"  # once there is room, saving works again


def test_a_failed_first_save_or_commit_says_there_is_no_earlier_checkpoint(runtime: Runtime, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    parts, state = _parts(runtime, 0), TrainState()
    ckpt = _checkpointer(runtime, tmp_path)
    _train(runtime, parts, state, 1)

    def failing_disk(root: Path) -> None:  # the main rank's commit: every file written, then fsync fails
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "fsync_tree", failing_disk)
    with pytest.raises(files.CheckpointSaveError) as caught:
        _save(ckpt, parts, state)
    assert str(caught.value) == (f"checkpoint save of step 1 failed writing {tmp_path / '.tmp-step_000000001'}: "
                                 "[Errno 5] Input/output error. No checkpoint was committed before it: free space (or "
                                 "fix the disk) and rerun the same command")
    assert list(tmp_path.iterdir()) == []


class _WatchedReader:
    """A reader whose iterator records being closed (a ShardReader's closes its DataLoader workers)."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            while True:
                yield torch.randn(4, 3)
        finally:
            self.closed = True

    def fault_counts(self) -> dict[str, int]:
        return {}


def test_a_failed_save_ends_the_loop_with_the_reader_closed(runtime: Runtime, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Left open, the reader's DataLoader workers outlived the error and the exit waited for them."""
    model, optimizer, scheduler, _ = _parts(runtime, 0)
    reader = _WatchedReader()
    metrics = MetricsLogger(tmp_path, LoggerConfig(progress=False, wandb=WandbConfig(mode="disabled")), stage="t",
                            run_name="t", config={})
    parts = Parts(runtime=runtime, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader,
                  checkpointer=_checkpointer(runtime, tmp_path / "checkpoints"), metrics=metrics, state=TrainState())
    monkeypatch.setenv("RECAP_FAULT", "enospc@save=2")
    with pytest.raises(files.CheckpointSaveError, match="^checkpoint save of step 2 failed writing ") as caught:
        train_steps(parts, Schedule(steps=4, accum=1, global_batch=4, checkpoint_every=2, log_every=1,
                                    show_progress=False), lambda m, x: m(x).pow(2).mean(), desc="t")
    assert reader.closed  # while the error (its traceback: the loop's frame) is still held, as when it is reported
    assert caught.value.__traceback__ is not None
    assert files.committed_steps(tmp_path / "checkpoints") == []


def test_world_size_change_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    parts, state = _parts(runtime, 0), TrainState()
    _train(runtime, parts, state, 1)
    directory = _save(_checkpointer(runtime, tmp_path), parts, state)
    train_state = json.loads((directory / "train_state.json").read_text())
    (directory / "train_state.json").write_text(json.dumps({**train_state, "world_size": 2}))
    _rewrite_manifest(directory)
    with pytest.raises(files.CheckpointError, match="written by 2 processes and this run has 1"):
        _restore(_checkpointer(runtime, tmp_path), _parts(runtime, 0), TrainState())


def test_resume_fingerprint_selects_keys() -> None:
    config = {"seed": 1, "data": {"train": "x", "reader": {"num_workers": 2, "strict": False}},
              "logger": {"progress": True}, "train_vae": {"steps": 10, "lr": 0.1}}
    fingerprint = resume_fingerprint(config, ("seed", "data", "train_vae"), ("train_vae.steps", "data.reader.strict"))
    assert fingerprint == {"seed": 1, "data.train": "x", "data.reader.num_workers": 2, "train_vae.lr": 0.1}
