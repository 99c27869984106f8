"""Optimizer and LR schedule from an OptimizerConfig (steps count optimizer updates)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from train.config.training import OptimizerConfig


# optimizer.implementation -> torch AdamW's (foreach, fused); None leaves torch's own choice, made at
# each step from where the parameters are (foreach on a GPU, the for-loop on the CPU)
_KERNELS: dict[str, tuple[bool | None, bool | None]] = {
    "auto": (None, None), "for_loop": (False, None), "foreach": (True, None), "fused": (None, True)}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch AdamW with the kernel cfg.implementation names (the parameters may still be on the CPU:
    torch's fused kernels run on the GPU and the CPU alike)."""
    foreach, fused = _KERNELS[cfg.implementation]
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=foreach, fused=fused)


def lr_factor(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr after ``step`` updates: linear warmup, then constant or cosine to
    min_lr_ratio at ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over optimizer steps. The factor is a pure function of the step, so the saved
    state is just the step count (a partial's empty __dict__, loadable with weights_only)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg, total_steps=total_steps))


def staged_lr_factor(step: int, cfg: OptimizerConfig, starts: tuple[int, ...], lengths: tuple[int, ...],
                     lrs: tuple[float, ...]) -> float:
    """Multiplier of cfg.lr at global ``step`` of a progressive schedule: the stage's lr relative
    to cfg.lr, times `lr_factor` counted from the stage's start (each stage warms up again)."""
    index = max(i for i, start in enumerate(starts) if step >= start)
    return lrs[index] / cfg.lr * lr_factor(step - starts[index], cfg, lengths[index])


def build_staged_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, lengths: list[int],
                           lrs: list[float]) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over a sequence of stages of ``lengths`` optimizer steps with peak ``lrs``."""
    starts = tuple(sum(lengths[:i]) for i in range(len(lengths)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        staged_lr_factor, cfg=cfg, starts=starts, lengths=tuple(lengths), lrs=tuple(lrs)))
