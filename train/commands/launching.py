"""`recap launch STAGE [overrides...] [-m] [--dry-run]`: start a stage with the launcher its config
chooses: here (local), torchrun, DeepSpeed's launcher, or a Slurm batch job (written to
<run dir>/slurm/STAGE.sbatch and submitted with sbatch). --dry-run prints the command or the
script instead. The config stops here: launch/slurm.py and launch/deepspeed_launch.py get plain
values. docs/slurm.md is the runbook.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.commands.exit_codes import EXIT_USAGE, fail
from train.commands.stage_table import STAGES, hydra_job_name
from train.commands.hydra_run import MULTIRUN_FLAGS, check_wandb_before_launch, checked_args, inside_launch, run_hydra
from train.config.typed import ConfigError, did_you_mean

if TYPE_CHECKING:
    from launch.slurm import SbatchJob


def _print_launch_help() -> None:
    print("usage: recap launch STAGE [key=value ...] [group=option ...] [-m] [--dry-run]\n")
    print("Start STAGE with the launcher its config chooses (launcher=...):")
    print("  local      in this process")
    print("  torchrun   under torchrun, on one node or several (launcher.nnodes, node_rank, rdzv_endpoint)")
    print("  deepspeed  under DeepSpeed's launcher on the hosts of launcher.hostfile")
    print("  slurm      as a Slurm job: writes <run dir>/slurm/STAGE.sbatch and submits it with sbatch")
    print("--dry-run prints the command (or the sbatch script) and starts nothing. -m: one launch per sweep point.")
    print("Resubmitting the same command resumes from the run's newest checkpoint (docs/slurm.md).")


def launch(args: list[str]) -> int:
    """`recap launch STAGE [overrides] [-m] [--dry-run]`: start the stage with its launcher."""
    dry_run = "--dry-run" in args
    args = [arg for arg in args if arg != "--dry-run"]
    if not args or args[0] in ("-h", "--help", "help") or "-h" in args or "--help" in args:
        _print_launch_help()
        return 0
    name, rest = args[0], args[1:]
    if name not in STAGES:
        return fail("launch", f"unknown stage '{name}'{did_you_mean(name, STAGES)}; stages: {', '.join(STAGES)}",
                     EXIT_USAGE)
    try:
        overrides, flags, experiment = checked_args(name, rest)
        if set(flags) - MULTIRUN_FLAGS:
            raise ConfigError("", f"recap launch takes -m and --dry-run, not {flags[0]}; `recap {name} --cfg job` "
                              "prints the config")
        multirun = bool(MULTIRUN_FLAGS & set(flags))
        if not multirun and experiment.launcher.kind == "slurm":
            return _submit_slurm(name, overrides, experiment, dry_run)
        cmd = None if multirun else launcher_command([name, *rest], experiment.launcher)
        if cmd is not None and not dry_run:
            check_wandb_before_launch(name, experiment)
    except ConfigError as exc:
        return fail(f"launch {name}", str(exc), EXIT_USAGE)
    if multirun:  # each point is its own `recap launch`: its own job, in its point's run directory
        return run_hydra(name, overrides, flags, point_prefix=["launch", *(["--dry-run"] if dry_run else [])])
    if dry_run:
        print(shlex.join(cmd or [sys.executable, "-m", "train.cli", name, *rest]))
        return 0
    if cmd is None:
        return run_hydra(name, overrides, flags)
    from launch.supervise import run_supervised

    return run_supervised(cmd)


def _run_dir(name: str, overrides: list[str]) -> Path:
    """The run directory (hydra.run.dir) Hydra gives `recap STAGE overrides`; nothing is created."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config.loading import PRIMARY_CONFIG, conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(PRIMARY_CONFIG, overrides=[*overrides, f"hydra.job.name={hydra_job_name(name)}"],
                      return_hydra_config=True)
    return Path.cwd() / str(OmegaConf.select(cfg, "hydra.run.dir"))


