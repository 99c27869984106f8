"""sbatch scripts for `recap launch STAGE launcher=slurm`: torchrun on every node of a Slurm job.

Pure where it can be: `render_sbatch` turns plain values into the script text (train/cli.py fills
them from the config); `submit` runs sbatch on a written script and returns the job id.

The job runs one task per node (srun). Each task runs the stage command, which re-executes the
stage under torchrun with that node's rank; the nodes meet at a c10d rendezvous on the job's
first node. Arguments that differ per node (`node_args`) are expanded by bash inside each task,
so they may name Slurm's per-task variables; everything else is quoted once, here, with shlex.

Preemption and time limits: ``--signal=USR1@<lead>`` makes Slurm send SIGUSR1 to every task
``lead`` seconds before the limit (SIGTERM comes on preemption); the stage saves a checkpoint at
the same step on every rank and exits ``EXIT_REQUEUE`` (75). The script then asks Slurm to
requeue the job, which reruns this same script: the stage resumes from its run directory. The
job id survives a requeue, so ``--open-mode=append`` keeps one log per job across restarts.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.supervise import EXIT_REQUEUE

# Shell expressions a node argument may use; bash expands them inside each srun task.
NNODES = "$SLURM_NNODES"
NODE_RANK = "$SLURM_NODEID"
JOB_ID = "$SLURM_JOB_ID"
RDZV_ENDPOINT = "$HEAD_NODE:$RDZV_PORT"  # both exported by the script before srun
DEFAULT_SIGNAL_LEAD_S = 90
# A port derived from the job id: two jobs whose first node is the same machine do not collide.
DERIVED_PORT = "$((20000 + SLURM_JOB_ID % 20000))"
TIME_FORMATS = "M, M:S, H:M:S, D-H, D-H:M or D-H:M:S"
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_SUBMITTED = re.compile(r"Submitted batch job (\d+)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SubmitError(RuntimeError):
    """sbatch failed or printed no job id."""


class SbatchMissing(SubmitError):
    """No sbatch on PATH: not a Slurm login node."""


@dataclass(frozen=True)
class SbatchJob:
    """Everything one sbatch script holds, as plain values.

    Attributes:
        job_name: Slurm's job name (squeue, sacct).
        command: the program every node runs (``python -m train.cli STAGE``), one line.
        args: its arguments (the overrides), one line each; like ``command``, each reaches the
            process exactly as given.
        node_args: appended after ``args`` on each node once bash expands them there, e.g.
            ``launcher.node_rank=$SLURM_NODEID`` (see NODE_RANK and friends); no quotes inside.
        workdir: the directory the stage runs in (relative paths in the config resolve here).
        run_dir: the stage's run directory (named in the header: where it resumes from).
        log_dir: where Slurm writes ``<job id>.out`` and ``<job id>.err`` (must exist at submit).
        nodes / gpus_per_node / cpus_per_task: the allocation; 0 GPUs omits the GPU request.
        time: wall-clock limit in one of Slurm's formats (TIME_FORMATS).
        partition / account / qos: omitted when None (the cluster's defaults).
        signal_lead_s: seconds before the time limit at which Slurm sends SIGUSR1.
        rdzv_port: rendezvous port on the first node; None derives it from the job id.
        omp_num_threads: exported as OMP_NUM_THREADS unless ``env`` sets it; None: not set.
        setup: shell lines run (in order) before the stage, e.g. ``module load cuda``.
        env: variables exported to every process of the job.
        sbatch_args: extra sbatch options, one ``#SBATCH`` line each.
    """

    job_name: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    node_args: tuple[str, ...]
    workdir: str
    run_dir: str
    log_dir: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    time: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_lead_s: int = DEFAULT_SIGNAL_LEAD_S
    rdzv_port: int | None = None
    omp_num_threads: int | None = None
    setup: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    sbatch_args: tuple[str, ...] = ()


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: "90" (minutes), "90:30", "24:00:00", "2-00", "2-12:30:00".

    Raises ValueError naming the accepted formats.
    """
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"'{text}' is not a Slurm time limit; use {TIME_FORMATS}")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:  # H:M:S
        days, hours, minutes, seconds = 0, a, b, c
    else:  # M or M:S
        days, hours, minutes, seconds = 0, 0, a, b or 0
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _check_sbatch_value(what: str, value: str) -> None:
    # sbatch splits #SBATCH lines on blanks and reads quotes itself, and expands %j-style
    # patterns in file names: such characters would silently change the option.
    bad = sorted({c for c in value if c.isspace() or c in "'\"%\\"})
    if bad:
        raise ValueError(f"{what} '{value}' has {' '.join(repr(c) for c in bad)}, which an #SBATCH line cannot "
                         "carry; choose a name without blanks, quotes, % or backslashes")


