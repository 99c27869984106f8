"""Toy attribute-probe variants: per-attribute accuracy after N steps, the first variant as the peer.

The judge of `recap evaluate` (models/attribute_probe.py) is only as useful as its accuracy on real
scenes. This trains probe variants (input size, stem, mirroring, scene count) stand-alone on
scenes of a toy world rendered in memory (data_pipeline.toy_scenes, squashed to the probe's input
with PIL bicubic; the stage reads JPEGs, so its numbers differ by a little) and prints, every
``--every`` steps, each variant's accuracy on ``--test`` other scenes of the same world, and at
the end each variant's shape accuracy against the first's, measured in the same run.

    python benchmarks/toy_probe_variants.py                       # all variants, 1200 steps
    python benchmarks/toy_probe_variants.py --only 0 3 --steps 800
    python benchmarks/toy_probe_variants.py --variant "mine:size=80,stem=32,hflip=1,scenes=16384"

Optimiser: AdamW, one-cycle learning rate peaking at 1e-3 after 5% of the steps, no weight decay,
batch 64 (the stage's conf uses lr 2e-3, weight decay 0.1 and a cosine decay: its numbers differ a
little). docs/evaluation.md quotes this script's runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from data_pipeline.toy_scenes import WORLDS, render_scene, sample_scene, scene_ground_truth
from models.attribute_probe import (
    CLASSES, AttributeProbe, ProbeSpec, majority_classes, mirror_scenes, predict, probe_loss, probe_targets,
    stack_targets, varying_attributes,
)

# name -> settings; the first is the peer (the probe of the demo before issue 16's second round).
VARIANTS: dict[str, dict[str, int]] = {
    "64px": {"size": 64, "stem": 24, "hflip": 0, "scenes": 8192},
    "64px-mirrored-16k": {"size": 64, "stem": 24, "hflip": 1, "scenes": 16384},
    "64px-no-stem": {"size": 64, "stem": 0, "hflip": 0, "scenes": 8192},
    "96px-mirrored-16k": {"size": 96, "stem": 24, "hflip": 1, "scenes": 16384},
    "96px-no-stem-mirrored-16k": {"size": 96, "stem": 0, "hflip": 1, "scenes": 16384},
}


def render(world: str, seed: int, count: int, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` scenes of ``world``: (count, 3, size, size) uint8 and their probe targets."""
    images, targets = [], []
    for i in range(count):
        scene = sample_scene(np.random.default_rng([seed, i]), text_probability=0.0, world=WORLDS[world])
        image = render_scene(scene).resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        targets.append(probe_targets(scene_ground_truth(scene)))
    return torch.stack(images), stack_targets(targets)


def train_variant(v: dict[str, int], args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Train one variant; {step: {attribute: test accuracy}} every ``args.every`` steps."""
    train_x, train_t = render(args.world, 1, v["scenes"], v["size"])
    test_x, test_t = render(args.world, 2, args.test, v["size"])
    attributes = varying_attributes(train_t)
    torch.manual_seed(0)
    spec = ProbeSpec(image_size=v["size"], channels=(32, 64, 128, 128), stem=v["stem"], attributes=attributes,
                     classes={a: CLASSES[a] for a in attributes},
                     majority=majority_classes({a: train_t[a] for a in attributes}))
    probe = AttributeProbe(spec)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=args.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(0)
    scores = {}
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train_x), (64,), generator=generator)
        x, t = train_x[batch].float() / 255, {a: train_t[a][batch] for a in attributes}
        if v["hflip"]:
            x, t = mirror_scenes(x, t, torch.rand(64, generator=generator) < 0.5)
        loss = probe_loss(probe(x), t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.every == 0 or step == args.steps:
            probe.eval()
            predicted = predict(probe, test_x.float() / 255)
            probe.train()
            scores[step] = {a: (predicted[a] == test_t[a]).float().mean().item() for a in attributes}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="shapes", choices=sorted(WORLDS))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--test", type=int, default=512, help="test scenes (another seed of the same world)")
    parser.add_argument("--only", type=int, nargs="*", help="indices of VARIANTS to run")
    parser.add_argument("--variant", action="append", default=[], help='"name:size=96,stem=24,hflip=1,scenes=16384"')
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for spec in args.variant:
        name, _, settings = spec.partition(":")
        variants[name] = {**VARIANTS["64px"], **{k: int(v) for k, v in (kv.split("=") for kv in settings.split(","))}}
    names = [n for i, n in enumerate(variants) if args.only is None or i in args.only or n not in VARIANTS]
    print(f"{args.world} world, {args.steps} steps of 64, {args.test} test scenes, {torch.get_num_threads()} thread(s)")
    finals = {}
    for name in names:
        start = time.perf_counter()
        scores = train_variant(variants[name], args)
        seconds = time.perf_counter() - start
        for step, acc in scores.items():
            print(f"{name:>22} step {step:>5}: " + "  ".join(f"{a} {v:.3f}" for a, v in acc.items()))
        finals[name] = scores[args.steps]
        print(f"{name:>22} {seconds:.0f} s (rendering included)")
    peer = finals[names[0]]["shape"]
    print("\n| variant | " + " | ".join(next(iter(finals.values()))) + " | shape vs peer |")
    print("|---|" + "---:|" * (len(next(iter(finals.values()))) + 1))
    for name, acc in finals.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in acc.values()) + f" | {acc['shape'] / peer:.3f} |")


if __name__ == "__main__":
    main()
