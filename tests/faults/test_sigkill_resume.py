"""SIGKILL mid-run + rerun == uninterrupted run, bit for bit, on 2 CPU processes (torchrun, gloo).

The real stage (train-vae on the toy shards) runs 12 steps with checkpoints every 3 steps and is
killed at step 7, so the rerun resumes from step 6 and replays step 7. Compared: the loss of
every step (including the replayed one against its first run), the final weights and the
optimizer state. Negative controls resume from the same checkpoint with the reader position or
the RNG state removed: their results must differ, which shows the comparison can fail.
(Formerly tests/train/test_exact_resume.py; the kill at a random step, 3 seeds, one process, is
test_sigkill_random_step.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.runs import assert_same
from tests.helpers import logged_losses, run_recap, run_stage
from train.runtime.processes import deepspeed_safe_globals
from train.training import checkpoint_files as files

pytestmark = pytest.mark.slow
STEPS, KILL_AT = 12, 7


def _args(root: Path, toy_data: Path, runtime: str) -> list[str]:
    return ["train-vae", f"run.root={root}", f"data.train={toy_data}/train", f"data.heldout={toy_data}/heldout",
            f"train_vae.steps={STEPS}", "checkpoint.every_steps=3", "checkpoint.keep_last=5",
            "train_vae.resolution=32", "train_vae.global_batch_size=8", "train_vae.micro_batch_size=2",
            "vae.block_out_channels=[8,16,16,16]", "vae.norm_num_groups=8", "data.reader.num_workers=2",
            "train_vae.sample_posterior=true",  # the RNG drives each step (the toy decodes the mean: no RNG)
            "logger.wandb.mode=disabled", "logger.progress=false", "launcher=torchrun", "launcher.nproc_per_node=2",
            f"runtime={runtime}"]


def _run(args: list[str], env: dict[str, str] | None = None, expect_ok: bool = True) -> None:
    result = run_recap(args, env=env)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode != 0


def _stage_dir(root: Path) -> Path:
    return root / "toy" / "train_vae"


def _final_checkpoint(root: Path) -> Path:
    return _stage_dir(root) / "checkpoints" / files.step_dir_name(STEPS)


def _model_and_optimizer(checkpoint: Path) -> dict[str, Any]:
    """Every weight and optimizer tensor of a checkpoint, whatever the runtime wrote."""
    if (checkpoint / "deepspeed").is_dir():
        allow = deepspeed_safe_globals()  # DeepSpeed's bookkeeping classes in its optimizer files
        return {p.name: files.safe_torch_load(p, allow=allow) for p in sorted((checkpoint / "deepspeed").glob("*.pt"))}
    return {"model": load_file(checkpoint / "model.safetensors"), "optimizer": files.safe_torch_load(checkpoint / "optimizer.pt")}


def _tamper(root: Path, edit: Any) -> None:
    """Edit every rank file of the newest checkpoint in place and re-seal its manifest."""
    checkpoint = _stage_dir(root) / "checkpoints" / files.step_dir_name(files.committed_steps(_stage_dir(root) / "checkpoints")[-1])
    for rank_file in sorted(checkpoint.glob("rank_*.pt")):
        state = files.safe_torch_load(rank_file)
        edit(state)
        torch.save(state, rank_file)
    files.write_manifest(checkpoint, files.hash_files(checkpoint, files.list_files(checkpoint)))


def _forget_reader(state: dict[str, Any]) -> None:
    state["reader"]["positions"], state["reader"]["next_worker"] = {}, 0


def _other_rng(state: dict[str, Any]) -> None:
    state["rng"]["torch"] = torch.Generator().manual_seed(12345).get_state()


# DDP's SIGKILL + rerun is covered across a resolution-stage boundary by test_train_t2i.py.
@pytest.mark.parametrize("runtime", ["zero2"])
def test_sigkill_and_rerun_is_bit_identical(runtime: str, toy_data: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_args(straight, toy_data, runtime))
    _run(_args(killed, toy_data, runtime), env={"RECAP_FAULT": f"sigkill@step={KILL_AT}"}, expect_ok=False)
    assert files.committed_steps(_stage_dir(killed) / "checkpoints") == [3, 6]
    _run(_args(killed, toy_data, runtime))

    expected, got = logged_losses(_stage_dir(straight)), logged_losses(_stage_dir(killed))
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert {step: losses[-1] for step, losses in got.items()} == {step: v[0] for step, v in expected.items()}
    assert got[KILL_AT] == [expected[KILL_AT][0]] * 2  # the replayed step equals its first run
    assert_same(_model_and_optimizer(_final_checkpoint(straight)), _model_and_optimizer(_final_checkpoint(killed)))
    exported = "vae/diffusion_pytorch_model.safetensors"
    assert_same(load_file(_stage_dir(straight) / exported), load_file(_stage_dir(killed) / exported))


def test_resuming_without_the_reader_position_or_the_rng_state_differs(toy_data: Path, tmp_path: Path) -> None:
    """Negative controls (one process, in this process): resume from step 6 of a finished run with the
    reader position removed, or another RNG state, and the replayed steps 7-12 must differ; resumed
    as saved, they are the same. This shows the comparisons above can fail."""
    def args(root: Path) -> list[str]:
        return [a for a in _args(root, toy_data, "single")[1:] if not a.startswith("launcher")]

    straight = tmp_path / "straight"
    run_stage("train_vae", args(straight))
    expected = logged_losses(_stage_dir(straight))
    exported = "vae/diffusion_pytorch_model.safetensors"
    reference = load_file(_stage_dir(straight) / exported)
    for name, edit in (("as_saved", None), ("no_reader", _forget_reader), ("no_rng", _other_rng)):
        root = tmp_path / name
        shutil.copytree(straight, root)
        for step in (9, 12):  # resume from step 6
            shutil.rmtree(_stage_dir(root) / "checkpoints" / files.step_dir_name(step))
        if edit is not None:
            _tamper(root, edit)
        run_stage("train_vae", args(root))
        replayed = [logged_losses(_stage_dir(root))[step][-1] for step in range(7, STEPS + 1)]
        same = replayed == [expected[step][0] for step in range(7, STEPS + 1)]
        weights = load_file(_stage_dir(root) / exported)
        assert same == (edit is None), name
        assert all(torch.equal(weights[k], v) for k, v in reference.items()) == (edit is None), name