def _sbatch_lines(job: SbatchJob) -> list[str]:
    for what, value in (("the job name", job.job_name), ("the log directory", job.log_dir),
                        ("the partition", job.partition), ("the account", job.account), ("the qos", job.qos)):
        if value is not None:
            _check_sbatch_value(what, value)
    options = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    options += [f"--cpus-per-task={job.cpus_per_task}", f"--time={job.time}"]
    options += [f"--{name}={value}" for name, value in
                (("partition", job.partition), ("account", job.account), ("qos", job.qos)) if value is not None]
    options += ["--requeue", f"--signal=USR1@{job.signal_lead_s}", "--open-mode=append",
                f"--output={job.log_dir}/%j.out", f"--error={job.log_dir}/%j.err", *job.sbatch_args]
    return [f"#SBATCH {option}" for option in options]


def _environment_lines(job: SbatchJob) -> list[str]:
    env = dict(job.env)
    if job.omp_num_threads is not None and "OMP_NUM_THREADS" not in env:
        env = {"OMP_NUM_THREADS": str(job.omp_num_threads), **env}
    for name in env:
        assert _ENV_NAME.fullmatch(name), f"not a shell variable name: {name!r}"  # the schema checks this
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]


def _srun_lines(job: SbatchJob) -> list[str]:
    for arg in job.node_args:
        assert "'" not in arg and '"' not in arg, f"node argument with a quote: {arg!r}"
    # bash -c 'exec "$@" ARGS' NAME CMD...: the command arrives as "$@", untouched; only ARGS
    # (double-quoted, inside the single-quoted program) are expanded, by bash in each task.
    per_node = " ".join(f'"{arg}"' for arg in job.node_args)
    program = shlex.quote(f'exec "$@" {per_node}'.rstrip())
    # srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05-23.02): pass it explicitly.
    lines = [f"srun --kill-on-bad-exit=1 --nodes={job.nodes} --ntasks-per-node=1 --cpus-per-task={job.cpus_per_task}",
             f"    bash -c {program} recap", f"    {shlex.join(job.command)}"]
    lines += [f"    {shlex.quote(arg)}" for arg in job.args]
    return [line + " \\" for line in lines] + ["    && code=0 || code=$?"]


def render_sbatch(job: SbatchJob) -> str:
    """The sbatch script text for ``job`` (ends with a newline).

    Raises ValueError when the job name or log directory cannot be written in an #SBATCH line.
    """
    port = DERIVED_PORT if job.rdzv_port is None else str(job.rdzv_port)
    lines = [
        "#!/bin/bash",
        f"# {job.job_name}: written by `recap launch` (launch/slurm.py; docs/slurm.md). Resubmitting the same",
        "# command writes this same script, and the stage resumes from the newest checkpoint in",
        f"# {job.run_dir}",
        *_sbatch_lines(job),
        "",
        "set -eo pipefail",
        f"cd {shlex.quote(job.workdir)}",
        *job.setup,
        "set -u  # after the setup lines: module and venv scripts often read unset variables",
        *_environment_lines(job),
        "",
        "# The first node of the allocation hosts the rendezvous; srun passes these on to every task.",
        "# (sed, not head: head closes the pipe early, and with pipefail scontrol's SIGPIPE ends the script.)",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        f"RDZV_PORT={port}",
        "export HEAD_NODE RDZV_PORT",
        'echo "recap: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s), '
        'rendezvous $HEAD_NODE:$RDZV_PORT"',
        "# Preemption also sends SIGTERM to this shell: a trap (run once srun returns) keeps it alive to",
        "# report the stage's exit code and requeue.",
        "trap 'echo \"recap: batch shell got SIGTERM; waiting for srun\" >&2' TERM",
        "",
        *_srun_lines(job),
        f"if [ \"$code\" -eq {EXIT_REQUEUE} ]; then",
        "    # Preempted or at the time limit, after a checkpoint on every rank: run again, same job id.",
        '    echo "recap: stage checkpointed and exited for a restart; requeueing job $SLURM_JOB_ID" >&2',
        '    scontrol requeue "$SLURM_JOB_ID" || echo "recap: scontrol requeue failed; resubmit the same '
        'recap launch command to resume" >&2',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def parse_job_id(stdout: str) -> int:
    """The job id in sbatch's "Submitted batch job N" line; SubmitError if there is none."""
    match = _SUBMITTED.search(stdout)
    if match is None:
        raise SubmitError(f"sbatch printed no job id (expected 'Submitted batch job N'): {stdout.strip()!r}")
    return int(match.group(1))


def submit(script: Path, sbatch: str = "sbatch") -> int:
    """Submit ``script`` with sbatch; returns the job id."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise SbatchMissing(f"'{sbatch}' is not on PATH: run recap launch on a Slurm login node, or add --dry-run "
                          "to print the script")
    proc = subprocess.run([exe, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split()) or "(no message)"
        raise SubmitError(f"sbatch exited with code {proc.returncode}: {detail}")
    return parse_job_id(proc.stdout)
