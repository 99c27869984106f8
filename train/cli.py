"""`recap STAGE [overrides...]`: run one stage of the recipe as a Hydra app.

`recap launch STAGE [overrides...] [-m] [--dry-run]` starts it with its launcher: here (local),
torchrun, DeepSpeed's launcher, or a Slurm batch job (submitted with sbatch; `recap STAGE
launcher=slurm` refuses and points here, so that only `launch` ever submits). --dry-run prints
the command or the sbatch script instead. docs/slurm.md is the runbook.

Every stage composes conf/recap.yaml; overrides are checked before any work starts, and a
mistake (unknown stage, unknown key, wrong type, bad option) exits with code 2 and one line
naming the key and the valid choices. Exit codes: 0 done, 1 crash, 2 usage/config error,
3 data error (too many bad samples, or an unusable checkpoint), 4 training diverged (a
non-finite loss under nan_policy=fail, or too many skipped steps in a row), 75 preempted (SIGTERM
or SIGUSR1: a checkpoint was saved at the same step on every rank; rerun the same command).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.typed_config import ConfigError, did_you_mean

EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_DIVERGED = 4


@dataclass(frozen=True)
class Stage:
    module: str  # imported lazily: `recap --help` stays fast
    summary: str
    batch_section: str | None = None  # config section with global/micro batch sizes, checked before launch
    precheck: bool = False  # the module's `check(cfg)` validates arguments before launch (exit 2)


# The stage table is the CLI's dispatch, nothing more: each module has `run(cfg, run_dir)`.
STAGES: dict[str, Stage] = {
    "make-toy-data": Stage("train.make_toy_data", "Generate the synthetic-scenes shards (img2dataset layout) with ground truth."),
    "pretrain-captioner": Stage("train.pretrain_captioner", "Pretrain a CoCa captioner on images + alt-text "
                                "(contrastive + captioning loss).", batch_section="pretrain_captioner"),
    "finetune-captioner": Stage("train.finetune_captioner", "Fine-tune it into the short (style=ssc) or descriptive "
                                "(style=dsc) captioner on curated ground truth.", batch_section="finetune_captioner"),
    "caption": Stage("train.caption", "Caption a folder of images, an image or shards with an exported captioner "
                     "(caption.input=PATH)."),
    "evaluate-captioner": Stage("train.evaluate_captioner", "Score alt-text, SSC and DSC captions on held-out toy "
                                "samples: attribute precision/recall."),
    "recaption": Stage("train.recaption", "Write SSC and DSC captions into every training shard (distributed, "
                       "resumable, exactly-once).", precheck=True),
    "train-tokenizer": Stage("train.train_tokenizer", "Fit the toy T5 tokenizer on the recaptioned captions "
                             "(saved in Hugging Face format)."),
    "train-vae": Stage("train.train_vae", "Train the toy AutoencoderKL on training images; export a diffusers folder.",
                       batch_section="train_vae"),
    "cache": Stage("train.cache", "Precompute VAE latents (per resolution stage) and T5 states (per caption key) "
                   "into cache shards for train-t2i (distributed, resumable).", precheck=True),
    "train-t2i": Stage("train.train_t2i", "Train the T5-conditioned latent diffusion UNet on the recaptioned shards "
                       "(caption mix, buckets, progressive resolution, EMA); export a diffusers pipeline.", precheck=True),
    "sample": Stage("train.sample", "Generate images from prompts with the trained pipeline (CFG, DDIM or "
                    "DPM-Solver++, any bucket size, EMA or raw weights, optional prompt rewriter)."),
    "train-eval-clip": Stage("train.train_eval_clip", "Toy: train the evaluation CLIP and the attribute probe on "
                             "held-out ground truth (reports their accuracy on real images).",
                             batch_section="train_eval_clip"),
    "evaluate": Stage("train.evaluate", "CLIP score (vs alt-text and DSC references) and attribute-binding accuracy "
                      "of generated images; JSON + markdown table."),
    "sweep-report": Stage("train.sweep_report", "Table and plot of the evaluation metrics over the points of a "
                          "sweep (e.g. the caption-mix sweep)."),
    "pipeline": Stage("train.pipeline", "Run every stage in order (complete ones are skipped) and write "
                      "runs/<experiment>/report.md; with -m, one train-t2i..evaluate per sweep point."),
}
_FLAGS_WITH_VALUE = {"--cfg", "-c"}
_CFG_VALUES = ("job", "hydra", "all")
MULTIRUN_FLAGS = {"-m", "--multirun"}
_FLAGS = MULTIRUN_FLAGS | {"--resolve"} | _FLAGS_WITH_VALUE


def _print_help() -> None:
    width = max(len(name) for name in STAGES)
    print("usage: recap STAGE [key=value ...] [group=option ...] [-m]\n")
    print("Reproduce DALL-E 3's better-captions recipe, one stage at a time.\n\nstages:")
    for name, stage in STAGES.items():
        print(f"  {name:<{width}}  {stage.summary}")
    print("\n`recap STAGE --help` lists the config groups; `recap STAGE --cfg job` prints the composed config.")
    print("`recap launch STAGE ... [--dry-run]` starts a stage with its launcher: torchrun, DeepSpeed, or a Slurm job.")
    print("Exit codes: 0 ok, 1 crash, 2 usage or config error, 3 bad data or unusable checkpoint, 4 training diverged,")
    print("            75 preempted after a checkpoint (SIGTERM/SIGUSR1; rerun the same command to resume).")


def _print_stage_help(name: str) -> None:
    from train.config_loading import GROUP_PACKAGES, config_groups, conf_dir

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
                if i + 1 >= len(args) or args[i + 1] not in _CFG_VALUES:
                    raise ConfigError("", f"{arg} needs a value: job, hydra or all")
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


def _inside_launch() -> bool:
    """True in a process that a launcher (torchrun, DeepSpeed's) started: run the stage, do not launch it."""
    from launch.deepspeed_launch import inside_deepspeed_launcher
    from launch.torchrun import inside_torchrun

    return inside_torchrun() or inside_deepspeed_launcher()


def hydra_job_name(stage: str) -> str:
    return stage.replace("-", "_")  # Hydra's job name: names run directories (conf/recap.yaml)


def _check_batch_for_world(stage: Stage, experiment: Any) -> None:
    """The global batch must split evenly over the processes this launch will start."""
    if stage.batch_section is None:
        return
    from train.config_schema import check_batch

    if _inside_launch():
        world = int(os.environ.get("WORLD_SIZE", "1"))
    else:  # every launcher starts nproc_per_node x nnodes processes (launcher=local: 1, validated)
        world = experiment.launcher.nproc_per_node * experiment.launcher.nnodes
    section = getattr(experiment, stage.batch_section)
    try:
        check_batch(section.global_batch_size, section.micro_batch_size, world)
    except ConfigError as exc:
        raise exc.under(stage.batch_section) from None


def fail(stage: str, message: str, code: int) -> int:
    from train.redaction import redact_text

    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"recap {stage}: error: {redact_text(one_line)}", file=sys.stderr)
    return code


