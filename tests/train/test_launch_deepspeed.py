"""launcher=deepspeed: hostfile checks and the argv of DeepSpeed's launcher (launch/deepspeed_launch.py),
what `recap launch` prints or runs with it, and one real run of a tiny stage under it on CPU."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml

from launch.deepspeed_launch import (
    HostfileError,
    deepspeed_command,
    inside_deepspeed_launcher,
    parse_hostfile,
    read_hostfile,
)
from tests.helpers import run_recap
from train.commands.exit_codes import EXIT_USAGE
from train.cli import main

RUNNER = ["/py", "-m", "deepspeed.launcher.runner"]
TAIL = ["--no_local_rank", "--module", "train.cli", "train-vae", "runtime=ddp"]


def test_hostfile_lines_comments_and_order():
    text = "# our nodes\nworker-1 slots=8\n\n  worker-0   slots=4   # the small one\n"
    assert list(parse_hostfile(text).items()) == [("worker-1", 8), ("worker-0", 4)]


@pytest.mark.parametrize(("text", "message"), [
    ("worker-0 slots=8\nworker-1 slot=8\n", "hosts:2: 'worker-1 slot=8' is not '<hostname> slots=<N>'"),
    ("worker-0\n", "hosts:1: 'worker-0' is not '<hostname> slots=<N>'"),
    ("worker-0 slots=8 gpus=2\n", "hosts:1: 'worker-0 slots=8 gpus=2' is not '<hostname> slots=<N>'"),
    ("worker-0 slots=0\n", "hosts:1: worker-0 has slots=0; a host needs at least one slot"),
    ("a slots=1\nb slots=1\na slots=2\n", "hosts:3: a is listed twice; give each host one line"),
    ("# nothing\n\n", "hosts: no hosts; write one '<hostname> slots=<N>' line per node"),
])
def test_bad_hostfiles_name_the_line(text, message):
    with pytest.raises(HostfileError) as info:
        parse_hostfile(text, "hosts")
    assert str(info.value) == message


def test_missing_hostfile_is_an_error_not_a_fallback(tmp_path):
    # DeepSpeed's own runner would warn and quietly use the local GPUs instead.
    with pytest.raises(HostfileError, match=f"^{tmp_path}/nope: cannot read the hostfile"):
        read_hostfile(tmp_path / "nope")


def test_single_host_runs_locally_without_ssh():
    cmd = deepspeed_command(["train-vae", "runtime=ddp"], hostfile="/h", hosts={"localhost": 2}, nnodes=1,
                            nproc_per_node=2, python="/py")
    assert cmd == [*RUNNER, "--hostfile=/h", "--num_nodes=1", "--num_gpus=2", "--master_addr=127.0.0.1",
                   "--no_ssh_check", *TAIL]


def test_several_hosts_with_and_without_an_endpoint():
    hosts = {"w0": 8, "w1": 8, "w2": 8}
    cmd = deepspeed_command(["train-vae", "runtime=ddp"], hostfile="/h", hosts=hosts, nnodes=2, nproc_per_node=8,
                            master_addr="10.0.0.1", master_port=29600, python="/py")
    assert cmd == [*RUNNER, "--hostfile=/h", "--num_nodes=2", "--num_gpus=8", "--master_addr=10.0.0.1",
                   "--master_port=29600", *TAIL]
    # No endpoint: DeepSpeed asks the first host for its address itself (and checks ssh first).
    cmd = deepspeed_command(["train-vae", "runtime=ddp"], hostfile="/h", hosts=hosts, nnodes=3, nproc_per_node=4,
                            python="/py")
    assert cmd == [*RUNNER, "--hostfile=/h", "--num_nodes=3", "--num_gpus=4", *TAIL]


@pytest.mark.parametrize(("hosts", "nnodes", "nproc", "message"), [
    ({"w0": 8}, 2, 8, "/h: 1 host(s) for launcher.nnodes=2; list one line per node"),
    ({"w0": 8, "w1": 4, "w2": 2}, 2, 8, "/h: w1 (slots=4) has fewer slots than launcher.nproc_per_node=8"),
])
def test_hostfile_too_small_for_the_launch(hosts, nnodes, nproc, message):
    with pytest.raises(HostfileError) as info:
        deepspeed_command(["train-vae"], hostfile="/h", hosts=hosts, nnodes=nnodes, nproc_per_node=nproc)
    assert str(info.value) == message


@pytest.mark.parametrize(("environ", "expected"), [
    ({"CROSS_RANK": "0", "CROSS_SIZE": "1", "RANK": "0"}, True),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, False),  # a plain env:// process group is not a launch
    ({"CROSS_RANK": "0"}, False),
])
def test_inside_deepspeed_launcher(environ, expected):
    assert inside_deepspeed_launcher(environ) is expected


# ---- through the CLI -----------------------------------------------------------------------


def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_launch_dry_run_prints_deepspeeds_command(tmp_path, capsys):
    hostfile = _hostfile(tmp_path, "node-0 slots=4\nnode-1 slots=4\n")
    stage = ["train-vae", "launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.nnodes=2",
             "launcher.nproc_per_node=4", "launcher.rdzv_endpoint=node-0:29600", "runtime=zero2",
             "train_vae.global_batch_size=16", "train_vae.micro_batch_size=2"]
    assert main(["launch", *stage, "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == [
        sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", "--num_nodes=2", "--num_gpus=4",
        "--master_addr=node-0", "--master_port=29600", "--no_local_rank", "--module", "train.cli", *stage]


DDP_BATCH = ["runtime=ddp", "train_vae.global_batch_size=16", "train_vae.micro_batch_size=8"]


@pytest.mark.parametrize(("text", "extra", "message"), [
    ("node-0 slots=4\nnode-1 slots:4\n", ["launcher.nnodes=2", *DDP_BATCH],
     "launcher.hostfile: {hostfile}:2: 'node-1 slots:4' is not '<hostname> slots=<N>'"),
    ("node-0 slots=1\n", ["launcher.nproc_per_node=2", *DDP_BATCH],
     "launcher.hostfile: {hostfile}: node-0 (slots=1) has fewer slots than launcher.nproc_per_node=2"),
    ("node-0 slots=1\n", ["launcher.rdzv_endpoint=node-0"],
     "launcher.rdzv_endpoint: expected host:port or null, got 'node-0'"),
])
def test_deepspeed_mistakes_exit_2_before_starting(tmp_path, capsys, text, extra, message):
    hostfile = _hostfile(tmp_path, text)
    assert main(["train-vae", "launcher=deepspeed", f"launcher.hostfile={hostfile}", *extra]) == EXIT_USAGE
    assert capsys.readouterr().err == f"recap train-vae: error: {message.format(hostfile=hostfile)}\n"


def test_a_hostfile_is_only_for_deepspeed(capsys):
    assert main(["train-vae", "launcher=deepspeed"]) == EXIT_USAGE
    assert capsys.readouterr().err == ("recap train-vae: error: launcher.hostfile: launcher=deepspeed needs "
                                       "launcher.hostfile=PATH (lines '<host> slots=<N>')\n")
    assert main(["train-vae", "+launcher.hostfile=/h"]) == EXIT_USAGE
    assert capsys.readouterr().err == ("recap train-vae: error: launcher.hostfile: only launcher=deepspeed reads a "
                                       "hostfile\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tiny_stage_runs_under_deepspeeds_launcher(tmp_path, toy_data):
    """`recap train-vae launcher=deepspeed` with a one-host hostfile: DeepSpeed's launcher starts 2
    CPU processes, which recognise the launch and train instead of launching again."""
    root = tmp_path / "runs"
    hostfile = _hostfile(tmp_path, "localhost slots=2\n")
    proc = run_recap(["launch", "train-vae", "launcher=deepspeed", f"launcher.hostfile={hostfile}",
                      "launcher.nproc_per_node=2", f"launcher.rdzv_endpoint=127.0.0.1:{_free_port()}", "runtime=ddp",
                      f"run.root={root}", f"data.train={toy_data}/train", f"data.heldout={toy_data}/heldout",
                      "train_vae.steps=2", "checkpoint.every_steps=2", "train_vae.resolution=32",
                      "train_vae.global_batch_size=4", "train_vae.micro_batch_size=2",
                      "vae.block_out_channels=[8,16,16,16]", "vae.norm_num_groups=8", "data.reader.num_workers=0",
                      "logger.wandb.mode=disabled", "logger.progress=false"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "toy" / "train_vae"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["processes"], summary["steps"], summary["samples_seen"]) == (2, 2, 8)
    assert (run_dir / "checkpoints" / "step_000000002" / "COMMITTED").is_file()
    assert sorted(p.name for p in (run_dir / "logs").glob("*.log")) == ["train_vae.rank0.log", "train_vae.rank1.log"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["launcher"]["kind"] == "deepspeed"
