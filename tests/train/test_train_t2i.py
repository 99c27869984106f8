"""`recap train-t2i` end to end on toy shards with tiny models: the loss falls, the caption mix and
CFG dropout rates hold, the export is the EMA weights and loads with diffusers, SIGKILL + rerun
is bit-identical across a resolution-stage boundary (2 processes), ZeRO-2/3 match DDP across it,
the NaN policy fails or skips, and the caption-mix sweep is one multirun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import logged_losses, run_recap, run_stage
from tests.helpers import t2i_inputs as build_t2i_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Recaptioned-layout shards, a toy tokenizer and a random VAE folder (what the earlier stages give)."""
    return build_t2i_inputs(toy_data, tmp_path_factory.mktemp("t2i_inputs"))


def _args(root: Path, inputs: dict[str, Path], stages: str, *extra: str) -> list[str]:
    return ["train-t2i", f"run.root={root}", "train_t2i.cache=null", f"train_t2i.input={inputs['shards']}", f"train_t2i.vae={inputs['vae']}",
            f"text_encoder.tokenizer={inputs['tokenizer']}", "text_encoder.max_tokens=24",
            "text_encoder.architecture={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4}",
            "unet.block_out_channels=[32,32,64]", "unet.attention_head_dim=8", "unet.xf_width=32", "unet.xf_heads=4",
            f"train_t2i.stages={stages}", "train_t2i.sampling.every_steps=null", "train_t2i.optimizer.warmup_steps=2",
            "logger.wandb.mode=disabled", "logger.progress=false", "data.reader.num_workers=1", *extra]


