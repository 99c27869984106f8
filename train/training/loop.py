"""The training loop every training stage shares: steps of ``accum`` micro-batches, metrics,
progress, checkpoints. A stage builds its parts, then calls `train_steps` and exports.

It reads like the algorithm: for each optimizer step, forward/backward each micro-batch, average
the reported losses over micro-batches and ranks, take the optimizer step (or, for a non-finite
loss or gradient, fail or skip it on every rank alike), log, checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.training.checkpointing import Checkpointer, TrainState
from train.runtime.failpoints import maybe_fail, poison_loss
from train.runtime.preemption import Preempted, PreemptionWatch
from train.outputs.run_logging import MetricsLogger, finish_stage, progress
from train.runtime.processes import Runtime

log = logging.getLogger("recap")

# Batch entries that stay on the CPU: per-sample seeds (int64 (B,)) only seed CPU-side draws
# (models/diffusion.dropout_draws), so moving them would be a round trip every micro-step.
HOST_KEYS = frozenset({"seeds"})


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors in a (nested) tuple/list/dict batch to ``device``, except a dict's
    `HOST_KEYS` entries."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: v if k in HOST_KEYS else to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass
class Schedule:
    """How long and how often: optimizer steps, micro-batches per step, images per step."""

    steps: int
    accum: int
    global_batch: int
    checkpoint_every: int
    log_every: int
    show_progress: bool = True
    nan_policy: str = "fail"  # "fail": stop; "skip": skip the update on every rank
    max_consecutive_skips: int = 3


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient under nan_policy=fail, or too many skipped steps in a row."""


