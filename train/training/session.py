"""A training run's session: what a stage states about where it writes, how it checkpoints, logs
and resumes (`RunSettings`), the loop's parts with the newest valid checkpoint restored
(`open_session`), and the shared epilogue (`Parts.finish`, train/training/loop.py).

Every training stage starts the same way: runtime, logs and config.yaml, model, optimizer,
scheduler, reader, then `open_session`. Nothing here sees the whole experiment config: the stage
hands over its typed sections and the redacted snapshot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config.execution import CheckpointConfig, LoggerConfig, ResumeConfig
from train.outputs.run_logging import MetricsLogger, setup_logging
from train.runtime.processes import Runtime
from train.training.checkpointing import Checkpointer, TrainState, resume_fingerprint
from train.training.ema import EmaWeights
from train.training.loop import Parts, Schedule

# Reader tuning that changes neither which samples a run reads nor in what order: every training
# stage lets a resume change these (its resume-ignore list).
READER_TUNING_KEYS = ("data.reader.prefetch_factor", "data.reader.strict", "data.reader.max_fault_fraction",
                      "data.reader.fault_check_after")


@dataclass(frozen=True)
class RunSettings:
    """How one training run writes, checkpoints, logs and resumes.

    Attributes:
        run_dir: the stage's run directory (checkpoints/, logs/, metrics.jsonl, summary.json).
        stage: the name in logs, metrics and wandb ("train_t2i"); the summary's title with dashes.
        run_name: the experiment's run name (the wandb group).
        checkpoint / resume / logger: the config sections of the same names.
        snapshot: the redacted config (run_logging.config_snapshot), stored for humans.
        resume_keys / resume_ignore: config key prefixes whose change refuses a resume, and the
            exceptions among them (see checkpointing.resume_fingerprint).
        nan_policy / max_consecutive_skips: what the loop does on a non-finite loss or gradient.
    """

    run_dir: Path
    stage: str
    run_name: str
    checkpoint: CheckpointConfig
    resume: ResumeConfig
    logger: LoggerConfig
    snapshot: dict[str, Any]
    resume_keys: tuple[str, ...]
    resume_ignore: tuple[str, ...] = ()
    nan_policy: str = "fail"
    max_consecutive_skips: int = 3

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The flat {key: value} of the snapshot that a resume must find unchanged."""
        return resume_fingerprint(self.snapshot, self.resume_keys, self.resume_ignore)

    def schedule(self, steps: int, accum: int, global_batch: int) -> Schedule:
        """The loop's schedule up to global step ``steps``: ``accum`` micro-batches per optimizer
        step and rank, ``global_batch`` images per step, this run's checkpoint/log cadence."""
        return Schedule(steps=steps, accum=accum, global_batch=global_batch,
                        checkpoint_every=self.checkpoint.every_steps, log_every=self.logger.log_every_steps,
                        show_progress=self.logger.progress, nan_policy=self.nan_policy,
                        max_consecutive_skips=self.max_consecutive_skips)


def start_logs(settings: RunSettings, rt: Runtime) -> logging.Logger:
    """Per-rank log files (and the console on the main rank), and ``run_dir/config.yaml`` (the
    redacted snapshot) written by the main rank."""
    log = setup_logging(settings.run_dir, settings.stage, rt.rank)
    if rt.is_main:
        _write_snapshot(settings.run_dir, settings.snapshot)
    return log


def _write_snapshot(run_dir: Path, snapshot: dict[str, Any]) -> None:
    """``run_dir/config.yaml``: what this run was asked to do (already redacted), as
    run_logging.write_config_snapshot writes it."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(snapshot)))


def open_session(settings: RunSettings, rt: Runtime, *, model: Any, optimizer: Any, scheduler: Any, reader: Any,
                 extra: dict[str, torch.nn.Module] | None = None,
                 ema: EmaWeights | None = None) -> tuple[Parts, bool]:
    """The checkpointer, the train state restored from the newest valid checkpoint (if any, with
    the model, optimizer, scheduler, reader, ``extra`` modules and the ``ema`` weights and decay
    progress), and the metrics logger. Returns the loop's parts and whether the run resumed."""
    if ema is not None:
        extra = {**(extra or {}), "ema": ema.module}
    checkpointer = Checkpointer(settings.run_dir / "checkpoints", rt, fingerprint=settings.fingerprint,
                                config=settings.snapshot, keep_last=settings.checkpoint.keep_last,
                                resume=settings.resume)
    state = TrainState()
    resumed = checkpointer.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader,
                                   extra=extra)
    metrics = MetricsLogger(settings.run_dir, settings.logger, stage=settings.stage, run_name=settings.run_name,
                            config=settings.snapshot, enabled=rt.is_main)
    if resumed:
        metrics.event(state.step, "resumed")
    if ema is not None:
        ema.restored(state)
    parts = Parts(runtime=rt, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader,
                  checkpointer=checkpointer, metrics=metrics, state=state, extra=dict(extra or {}),
                  run_dir=settings.run_dir, title=settings.stage.replace("_", "-"))
    return parts, resumed
