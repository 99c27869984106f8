"""Where an inference stage runs: one device policy for caption, evaluate-captioner, recaption,
cache, sample, train-eval-clip and evaluate (training stages get theirs from start_runtime)."""

from __future__ import annotations

from typing import Any

from train.config.execution import RuntimeConfig
from train.config.typed import ConfigError
from train.runtime.environment import local_rank


def inference_placement(runtime: RuntimeConfig) -> tuple[Any, bool]:
    """(device, bf16) per runtime.device / runtime.precision: this process's GPU (LOCAL_RANK) when
    one is visible and runtime.device is not cpu, else the CPU; bf16 on a GPU unless
    runtime.precision=fp32. runtime.device=cuda without a GPU is a ConfigError."""
    import torch

    use_cuda = torch.cuda.is_available() and runtime.device != "cpu"
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "cuda requested but no GPU is visible; use runtime.device=auto or cpu")
    device = torch.device(f"cuda:{local_rank()}" if use_cuda else "cpu")
    bf16 = use_cuda and runtime.precision in ("auto", "bf16")
    return device, bf16
