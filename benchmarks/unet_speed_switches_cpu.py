"""train-t2i's speed switches on this machine's CPU: the xf + UNet training step eager, with
`train_t2i.channels_last` and with `train_t2i.compile_unet` (torch.compile, inductor).

Each side trains the configured UNet preset (random init) on one fixed batch of random latents and
T5 states: forward, v-target MSE, backward, AdamW. The same module functions the stage uses
(`build_denoiser`, `to_channels_last`, `compile_unet`) set each side up. Prints the seconds of the
first two steps (compilation) and the median ms/step over rounds in which the sides take turns
(this machine's speed drifts by 10-30% between minutes), with the ratio against eager. The
switches were written for GPUs (docs/real-run.md); this says whether the toy demo on a CPU should
turn them on.

    python benchmarks/unet_speed_switches_cpu.py                      # toy UNet, 64 px, batch 16
    python benchmarks/unet_speed_switches_cpu.py --resolution 128 --batch 8 --sides eager,compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from train.config.loading import load_experiment
from train.t2i.parts import build_denoiser
from train.t2i.speed import compile_unet, to_channels_last

SIDES = ("eager", "channels_last", "compile")


def side(name: str, cfg: Any, batch: int, resolution: int) -> tuple[Callable[[], None], float]:
    """(one training step of side ``name``, seconds of its first two steps: compilation)."""
    torch.manual_seed(0)
    net = build_denoiser(cfg.unet, text_dim=cfg.text_encoder.architecture.d_model, latent_channels=4)
    if name == "channels_last":
        to_channels_last(net)
    if name == "compile":
        compile_unet(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    h = resolution // 2 ** (len(cfg.vae.block_out_channels) - 1)  # the configured VAE's latent size
    latents, target = torch.randn(batch, 4, h, h, generator=g), torch.randn(batch, 4, h, h, generator=g)
    states = torch.randn(batch, 40, cfg.text_encoder.architecture.d_model, generator=g)
    mask = torch.ones(batch, 40, dtype=torch.bool)
    mask[:, 30:] = False
    t = torch.randint(0, 1000, (batch,), generator=g)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(latents, t, states, mask), target).backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    step()
    return step, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the sides taking turns (the machine drifts)")
    parser.add_argument("--unet", default="tiny", help="a conf/unet preset")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    args = parser.parse_args()
    cfg = load_experiment([f"unet={args.unet}", "runtime=single"])
    sides = {name: side(name, cfg, args.batch, args.resolution) for name in args.sides.split(",")}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (step, _) in sides.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median.get("eager", next(iter(median.values())))
    print(f"xf + UNet training step, unet={args.unet}, {args.resolution} px, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} timed steps per side, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| side | first 2 steps (s) | ms/step (median) | vs eager |\n|---|---:|---:|---:|")
    for name, (_, first) in sides.items():
        print(f"| {name} | {first:.1f} | {median[name] * 1000:.1f} | {median[name] / base:.3f} |")


if __name__ == "__main__":
    main()
