"""One GPU check: train-t2i's speed switches and the captioner's throughput, on one H100 in under
8 minutes (docs/real-run.md, "GPU speed switches"; run it as `bash benchmarks/gpu_check.sh`).
`--smoke` runs the same code with tiny models on the CPU in under a minute (tests/test_gpu_check.py
does, so that it never rots); its numbers mean nothing.

train-t2i. The xf + UNet of conf/unet/dalle3_0p9b.yaml (random init) trained on cached inputs
(random VAE latents and T5-XXL-wide states of 256 tokens, as `train_t2i.cache` feeds them). A step
is the stage's: Runtime.micro_step under bf16 autocast, Runtime.optimizer_step (clipping, AdamW)
and the EMA update (the loop around them costs <= 5%: benchmarks/t2i_step_overhead.py), at 256 and
512 px. The rows switch one thing on at a time, cumulatively: off -> runtime.allow_tf32 ->
optimizer.implementation=fused -> train_t2i.channels_last -> train_t2i.compile_unet (all on), so
a row's `vs above` is its switch's gain and compilation (minutes) is paid once per resolution (those
rows run last, after the captioner). img/s and ms/step: the median of --steps timed steps after
--warmup. MFU = model FLOPs per step / step time / --peak-tflops (989: H100 SXM, dense bf16). Model
FLOPs: one xf + UNet forward + backward of one sample counted by torch.utils.flop_counter through
the math attention path (its matmuls are counted on every device, the fused kernels only on some),
times the batch. `loss vs off`: the largest relative difference of the row's per-step losses from
the off row's (same weights, batch and seeds).

Attention: the fused scaled_dot_product_attention kernels one forward runs (bf16 on the GPU),
against the number of attention layers: a math fallback decomposes into matmuls, missing from the count.

Captioner. A full-size coca_ViT-L-14 (random weights, captions forced to full length as in
benchmarks/caption_decoding.py): our KV-cached decoder against open_clip's `generate` on one batch
of 64 images under bf16 autocast, then `recap recaption` run in this process over toy shards with
two such captioners (benchmarks/recaption_throughput.py), images/s from its own clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train.config.execution import RuntimeConfig  # noqa: E402
from train.config.loading import load_experiment  # noqa: E402
from train.runtime.placement import set_tf32  # noqa: E402
from train.runtime.processes import seed_everything, start_runtime  # noqa: E402
from train.t2i.objective import Objective  # noqa: E402
from train.t2i.parts import build_denoiser  # noqa: E402
from train.t2i.speed import AttentionKernels, attention_layers, compile_unet, to_channels_last  # noqa: E402
from train.training.checkpointing import TrainState  # noqa: E402
from train.training.ema import EmaWeights  # noqa: E402
from train.training.optimization import build_optimizer, build_scheduler  # noqa: E402

H100_SXM_BF16_DENSE_TFLOPS = 989.0
SWITCHES = ("allow_tf32", "fused", "channels_last", "compile_unet")  # the rows add them in this order
ROWS = ("off", "+ allow_tf32", "+ AdamW fused", "+ channels_last", "+ compile_unet (all on)")


@dataclass(frozen=True)
class Sizes:
    unet: str  # a conf/unet preset
    text_dim: int  # T5 width
    tokens: int  # T5 tokens per caption
    batches: dict[int, int]  # resolution (px) -> micro-batch
    warmup: int
    steps: int
    coca: str  # 'tiny' or an open_clip CoCa name
    caption_batch: int
    caption_length: int
    recaption_images: int
    recaption_workers: int
    device: str
    precision: str
    compile_backend: str
    budget_s: float  # what has not started by then (or would not end by then) is reported as skipped


FULL = Sizes(unet="dalle3_0p9b", text_dim=4096, tokens=256, batches={256: 16, 512: 8}, warmup=3, steps=10,
             coca="coca_ViT-L-14", caption_batch=64, caption_length=76, recaption_images=512, recaption_workers=4,
             device="cuda", precision="bf16", compile_backend="inductor", budget_s=450.0)
SMOKE = Sizes(unet="tiny", text_dim=32, tokens=8, batches={64: 2, 128: 2}, warmup=1, steps=2, coca="tiny",
              caption_batch=4, caption_length=8, recaption_images=16, recaption_workers=0, device="cpu",
              precision="auto", compile_backend="eager", budget_s=600.0)


@dataclass
class Row:
    resolution: int
    index: int  # into ROWS: SWITCHES[:index] are on
    batch: int
    step_s: float | None = None
    losses: list[float] = field(default_factory=list)
    note: str = ""  # why there is no number


class CachedInputs:
    """What Objective needs of the frozen encoders when batches come from the cache: the empty
    caption (one token of zero states, standing in for T5's '</s>')."""

    def __init__(self, width: int) -> None:
        self.width = width

    def empty_caption(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, self.width, device=device), torch.ones(1, dtype=torch.bool, device=device)


def cached_batch(batch: int, resolution: int, sizes: Sizes, device: torch.device) -> dict[str, torch.Tensor]:
    """Latents (B, 4, r/8, r/8), T5 states (B, T, D) with every other caption half padding, mask, seeds."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, sizes.tokens, dtype=torch.bool)
    mask[1::2, sizes.tokens // 2:] = False
    states = torch.randn(batch, sizes.tokens, sizes.text_dim, generator=g) * mask[..., None]
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, generator=g)
    return {"latents": latents.to(device), "states": states.to(device), "mask": mask.to(device),
            "seeds": torch.arange(batch, dtype=torch.long) * 7919}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_model(sizes: Sizes, cfg: Any, resolution: int) -> tuple[float, int, dict[str, int]]:
    """(model FLOPs of one sample's forward + backward, attention layers, forward attention kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(sizes.device)
    seed_everything(0)
    with torch.device(device):
        model = build_denoiser(cfg.unet, text_dim=sizes.text_dim, latent_channels=4).train()
    one = cached_batch(1, resolution, sizes, device)
    inputs = (one["latents"], torch.zeros(1, dtype=torch.long, device=device), one["states"], one["mask"])
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(*inputs).float().square().mean().backward()
    bf16 = sizes.precision == "bf16"
    with AttentionKernels() as kernels, torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        model(*inputs)
    layers = attention_layers(model)
    del model
    _free()
    return float(counter.get_total_flops()), layers, dict(kernels.counts)


def train_row(sizes: Sizes, cfg: Any, row: Row) -> None:
    """Time ``row``'s switches: per-step losses of all steps, median seconds of the timed ones."""
    on = set(SWITCHES[:row.index])
    rt = start_runtime(RuntimeConfig(device=sizes.device, precision=sizes.precision, allow_tf32="allow_tf32" in on),
                       micro_batch_size=row.batch, grad_accum=1, grad_clip=1.0)
    try:
        seed_everything(0)
        with torch.device(rt.device):
            denoiser = build_denoiser(cfg.unet, text_dim=sizes.text_dim, latent_channels=4)
        if "channels_last" in on:
            to_channels_last(denoiser)
        ema = EmaWeights(denoiser, 0.9999, rt.device)
        if "compile_unet" in on:
            compile_unet(denoiser, backend=sizes.compile_backend)
        opt = dataclasses.replace(cfg.train_t2i.optimizer, implementation="fused" if "fused" in on else "auto")
        optimizer = build_optimizer(denoiser.parameters(), opt)
        scheduler = build_scheduler(optimizer, opt, total_steps=10**6)
        model, optimizer = rt.prepare(denoiser, optimizer)
        objective = Objective(cfg.diffusion, CachedInputs(sizes.text_dim), rt.device)  # type: ignore[arg-type]
        batch = cached_batch(row.batch, row.resolution, sizes, rt.device)
        seed_everything(1)  # the same noise and timesteps in every row
        state, stamps = TrainState(), []
        for _ in range(sizes.warmup + sizes.steps):
            out = rt.micro_step(model, lambda m: objective(m, batch), last=True)
            rt.optimizer_step(model, optimizer, scheduler)
            ema.step(model.parameters(), state)
            row.losses.append(float(out["loss"]))  # waits for the step
            stamps.append(time.perf_counter())
        row.step_s = statistics.median(b - a for a, b in zip(stamps[sizes.warmup - 1:], stamps[sizes.warmup:]))
    finally:
        rt.close()
        if "compile_unet" in on:
            torch._dynamo.reset()


def failure(exc: BaseException) -> str:
    """'failed: Class: first line of the message', for a table cell."""
    first = (str(exc).splitlines() or [""])[0]
    return f"failed: {type(exc).__name__}: {first[:160]}"


def run_row(sizes: Sizes, cfg: Any, row: Row, started: float, *, shrink: bool) -> Row:
    """train_row, reporting instead of raising: past the budget, out of memory (halving the
    batch first when ``shrink``: the off row picks the batch its resolution's rows use)."""
    while True:
        if time.monotonic() - started > sizes.budget_s:
            row.note = "skipped: past --budget-s"
            return row
        try:
            train_row(sizes, cfg, row)
            out_of_memory = False
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as exc:  # one failing switch must not hide the other rows (exit 1)
            row.note, out_of_memory = failure(exc), False
        _free()  # out here the row's model, and the traceback's frames holding it, are gone
        if not out_of_memory:
            return row
        row.losses.clear()
        if not shrink or row.batch == 1:
            row.note = f"out of memory at batch {row.batch}"
            return row
        row.batch //= 2


def captioner_section(sizes: Sizes, started: float) -> tuple[list[tuple[str, float, float, float, float]], bool] | str:
    """(rows of side, images/s, captions/s, tokens/s and tokens/s vs open_clip's; whether ours and
    open_clip gave the same tokens), or why it did not run."""
    if time.monotonic() - started > sizes.budget_s:
        return "skipped: past --budget-s"
    from caption_decoding import build_model, enable_open_clip_generate, measure

    enable_open_clip_generate()  # open_clip's generate without transformers' BeamSearchScorer (transformers 5)
    model, image_size = build_model(sizes.coca, sizes.device)
    images = torch.randn(sizes.caption_batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    bf16 = sizes.precision == "bf16"
    with torch.autocast(torch.device(sizes.device).type, torch.bfloat16, enabled=bf16):
        result = measure(model, images.to(sizes.device), sizes.caption_length, 2, sizes.device)
    del model
    _free()
    tokens = sizes.caption_length - 1
    rows = [(side, result[key] / tokens, result[key] / tokens, result[key], result[key] / result["open_clip"])
            for side, key in (("open_clip generate", "open_clip"), ("ours (KV-cached greedy)", "ours"))]
    stage = recaption_stage(sizes)
    captions_s = 2 * stage  # two captioners per image
    rows.append(("`recap recaption`, 2 captioners", stage, captions_s, captions_s * tokens,
                 captions_s * tokens / result["open_clip"]))
    return rows, bool(result["same"])


def recaption_stage(sizes: Sizes) -> float:
    """images/s of `recap recaption` with two captioners of sizes.coca, by the stage's own clock."""
    from recaption_throughput import make_inputs, run_stage

    root = Path(tempfile.mkdtemp(prefix="gpu-check-recaption-"))
    try:
        per_shard = max(1, sizes.recaption_images // 2)
        paths = make_inputs(root / "in", sizes.recaption_images, per_shard, sizes.coca)
        args = SimpleNamespace(batch_size=sizes.caption_batch, length=sizes.caption_length, device=sizes.device)
        summary = run_stage(paths, root / "out", args, sizes.recaption_workers)
        if summary["failures"] or not summary["images_captioned"]:
            raise RuntimeError(f"recaption captioned {summary['images_captioned']} images with "
                               f"{summary['failures']} failures")
        return summary["images_captioned"] / summary["seconds"]
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _progress(started: float, message: str) -> None:
    print(f"[gpu_check {time.monotonic() - started:5.0f} s] {message}", file=sys.stderr, flush=True)


def print_t2i(rows: list[Row], flops: dict[int, float], sizes: Sizes, peak: float) -> None:
    print("| px | switches | batch | ms/step | img/s | TFLOP/step | MFU | vs off | vs above | loss vs off |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    done = {(r.resolution, r.index): r for r in rows if r.step_s}
    for r in rows:
        name = ROWS[r.index] + (f" ({sizes.compile_backend} backend)" if r.index == 4 and sizes.compile_backend !=
                                "inductor" else "")
        if not r.step_s:
            print(f"| {r.resolution} | {name} | {r.batch} | {r.note} | | | | | | |")
            continue
        off, above = done.get((r.resolution, 0)), done.get((r.resolution, r.index - 1))
        step_flops = flops[r.resolution] * r.batch
        loss = (f"{max(abs(a - b) / abs(b) for a, b in zip(r.losses, off.losses)):.1e}" if off else "-")
        print(f"| {r.resolution} | {name} | {r.batch} | {r.step_s * 1e3:.1f} | {r.batch / r.step_s:.1f} | "
              f"{step_flops / 1e12:.4g} | {100 * step_flops / r.step_s / (peak * 1e12):.2f}% | {_speedup(off, r)} | "
              f"{_speedup(above, r) if r.index else '1.00'} | {loss} |")


def _speedup(peer: Row | None, row: Row) -> str:
    """How many times faster ``row`` steps than ``peer`` ('-' without the peer's number)."""
    return f"{peer.step_s / row.step_s:.2f}" if peer and peer.step_s and row.step_s else "-"


def print_attention(attention: dict[int, tuple[int, dict[str, int]]]) -> None:
    print("| px | attention layers | fused kernels in one forward | math fallbacks |")
    print("|---:|---:|---|---:|")
    for resolution, (layers, kernels) in attention.items():
        names = ", ".join(f"{k} {v}" for k, v in sorted(kernels.items()))
        print(f"| {resolution} | {layers} | {names or 'none'} | {layers - sum(kernels.values())} |")


def print_captioner(section: Any, sizes: Sizes) -> None:
    if isinstance(section, str):
        print(section)
        return
    rows, same = section
    print("| side | images/s | captions/s | tokens/s | vs open_clip (tokens/s) |")
    print("|---|---:|---:|---:|---:|")
    for side, images_s, captions_s, tokens_s, ratio in rows:
        print(f"| {side} | {images_s:.1f} | {captions_s:.1f} | {tokens_s:.0f} | {ratio:.2f} |")
    print(f"\nours and open_clip gave the same tokens: {same} (under bf16 autocast a tie can break either way)"
          if sizes.precision == "bf16" else f"\nours and open_clip gave the same tokens: {same}")


def parse_args(argv: list[str] | None) -> tuple[Sizes, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (the test suite's run)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="the MFU denominator (989: H100 SXM dense bf16; H100 PCIe: 756)")
    parser.add_argument("--batches", type=int, nargs=2, metavar=("B256", "B512"),
                        help="micro-batches at the two resolutions (default 16 8; halved on out of memory)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default 10)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile_unet rows")
    parser.add_argument("--budget-s", type=float,
                        help="start nothing that would end after this many seconds (default 450)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.batches:
        sizes = dataclasses.replace(sizes, batches=dict(zip(sizes.batches, args.batches)))
    if args.steps:
        sizes = dataclasses.replace(sizes, steps=args.steps)
    if args.budget_s:
        sizes = dataclasses.replace(sizes, budget_s=args.budget_s)
    if args.no_compile:
        sizes = dataclasses.replace(sizes, compile_backend="")
    return sizes, args.peak_tflops


def eager_rows(sizes: Sizes, cfg: Any, started: float) -> list[Row]:
    """The rows without compile_unet, resolution by resolution; each off row settles its batch."""
    rows: list[Row] = []
    for resolution, batch in sizes.batches.items():
        for index in range(4):
            rows.append(run_row(sizes, cfg, Row(resolution, index, rows[-1].batch if index else batch), started,
                                shrink=index == 0))
            _row_progress(started, rows[-1])
    return rows


def compile_rows(sizes: Sizes, cfg: Any, eager: list[Row], started: float) -> list[Row]:
    """The all-on rows (compile_unet last: its compilation is the long part), at the off rows'
    batches; a row that the one before it says would end past the budget is not started."""
    rows, last_s = [], 0.0
    for resolution in sizes.batches:
        row = Row(resolution, 4, next(r.batch for r in eager if r.resolution == resolution))
        if not sizes.compile_backend:
            row.note = "left out: --no-compile"
        elif time.monotonic() - started + last_s > sizes.budget_s:
            row.note = f"skipped: the last compile row took {last_s:.0f} s, past --budget-s"
        else:
            begin = time.monotonic()
            run_row(sizes, cfg, row, started, shrink=False)
            last_s = time.monotonic() - begin
        rows.append(row)
        _row_progress(started, row)
    return rows


def _row_progress(started: float, row: Row) -> None:
    result = f"{row.batch / row.step_s:.1f} img/s" if row.step_s else row.note
    _progress(started, f"{row.resolution} px {ROWS[row.index]}: {result}")


def main(argv: list[str] | None = None) -> int:
    sizes, peak = parse_args(argv)
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no GPU visible (torch.cuda.is_available() is False); run --smoke on the CPU",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    cfg = load_experiment([f"unet={sizes.unet}", "diffusion=eps_linear"])
    flops, attention = {}, {}
    for resolution in sizes.batches:
        flops[resolution], *attention[resolution] = count_model(sizes, cfg, resolution)
        _progress(started, f"{resolution} px: {flops[resolution] / 1e12:.4g} TFLOP per sample (forward + backward)")
    rows = eager_rows(sizes, cfg, started)
    set_tf32(False)  # PyTorch's default again (the last row turned it on)
    try:
        captioner = captioner_section(sizes, started)
    except Exception as exc:  # reported under its heading; the t2i tables still print (exit 1)
        captioner = failure(exc)
        _free()
    _progress(started, f"captioner: {captioner if isinstance(captioner, str) else 'done'}")
    rows = sorted(rows + compile_rows(sizes, cfg, rows, started), key=lambda r: (r.resolution, r.index))

    name = (torch.cuda.get_device_name() if sizes.device == "cuda"
            else "CPU (--smoke: tiny models, numbers mean nothing)")
    print(f"# gpu_check on {name}, torch {torch.__version__}, {time.monotonic() - started:.0f} s\n")
    print(f"## train-t2i: xf + {sizes.unet} UNet, {'bf16' if sizes.precision == 'bf16' else 'fp32'}, cached inputs "
          f"({sizes.tokens} T5 tokens); MFU against {peak:g} TFLOP/s\n")
    print_t2i(rows, flops, sizes, peak)
    print("\n## attention: scaled_dot_product_attention kernels\n")
    print_attention(attention)
    print(f"\n## captioner: {sizes.coca} (random weights), batch {sizes.caption_batch}, "
          f"{sizes.caption_length - 1} tokens per caption\n")
    print_captioner(captioner, sizes)
    notes = [r.note for r in rows] + ([captioner] if isinstance(captioner, str) else [])
    return 1 if any(note.startswith("failed") for note in notes) else 0  # the tables print either way


if __name__ == "__main__":
    sys.exit(main())