def _ok(args: list[str], env: dict[str, str] | None = None) -> None:
    result = run_recap(args, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _last_losses(run_dir: Path) -> dict[int, float]:
    return {step: values[-1] for step, values in logged_losses(run_dir).items()}


def test_toy_run_trains_mixes_captions_and_exports_the_ema_pipeline(inputs, tmp_path: Path) -> None:
    stages = "[{resolution: 64, steps: 40, global_batch_size: 8, micro_batch_size: 8}]"
    run_stage("train_t2i", _args(tmp_path, inputs, stages, "caption_mix.dsc=0.8", "caption_mix.ssc=0.1", "train_t2i.ema_decay=0.9",
              "train_t2i.optimizer.lr=2e-3", "checkpoint.every_steps=40", "diffusion.cfg_dropout=0.2",
              "train_t2i.sampling.prompts=[a red circle]", "train_t2i.sampling.steps=3")[1:])  # in this process
    run_dir = tmp_path / "toy" / "train_t2i"
    losses = _last_losses(run_dir)
    assert len(losses) == 40
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.7 * first, (first, last)

    summary = json.loads((run_dir / "summary.json").read_text())
    n = 40 * 8  # samples trained on; each ratio within 4 standard deviations of its probability
    for key, p in (("dsc", 0.8), ("ssc", 0.1), ("txt", 0.1)):
        assert abs(summary["caption_mix"][f"caption_mix/{key}"] - p) < 4 * math.sqrt(p * (1 - p) / n), key
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dropped = sum(r["cfg_dropped"] for r in records if "cfg_dropped" in r) / 40
    assert abs(dropped - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)
    assert (run_dir / "samples" / "step_0000040.png").is_file()

    # the export carries the code that loads it without recap (tests/models/test_pipeline.py)
    pipeline_index = json.loads((run_dir / "pipeline" / "model_index.json").read_text())
    assert pipeline_index["_class_name"] == ["recap_pipeline", "RecapPipeline"]
    assert (run_dir / "pipeline" / "caption_transformer" / "text_conditioning.py").is_file()
    # the export is the EMA weights, loadable by diffusers' own classes
    from diffusers import UNet2DConditionModel

    from models.text_conditioning import CaptionTransformer

    ema = load_file(str(run_dir / "checkpoints" / "step_000000040" / "ema.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(run_dir / "pipeline" / "unet")
    xf = CaptionTransformer.from_pretrained(run_dir / "pipeline" / "caption_transformer")
    live = load_file(str(run_dir / "checkpoints" / "step_000000040" / "model.safetensors"))
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, ema[f"unet.{name}"]), name
    for name, tensor in xf.state_dict().items():
        assert torch.equal(tensor, ema[f"caption_transformer.{name}"]), name
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # EMA is not the live weights
    raw_unet = UNet2DConditionModel.from_pretrained(run_dir / "raw_weights" / "unet")  # for sample weights=raw
    raw_xf = CaptionTransformer.from_pretrained(run_dir / "raw_weights" / "caption_transformer")
    for prefix, module in (("unet", raw_unet), ("caption_transformer", raw_xf)):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, live[f"{prefix}.{name}"]), name


# Stage 1: 4 images per step as 2 ranks x 1 micro-batch of 2; stage 2 at 128 px: 2 ranks x 2 micro-batches of 1
# (the accumulation changes at the boundary, under DDP and DeepSpeed alike).
TWO_STAGES = ("[{resolution: 64, steps: 4, global_batch_size: 4, micro_batch_size: 2},"
              " {resolution: 128, steps: 3, global_batch_size: 4, micro_batch_size: 1}]")
TWO_PROCESSES = ("launcher=torchrun", "launcher.nproc_per_node=2", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
                 "train_t2i.ema_decay=0.9")


@pytest.fixture(scope="module")
def ddp_run(inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process DDP run over both stages (the reference of the tests below)."""
    root = tmp_path_factory.mktemp("ddp")
    _ok(_args(root, inputs, TWO_STAGES, *TWO_PROCESSES, "runtime=ddp"))
    return root / "toy" / "train_t2i"


def test_sigkill_and_rerun_is_bit_identical_across_a_stage_boundary(inputs, ddp_run: Path, tmp_path: Path) -> None:
    # checkpoints at 2, 4 (end of stage 1), 6, 7; killed at step 3, the rerun resumes from step 2,
    # replays steps 3 and 4, then switches stage exactly as the uninterrupted run did
    args = _args(tmp_path, inputs, TWO_STAGES, *TWO_PROCESSES, "runtime=ddp")
    killed = run_recap(args, env={"RECAP_FAULT": "sigkill@step=3,rank=1"})
    assert killed.returncode != 0
    _ok(args)
    a, b = ddp_run, tmp_path / "toy" / "train_t2i"
    assert _last_losses(a) == _last_losses(b) and len(_last_losses(a)) == 7
    assert logged_losses(b)[3][0] == logged_losses(b)[3][1]  # the replayed step equals its first run
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(str(a / "checkpoints/step_000000007" / name)), load_file(str(b / "checkpoints/step_000000007" / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    summary = json.loads((b / "summary.json").read_text())
    assert summary["resumed"] is True and summary["read_ahead_dropped_at_stage_switches"] > 0
    assert summary == {**json.loads((a / "summary.json").read_text()), "resumed": True,
                       "img_per_s": summary["img_per_s"], "img_per_s_by_stage": summary["img_per_s_by_stage"],
                       "samples": summary["samples"], "export": summary["export"]}


# ZeRO-3 only (it partitions parameters too): ZeRO-2 against plain AdamW is
# tests/train/test_runtime.py::test_zero_stages_match_plain_adamw, and its resume tests/faults/test_sigkill_resume.py.
@pytest.mark.parametrize("zero", ["zero3"])
def test_zero_matches_ddp(zero: str, inputs, ddp_run: Path, tmp_path: Path) -> None:
    _ok(_args(tmp_path, inputs, TWO_STAGES, *TWO_PROCESSES, f"runtime={zero}"))
    ddp, ds = _last_losses(ddp_run), _last_losses(tmp_path / "toy" / "train_t2i")
    assert ddp.keys() == ds.keys() == set(range(1, 8))
    for step in ddp:
        assert ds[step] == pytest.approx(ddp[step], rel=1e-4, abs=1e-5), step
    from diffusers import UNet2DConditionModel

    x = UNet2DConditionModel.from_pretrained(ddp_run / "pipeline" / "unet")
    y = UNet2DConditionModel.from_pretrained(tmp_path / "toy" / "train_t2i" / "pipeline" / "unet")
    assert x.state_dict().keys() == y.state_dict().keys()
    # The EMA exports agree as a whole. Single entries may differ by up to a few 1e-4: biases that feed
    # a GroupNorm have a zero gradient up to rounding, and Adam turns that rounding into lr-sized steps.
    a = torch.cat([t.flatten() for t in x.state_dict().values()])
    b = torch.cat([t.flatten() for t in y.state_dict().values()])
    assert float((a - b).norm() / a.norm()) < 1e-4 and float((a - b).abs().max()) < 2e-3


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_nan_loss_fails_or_skips_the_step(policy: str, inputs, tmp_path: Path, monkeypatch) -> None:
    stages = "[{resolution: 64, steps: 4, global_batch_size: 4, micro_batch_size: 2}]"
    # One process: every rank decides from the loss averaged over ranks (train/training/loop.py), so a NaN on one
    # rank is a NaN on all; the 2-process case belongs to the fault-injection suite.
    args = _args(tmp_path, inputs, stages, f"train_t2i.nan_policy={policy}", "checkpoint.every_steps=2")
    run_dir = tmp_path / "toy" / "train_t2i"
    if policy == "fail":  # through the CLI: its exit code
        result = run_recap(args, env={"RECAP_FAULT": "nan@step=3,rank=0"}, timeout=600)
        assert result.returncode == 4, result.stderr[-3000:]
        assert "non-finite loss or gradient at step 3" in result.stderr
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000000002"]
        return
    monkeypatch.setenv("RECAP_FAULT", "nan@step=3,rank=0")
    summary = run_stage("train_t2i", args[1:])
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    weights = load_file(str(run_dir / "checkpoints" / "step_000000004" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "skipped_step"] == [3]


# The caption-mix sweep (one multirun, a directory per point) is tested through `recap pipeline -m` in
# tests/train/test_pipeline_stage.py.


def test_train_t2i_seed_changes_the_training_and_defaults_to_the_experiment_seed(inputs, tmp_path: Path) -> None:
    """train_t2i.seed (a sweep's error bars) sets the weights, data order and noise; null is `seed`."""
    stages = "[{resolution: 64, steps: 2, global_batch_size: 4, micro_batch_size: 4}]"
    losses = {}
    for name, extra in (("default", ()), ("same", ("train_t2i.seed=0",)), ("other", ("train_t2i.seed=1",))):
        run_stage("train_t2i", _args(tmp_path / name, inputs, stages, "checkpoint.every_steps=2", *extra)[1:])
        losses[name] = _last_losses(tmp_path / name / "toy" / "train_t2i")
    assert losses["same"] == losses["default"] and len(losses["default"]) == 2  # seed is 0 by default
    assert all(losses["other"][s] != losses["default"][s] for s in (1, 2))