def _redact_multirun_yaml() -> None:
    """Hydra writes the raw overrides of a sweep to <sweep dir>/multirun.yaml before the first
    job starts; mask any secret in it (a password in a shard URL, a token) in place."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from train.redaction import redact_text

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


def run_hydra(name: str, overrides: list[str], flags: list[str], point_prefix: Sequence[str] = ()) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from data_pipeline.shard_io import DataError
    from train.checkpoint_files import CheckpointError
    from launch.supervise import EXIT_REQUEUE
    from train.loop import NonFiniteLoss
    from train.preemption import Preempted
    from train.config_loading import PRIMARY_CONFIG, conf_dir, experiment_from_omegaconf

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
            experiment = experiment_from_omegaconf(cfg)
            importlib.import_module(STAGES[name].module).run(experiment, Path(output_dir))
        except ConfigError as exc:
            sys.exit(fail(name, str(exc), EXIT_USAGE))
        except (DataError, CheckpointError) as exc:
            sys.exit(fail(name, str(exc), EXIT_DATA))
        except NonFiniteLoss as exc:
            sys.exit(fail(name, str(exc), EXIT_DIVERGED))
        except Preempted as exc:
            print(f"recap {name}: {exc}", file=sys.stderr)
            sys.exit(EXIT_REQUEUE)

    sys.argv = [f"recap {name}", *flags, *overrides, f"hydra.job.name={hydra_job_name(name)}"]
    hydra.main(config_path=str(conf_dir()), config_name=PRIMARY_CONFIG, version_base="1.3")(task)()
    if failures:
        points = ", ".join(f"#{num} (exit {code})" for num, code in failures)
        return fail(name, f"{len(failures)} sweep point(s) failed: {points}; see their messages above", failures[0][1])
    return 0


def checked_args(name: str, rest: list[str]) -> tuple[list[str], list[str], Any]:
    """(overrides, flags, config of the first point) after every check that runs before a launch."""
    from train.config_loading import check_overrides, sweep_keys

    overrides, flags = _split_args(rest)
    swept = sweep_keys(overrides)
    if swept and not MULTIRUN_FLAGS & set(flags):
        raise ConfigError(swept[0], "has several values (a sweep): add -m to run one job per value; for a "
                          "single value that contains commas quote it (key='a,b'), for a list use key=[a,b]")
    experiment = check_overrides(overrides)
    _check_batch_for_world(STAGES[name], experiment)
    if STAGES[name].precheck and not _inside_launch() and not swept:  # sweep points check themselves
        importlib.import_module(STAGES[name].module).check(experiment)
    return overrides, flags, experiment


def launcher_command(stage_args: list[str], launcher: Any) -> list[str] | None:
    """argv of the launcher that runs `recap <stage_args>` in every process, or None: run the stage
    in this process (launcher=local, or this process is one a launcher started)."""
    from launch.deepspeed_launch import HostfileError, deepspeed_command, read_hostfile
    from launch.torchrun import torchrun_command

    if launcher.kind == "local" or _inside_launch():
        return None
    if launcher.kind == "torchrun":
        assert launcher.rdzv_endpoint is not None  # LauncherConfig.validate
        return torchrun_command(
            stage_args, nproc_per_node=launcher.nproc_per_node, nnodes=launcher.nnodes, node_rank=launcher.node_rank,
            rdzv_endpoint=launcher.rdzv_endpoint, rdzv_timeout_s=launcher.rdzv_timeout_s, run_id=launcher.rdzv_id,
            shutdown_timeout_s=launcher.shutdown_timeout_s,
        )
    assert launcher.kind == "deepspeed", launcher.kind  # slurm is submitted (recap launch), never run here
    addr, port = None, None
    if launcher.rdzv_endpoint is not None:
        addr, _, port_text = launcher.rdzv_endpoint.rpartition(":")
        if not addr or not port_text.isdigit():
            raise ConfigError("launcher.rdzv_endpoint", f"expected host:port or null, got '{launcher.rdzv_endpoint}'")
        port = int(port_text)
    try:
        return deepspeed_command(stage_args, hostfile=launcher.hostfile, hosts=read_hostfile(launcher.hostfile),
                                 nnodes=launcher.nnodes, nproc_per_node=launcher.nproc_per_node,
                                 master_addr=addr, master_port=port)
    except HostfileError as exc:
        raise ConfigError("launcher.hostfile", str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `recap`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        _print_help()
        return 0
    if args[0] == "launch":
        from train.launch_command import launch

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


if __name__ == "__main__":  # torchrun runs `python -m train.cli STAGE ...` in each process
    sys.exit(_main_recording_exit())
