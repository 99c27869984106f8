"""Processes, devices and precision: one process, DDP under torchrun, or DeepSpeed ZeRO 1/2/3.

This module is the only one that touches torch.distributed, accelerate or deepspeed. Stages
get a `Runtime` and call `micro_step` / `optimizer_step`; the checkpointer has it save and load
the model and optimizer state in the engine's own layout (`save_model_state` /
`load_model_state`); models and data code never see a rank. accelerate sets up the process
group and wraps the model (DDP, or a DeepSpeed engine built from our ZeRO config through its
DeepSpeedPlugin). Gradient accumulation is explicit here rather than accelerate's
`accumulate()` so that one optimizer step is always exactly ``grad_accum`` micro-batches and
the LR schedule counts optimizer steps on every runtime (accelerate's scheduler wrapper would
step once per process).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model

from data_pipeline.seeding import derive_seed
from data_pipeline.workers import set_worker_start_method
from train.config.execution import RuntimeConfig
from train.config.typed import ConfigError
from train.runtime.engine_saves import save_engine_state
from train.runtime.environment import launched_world_size
from train.runtime.placement import set_tf32

DEEPSPEED_TAG = "deepspeed"  # the checkpoint subfolder DeepSpeed writes its own layout into


class ModelStateError(RuntimeError):
    """A checkpoint holds no model state the engine can load (the checkpointer reports it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_single_process_env() -> list[str]:
    """DeepSpeed wants a process group even alone; give a lone process torchrun's variables.
    Returns the names it set (removed again by Runtime.close)."""
    if "WORLD_SIZE" in os.environ:
        return []
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    os.environ.update(env)
    return list(env)


def keep_freed_memory_in_heap() -> bool:
    """On CPU, stop glibc from returning large freed blocks to the OS after every step.

    PyTorch's CPU tensors come from malloc; glibc serves big blocks with fresh mmap'd pages and
    unmaps them on free, so every step page-faults its large buffers back in (the captioner's
    (B, L, 49408) logits are ~100 MB). Raising the mmap and trim thresholds keeps them in the
    heap: the toy CoCa step got ~30% faster and its system time fell 3x on a 2-core machine.
    Returns whether glibc accepted the settings (False elsewhere, e.g. musl or macOS).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, ctypes.c_int(1 << 30)) and
                    libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30)))
    except (OSError, AttributeError):  # not glibc
        return False


def _skip_deepspeed_shm_kernel() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (~50 s of gcc per
    fresh machine). That kernel only serves `inference_all_reduce` (inference tensor
    parallelism); training collectives go through torch.distributed (gloo) either way."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(options: RuntimeConfig, *, micro_batch_size: int, grad_accum: int, grad_clip: float | None,
                     bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for a ZeRO stage; batch sizes come from the stage, not from a file."""
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if options.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # lets full_state_dict() gather
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # we pass torch's AdamW; no JIT-compiled op needed
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if grad_clip:
        config["gradient_clipping"] = grad_clip
    return config


def deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's small bookkeeping classes in its optimizer files (no code runs on load): the
    extra allowlist of a weights-only torch.load of a DeepSpeed checkpoint file."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safetensors_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)  # safetensors accepts "cpu" but not "cpu:0"


@dataclass
class Runtime:
    """A started runtime. ``micro_step``/``optimizer_step`` make one training step."""

    options: RuntimeConfig
    accelerator: Any
    grad_accum: int
    grad_clip: float | None
    env_set: list[str] = field(default_factory=list)
    # names of 0-dim parameters held as shape (1,) while wrapped by DeepSpeed (see prepare)
    _scalar_params: set[str] = field(default_factory=set)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def local_rank(self) -> int:
        return self.accelerator.local_process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_deepspeed(self) -> bool:
        return self.options.kind == "deepspeed"

    @property
    def name(self) -> str:
        """"single", "ddp" or "zero1/2/3", as the runtime config group names it (for summaries)."""
        return f"zero{self.options.zero_stage}" if self.is_deepspeed else self.options.kind

    @property
    def precision(self) -> str:
        return "bf16" if self.accelerator.mixed_precision == "bf16" else "fp32"

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Wrap for the runtime: DDP, a DeepSpeed engine (its optimizer inside), or unchanged.

        DeepSpeed (0.19) broadcasts and partitions parameters through byte views, which fail on
        0-dim tensors (CoCa's ``logit_scale``); such parameters are held as shape (1,) while
        wrapped (they broadcast the same in every use) and restored in ``full_state_dict``.
        """
        if self.is_deepspeed:
            for name, param in model.named_parameters():
                if param.dim() == 0:
                    param.data = param.data.reshape(1)
                    self._scalar_params.add(name)
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: Any) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def micro_step(self, model: Any, loss_fn: Callable[[Any], torch.Tensor | dict[str, torch.Tensor]], *,
                   last: bool) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; ``last`` marks the final one of the step.

        ``loss_fn(model)`` returns the loss, or a dict with the loss under "loss" and other
        parts to report. Returns them detached and unscaled, as float tensors. Under DDP
        gradients are all-reduced on the last micro-batch only; DeepSpeed averages over its
        configured accumulation steps itself.
        """
        sync = contextlib.nullcontext() if last or self.world_size == 1 or self.is_deepspeed else model.no_sync()
        if self.is_deepspeed:  # the boundary from us, not from the engine's micro-step counter (see set_accumulation)
            model.set_gradient_accumulation_boundary(last)
        with sync:
            with self.accelerator.autocast():
                out = loss_fn(model)
            losses = out if isinstance(out, dict) else {"loss": out}
            if self.is_deepspeed:
                model.backward(losses["loss"])
                model.step()  # applies the update only at the accumulation boundary
            else:
                (losses["loss"] / self.grad_accum).backward()
        return {k: v.detach().float() for k, v in losses.items()}

    def optimizer_step(self, model: Any, optimizer: Any, scheduler: Any, *,
                       skip: bool = False) -> tuple[float | None, bool]:
        """Clip, update, zero the gradients and advance the LR schedule.

        Returns (gradient norm, whether the update was applied). No update is applied when
        ``skip`` (a non-finite loss) or the gradient norm is not finite: the gradients are
        dropped instead. Under DeepSpeed the engine has already stepped at the accumulation
        boundary (micro_step) and skips non-finite gradients itself (its overflow check,
        reported as an infinite norm). The LR schedule advances either way (it counts steps).
        """
        if self.is_deepspeed:
            norm = model.get_global_grad_norm()
            norm = None if norm is None else float(norm)
            applied = norm is None or math.isfinite(norm)
        else:
            params = [p for p in model.parameters() if p.grad is not None]
            # clip_grad_norm_ with an infinite bound measures without clipping
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)) if params else 0.0
            applied = not skip and math.isfinite(norm)
            if applied:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return norm, applied

    def set_accumulation(self, model: Any, *, micro_batch_size: int, grad_accum: int) -> None:
        """Change the micro-batch size and accumulation steps between optimizer steps (a new
        progressive-resolution stage). DeepSpeed scales each micro-batch's loss by its configured
        accumulation steps, so the engine is told; its boundaries come from micro_step's ``last``,
        which stays right when the count changes mid-run (its own counter would not)."""
        self.grad_accum = grad_accum
        if self.is_deepspeed:
            model.set_train_micro_batch_size(micro_batch_size)
            model.set_train_batch_size(micro_batch_size * grad_accum * self.world_size)

    def full_state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        """The unsharded weights on CPU: on every rank, except under ZeRO-3 where the gather
        (a collective: call it on all ranks) lands on the main rank only and others get {}."""
        state = self.accelerator.get_state_dict(model, unwrap=True) or {}
        return {k: v.detach().cpu().reshape(()) if k in self._scalar_params else v.detach().cpu()
                for k, v in state.items()}

    def save_model_state(self, model: Any, optimizer: Any, directory: Path, save_torch: Callable[[Any, Path], None],
                         save_module: Callable[[torch.nn.Module, Path], None]) -> None:
        """Write the model and optimizer state into ``directory`` (collective: every rank calls it).

        DeepSpeed's engine writes its own layout under ``directory/deepspeed/`` (optimizer
        partitions from every rank); otherwise the main rank writes the unwrapped weights
        (``model.safetensors``) and ``optimizer.pt``. Each file is written by ``save_torch(obj,
        path)`` or ``save_module(module, path)`` (train/training/checkpoint_files: a failed write
        names the file and the errno), the engine's too (train/runtime/engine_saves.py).
        """
        if self.is_deepspeed:
            save_engine_state(model, directory, DEEPSPEED_TAG, save_torch)
        elif self.is_main:
            save_module(self.unwrap(model), directory / "model.safetensors")
            save_torch(optimizer.state_dict(), directory / "optimizer.pt")

    def load_model_state(self, model: Any, optimizer: Any, directory: Path, safe_load: Callable[..., Any]) -> None:
        """Load what ``save_model_state`` wrote in ``directory`` into the prepared model and optimizer.

        ``safe_load(path, map_location=..., allow=...)`` is a weights-only torch.load
        (train/training/checkpoint_files.safe_torch_load). DeepSpeed's own loader unpickles with
        weights_only=False, so it is routed through ``safe_load`` with DeepSpeed's allowlist.
        Raises ModelStateError when DeepSpeed finds no checkpoint in ``directory``.
        """
        if not self.is_deepspeed:
            device = _safetensors_device(self.device)
            load_model(self.unwrap(model), str(directory / "model.safetensors"), device=device)
            optimizer.load_state_dict(safe_load(directory / "optimizer.pt"))
            return
        model.checkpoint_engine.load = lambda path, map_location=None: safe_load(
            path, map_location=map_location or "cpu", allow=deepspeed_safe_globals())
        path, _ = model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise ModelStateError(f"{directory / DEEPSPEED_TAG}: DeepSpeed found no checkpoint to load")

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (identity on one process)."""
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.to(self.device), reduction="mean")

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value`` (one all-reduce; the value itself on one process)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        with self.accelerator.main_process_first():
            yield

    def close(self) -> None:
        """Tear down the process group and accelerate's process-wide state, so that the next
        job of a sweep (same process) can start a runtime of another kind."""
        import torch.distributed as dist
        from accelerate.state import AcceleratorState, GradientState

        self.accelerator.end_training()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        set_worker_start_method(None)
        # accelerate keeps one shared state per process and offers no public reset; its own
        # test-suite uses these. Without them a second Accelerator inherits the first's plugin.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for name in [*self.env_set, "ACCELERATE_USE_DEEPSPEED"]:
            os.environ.pop(name, None)


def start_runtime(options: RuntimeConfig, *, micro_batch_size: int, grad_accum: int,
                  grad_clip: float | None) -> Runtime:
    """Start processes and precision per ``options`` (call once per stage, before models)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    world = launched_world_size()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would warn while probing for a GPU
        keep_freed_memory_in_heap()
    if options.kind == "single" and world > 1:
        raise ConfigError("runtime", f"runtime=single but {world} processes were started; use runtime=ddp or zero1/2/3")
    cuda = torch.cuda.is_available() and options.device != "cpu"
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "cuda requested but no GPU is visible; use runtime.device=auto or cpu")
    bf16 = options.precision == "bf16" or (options.precision == "auto" and cuda)
    set_tf32(options.allow_tf32)
    plugin, env_set = None, []
    if options.kind == "deepspeed":
        env_set = _ensure_single_process_env()
        if not cuda:
            _skip_deepspeed_shm_kernel()
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(
            options, micro_batch_size=micro_batch_size, grad_accum=grad_accum, grad_clip=grad_clip, bf16=bf16))
    handlers = []
    if world > 1 or plugin is not None:  # an explicit backend makes accelerate start a process group
        handlers.append(InitProcessGroupKwargs(backend="nccl" if cuda else "gloo",
                                               timeout=timedelta(seconds=options.timeout_s)))
        # the process group's threads make a plain fork unsafe (data_pipeline/workers.py)
        set_worker_start_method("forkserver")
    # accelerate ignores a DeepSpeed plugin when cpu=True; without a GPU it picks the CPU anyway.
    accelerator = Accelerator(cpu=not cuda and plugin is None, mixed_precision="bf16" if bf16 else "no",
                              deepspeed_plugin=plugin, kwargs_handlers=handlers)
    return Runtime(options=options, accelerator=accelerator, grad_accum=grad_accum, grad_clip=grad_clip, env_set=env_set)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices) from (seed, rank)."""
    s = derive_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
