"""DeepSpeed's launcher (`deepspeed --hostfile H ...`) for `launcher=deepspeed`.

Pure: reads and checks the hostfile, builds the argv; train/cli.py runs it (launch/supervise.py).
DeepSpeed's own hostfile parser accepts a missing file (it silently falls back to the local
GPUs) and reports a bad line without its number; we check first and name the line. Its
``--num_gpus`` takes that many slots per host without comparing with the hostfile, so a host
with fewer slots than processes is refused here too.

Workers are started with ``--no_local_rank`` (our CLI takes overrides, not ``--local_rank=N``;
the rank is in the LOCAL_RANK environment variable) and recognise themselves by the variables
DeepSpeed's per-node launcher sets (`inside_deepspeed_launcher`), so they run the stage instead
of launching it again.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HOSTFILE_LINE = "<hostname> slots=<N>"
# Set by deepspeed.launcher.launch in every worker it starts (deepspeed/constants.py).
DEEPSPEED_ENV_MARKERS = ("CROSS_RANK", "CROSS_SIZE")
_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\d+)\s*(?:#.*)?")


class HostfileError(ValueError):
    """A hostfile that DeepSpeed's launcher would misread; the message names the file and line."""


def inside_deepspeed_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process that DeepSpeed's launcher started (so it must not launch again)."""
    env = os.environ if environ is None else environ
    return all(name in env for name in DEEPSPEED_ENV_MARKERS)


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """Host -> slots, in file order, from MPI-style lines ``worker-0 slots=8``.

    Blank lines and ``#`` comments (whole-line or trailing) are skipped. Raises HostfileError
    naming ``source:line`` for a malformed line, zero slots, a repeated host, or no host at all.
    """
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise HostfileError(f"{source}:{number}: '{line}' is not '{HOSTFILE_LINE}'")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise HostfileError(f"{source}:{number}: {host} has slots={slots}; a host needs at least one slot")
        if host in hosts:
            raise HostfileError(f"{source}:{number}: {host} is listed twice; give each host one line")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"{source}: no hosts; write one '{HOSTFILE_LINE}' line per node")
    return hosts


def read_hostfile(path: str | Path) -> dict[str, int]:
    """parse_hostfile of the file at ``path`` (HostfileError if it cannot be read)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise HostfileError(f"{path}: cannot read the hostfile ({exc.strerror or exc})") from None
    return parse_hostfile(text, str(path))


def deepspeed_command(
    stage_args: Sequence[str],
    *,
    hostfile: str,
    hosts: Mapping[str, int],
    nnodes: int,
    nproc_per_node: int,
    master_addr: str | None = None,
    master_port: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """argv that runs ``recap <stage_args>`` in ``nproc_per_node`` processes on the first
    ``nnodes`` hosts of ``hosts`` (the parsed ``hostfile``).

    Args:
        master_addr / master_port: node 0's address for torch.distributed. None on one node:
            127.0.0.1 (DeepSpeed runs a single host locally); None on several: omitted, and
            DeepSpeed asks the first host for its address over ssh (`hostname -I`).

    Raises HostfileError when the hostfile has fewer hosts than ``nnodes`` or a used host has
    fewer slots than ``nproc_per_node``.
    """
    used = list(hosts.items())[:nnodes]
    if len(used) < nnodes:
        raise HostfileError(f"{hostfile}: {len(hosts)} host(s) for launcher.nnodes={nnodes}; list one line per node")
    short = [f"{host} (slots={slots})" for host, slots in used if slots < nproc_per_node]
    if short:
        raise HostfileError(f"{hostfile}: {', '.join(short)} has fewer slots than launcher.nproc_per_node="
                            f"{nproc_per_node}")
    if master_addr is None and nnodes == 1:
        master_addr = "127.0.0.1"
    cmd = [python, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", f"--num_nodes={nnodes}",
           f"--num_gpus={nproc_per_node}"]
    if master_addr is not None:
        cmd.append(f"--master_addr={master_addr}")
    if master_port is not None:
        cmd.append(f"--master_port={master_port}")
    if nnodes == 1:
        cmd.append("--no_ssh_check")  # one host runs locally: DeepSpeed's ssh probe would only fail without sshd
    return cmd + ["--no_local_rank", "--module", "train.cli", *stage_args]
