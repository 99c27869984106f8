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


def set_tf32(allow: bool) -> None:
    """runtime.allow_tf32: CUDA fp32 matmuls on TF32 tensor cores, or IEEE fp32 (PyTorch's default);
    set both ways, so that a sweep's job never inherits the last one's. The legacy flag, as accelerate
    sets it: torch 2.9+ refuses to report the matmul precision once the legacy and per-backend APIs
    are mixed. cuDNN convolutions use TF32 by PyTorch's default (untouched). No effect on the CPU."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = allow
