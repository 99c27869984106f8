"""GPU speed switches of train-t2i's model (docs/real-run.md, "GPU speed switches"): the UNet in
channels-last memory format (train_t2i.channels_last) and compiled with torch.compile
(train_t2i.compile_unet), plus a count of the attention kernels a forward runs.

Neither switch changes the module's parameters, names or state dict, so checkpoints and exports
of a run with them load in a run without: channels-last only changes the strides of the 4-D
convolution weights (the convolutions then keep activations channels-last too; the safetensors writers
make tensors contiguous), and `nn.Module.compile` compiles the forward of the same module
instead of wrapping it (``torch.compile(module)`` would prefix every key with ``_orig_mod.``).

Attention needs no switch: diffusers' default processor (AttnProcessor2_0) and the xf stage's
nn.MultiheadAttention (training runs its Python path, which calls it too) both go through
torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel by itself: flash
attention where there is no mask (the UNet's self-attention), memory-efficient or cuDNN
attention with one (cross-attention and xf see the caption mask). `attention_kernels` shows it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.denoiser import CaptionConditionedUNet

COMPILE_BACKEND = "inductor"  # tests use "eager": dynamo's trace without code generation (seconds, not minutes)


def to_channels_last(denoiser: CaptionConditionedUNet) -> CaptionConditionedUNet:
    """The UNet's 4-D weights in channels-last (NHWC) strides, and its input latents made
    channels-last on the way in (a forward pre-hook), in place. The input matters where weights
    lose the layout: DeepSpeed's ZeRO holds them as contiguous views into flat buffers, and a
    convolution with either operand channels-last runs channels-last. Call it before the EMA
    copy and the optimizer are made, so that they hold the same layout."""
    denoiser.unet.to(memory_format=torch.channels_last)
    denoiser.unet.register_forward_pre_hook(_channels_last_input, with_kwargs=True)
    return denoiser


def _channels_last_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:  # UNet2DConditionModel.forward(sample (B, C, h, w), timestep, ...)
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
    return args, {**kwargs, "sample": kwargs["sample"].contiguous(memory_format=torch.channels_last)}


def compile_unet(denoiser: CaptionConditionedUNet, backend: str | None = None) -> CaptionConditionedUNet:
    """The UNet's forward compiled with torch.compile, in place (state dict keys unchanged). Call it
    after the EMA copy is made: a deep copy of a compiled module would call the original's forward.
    Shapes that change (a new resolution stage or aspect bucket) recompile once each, then
    dynamo marks the changing sizes dynamic."""
    denoiser.unet.compile(backend=backend or COMPILE_BACKEND)
    return denoiser


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `compile_unet` (nn.Module.compile) compiled ``module``'s forward."""
    return getattr(module, "_compiled_call_impl", None) is not None


class AttentionKernels(TorchDispatchMode):
    """Counts the fused attention kernels (aten ``_scaled_dot_product_*`` ops, forward and
    backward) that run inside it, by kernel name: ``with AttentionKernels() as k: model(...)``,
    then ``k.counts``. scaled_dot_product_attention's math fallback is not an op of its own (it
    decomposes into matmuls), so a layer that fell back is missing from the counts."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name.startswith("_scaled_dot_product_"):
            self.counts[name.removeprefix("_scaled_dot_product_")] += 1
        return func(*args, **(kwargs or {}))


def attention_layers(denoiser: torch.nn.Module) -> int:
    """How many attention layers one forward of ``denoiser`` runs: diffusers ``Attention`` modules
    (self- and cross-attention of the UNet) and the xf stage's nn.MultiheadAttention."""
    from diffusers.models.attention_processor import Attention

    return sum(isinstance(m, (Attention, torch.nn.MultiheadAttention)) for m in denoiser.modules())
