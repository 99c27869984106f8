"""The GPU speed switches (docs/real-run.md) on the CPU: each one on trains the tiny xf + UNet like
each one off, bit for bit where the computation is the same and within a tolerance sized to it
where a kernel differs; TF32 only reaches the CUDA flag here (no CPU kernel reads it); attention
runs as fused scaled_dot_product_attention kernels in the UNet and the xf stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model

from train.config.training import OptimizerConfig
from train.t2i import speed
from train.training.optimization import build_optimizer

STEPS = 4


def _denoiser():
    from train.config.loading import load_experiment
    from train.t2i.parts import build_denoiser

    torch.manual_seed(0)
    return build_denoiser(load_experiment([]).unet, text_dim=16, latent_channels=4).train()


def _batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    noisy, states, target = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g),
                             torch.randn(2, 4, 8, 8, generator=g))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return noisy, torch.tensor([10, 900]), states * mask[..., None], mask, target


def _train(*, implementation: str = "auto", channels_last: bool = False, compile_backend: str | None = None,
           model=None) -> list[float]:
    """Losses of STEPS AdamW steps on one batch, the switches applied in train-t2i's order."""
    model = model if model is not None else _denoiser()
    if channels_last:
        speed.to_channels_last(model)
    if compile_backend:
        speed.compile_unet(model, backend=compile_backend)
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(lr=1e-3, implementation=implementation))
    noisy, t, states, mask, target = _batch()
    losses = []
    for _ in range(STEPS):
        loss = (model(noisy, t, states, mask) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def off() -> list[float]:
    return _train()


@pytest.mark.parametrize(("implementation", "foreach", "fused"), [
    ("auto", None, None), ("for_loop", False, None), ("foreach", True, None), ("fused", None, True)])
def test_each_adamw_implementation_reaches_torch(implementation: str, foreach, fused) -> None:
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig(implementation=implementation))
    assert (optimizer.param_groups[0]["foreach"], optimizer.param_groups[0]["fused"]) == (foreach, fused)


def test_adamw_implementations_train_alike(off: list[float]) -> None:
    # auto is torch's choice, the for-loop on the CPU: the same computation, bit for bit
    assert _train(implementation="for_loop") == off
    # foreach and fused: other kernels for the same update (measured: foreach equal, fused <= 2e-7)
    assert _train(implementation="foreach") == pytest.approx(off, rel=1e-6, abs=0)
    fused = _train(implementation="fused")
    assert fused != off and fused == pytest.approx(off, rel=1e-6, abs=0)


def test_channels_last_trains_alike_and_saves_like_the_default(off: list[float], tmp_path: Path) -> None:
    model = _denoiser()
    losses = _train(channels_last=True, model=model)
    assert losses == pytest.approx(off, rel=1e-5, abs=0)  # other convolution kernels (measured <= 1.6e-6)
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.unet.conv_in(torch.randn(1, 4, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    # the state dict is the default model's: a checkpoint and a diffusers export load into one
    plain = _denoiser()
    assert list(model.state_dict()) == list(plain.state_dict())
    save_model(model, str(tmp_path / "model.safetensors"))
    load_model(plain, str(tmp_path / "model.safetensors"))
    model.unet.save_pretrained(tmp_path / "unet")
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), model.unet.state_dict().values()))


def test_channels_last_reaches_the_convolutions_when_an_engine_makes_the_weights_contiguous() -> None:
    """DeepSpeed's ZeRO holds weights as contiguous views into flat buffers: the input still
    arrives channels-last, so the convolutions run channels-last."""
    model = speed.to_channels_last(_denoiser())
    for p in model.unet.parameters():
        p.data = p.data.contiguous()  # what ZeRO's flat buffers do to the layout
    seen = []
    model.unet.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    noisy, t, states, mask, _ = _batch()
    out = model(noisy, t, states, mask)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last)
    # channels-last picks other convolution kernels: fp32 sums in another order (~1e-6 of values ~1e-2)
    reference = _denoiser()(noisy, t, states, mask)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_compile_unet_compiles_in_place_and_trains_alike(off: list[float]) -> None:
    """dynamo's trace with the eager backend (inductor's code generation takes minutes on a CPU;
    benchmarks/gpu_check.sh measures it on a GPU, with its loss beside the eager one)."""
    model = _denoiser()
    keys = list(model.state_dict())
    losses = _train(compile_backend="eager", model=model)
    assert speed.is_compiled(model.unet) and not speed.is_compiled(model.caption_transformer)
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints load either way
    assert losses == off  # the same aten ops in the same order