@dataclass
class Parts:
    """What the loop drives; the stage built and prepared all of it (train/training/session.py
    `open_session` assembles it with the restored state)."""

    runtime: Runtime
    model: Any
    optimizer: Any
    scheduler: Any
    reader: Any
    checkpointer: Checkpointer
    metrics: MetricsLogger
    state: TrainState
    extra: dict[str, torch.nn.Module] = field(default_factory=dict)  # saved with checkpoints (EMA ...)
    run_dir: Path | None = None  # where `finish` writes summary.json
    title: str = ""  # the summary's title ("train-t2i")

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The stage's epilogue, on every rank: close the metrics (wandb gets ``summary``), write
        run_dir/summary.json and print it on the main rank, stop the runtime. Returns ``summary``."""
        assert self.run_dir is not None, "finish() needs the parts of open_session (they know the run directory)"
        self.metrics.close(summary)
        if self.runtime.is_main:
            finish_stage(self.run_dir, self.title, summary)
        self.runtime.close()
        return summary


def train_steps(parts: Parts, schedule: Schedule, loss_fn: Callable[[Any, Any], Any], desc: str,
                after_step: Callable[[TrainState], None] | None = None,
                report: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """Run optimizer steps until ``schedule.steps``; returns the last losses and the throughput.

    ``loss_fn(model, batch)`` returns a loss tensor or a dict with "loss" (other entries are
    reported). ``after_step(state)`` runs after each applied optimizer step (EMA updates);
    ``report()`` adds metrics at each logged step (called on every rank: it may reduce).
    A non-finite loss (averaged over ranks, so every rank sees it) or gradient norm (the same on
    every rank after the all-reduce) fails the run or, under nan_policy=skip, skips the update
    on every rank; ``state.extra["skipped_steps"]`` counts skips. SIGTERM/SIGUSR1 on any rank
    (train/runtime/preemption.py): every rank saves a checkpoint at the end of that step and raises
    Preempted.
    """
    rt, state = parts.runtime, parts.state
    batches: Iterator[Any] = iter(parts.reader)
    start, first_step = time.perf_counter(), state.step
    last: dict[str, float] = {}
    rate = 0.0
    bar = progress(total=schedule.steps, initial=state.step, desc=desc, unit="step",
                   enabled=rt.is_main and schedule.show_progress)
    with PreemptionWatch() as watch, _closing(batches):
        while state.step < schedule.steps:
            last, rate = _one_step(parts, schedule, loss_fn, batches, after_step, report, start, first_step, bar)
            checkpoint = None
            if state.step % schedule.checkpoint_every == 0 or state.step == schedule.steps:
                checkpoint = _save(parts)
            maybe_fail(step=state.step, rank=rt.rank)
            signal_name = watch.agreed(rt)  # collective: every rank leaves at the same step
            if signal_name is not None:
                checkpoint = checkpoint or _save(parts)
                bar.close()
                parts.metrics.event(state.step, "preempted", signal=signal_name)
                parts.metrics.close({"preempted_at_step": state.step})
                raise Preempted(state.step, signal_name, checkpoint)
    bar.close()
    return {"steps": state.step, "samples_seen": state.samples_seen, "final_losses": last,
            "img_per_s": round(rate, 2), "skipped_samples": parts.reader.fault_counts(),
            "skipped_steps": state.extra.get("skipped_steps", 0)}


def _closing(batches: Iterator[Any]) -> contextlib.AbstractContextManager[Any]:
    """Closes the reader's iterator when the loop ends, also when a step or a save raises: its
    DataLoader workers stop then. Left to the garbage collector, they stayed alive while the error
    was reported, and the exit waited for them forever (a disk-full save hung instead of exit 3)."""
    return contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext()


def _save(parts: Parts) -> Path:
    return parts.checkpointer.save(parts.state, model=parts.model, optimizer=parts.optimizer,
                                   scheduler=parts.scheduler, reader=parts.reader, extra=parts.extra)


def _one_step(parts: Parts, schedule: Schedule, loss_fn: Callable[[Any, Any], Any], batches: Iterator[Any],
              after_step: Callable[[TrainState], None] | None, report: Callable[[], dict[str, float]] | None,
              start: float, first_step: int, bar: Any) -> tuple[dict[str, float], float]:
    """One optimizer step of ``accum`` micro-batches, its NaN policy, metrics and progress;
    returns (the losses averaged over micro-batches and ranks, images per second so far)."""
    rt, state = parts.runtime, parts.state
    micro_losses = []
    for micro in range(schedule.accum):
        batch = to_device(next(batches), rt.device)
        micro_losses.append(rt.micro_step(parts.model, lambda m: poison_loss(loss_fn(m, batch), step=state.step + 1,
                                                                             rank=rt.rank),
                                          last=micro == schedule.accum - 1))
    names = list(micro_losses[0])
    stacked = torch.stack([torch.stack([m[k] for k in names]) for m in micro_losses]).mean(0)  # (parts,)
    last = dict(zip(names, rt.mean(stacked).tolist()))
    finite = all(map(math.isfinite, last.values()))
    grad_norm, applied = rt.optimizer_step(parts.model, parts.optimizer, parts.scheduler, skip=not finite)
    state.step += 1
    state.samples_seen += schedule.global_batch
    if not applied:
        _on_skipped(state, schedule, last, grad_norm, parts)
    else:
        state.extra["consecutive_skips"] = 0
        if after_step is not None:
            after_step(state)
    rate = (state.step - first_step) * schedule.global_batch / (time.perf_counter() - start)
    if state.step % schedule.log_every == 0 or state.step == schedule.steps:
        faults = {f"skipped/{k}": v for k, v in parts.reader.fault_counts().items()}
        parts.metrics.log(state.step, {**last, "lr": parts.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                       "img_per_s": rate, **faults, **(report() if report else {})})
    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{rate:.1f}")
    bar.update(1)
    return last, rate


def _on_skipped(state: TrainState, schedule: Schedule, losses: dict[str, float], grad_norm: float | None,
                parts: Parts) -> None:
    """Apply the NaN policy to a step whose update was not applied (same on every rank)."""
    what = f"step {state.step}: loss {losses.get('loss')}, gradient norm {grad_norm}"
    if schedule.nan_policy == "fail":
        raise NonFiniteLoss(f"non-finite loss or gradient at {what}; the last checkpoint is intact. Lower the lr, "
                            "check the data, or set nan_policy=skip")
    state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
    state.extra["consecutive_skips"] = state.extra.get("consecutive_skips", 0) + 1
    parts.metrics.event(state.step, "skipped_step", loss=losses.get("loss"), grad_norm=grad_norm)
    log.warning("skipped the update of %s (nan_policy=skip)", what)
    if state.extra["consecutive_skips"] >= schedule.max_consecutive_skips:
        raise NonFiniteLoss(f"{state.extra['consecutive_skips']} steps in a row had a non-finite loss or gradient "
                            f"(max_consecutive_skips={schedule.max_consecutive_skips}); last at {what}")

