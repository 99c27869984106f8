"""From a `recap STAGE` command line to a running stage: argv split, the checks that run before a
launch (overrides, batch vs world size, the stage's own `check`), the Hydra run, and sweep points
as `recap` subprocesses (multirun.yaml redacted)."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.commands.exit_codes import EXIT_DATA, EXIT_DIVERGED, EXIT_USAGE, fail, warn
from train.commands.stage_table import STAGES, Stage, hydra_job_name
from train.config.typed import ConfigError

if TYPE_CHECKING:
    from train.config.experiment import RunConfig

_FLAGS_WITH_VALUE = {"--cfg", "-c"}
_CFG_VALUES = ("job", "hydra", "all")
MULTIRUN_FLAGS = {"-m", "--multirun"}
_FLAGS = MULTIRUN_FLAGS | {"--resolve"} | _FLAGS_WITH_VALUE


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, hydra flags); rejects flags recap does not support."""
    overrides, flags = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            if arg not in _FLAGS:
                raise ConfigError("", f"unknown option '{arg}'; options: -m/--multirun, --cfg job|hydra|all, --resolve")
            flags.append(arg)
            if arg in _FLAGS_WITH_VALUE:
                if i + 1 >= len(args) or args[i + 1] not in _CFG_VALUES:
                    raise ConfigError("", f"{arg} needs a value: job, hydra or all")
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


def inside_launch() -> bool:
    """True in a process that a launcher (torchrun, DeepSpeed's) started: run the stage, do not launch it."""
    from launch.deepspeed_launch import inside_deepspeed_launcher
    from launch.torchrun import inside_torchrun

    return inside_torchrun() or inside_deepspeed_launcher()


def _check_batch_for_world(stage: Stage, experiment: Any) -> None:
    """The global batch must split evenly over the processes this launch will start."""
    if stage.batch_section is None:
        return
    from train.config.training import check_batch
    from train.runtime.environment import launched_world_size

    if not stage.multi_process:  # runs in one process whatever the launcher (train-eval-clip)
        world = 1
    elif inside_launch():
        world = launched_world_size()
    else:  # every launcher starts nproc_per_node x nnodes processes (launcher=local: 1, validated)
        world = experiment.launcher.nproc_per_node * experiment.launcher.nnodes
    section = getattr(experiment, stage.batch_section)
    try:
        check_batch(section.global_batch_size, section.micro_batch_size, world)
    except ConfigError as exc:
        raise exc.under(stage.batch_section) from None