def _is_launcher_override(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
    return key == "launcher" or key.startswith("launcher.")


def _refuse_secrets(overrides: list[str]) -> None:
    """The sbatch script is a plain file: no literal secret may go into it. An interpolation such
    as ${oc.env:SHARD_TOKEN} is resolved on the nodes, from the environment sbatch passes on."""
    from train.outputs.redaction import redact_text

    for override in overrides:
        literal = re.sub(r"\$\{[^}]*\}", "", override)
        if redact_text(literal) != literal:
            raise ConfigError(override.split("=", 1)[0], "holds a secret, which the sbatch script would store in "
                              "plain text; read it from the environment instead: key='...${oc.env:VAR}...' with VAR "
                              "exported before recap launch (sbatch passes your environment on)")


def _sbatch_job(name: str, overrides: list[str], experiment: Any, run_dir: Path) -> SbatchJob:
    """launcher=slurm as launch/slurm.py's plain values. Every node runs the stage with the user's
    overrides, their launcher keys replaced by torchrun's for that node (rank from Slurm)."""
    from launch import slurm

    launcher, job = experiment.launcher, experiment.launcher.slurm
    kept = [o for o in overrides if not _is_launcher_override(o)]
    _refuse_secrets(kept)
    args = (*kept, "launcher=torchrun", f"launcher.nproc_per_node={launcher.nproc_per_node}",
            f"launcher.rdzv_timeout_s={launcher.rdzv_timeout_s}",
            f"launcher.shutdown_timeout_s={launcher.shutdown_timeout_s}")
    node_args = (f"launcher.nnodes={slurm.NNODES}", f"launcher.node_rank={slurm.NODE_RANK}",
                 f"launcher.rdzv_endpoint={slurm.RDZV_ENDPOINT}", f"launcher.rdzv_id=slurm-{slurm.JOB_ID}")
    return slurm.SbatchJob(
        job_name=job.job_name or f"recap-{name}-{experiment.run.name}",
        command=(job.python or sys.executable, "-m", "train.cli", name), args=args, node_args=node_args,
        workdir=str(Path.cwd()), run_dir=str(run_dir), log_dir=str(run_dir / "slurm"), nodes=launcher.nnodes,
        gpus_per_node=launcher.nproc_per_node if job.gpus_per_node is None else job.gpus_per_node,
        cpus_per_task=job.cpus_per_task, time=str(job.time), partition=job.partition, account=job.account, qos=job.qos,
        signal_lead_s=job.signal_lead_s, rdzv_port=job.rdzv_port,
        omp_num_threads=max(1, job.cpus_per_task // launcher.nproc_per_node),  # torchrun would default to 1
        setup=tuple(job.setup), env=tuple(job.env.items()), sbatch_args=tuple(job.sbatch_args),
    )


def _submit_slurm(name: str, overrides: list[str], experiment: Any, dry_run: bool) -> int:
    """Write <run dir>/slurm/<stage>.sbatch and submit it with sbatch (dry_run: print it instead).
    ConfigError before anything is written."""
    from launch import slurm

    run_dir = _run_dir(name, overrides)
    job = _sbatch_job(name, overrides, experiment, run_dir)
    try:
        script = slurm.render_sbatch(job)
    except ValueError as exc:  # a name the #SBATCH lines cannot carry
        raise ConfigError("", f"{exc} (the job name comes from launcher.slurm.job_name or run.name, the log "
                          "directory from run.root and run.name, the others from launcher.slurm)") from None
    if dry_run:
        print(script, end="")
        return 0
    path = run_dir / "slurm" / f"{name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)  # also the log directory: Slurm does not create it
    path.write_text(script)  # sbatch keeps its own copy: rewriting it under a queued job is safe
    try:
        job_id = slurm.submit(path)
    except slurm.SubmitError as exc:
        return fail(f"launch {name}", str(exc), EXIT_USAGE if isinstance(exc, slurm.SbatchMissing) else 1)
    print(f"submitted batch job {job_id}: script {path}, log {path.parent / f'{job_id}.out'}")
    return 0


def launcher_command(stage_args: list[str], launcher: Any) -> list[str] | None:
    """argv of the launcher that runs `recap <stage_args>` in every process, or None: run the stage
    in this process (launcher=local, this process is one a launcher started, or a stage that runs in
    one process whatever the launcher: it says so on stderr)."""
    from launch.deepspeed_launch import HostfileError, deepspeed_command, read_hostfile
    from launch.torchrun import torchrun_command

    if launcher.kind == "local" or inside_launch():
        return None
    if not STAGES[stage_args[0]].multi_process:  # e.g. sample, evaluate under a preset's launcher=torchrun
        print(f"recap {stage_args[0]}: runs in one process (launcher={launcher.kind} starts the stages that split "
              f"their work over processes: {', '.join(n for n, s in STAGES.items() if s.multi_process)})",
              file=sys.stderr)
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
