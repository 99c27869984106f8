"""`recap STAGE [overrides...]`: run one stage of the recipe as a Hydra app.

`recap launch STAGE [overrides...] [-m] [--dry-run]` starts it with its launcher: here (local),
torchrun, DeepSpeed's launcher, or a Slurm batch job (submitted with sbatch; `recap STAGE
launcher=slurm` refuses and points here, so that only `launch` ever submits). --dry-run prints
the command or the sbatch script instead. docs/slurm.md is the runbook.

Every stage composes conf/recap.yaml; overrides are checked before any work starts, and a
mistake (unknown stage, unknown key, wrong type, bad option) exits with code 2 and one line
naming the key and the valid choices. Exit codes: 0 done, 1 crash, 2 usage/config error,
3 data error (too many bad samples, an unusable checkpoint, or a checkpoint save that failed:
disk full, quota, I/O error), 4 training diverged (a
non-finite loss under nan_policy=fail, or too many skipped steps in a row), 75 preempted (SIGTERM
or SIGUSR1: a checkpoint was saved at the same step on every rank; rerun the same command).

This file is the contract torchrun, DeepSpeed's launcher, Slurm and `recap pipeline` use
(`python -m train.cli STAGE ...`); the mechanics live in train/commands/.
"""

from __future__ import annotations

import sys
from typing import NoReturn, TextIO

from launch.quick_process import defer_gc, exit_now
from train.commands.exit_codes import EXIT_USAGE, fail
from train.commands.hydra_run import MULTIRUN_FLAGS, check_wandb_before_launch, checked_args, run_hydra
from train.commands.launching import launch, launcher_command
from train.commands.stage_table import STAGES
from train.config.typed import ConfigError, did_you_mean


def _print_help(file: TextIO | None = None) -> None:
    width = max(len(name) for name in STAGES)
    lines = ["usage: recap STAGE [key=value ...] [group=option ...] [-m]\n",
             "Reproduce DALL-E 3's better-captions recipe, one stage at a time.\n\nstages:",
             *(f"  {name:<{width}}  {stage.summary}" for name, stage in STAGES.items()),
             "\n`recap STAGE --help` lists the config groups; `recap STAGE --cfg job` prints the composed config.",
             "`recap launch STAGE ... [--dry-run]` starts a stage with its launcher: torchrun, DeepSpeed, or a Slurm job.",
             "Exit codes: 0 ok, 1 crash, 2 usage or config error, 3 bad data, unusable or unsaved checkpoint, "
             "4 training diverged,",
             "            75 preempted after a checkpoint (SIGTERM/SIGUSR1; rerun the same command to resume)."]
    print("\n".join(lines), file=file or sys.stdout)


def _print_stage_help(name: str) -> None:
    from train.config.loading import GROUP_PACKAGES, config_groups, conf_dir

    print(f"usage: recap {name} [key=value ...] [group=option ...] [-m] [--cfg job]\n")
    print(f"{STAGES[name].summary}\n")
    print(f"Config groups (group=option), from {conf_dir()}:")
    groups = {f"{g}@<stage>.{g}" if g in GROUP_PACKAGES else g: opts for g, opts in config_groups().items()}
    width = max(13, *(len(g) for g in groups))
    for group, options in groups.items():
        print(f"  {group:<{width}} {', '.join(options)}")
    print("\nExamples:")
    print(f"  recap {name} experiment=toy seed=1")
    print(f"  recap {name} -m seed=1,2,3          # one run per value (Hydra multirun)")
    print(f"  recap {name} launcher=torchrun runtime=ddp launcher.nproc_per_node=2")


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `recap`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # a usage error (a script that lost its stage name must not pass): help on stderr
        _print_help(sys.stderr)
        return EXIT_USAGE
    if args[0] in ("-h", "--help", "help"):
        _print_help()
        return 0
    if args[0] == "launch":
        return launch(args[1:])
    name, rest = args[0], args[1:]
    if name not in STAGES:
        return fail(name, f"unknown stage '{name}'{did_you_mean(name, STAGES)}; stages: {', '.join(STAGES)}",
                     EXIT_USAGE)
    if "-h" in rest or "--help" in rest:
        _print_stage_help(name)
        return 0
    try:
        overrides, flags, experiment = checked_args(name, rest)
        if experiment.launcher.kind == "slurm":
            raise ConfigError("launcher", f"launcher=slurm submits a batch job: run `recap launch {name}` with the "
                              "same arguments (add --dry-run to see the sbatch script first)")
        multirun = bool(MULTIRUN_FLAGS & set(flags))
        cmd = None if multirun else launcher_command(args, experiment.launcher)  # sweeps launch per point
        if cmd is not None:
            check_wandb_before_launch(name, experiment)
    except ConfigError as exc:
        return fail(name, str(exc), EXIT_USAGE)
    if cmd is not None:
        from launch.supervise import run_supervised

        return run_supervised(cmd)
    return run_hydra(name, overrides, flags)


def _main_recording_exit() -> int:
    """main(), with this process's exit code recorded for a supervising parent (launch/supervise.py)."""
    from launch.supervise import record_exit

    code: int | str | None = 1  # an exception escaping main() is a crash
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    finally:
        record_exit(code if isinstance(code, int) or code is None else 1)
    return code if isinstance(code, int) else (0 if code is None else 1)


def console() -> NoReturn:
    """The `recap` console script and `python -m train.cli` (what torchrun runs in each process):
    main(), its exit code recorded for a supervising parent, with the garbage collector off until
    the stage's imports are done (train/commands/hydra_run.py resumes it) and an exit that skips
    Python's interpreter teardown (launch/quick_process.py)."""
    defer_gc()
    exit_now(_main_recording_exit())


if __name__ == "__main__":
    console()
