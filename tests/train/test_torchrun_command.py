"""launch/torchrun.py: the torchrun argv `recap` re-executes itself under."""

from __future__ import annotations

import sys

import pytest

from launch.torchrun import TORCHRUN_ENV_MARKER, inside_torchrun, torchrun_command


def test_single_node_is_standalone():
    cmd = torchrun_command(["train-vae", "runtime=ddp", "-m", "seed=1,2"], nproc_per_node=2, python="/py")
    assert cmd == ["/py", "-m", "train.runtime.torchrun_main", "--nproc-per-node=2",
                   "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=120", "--standalone",
                   "-m", "train.cli", "train-vae", "runtime=ddp", "-m", "seed=1,2"]


def test_default_python_is_this_interpreter():
    cmd = torchrun_command(["make-toy-data"], nproc_per_node=1)
    assert cmd[:3] == [sys.executable, "-m", "train.runtime.torchrun_main"]
    assert cmd[-3:] == ["-m", "train.cli", "make-toy-data"]


def test_multi_node_uses_c10d_rendezvous_with_join_timeout():
    cmd = torchrun_command(["train-vae", "launcher=torchrun"], nproc_per_node=8, nnodes=4, node_rank=3,
                           rdzv_endpoint="10.0.0.1:29400", rdzv_timeout_s=120, run_id="job42", shutdown_timeout_s=80,
                           python="/py")
    assert cmd == [
        "/py", "-m", "train.runtime.torchrun_main", "--nproc-per-node=8",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=80",
        "--nnodes=4", "--node-rank=3", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=job42", "--rdzv-conf=join_timeout=120",
        "-m", "train.cli", "train-vae", "launcher=torchrun",
    ]
    assert "--standalone" not in cmd


def test_multi_node_defaults():
    cmd = torchrun_command(["train-vae"], nproc_per_node=2, nnodes=2, python="/py")
    assert "--node-rank=0" in cmd
    assert "--rdzv-endpoint=127.0.0.1:29500" in cmd
    assert "--rdzv-id=recap" in cmd
    assert "--rdzv-conf=join_timeout=300" in cmd


@pytest.mark.parametrize(("environ", "expected"), [({TORCHRUN_ENV_MARKER: "abc"}, True), ({}, False),
                                                   ({"RANK": "0", "WORLD_SIZE": "2"}, False)])
def test_inside_torchrun_from_mapping(environ, expected):
    assert inside_torchrun(environ) is expected


def test_inside_torchrun_reads_process_env(monkeypatch):
    assert TORCHRUN_ENV_MARKER == "TORCHELASTIC_RUN_ID"
    monkeypatch.delenv(TORCHRUN_ENV_MARKER, raising=False)
    assert inside_torchrun() is False
    monkeypatch.setenv(TORCHRUN_ENV_MARKER, "none")
    assert inside_torchrun() is True


def test_launch_dry_run_prints_the_torchrun_command_with_its_rendezvous_id(capsys):
    from train.cli import main

    args = ["train-vae", "launcher=torchrun", "runtime=ddp", "launcher.nnodes=2", "launcher.node_rank=1",
            "launcher.rdzv_endpoint=10.0.0.1:29400", "launcher.rdzv_id=job7", "launcher.shutdown_timeout_s=80",
            "train_vae.global_batch_size=16", "train_vae.micro_batch_size=4"]
    assert main(["launch", *args, "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == [
        sys.executable, "-m", "train.runtime.torchrun_main", "--nproc-per-node=2",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=80",
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=job7", "--rdzv-conf=join_timeout=300", "-m", "train.cli", *args,
    ]


def test_torchrun_needs_a_rendezvous_endpoint(capsys):
    from train.commands.exit_codes import EXIT_USAGE
    from train.cli import main

    assert main(["train-vae", "launcher=torchrun", "runtime=ddp", "launcher.rdzv_endpoint=null",
                 "train_vae.global_batch_size=16", "train_vae.micro_batch_size=8"]) == EXIT_USAGE
    assert capsys.readouterr().err == ("recap train-vae: error: launcher.rdzv_endpoint: torchrun's nodes meet at "
                                       "node 0: set it to <node 0 host>:<port>\n")


@pytest.mark.parametrize("stage", ["sample", "evaluate", "pipeline", "train-eval-clip"])
def test_single_process_stages_run_once_under_torchrun(stage, capsys):
    """A preset's launcher=torchrun (dalle3_256) starts only the stages that split their work over
    ranks; `recap sample` there runs in one process instead of 8 copies that each redo it."""
    from train.cli import main

    args = [stage, "experiment=dalle3_256"]  # launcher=torchrun, 8 processes
    assert main(["launch", *args, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [sys.executable, "-m", "train.cli", *args]
    assert err == (f"recap {stage}: runs in one process (launcher=torchrun starts the stages that split their work "
                   "over processes: pretrain-captioner, finetune-captioner, recaption, train-vae, cache, train-t2i)\n")
