"""Multi-node on one machine: two "nodes" (two `recap` launches with launcher.nnodes=2 and
node_rank 0/1, one process each, c10d rendezvous on 127.0.0.1) train the toy UNet exactly as one
node with two processes does, bit for bit; a node whose peer never joins ends with one clear line
naming the rendezvous endpoint and the timeout (launch/supervise.py), not a hang.

Every process computes with one thread (tests/faults/runs.py: ONE_THREAD): torchrun sets that
itself for several processes per node but not for one, and CPU kernels sum in an order that
depends on the thread count.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.faults.runs import T2I_STEPS, assert_same, assert_same_run, free_port, start_recap, t2i_args, t2i_dir
from tests.helpers import logged_losses

pytestmark = pytest.mark.slow


def _node_args(root: Path, inputs: dict[str, Path], node_rank: int, port: int, timeout_s: int) -> list[str]:
    return t2i_args(root, inputs, "runtime=ddp", "launcher=torchrun", "launcher.nproc_per_node=1", "launcher.nnodes=2",
                    f"launcher.node_rank={node_rank}", f"launcher.rdzv_endpoint=127.0.0.1:{port}",
                    f"launcher.rdzv_timeout_s={timeout_s}")


def _stop(nodes: list[subprocess.Popen]) -> None:
    """End what still runs after a failed test: SIGTERM, which `recap` passes on to torchrun and its
    workers (launch/supervise.py), then SIGKILL."""
    for node in nodes:
        if node.poll() is None:
            node.terminate()
            try:
                node.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.communicate()


def test_two_nodes_train_exactly_like_one_node_with_two_processes(two_process_t2i: Path,
                                                                  t2i_inputs: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    nodes = [start_recap(_node_args(tmp_path, t2i_inputs, rank, port, timeout_s=120)) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=400) for node in nodes]
    finally:
        _stop(nodes)
    for rank, (node, (_, stderr)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, (rank, stderr[-4000:])

    two_nodes = t2i_dir(tmp_path)
    assert sorted(logged_losses(two_nodes)) == list(range(1, T2I_STEPS + 1))
    assert_same_run(two_nodes, two_process_t2i, T2I_STEPS)  # losses, weights, optimizer, both ranks' RNG + reader
    exported = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert_same(load_file(two_nodes / exported), load_file(two_process_t2i / exported))


def test_a_node_that_never_joins_ends_with_a_clear_timeout(t2i_inputs: dict[str, Path], tmp_path: Path) -> None:
    port, timeout_s = free_port(), 5
    start = time.monotonic()
    node = start_recap(_node_args(tmp_path, t2i_inputs, 0, port, timeout_s))  # node 1 never starts
    try:
        _, stderr = node.communicate(timeout=120)
    finally:
        _stop([node])
    elapsed = time.monotonic() - start

    assert node.returncode == 1, stderr[-3000:]
    assert elapsed < timeout_s + 60, elapsed  # the join timeout plus start-up, not forever
    assert stderr.splitlines()[-1] == (
        f"recap: error: the 2 nodes did not join the rendezvous at 127.0.0.1:{port} within {timeout_s} s "
        "(launcher.rdzv_timeout_s); start every node with the same launcher.nnodes and launcher.rdzv_endpoint, and "
        "check that node 0 can be reached there")
    assert not tmp_path.joinpath("toy").exists()  # no worker started: nothing written
