"""Checkpoints that resume exactly: everything a run needs to continue as if never stopped.

Saved: the model and optimizer (in the engine's own layout: Runtime.save_model_state in
train/runtime/processes.py), the LR scheduler, extra modules such as EMA (safetensors), the train
state (step, samples seen, resolution stage, world size), per-rank RNG states and reader
positions (``rank_NNNNN.pt``), the resume-relevant config (``fingerprint.json``) and the
redacted config. Files are written under a temp name, checksummed, renamed and marked
committed (train/training/checkpoint_files.py). Rerunning the same command resumes from the newest
valid checkpoint; a config that changed in a resume-relevant key is refused with the list of
differences unless resume.allow_config_change=true.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from train.training import checkpoint_files as files
from train.training.checkpoint_files import CheckpointError, CheckpointSaveError
from train.runtime.failpoints import maybe_fail, maybe_fail_write
from train.config.execution import ResumeConfig
from train.runtime.processes import ModelStateError, Runtime
from train.config.typed import ConfigError

log = logging.getLogger("recap")


@dataclass
class TrainState:
    """The loop's counters; everything else a resume needs is in the saved objects."""

    step: int = 0
    samples_seen: int = 0
    stage_index: int = 0  # progressive-resolution stage
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def resume_fingerprint(config: dict[str, Any], keys: tuple[str, ...], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flat {key: value} of a (redacted) config under ``keys`` prefixes, minus ``ignore``.

    A stage lists the keys that change what it computes (seed, batch, model shape, data);
    changing one of those between runs of the same run directory refuses the resume.
    """
    from train.config.typed import flatten

    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return {k: v for k, v in flatten(config).items() if under(k, keys) and not under(k, ignore)}


def _diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in keys
            if saved.get(k, "<absent>") != current.get(k, "<absent>")]


class Checkpointer:
    """Saves to and resumes from ``root`` (usually ``<run_dir>/checkpoints``).

    Args:
        root: checkpoint directory of this run.
        runtime: the started runtime (barriers, gathers, the model and optimizer state).
        fingerprint: flat {key: value} of the config keys a resume must not change.
        config: redacted config snapshot, stored for humans.
        keep_last: committed checkpoints to keep.
        resume: allow_config_change / fallback_to_previous policy.
    """

    def __init__(self, root: Path, runtime: Runtime, *, fingerprint: dict[str, Any], config: dict[str, Any],
                 keep_last: int, resume: ResumeConfig) -> None:
        self.root, self.rt, self.fingerprint, self.config = root, runtime, fingerprint, config
        self.keep_last, self.resume = keep_last, resume

    # ---- saving -------------------------------------------------------------------------
    def save(self, state: TrainState, *, model: Any, optimizer: Any, scheduler: Any, reader: Any = None,
             extra: dict[str, torch.nn.Module] | None = None) -> Path:
        """Write a checkpoint of ``state.step`` (collective: every rank calls it).

        A write that fails on any rank (disk full, quota, I/O error) fails the save on every rank
        alike, each after the same collectives (no rank is left waiting): the partial checkpoint is
        removed, the committed ones are untouched, and CheckpointSaveError names the file and why.
        """
        rt, name = self.rt, files.step_dir_name(state.step)
        tmp, final = self.root / f"{files.TMP_PREFIX}{name}", self.root / name
        failure = self._agreed(_attempt(self._start, tmp) if rt.is_main else None)
        if failure is None:
            failure = self._agreed(_attempt(self._write, tmp, state, model=model, optimizer=optimizer,
                                            scheduler=scheduler, reader=reader, extra=extra))
        shares = self._spread(tmp, _hash_share) if failure is None else []
        failure = failure or next((share for share in shares if isinstance(share, str)), None)
        if failure is None and rt.is_main:
            merged = {k: v for share in shares for k, v in share.items()}
            failure = _attempt(self._commit, tmp, final, merged, state.step)
        failure = rt.broadcast_object(failure)  # rank 0 committed, or did not: every rank knows
        if failure is None:
            return final
        if rt.is_main and not files.discard(tmp, final):
            log.warning("could not remove %s; the next start removes it", tmp)
        raise CheckpointSaveError(self._failed_message(state.step, failure))

    def _start(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        with files.writing(tmp):
            tmp.mkdir(parents=True)

    def _write(self, tmp: Path, state: TrainState, *, model: Any, optimizer: Any, scheduler: Any, reader: Any,
               extra: dict[str, torch.nn.Module] | None) -> None:
        """This rank's files of the checkpoint, into ``tmp``; a failed write is WriteFailed."""
        rt, out = self.rt, _Files(state.step, self.rt.rank)
        with files.writing(tmp):  # what the engine raised without naming its file (WriteFailed passes)
            rt.save_model_state(model, optimizer, tmp, out.torch, out.module)
        if rt.is_main:
            out.torch(scheduler.state_dict(), tmp / "scheduler.pt")
            for key, module in (extra or {}).items():
                out.module(module, tmp / f"{key}.safetensors")
            state.world_size = rt.world_size
            out.text(tmp / "train_state.json", json.dumps(asdict(state), indent=2, sort_keys=True))
            out.text(tmp / "fingerprint.json", json.dumps(self.fingerprint, indent=1, sort_keys=True))
            out.text(tmp / "config.json", json.dumps(self.config, indent=1, sort_keys=True))
        out.torch({"rng": files.capture_rng(), "reader": reader.state_dict() if reader is not None else None},
                  tmp / f"rank_{rt.rank:05d}.pt")
        maybe_fail(save=state.step, rank=rt.rank)  # fault tests: a signal or kill in the middle of a save

    def _commit(self, tmp: Path, final: Path, entries: dict[str, dict[str, Any]], step: int) -> None:
        files.write_manifest(tmp, entries)
        files.commit(tmp, final, step)
        pruned = files.prune(self.root, self.keep_last)
        log.info("checkpoint %s saved (%d files%s)", final, len(entries), f"; pruned steps {pruned}" if pruned else "")

    def _agreed(self, failure: str | None) -> str | None:
        """The first failing rank's ``failure``, on every rank (collective)."""
        return next((f for f in self.rt.gather_objects(failure) if f is not None), None)

    def _failed_message(self, step: int, failure: str) -> str:
        previous = [s for s in files.committed_steps(self.root) if s < step]
        then = (f"The previous checkpoint ({self.root / files.step_dir_name(previous[-1])}) is intact: free space "
                "(or fix the disk) and rerun the same command to resume from it" if previous else
                "No checkpoint was committed before it: free space (or fix the disk) and rerun the same command")
        return f"checkpoint save of step {step} failed {failure}. {then}"

    def _spread(self, directory: Path, fn: Any) -> list[Any]:
        """Run ``fn(directory, names)`` on a disjoint share of the files on each rank; gather."""
        names = self.rt.broadcast_object(files.list_files(directory) if self.rt.is_main else None)
        return self.rt.gather_objects(fn(directory, names[self.rt.rank :: self.rt.world_size]))

    # ---- resuming -----------------------------------------------------------------------
    def latest_valid(self) -> Path | None:
        """The newest committed checkpoint whose files match their checksums (collective).

        Debris of interrupted saves is removed first. A corrupt newest checkpoint raises
        CheckpointError naming the file, or falls back to the previous one when configured.
        """
        if self.rt.is_main:
            removed = files.remove_debris(self.root)
            if removed:
                log.warning("removed incomplete checkpoint directories: %s", ", ".join(removed))
        steps = self.rt.broadcast_object(files.committed_steps(self.root) if self.rt.is_main else None)
        for step in reversed(steps):
            directory = self.root / files.step_dir_name(step)
            problems = [p for part in self._spread(directory, files.verify_files) for p in part]
            if not problems:
                return directory
            if not self.resume.fallback_to_previous:
                raise CheckpointError(f"checkpoint {directory} is corrupt: {problems[0]}. Delete it, or set "
                                      "resume.fallback_to_previous=true to resume from the one before")
            log.warning("checkpoint %s is corrupt (%s); falling back to the previous one", directory, problems[0])
        return None

    def restore(self, state: TrainState, *, model: Any, optimizer: Any, scheduler: Any, reader: Any = None,
                extra: dict[str, torch.nn.Module] | None = None) -> bool:
        """Load the newest valid checkpoint into the given objects; False when there is none."""
        directory = self.latest_valid()
        if directory is None:
            return False
        self._check_compatible(directory)
        saved = TrainState(**json.loads((directory / "train_state.json").read_text()))
        try:
            self.rt.load_model_state(model, optimizer, directory, files.safe_torch_load)
        except ModelStateError as exc:
            raise CheckpointError(str(exc)) from None
        scheduler.load_state_dict(files.safe_torch_load(directory / "scheduler.pt"))
        for key, module in (extra or {}).items():
            load_model(module, str(directory / f"{key}.safetensors"), device=self._device())
        per_rank = files.safe_torch_load(directory / f"rank_{self.rt.rank:05d}.pt")
        if reader is not None:
            try:
                reader.load_state_dict(per_rank["reader"])
            except ValueError as exc:
                raise CheckpointError(f"{directory}: {exc}") from None
        files.restore_rng(per_rank["rng"])
        for k, v in asdict(saved).items():
            setattr(state, k, v)
        log.info("resumed from %s (step %d, %d samples seen)", directory, saved.step, saved.samples_seen)
        return True

    def _device(self) -> str:
        device = self.rt.device  # safetensors accepts "cpu" but not "cpu:0"
        return "cpu" if device.type == "cpu" else str(device)

    def _check_compatible(self, directory: Path) -> None:
        saved_world = json.loads((directory / "train_state.json").read_text())["world_size"]
        if saved_world != self.rt.world_size:
            raise CheckpointError(
                f"{directory} was written by {saved_world} processes and this run has {self.rt.world_size}; the "
                "data order and optimizer shards depend on it. Resume with the same number of processes")
        saved = json.loads((directory / "fingerprint.json").read_text())
        differences = _diff(saved, self.fingerprint)
        if differences and not self.resume.allow_config_change:
            raise ConfigError("resume", f"the config changed since {directory} was saved: {'; '.join(differences)}. "
                              "Restore these values, use another run.name, or set resume.allow_config_change=true")
        if differences:
            log.warning("resuming with a changed config: %s", "; ".join(differences))


@dataclass(frozen=True)
class _Files:
    """The writers of one save's files (checkpoint_files: a failed write is WriteFailed naming the
    file), each file first past the write failpoint of this step and rank: ``enospc@save=N`` fails
    the first file a rank writes into step N's checkpoint (fault tests)."""

    step: int
    rank: int

    def torch(self, obj: Any, path: Path) -> None:
        self._failpoint(path)
        files.save_torch(obj, path)

    def module(self, module: torch.nn.Module, path: Path) -> None:
        self._failpoint(path)
        files.save_module(module, path)

    def text(self, path: Path, text: str) -> None:
        self._failpoint(path)
        files.write_text(path, text)

    def _failpoint(self, path: Path) -> None:
        with files.writing(path):
            maybe_fail_write(path, save=self.step, rank=self.rank)


def _attempt(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    """None when ``fn(*args, **kwargs)`` ran; what failed when it raised WriteFailed."""
    try:
        fn(*args, **kwargs)
    except files.WriteFailed as exc:
        return str(exc)
    return None


def _hash_share(directory: Path, names: list[str]) -> dict[str, dict[str, Any]] | str:
    """The manifest entries of ``names``, or what failed reading them back."""
    try:
        with files.writing(directory, doing="reading back"):
            return files.hash_files(directory, names)
    except files.WriteFailed as exc:
        return str(exc)
