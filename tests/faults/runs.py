"""Tiny runs shared by the fault-injection tests: their overrides, launching `recap` nodes side by
side, and bit-for-bit comparisons of what two runs left behind."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.helpers import REPO, logged_losses
from train.training import checkpoint_files as files

VAE_STEPS = 8
T2I_STEPS = 3
# Every process computes with one thread, in pytest and in `recap` subprocesses alike: CPU kernels
# sum in an order that depends on the thread count, and torchrun already sets 1 when it starts
# several processes per node (not for one), so runs compared bit for bit must agree on it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def vae_args(root: Path, toy_data: Path, *extra: str) -> list[str]:
    """Overrides of a tiny single-process train-vae run: 8 steps of 4 images (2 micro-batches of 2),
    a checkpoint every 2 steps (all kept), 2 DataLoader workers (the reader position has two
    streams to restore)."""
    return [f"run.root={root}", f"data.train={toy_data}/train", f"data.heldout={toy_data}/heldout",
            f"train_vae.steps={VAE_STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=10",
            "train_vae.resolution=32", "train_vae.global_batch_size=4", "train_vae.micro_batch_size=2",
            "vae.block_out_channels=[8,8,8,8]", "vae.norm_num_groups=8", "data.reader.num_workers=2",
            "logger.wandb.mode=disabled", "logger.progress=false", "launcher=local", "runtime=single", *extra]


def t2i_args(root: Path, inputs: dict[str, Path], *extra: str, steps: int = T2I_STEPS) -> list[str]:
    """`recap train-t2i` with the toy UNet: one 64 px stage of ``steps`` steps, 4 images per step
    (2 processes x 1 micro-batch of 2, or 1 process x 2), raw images (no cache)."""
    stage = f"[{{resolution: 64, steps: {steps}, global_batch_size: 4, micro_batch_size: 2}}]"
    return ["train-t2i", f"run.root={root}", "train_t2i.cache=null", f"train_t2i.input={inputs['shards']}",
            f"train_t2i.vae={inputs['vae']}", f"text_encoder.tokenizer={inputs['tokenizer']}",
            "text_encoder.max_tokens=24",
            "text_encoder.architecture={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4}",
            "unet.block_out_channels=[32,32,64]", "unet.attention_head_dim=8", "unet.xf_width=32", "unet.xf_heads=4",
            f"train_t2i.stages={stage}", "train_t2i.sampling.every_steps=null", "train_t2i.sampling.prompts=[]",
            "train_t2i.optimizer.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
            "logger.wandb.mode=disabled", "logger.progress=false", "data.reader.num_workers=1", *extra]


def vae_dir(root: Path) -> Path:
    return root / "toy" / "train_vae"


def t2i_dir(root: Path) -> Path:
    return root / "toy" / "train_t2i"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run in-process training with one thread (see ONE_THREAD), restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of one test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_recap(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`recap ARGS` started in the background (as tests.helpers.run_recap runs it); output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "train.cli", *args], cwd=REPO, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality of checkpoint contents: tensors bit for bit (dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # DeepSpeed's LossScaler and friends have no __eq__
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def checkpoint_state(directory: Path) -> dict[str, Any]:
    """Everything a (non-DeepSpeed) checkpoint restores: weights, optimizer, LR scheduler, extra
    modules, the train state and every rank's RNG states and reader position."""
    out: dict[str, Any] = {p.name: load_file(p) for p in sorted(directory.glob("*.safetensors"))}
    for name in ("optimizer.pt", "scheduler.pt", *sorted(p.name for p in directory.glob("rank_*.pt"))):
        out[name] = files.safe_torch_load(directory / name)
    out["train_state.json"] = (directory / "train_state.json").read_text()
    return out


def assert_same_run(run_dir: Path, reference: Path, steps: int) -> None:
    """Same loss at every step (a replayed step repeats its first value), same final checkpoint
    state, bit for bit."""
    got, expected = logged_losses(run_dir), logged_losses(reference)
    assert sorted(expected) == list(range(1, steps + 1))
    assert sorted(got) == sorted(expected)
    for step, values in got.items():
        assert set(values) == set(expected[step]), (step, values, expected[step])
    final = files.step_dir_name(steps)
    assert_same(checkpoint_state(run_dir / "checkpoints" / final), checkpoint_state(reference / "checkpoints" / final))
