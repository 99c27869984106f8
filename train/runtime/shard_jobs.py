"""Exactly-once shard jobs: the process side of `recap recaption` and `recap cache`.

Such a job needs no process group. Each process (a torchrun rank or a Slurm array task;
launch/ranks.py says which) takes every world_size-th input shard, skips those whose output is
already done, and writes one output shard per input shard, named like its input, with the
protocol of data_pipeline/recaption.py (temp name, rename, stats file last), so a killed job
reruns to the same bytes. This module holds what both stages share: checking the input and
output directories and the rank, this process's shards still to do, writing them with the
stage's failpoints (``<stage>_batch=N`` / ``<stage>_shard=N``, train/runtime/failpoints.py),
preemption, and the names a process writes. The stage keeps what it computes per batch.

Preemption: while ``with job.running(...):`` is open (the stage wraps its work in it), SIGTERM or
SIGUSR1 is only recorded; the job stops before its next batch, abandons the shards in progress
(their ``.partial`` files are removed; nothing half-written is ever marked done) and raises
ShardsPreempted, which `recap` turns into exit 75. The rerun writes the rest, and the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline import recaption as shards
from data_pipeline.cross_shard_keys import CrossShardKeys
from data_pipeline.shard_io import DataError, NoShardsError, is_local, list_shards, shard_name
from launch.ranks import RankError, job_rank_and_world
from train.config.typed import ConfigError
from train.runtime.environment import is_node_console
from train.runtime.failpoints import maybe_fail
from train.runtime.preemption import PreemptionWatch, ShardsPreempted
from train.runtime.run_lock import locked

_STOPPING = "stopping before the next batch (the shards in progress are abandoned), then exiting"


def output_name(url: str) -> str:
    """The output shard's file name: the input's (``00042.tar``; a pipe: command's shard)."""
    return shard_name(url).removeprefix("pipe:")


def list_inputs(section: str, spec: str | Sequence[str], *, hint: str | None = None) -> list[str]:
    """The input shard URLs of ``<section>.input``. None found is a ConfigError naming that key,
    with ``hint`` (how to make them) appended."""
    try:
        return list_shards(spec)
    except NoShardsError as exc:
        raise ConfigError(f"{section}.input", f"{exc}. {hint}" if hint else str(exc)) from None


def refuse_output_holding_inputs(section: str, urls: Sequence[str], output: str, *, note: str = "") -> None:
    """A ConfigError on ``<section>.output`` when that directory holds local input shards
    (outputs are named like their inputs); ``note`` is appended to the message."""
    out = Path(output).resolve()
    if any(is_local(u) and Path(u).resolve().parent == out for u in urls):
        raise ConfigError(f"{section}.output", f"{output} holds the input shards; write to another directory{note}")


def check_rank(section: str, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size) of this process (launch/ranks.py); bad settings are a ConfigError on
    ``<section>.rank``."""
    try:
        return job_rank_and_world(rank, world_size)
    except RankError as exc:
        raise ConfigError(f"{section}.rank", str(exc)) from None


def expected_samples(tasks: Sequence[shards.ShardTask]) -> int | None:
    """Samples in the shards to do, from their img2dataset stats files (None when unknown)."""
    counts = [shards.expected_samples(t.url) for t in tasks]
    return sum(counts) if all(isinstance(c, int) for c in counts) else None  # type: ignore[misc]


@dataclass(frozen=True)
class ShardJob:
    """This process's part of a shard job.

    ``stage`` names the job's log file, progress bar, failpoints and summary (it is also the
    config section); ``stats_suffix`` names an output shard's done marker; ``console``: this
    process owns its node's console (one per node under torchrun, every array task); ``watch``
    records SIGTERM/SIGUSR1 while the stage holds it open (``running``).
    """

    stage: str
    rank: int
    world: int
    stats_suffix: str
    console: bool
    watch: PreemptionWatch = field(default_factory=lambda: PreemptionWatch(_STOPPING), compare=False, repr=False)

    @property
    def label(self) -> str:
        """The progress bar's description: the stage, with the rank when there are several."""
        return f"{self.stage} r{self.rank}" if self.world > 1 else self.stage

    @property
    def summary_file(self) -> str:
        """``summary.json`` for a lone process, else one ``summary.rank<R>.json`` per rank."""
        return "summary.json" if self.world == 1 else f"summary.rank{self.rank}.json"

    @contextmanager
    def running(self, run_dir: Path, output: Path) -> Iterator[None]:
        """While the stage works: hold this process's slot (rank of world size) of the run and
        output directories (train/runtime/run_lock.py: another job on them is refused, exit 2) and
        record SIGTERM/SIGUSR1 (``watch``)."""
        slot = (self.rank, self.world)
        with ExitStack() as stack:
            stack.enter_context(locked(run_dir, self.stage, "run.name", slot=slot))
            if Path(output).resolve() != Path(run_dir).resolve():
                stack.enter_context(locked(output, self.stage, f"{self.stage}.output", slot=slot))
            stack.enter_context(self.watch)
            yield

    def tasks(self, urls: Sequence[str], output: Path, *,
              redo_failures: bool = False) -> tuple[list[shards.ShardTask], int]:
        """This process's shards still to do, and how many of its shards were already done.

        With ``redo_failures`` a done shard whose stats list failures is redone, keeping the
        keys its output already holds (recaption's ``only_failures``).
        """
        todo, done = [], 0
        for index in shards.assign_shards(len(urls), self.rank, self.world):
            target = output / output_name(urls[index])
            stats = shards.read_stats(target, self.stats_suffix)
            if stats is None:
                todo.append(shards.ShardTask(index, urls[index], target, stats_suffix=self.stats_suffix))
            elif redo_failures and stats["failures"]:
                todo.append(shards.ShardTask(index, urls[index], target, frozenset(shards.output_keys(target)), target,
                                             stats_suffix=self.stats_suffix))
            else:
                done += 1
        return todo, done

    def write_all(self, loader: Any, process: Callable[[shards.ShardBatch], list[dict[str, bytes]]],
                  extra: dict[str, Any], *, bar: Any, total_tasks: int) -> tuple[Counter, Counter]:
        """Write every shard of ``loader``'s batches (data_pipeline.recaption.write_all) with this
        stage's failpoints; returns (totals: shards, images, copied, duplicate_keys_across_shards;
        failures by reason). Keys written to more than one of the shards this call writes are
        counted (not dropped: data_pipeline/cross_shard_keys.py) and logged as one warning. Input
        shards that could not be read at all are left not done, and end the stage with exit 3
        (DataError) naming them, after the other shards are done. A signal recorded by
        ``watch`` stops it before the next batch: ShardsPreempted (exit 75)."""
        batch_point, shard_point = f"{self.stage}_batch", f"{self.stage}_shard"
        seen = CrossShardKeys()
        try:
            totals, reasons, failed = shards.write_all(
                loader, process, extra, bar=bar, total_tasks=total_tasks,
                on_batch=lambda n: maybe_fail(rank=self.rank, **{batch_point: n}),
                on_shard=lambda n: maybe_fail(rank=self.rank, **{shard_point: n}), seen=seen,
                stop=lambda: self.watch.received is not None)
        except shards.Stopped as stopped:
            raise ShardsPreempted(self.watch.signal_name or "a signal", stopped.done, stopped.abandoned) from None
        totals["duplicate_keys_across_shards"] = seen.repeated
        if (warning := seen.warning()) is not None:
            logging.getLogger(f"recap.{self.stage}").warning("%s", warning)
        if failed:
            names = "; ".join(f"{name} ({why})" for name, why in sorted(failed.items()))
            raise DataError(
                f"{len(failed)} input shard(s) could not be read and were not written: {names}. The other "
                f"{totals['shards']} written shard(s) are done; replace or remove these and rerun the same command")
        return totals, reasons


def start_job(stage: str, rank: int | None, world_size: int | None, *, stats_suffix: str) -> ShardJob:
    """This process's ShardJob: its rank and world size (``check_rank``) and whether it owns
    its node's console."""
    rank, world = check_rank(stage, rank, world_size)
    return ShardJob(stage, rank, world, stats_suffix, console=is_node_console())
