"""The runtime: setup checks, seeding, gradient accumulation, and ZeRO 1/2/3 against plain AdamW."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, assert_close_to_scale
from train.config.execution import RuntimeConfig
from train.runtime.processes import deepspeed_config, seed_everything, start_runtime
from train.config.typed import ConfigError


def test_deepspeed_config_per_stage() -> None:
    z2 = deepspeed_config(RuntimeConfig(kind="deepspeed", zero_stage=2), micro_batch_size=4, grad_accum=3,
                          grad_clip=1.5, bf16=False)
    assert z2["train_micro_batch_size_per_gpu"] == 4 and z2["gradient_accumulation_steps"] == 3
    assert z2["zero_optimization"] == {"stage": 2} and z2["gradient_clipping"] == 1.5
    assert z2["bf16"] == {"enabled": False} and z2["zero_allow_untested_optimizer"] is True
    z3 = deepspeed_config(RuntimeConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True), micro_batch_size=1,
                          grad_accum=1, grad_clip=None, bf16=True)
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "gradient_clipping" not in z3 and z3["bf16"] == {"enabled": True}


def test_single_runtime_under_several_processes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="runtime=single but 2 processes"):
        start_runtime(RuntimeConfig(kind="single"), micro_batch_size=1, grad_accum=1, grad_clip=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no GPU is visible"):
        start_runtime(RuntimeConfig(device="cuda"), micro_batch_size=1, grad_accum=1, grad_clip=None)


def test_seeds_derive_from_seed_and_rank() -> None:
    seed_everything(5, rank=0)
    a = torch.rand(3)
    seed_everything(5, rank=0)
    assert torch.equal(torch.rand(3), a)
    seed_everything(5, rank=1)
    assert not torch.equal(torch.rand(3), a)


def _updated_weights(grad_accum: int, data: torch.Tensor) -> dict[str, torch.Tensor]:
    rt = start_runtime(RuntimeConfig(kind="single", device="cpu"), micro_batch_size=len(data) // grad_accum,
                       grad_accum=grad_accum, grad_clip=None)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer = rt.prepare(model, optimizer)
    for micro, chunk in enumerate(data.chunk(grad_accum)):
        rt.micro_step(model, lambda m: m(chunk).pow(2).mean(), last=micro == grad_accum - 1)
    rt.optimizer_step(model, optimizer, scheduler)
    weights = {k: v.detach().clone() for k, v in rt.unwrap(model).state_dict().items()}
    rt.close()
    return weights


def test_gradient_accumulation_equals_one_big_batch() -> None:
    data = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    big, accumulated = _updated_weights(1, data), _updated_weights(4, data)
    for key in big:
        assert_close_to_scale(accumulated[key], big[key], msg=key)
    assert not torch.equal(big["weight"], _updated_weights(1, data[:2])["weight"])


# One DeepSpeed runtime per process (DeepSpeed keeps process-group globals), so each stage runs
# in its own interpreter and prints its losses and final weights as JSON.
_ZERO_SCRIPT = """
import json, sys, torch
from train.config.training import OptimizerConfig
from train.config.execution import RuntimeConfig
from train.training.optimization import build_optimizer, build_scheduler
from train.runtime.processes import start_runtime
stage = int(sys.argv[1])
options = RuntimeConfig(kind="deepspeed" if stage else "single", zero_stage=stage, device="cpu")
rt = start_runtime(options, micro_batch_size=4, grad_accum=2, grad_clip=1.0)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
cfg = OptimizerConfig(lr=0.05, warmup_steps=2, schedule="cosine")
optimizer = build_optimizer(model.parameters(), cfg)
scheduler = build_scheduler(optimizer, cfg, total_steps=6)
model, optimizer = rt.prepare(model, optimizer)
data = torch.randn(6, 2, 4, 6, generator=torch.Generator().manual_seed(3))
losses = []
for step in range(6):
    step_losses = [rt.micro_step(model, lambda m: m(x).pow(2).mean(), last=i == 1)["loss"].item() for i, x in enumerate(data[step])]
    rt.optimizer_step(model, optimizer, scheduler)
    losses.append(sum(step_losses) / 2)
weights = {k: v.flatten().tolist() for k, v in rt.full_state_dict(model).items()}
print("RESULT" + json.dumps({"losses": losses, "weights": weights, "lr": scheduler.get_last_lr()[0]}))
rt.close()
"""


def _zero_result(stage: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _ZERO_SCRIPT, str(stage)], cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])


@pytest.mark.slow
def test_zero_stages_match_plain_adamw() -> None:
    reference = _zero_result(0)
    assert reference["losses"][-1] < reference["losses"][0]
    for stage in (1, 2, 3):
        result = _zero_result(stage)
        assert result["lr"] == pytest.approx(reference["lr"], abs=1e-12), stage
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6), stage
        assert result["weights"].keys() == reference["weights"].keys()
        for key, values in reference["weights"].items():
            assert result["weights"][key] == pytest.approx(values, rel=1e-4, abs=1e-5), (stage, key)
