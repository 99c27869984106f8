"""torchrun command lines for `launcher=torchrun` (one node, or several with a rendezvous).

Pure: builds argv from plain arguments; train/cli.py runs it. A single node uses torchrun's
--standalone (a free local port, no clashes between runs); several nodes use the c10d
rendezvous at ``rdzv_endpoint`` with a join timeout, so a node that never joins ends the job
with torchrun's error instead of waiting forever.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

TORCHRUN_ENV_MARKER = "TORCHELASTIC_RUN_ID"  # set by torchrun in every worker it starts
# torch.distributed.run's main, ending a failed job in one line instead of a traceback
TORCHRUN_MODULE = "train.runtime.torchrun_main"
# torchrun passes these on to each worker's process group (its default lacks SIGUSR1, which
# Slurm's --signal sends before the time limit; without it torchrun would die of SIGUSR1).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def inside_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True in a process that torchrun started (so it must not launch torchrun again)."""
    env = os.environ if environ is None else environ
    return TORCHRUN_ENV_MARKER in env


def torchrun_command(
    stage_args: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "127.0.0.1:29500",
    rdzv_timeout_s: int = 300,
    run_id: str = "recap",
    shutdown_timeout_s: int = 120,
    python: str = sys.executable,
) -> list[str]:
    """argv that runs ``recap <stage_args>`` in every process torchrun starts.

    Args:
        stage_args: the stage name followed by its overrides/flags.
        nproc_per_node: processes on this node (one per GPU; any number on CPU).
        nnodes / node_rank: node count and this node's index (multi-node only).
        rdzv_endpoint: host:port of the rendezvous (node 0's address), multi-node only.
        rdzv_timeout_s: how long nodes wait for each other before failing.
        run_id: rendezvous id shared by the nodes of one job.
        shutdown_timeout_s: after passing SIGTERM/SIGUSR1 on to the workers, how long torchrun
            waits for them (a preempted run saves a checkpoint first) before SIGKILL.
    """
    cmd = [python, "-m", TORCHRUN_MODULE, f"--nproc-per-node={nproc_per_node}",
           f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf=join_timeout={rdzv_timeout_s}",
        ]
    return cmd + ["-m", "train.cli", *stage_args]
