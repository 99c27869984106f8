"""How fast can the toy captioner's image tower learn shape? A supervised upper bound.

The toy CoCa's ViT (conf/captioner/coca_tiny.yaml's vision tower, ``--patch`` px patches) with a
linear head is trained directly on the main subject's shape (7 classes) and colour (8) of
in-memory `shapes`-world scenes, squashed to its square input by the captioner's own transform
(models/captioner.py ``image_transform``). Captioning gives the tower a weaker signal than these
labels, so a floor this run cannot reach is out of reach for the captioner too. The peer in the
same run is the same world with another set of aspect ratios (``--aspects``), on the same seeds:

    python benchmarks/vit_shape_supervised.py                              # square vs 1:1/4:3/3:4
    python benchmarks/vit_shape_supervised.py --steps 3000 --patch 8 --aspects square

Prints held-out (512 scenes) shape and colour accuracy every ``--every`` steps per variant, then
a table of the shape accuracies and their ratio to the first variant's. One torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from data_pipeline.toy_captions import main_subject
from data_pipeline.toy_scenes import COLOURS, WORLDS, render_scene, sample_scene
from models.captioner import build_captioner, image_transform

ASPECTS = {"mixed": ((1, 1), (4, 3), (3, 4)), "square": ((1, 1),)}
TOWER = "conf/captioner/coca_tiny.yaml"


def scenes(world, transform, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N, 3, S, S), shape index (N,), colour index (N,)) of the main subject."""
    rng = np.random.default_rng(seed)
    images, shapes, colours = [], [], []
    for _ in range(count):
        scene = sample_scene(rng, world=world, text_probability=0.0)
        main = main_subject(scene)
        images.append(transform(render_scene(scene)))
        shapes.append(world.shapes.index(main.shape))
        colours.append(list(COLOURS).index(main.colour))
    return torch.stack(images), torch.tensor(shapes), torch.tensor(colours)


def train(aspects: str, args: argparse.Namespace) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    architecture = OmegaConf.to_container(OmegaConf.load(TOWER)["architecture"])
    architecture["vision_cfg"]["patch_size"] = args.patch
    coca = build_captioner("coca_toy", architecture)
    tower, transform = coca.visual, image_transform(coca)
    world = dataclasses.replace(WORLDS["shapes"], aspect_ratios=ASPECTS[aspects])
    n_shapes = len(world.shapes)
    x, y_shape, y_colour = scenes(world, transform, args.train_scenes, seed=1)
    x_test, t_shape, t_colour = scenes(world, transform, 512, seed=2)
    width = tower.output_dim + tower.transformer.width
    head = torch.nn.Linear(width, n_shapes + len(COLOURS))

    def logits(images: torch.Tensor) -> torch.Tensor:
        pooled, tokens = tower(images)  # (B, D), (B, N, W)
        return head(torch.cat([pooled, tokens.mean(dim=1)], dim=1))

    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,), generator=generator)
        out = logits(x[idx])
        loss = (torch.nn.functional.cross_entropy(out[:, :n_shapes], y_shape[idx])
                + torch.nn.functional.cross_entropy(out[:, n_shapes:], y_colour[idx]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            tower.eval()
            with torch.no_grad():
                out = torch.cat([logits(x_test[i:i + 128]) for i in range(0, len(x_test), 128)])
            tower.train()
            shape = (out[:, :n_shapes].argmax(1) == t_shape).float().mean().item()
            colour = (out[:, n_shapes:].argmax(1) == t_colour).float().mean().item()
            curve.append((step, shape, colour))
            print(f"{aspects:>6} step {step:5d}: shape {shape:.3f} colour {colour:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aspects", nargs="+", choices=sorted(ASPECTS), default=["square", "mixed"])
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--train-scenes", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves = {aspects: train(aspects, args) for aspects in args.aspects}
    first = curves[args.aspects[0]]
    print(f"\nheld-out shape accuracy of the main subject (7 classes; patch {args.patch} px, batch {args.batch})")
    print("| aspects | " + " | ".join(f"step {s}" for s, _, _ in first) + f" | vs {args.aspects[0]} (last) |")
    print("|---|" + "---:|" * (len(first) + 1))
    for aspects, curve in curves.items():
        print(f"| {aspects} | " + " | ".join(f"{shape:.3f}" for _, shape, _ in curve)
              + f" | {curve[-1][1] / max(first[-1][1], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
