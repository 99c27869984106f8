"""Fixtures of the fault-injection suite: uninterrupted reference runs, made once per session and
only read by the tests (a test that edits a run works on a copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.runs import ONE_THREAD, one_thread, t2i_args, t2i_dir, vae_args
from tests.helpers import run_recap, run_stage
from tests.helpers import t2i_inputs as build_t2i_inputs


@pytest.fixture(scope="session")
def vae_reference(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny train-vae run (runs.vae_args), in this process; its run root."""
    root = tmp_path_factory.mktemp("vae_reference")
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.delenv("RECAP_FAULT", raising=False)
        run_stage("train_vae", vae_args(root, toy_data))
    return root


@pytest.fixture(scope="session")
def t2i_inputs(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the stages before train-t2i give: recaptioned-layout shards, a toy tokenizer, a random VAE."""
    return build_t2i_inputs(toy_data, tmp_path_factory.mktemp("t2i_inputs"))


@pytest.fixture(scope="session")
def two_process_t2i(t2i_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-process single-node torchrun run of train-t2i (DDP, 3 steps, checkpoints at 2 and 3);
    its run directory."""
    root = tmp_path_factory.mktemp("t2i_one_node")
    result = run_recap(t2i_args(root, t2i_inputs, "launcher=torchrun", "launcher.nproc_per_node=2", "runtime=ddp"),
                       env=ONE_THREAD, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return t2i_dir(root)