def _redact_multirun_yaml() -> None:
    """Hydra writes the raw overrides of a sweep to <sweep dir>/multirun.yaml before the first
    job starts; mask any secret in it (a password in a shard URL, a token) in place."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from train.outputs.redaction import redact_text

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    path = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if not path.is_file():
        return
    text = path.read_text()
    redacted = redact_text(text)
    if redacted != text:  # atomically: under torchrun every rank of the job gets here
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(redacted)
        os.replace(tmp, path)


def _run_point(name: str, output_dir: str, prefix: Sequence[str] = ()) -> int:
    """Run one sweep point as its own `recap [prefix] STAGE` process (exit code returned).

    Each point gets a fresh interpreter: its own launcher (torchrun when configured), process
    group, DeepSpeed engine and memory, and a failure that cannot take the others down. Under
    `recap launch -m` the prefix is `launch`: each point is launched (one Slurm job) on its own.
    """
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    quoted_dir = output_dir.replace("\\", "\\\\").replace("'", "\\'")
    return subprocess.call([sys.executable, "-m", "train.cli", *prefix, name, *overrides,
                            f"hydra.run.dir='{quoted_dir}'"])


def _with_checked_wandb(name: str, experiment: Any, run_dir: Path) -> Any:
    """The experiment as it will run, checked before any work by the process that talks to wandb
    (rank 0; under Slurm, on the job's node, where the network matters): logger.wandb.mode=online
    without an API key or a server that answers is ConfigError (exit 2), or offline after a
    warning line when logger.wandb.fallback_offline allows it (config.yaml then records offline)."""
    from dataclasses import replace

    from train.outputs.wandb_preflight import checked_mode

    wandb = experiment.logger.wandb
    mode, warning = checked_mode(wandb, run_dir)
    if warning:
        warn(name, warning)
    if mode == wandb.mode:
        return experiment
    return replace(experiment, logger=replace(experiment.logger, wandb=replace(wandb, mode=mode)))


def check_wandb_before_launch(name: str, experiment: Any) -> None:
    """Before this node starts a launcher (torchrun, DeepSpeed's): on the node of rank 0, an online
    wandb run that cannot start is ConfigError here, one line, instead of rank 0's line amid the
    launcher's report of a failed worker. Under fallback_offline rank 0 decides (and warns)."""
    from train.outputs.wandb_preflight import checked_mode

    wandb = experiment.logger.wandb
    if STAGES[name].wandb and experiment.launcher.node_rank == 0 and not wandb.fallback_offline:
        checked_mode(wandb)


def _run_stage(name: str, experiment: Any, run_dir: Path) -> None:
    """Run stage ``name`` in ``run_dir``, holding the directory's lock (one job at a time; shard
    jobs lock their rank's slot themselves, train/runtime/run_lock.py) and with wandb checked."""
    from launch.quick_process import resume_gc
    from train.outputs.writable import check_run_dir
    from train.runtime.environment import global_rank
    from train.runtime.run_lock import locked

    check_run_dir(run_dir)  # before any work: every folder the stage writes into takes files
    rank = global_rank()
    lock = contextlib.nullcontext() if STAGES[name].shard_job else locked(run_dir, name, "run.name", rank=rank)
    with lock:
        if STAGES[name].wandb and rank == 0:
            experiment = _with_checked_wandb(name, experiment, run_dir)
        stage = importlib.import_module(STAGES[name].module)
        resume_gc()  # the libraries are imported: collect again (launch/quick_process.py)
        stage.run(experiment, run_dir)


def run_hydra(name: str, overrides: list[str], flags: list[str], point_prefix: Sequence[str] = ()) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from data_pipeline.shard_io import DataError
    from train.training.checkpoint_files import CheckpointError
    from launch.supervise import EXIT_REQUEUE
    from train.training.loop import NonFiniteLoss
    from train.runtime.preemption import StagePreempted
    from train.config.loading import PRIMARY_CONFIG, conf_dir, experiment_from_omegaconf

    failures: list[tuple[int, int]] = []  # (job number, exit code) of failed sweep points

    def task(cfg) -> None:  # one Hydra job: the run itself, or one point of a sweep
        hydra_cfg = HydraConfig.get()
        output_dir = hydra_cfg.runtime.output_dir
        if hydra_cfg.mode == RunMode.MULTIRUN:
            _redact_multirun_yaml()
            code = _run_point(name, output_dir, point_prefix)
            if code:
                failures.append((hydra_cfg.job.num, code))
            return
        try:
            _run_stage(name, experiment_from_omegaconf(cfg), Path(output_dir))
        except ConfigError as exc:
            sys.exit(fail(name, str(exc), EXIT_USAGE))
        except (DataError, CheckpointError) as exc:
            sys.exit(fail(name, str(exc), EXIT_DATA))
        except NonFiniteLoss as exc:
            sys.exit(fail(name, str(exc), EXIT_DIVERGED))
        except StagePreempted as exc:
            print(f"recap {name}: {exc}", file=sys.stderr)
            sys.exit(EXIT_REQUEUE)

    sys.argv = [f"recap {name}", *flags, *overrides, f"hydra.job.name={hydra_job_name(name)}"]
    app = hydra.main(config_path=str(conf_dir()), config_name=PRIMARY_CONFIG, version_base="1.3")(task)
    if {"--cfg", "-c"} & set(flags):  # Hydra prints the config and runs nothing: print it redacted
        from train.outputs.redaction import redact_text

        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                app()
        finally:
            sys.stdout.write(redact_text(printed.getvalue()))
        return 0
    app()
    if failures:
        points = ", ".join(f"#{num} (exit {code})" for num, code in failures)
        return fail(name, f"{len(failures)} sweep point(s) failed: {points}; see their messages above", failures[0][1])
    return 0


def _check_run_dir(run: RunConfig, stage: str, overrides: list[str], multirun: bool) -> None:
    """The stage's run directory can be made: its nearest existing folder takes a file (run.root=/proc
    was a traceback from deep inside Hydra, and so was a read-only run.root/run.name). Creates
    nothing: --dry-run and mistakes leave no trace. Once Hydra made it, `check_run_dir` checks
    every folder in it (run_hydra)."""
    from train.outputs.writable import nearest_existing, probe, reason

    root = Path(run.root).absolute()
    target = root / run.name / ("sweeps" if multirun else "") / hydra_job_name(stage)
    if any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
        target = root  # a sweep point, or a directory of the user's: only run.root is known here
    existing = nearest_existing(target)
    try:
        probe(existing)
    except OSError as exc:
        if existing == root or existing in root.parents:
            raise ConfigError("run.root", f"cannot write run directories under '{run.root}': {reason(exc)}") from None
        where = (f"to the run directory '{existing}'" if existing == target else
                 f"the run directory '{target}': '{existing}' refuses new files")
        raise ConfigError("run.name", f"cannot write {where}: {reason(exc)}. Make it writable, or choose another "
                          "run.root or run.name") from None


def checked_args(name: str, rest: list[str]) -> tuple[list[str], list[str], Any]:
    """(overrides, flags, config of the first point) after every check that runs before a launch."""
    from train.commands.prechecks import PRECHECKS
    from train.config.loading import check_overrides, sweep_keys

    overrides, flags = split_args(rest)
    swept = sweep_keys(overrides)
    if swept and not MULTIRUN_FLAGS & set(flags):
        raise ConfigError(swept[0], "has several values (a sweep): add -m to run one job per value; for a "
                          "single value that contains commas quote it (key='a,b'), for a list use key=[a,b]")
    experiment = check_overrides(overrides)
    _check_run_dir(experiment.run, name, overrides, bool(MULTIRUN_FLAGS & set(flags)))
    _check_batch_for_world(STAGES[name], experiment)
    if STAGES[name].precheck and not inside_launch() and not swept:  # sweep points check themselves
        PRECHECKS[name](experiment)
    return overrides, flags, experiment
