"""EMA of the trained weights, saved and restored with the run (DiT's `update_ema`, torchtitan's
train state): the weights samples and exports use when a stage keeps an EMA."""

from __future__ import annotations

import copy
from typing import Any

import torch

from train.training.checkpointing import TrainState


class EmaWeights:
    """EMA of the trained weights: diffusers' EMAModel (which gathers ZeRO-3 partitions itself),
    its shadow weights living in a module copy so that checkpoints save them as safetensors and
    the export is that module.

    Its progress (the decay warm-up) rides in the train state: ``state.extra["ema_steps"]``,
    written by `step` and read back by `restored` after a resume.
    """

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device) -> None:
        from diffusers.training_utils import EMAModel

        self.module = copy.deepcopy(model).requires_grad_(False).to(device).eval()
        self.ema = EMAModel(self.module.parameters(), decay=decay, foreach=True)
        self.ema.shadow_params = list(self.module.parameters())  # update the copy in place

    def step(self, parameters: Any, state: TrainState) -> None:
        """One EMA update from the live ``parameters`` (after an applied optimizer step)."""
        self.ema.step(parameters)  # a collective under ZeRO-3: every rank calls it
        state.extra["ema_steps"] = self.ema.optimization_step

    def restored(self, state: TrainState) -> None:
        """Continue the decay schedule where a resumed ``state`` left it."""
        self.ema.optimization_step = state.extra.get("ema_steps", 0)  # its decay warms up with it