def test_allow_tf32_sets_the_cuda_matmul_flag_both_ways() -> None:
    """TF32 is a CUDA matmul mode: on the CPU the switch can only be seen on torch.backends."""
    from train.config.execution import RuntimeConfig
    from train.runtime.processes import start_runtime

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (True, False, True):
            rt = start_runtime(RuntimeConfig(device="cpu", allow_tf32=allow), micro_batch_size=1, grad_accum=1,
                               grad_clip=None)
            assert torch.backends.cuda.matmul.allow_tf32 is allow
            assert torch.get_float32_matmul_precision() == ("high" if allow else "highest")  # still reportable
            rt.close()
        assert torch.backends.cudnn.allow_tf32  # convolutions: PyTorch's default, untouched
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_attention_runs_fused_sdpa_kernels_in_the_unet_and_the_xf_stage() -> None:
    model = _denoiser()
    noisy, t, states, mask, _ = _batch()
    layers = speed.attention_layers(model)
    assert layers == 14 + 1  # 7 transformer blocks x (self + cross) in the tiny UNet, 1 xf layer
    with speed.AttentionKernels() as kernels:
        model(noisy, t, states, mask).square().mean().backward()
    assert kernels.counts == {"flash_attention_for_cpu": layers, "flash_attention_for_cpu_backward": layers}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with speed.AttentionKernels() as kernels, sdpa_kernel(SDPBackend.MATH):  # the fallback is not counted
        model(noisy, t, states, mask)
    assert kernels.counts == {}


@pytest.mark.slow
def test_train_t2i_with_every_switch_on_trains_like_the_default(toy_data: Path, tmp_path: Path, monkeypatch) -> None:
    """The stage end to end (EMA, checkpoints, export), every switch on against every switch off."""
    from tests.golden_losses import _losses
    from tests.helpers import run_stage, t2i_inputs

    import train.stages.train_t2i as stage

    inputs = t2i_inputs(toy_data, tmp_path / "inputs")
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")
    order = []  # what the stage does to the model, in order: channels-last before the EMA copy, compile after

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            order.append(name)
            return fn(*args, **kwargs)
        monkeypatch.setattr(stage, name, wrapped)

    for name in ("to_channels_last", "EmaWeights", "compile_unet"):
        spy(name, getattr(stage, name))
    stages = f"[{{resolution: 64, steps: {STEPS}, global_batch_size: 4, micro_batch_size: 4}}]"
    common = ["train_t2i.cache=null", f"train_t2i.input={inputs['shards']}", f"train_t2i.vae={inputs['vae']}",
              f"text_encoder.tokenizer={inputs['tokenizer']}", "text_encoder.max_tokens=24",
              "text_encoder.architecture={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4}",
              "unet.block_out_channels=[32,32,64]", "unet.attention_head_dim=8", "unet.xf_width=32", "unet.xf_heads=4",
              f"train_t2i.stages={stages}", "train_t2i.sampling.every_steps=null", "train_t2i.optimizer.lr=1e-3",
              "train_t2i.ema_decay=0.9", "checkpoint.every_steps=2", "logger.wandb.mode=disabled",
              "logger.progress=false", "data.reader.num_workers=0"]
    on = ["train_t2i.channels_last=true", "train_t2i.compile_unet=true", "runtime.allow_tf32=true",
          "train_t2i.optimizer.implementation=fused"]
    runs, orders = {}, {}
    try:
        for name, extra in (("off", []), ("on", on)):
            order.clear()
            run_stage("train_t2i", [f"run.root={tmp_path / name}", *common, *extra])
            runs[name], orders[name] = tmp_path / name / "toy" / "train_t2i", list(order)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False  # this process's default
    assert orders == {"off": ["EmaWeights"], "on": ["to_channels_last", "EmaWeights", "compile_unet"]}
    off_losses, on_losses = _losses(runs["off"]), _losses(runs["on"])
    assert len(on_losses) == STEPS and on_losses == pytest.approx(off_losses, rel=1e-5, abs=0)  # measured <= 2.6e-7
    assert on_losses != off_losses  # fused AdamW and channels-last convolutions round differently
    log = (runs["on"] / "logs" / "train_t2i.rank0.log").read_text()
    assert "speed: channels_last, compile_unet, allow_tf32, AdamW fused" in log
    assert "speed: AdamW auto" in (runs["off"] / "logs" / "train_t2i.rank0.log").read_text()
    for run in runs.values():  # the same checkpoint and export files, with the same tensor names
        assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from safetensors import safe_open

    names = {}
    for name, run in runs.items():
        with safe_open(str(run / "checkpoints" / f"step_{STEPS:09d}" / "ema.safetensors"), "pt") as f:
            names[name] = sorted(f.keys())
    assert names["on"] == names["off"]


def test_a_resume_may_change_channels_last_and_compile_but_not_the_adamw_kernel() -> None:
    from train.config.loading import load_experiment
    from train.outputs.run_logging import config_snapshot
    from train.stages.train_t2i import RESUME_IGNORE, RESUME_KEYS
    from train.training.checkpointing import resume_fingerprint

    def fingerprint(*overrides: str) -> dict:
        return resume_fingerprint(config_snapshot(load_experiment(list(overrides))), RESUME_KEYS, RESUME_IGNORE)

    base = fingerprint()
    assert fingerprint("train_t2i.channels_last=true", "train_t2i.compile_unet=true", "runtime.allow_tf32=true") == base
    changed = fingerprint("train_t2i.optimizer.implementation=fused")
    assert {k for k in base if base[k] != changed[k]} == {"train_t2i.optimizer.implementation"}
