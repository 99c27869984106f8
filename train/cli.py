"""`recap STAGE [overrides...]`: run one stage of the recipe as a Hydra app.

Every stage composes conf/recap.yaml; overrides are checked before any work starts, and a
mistake (unknown stage, unknown key, wrong type, bad option) exits with code 2 and one line
naming the key and the valid choices. Exit codes: 0 done, 1 crash, 2 usage/config error,
3 data error (too many bad samples, or an unusable checkpoint).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from train.typed_config import ConfigError, did_you_mean

EXIT_USAGE = 2
EXIT_DATA = 3


@dataclass(frozen=True)
class Stage:
    module: str  # imported lazily: `recap --help` stays fast
    summary: str


# The stage table is the CLI's dispatch, nothing more: each module has `run(cfg, run_dir)`.
STAGES: dict[str, Stage] = {
    "make-toy-data": Stage("train.make_toy_data", "Generate the synthetic-scenes shards (img2dataset layout) with ground truth."),
    "train-vae": Stage("train.train_vae", "Train the toy AutoencoderKL on training images; export a diffusers folder."),
}
_FLAGS_WITH_VALUE = {"--cfg", "-c"}
_FLAGS = {"-m", "--multirun", "--resolve"} | _FLAGS_WITH_VALUE


def _print_help() -> None:
    width = max(len(name) for name in STAGES)
    print("usage: recap STAGE [key=value ...] [group=option ...] [-m]\n")
    print("Reproduce DALL-E 3's better-captions recipe, one stage at a time.\n\nstages:")
    for name, stage in STAGES.items():
        print(f"  {name:<{width}}  {stage.summary}")
    print("\n`recap STAGE --help` lists the config groups; `recap STAGE --cfg job` prints the composed config.")
    print("Exit codes: 0 ok, 1 crash, 2 usage or config error, 3 bad data or unusable checkpoint.")


def _print_stage_help(name: str) -> None:
    from train.config_loading import config_groups, conf_dir

    print(f"usage: recap {name} [key=value ...] [group=option ...] [-m] [--cfg job]\n")
    print(f"{STAGES[name].summary}\n")
    print(f"Config groups (group=option), from {conf_dir()}:")
    for group, options in config_groups().items():
        print(f"  {group:<13} {', '.join(options)}")
    print("\nExamples:")
    print(f"  recap {name} experiment=toy seed=1")
    print(f"  recap {name} -m seed=1,2,3          # one run per value (Hydra multirun)")
    print(f"  recap {name} launcher=torchrun runtime=ddp launcher.nproc_per_node=2")


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
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
                if i + 1 >= len(args):
                    raise ConfigError("", f"{arg} needs a value (job, hydra or all)")
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


def _fail(stage: str, message: str, code: int) -> int:
    from train.redaction import redact_text

    print(f"recap {stage}: error: {redact_text(message)}", file=sys.stderr)
    return code


def _run_hydra(name: str, overrides: list[str], flags: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from data_pipeline.shard_io import DataError
    from train.checkpoint_files import CheckpointError
    from train.config_loading import PRIMARY_CONFIG, conf_dir, experiment_from_omegaconf

    module = importlib.import_module(STAGES[name].module)

    def task(cfg) -> None:  # one Hydra job (one point of a sweep)
        try:
            experiment = experiment_from_omegaconf(cfg)
            module.run(experiment, Path(HydraConfig.get().runtime.output_dir))
        except ConfigError as exc:
            sys.exit(_fail(name, str(exc), EXIT_USAGE))
        except (DataError, CheckpointError) as exc:
            sys.exit(_fail(name, str(exc), EXIT_DATA))

    job_name = name.replace("-", "_")
    sys.argv = [f"recap {name}", *flags, *overrides, f"hydra.job.name={job_name}"]
    hydra.main(config_path=str(conf_dir()), config_name=PRIMARY_CONFIG, version_base="1.3")(task)()


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `recap`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        _print_help()
        return 0
    name, rest = args[0], args[1:]
    if name not in STAGES:
        return _fail(name, f"unknown stage '{name}'{did_you_mean(name, STAGES)}; stages: {', '.join(STAGES)}",
                     EXIT_USAGE)
    if "-h" in rest or "--help" in rest:
        _print_stage_help(name)
        return 0
    try:
        overrides, flags = _split_args(rest)
        from train.config_loading import check_overrides

        launcher = check_overrides(overrides).launcher
    except ConfigError as exc:
        return _fail(name, str(exc), EXIT_USAGE)

    from launch.torchrun import inside_torchrun, torchrun_command

    if launcher.kind == "torchrun" and not inside_torchrun():
        cmd = torchrun_command(
            args, nproc_per_node=launcher.nproc_per_node, nnodes=launcher.nnodes, node_rank=launcher.node_rank,
            rdzv_endpoint=launcher.rdzv_endpoint, rdzv_timeout_s=launcher.rdzv_timeout_s,
        )
        return subprocess.call(cmd)
    _run_hydra(name, overrides, flags)
    return 0


if __name__ == "__main__":  # torchrun runs `python -m train.cli STAGE ...` in each process
    sys.exit(main())
