"""Why a toy text-to-image model does or does not bind colours: two measurements (docs/train_t2i.md).

``latent-noise``: decode held-out scenes' VAE latents with Gaussian noise of std sigma added (the
latents have std ~1 after the scaling factor) and let the attribute probe read the main object's
attributes. If colours survived only exact latents, a denoiser's small errors would turn them; the
peer is sigma 0 in the same run.

``colour-words``: the exported pipeline's loss at fixed timesteps and noise on cached training
latents, prompted with each scene's ground-truth DSC, with the same DSC whose colour words are
cycled (red -> green, ...), and with the empty caption; plain and weighted towards the objects
(latent positions far from the image's median latent). A model that binds colours loses more with
the cycled words on the objects than anywhere else.

    python benchmarks/t2i_diagnostics.py latent-noise --vae runs/toy/train_vae/vae \\
        --probe runs/toy/train_eval_clip/probe --heldout runs/toy/toy_data/heldout/00001.tar
    python benchmarks/t2i_diagnostics.py colour-words --pipeline runs/toy/train_t2i/pipeline \\
        --cache runs/toy/cache/shards/00007.tar --scenes runs/toy/toy_data/train/00007.tar
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
from pathlib import Path

import torch
from PIL import Image

from data_pipeline.latent_cache import CACHE_MEMBER, decode_entry, latents_name
from data_pipeline.toy_scenes import COLOURS
from models.attribute_probe import binding_accuracy, load_probe, predict, probe_targets, stack_targets
from models.diffusion import make_scheduler, noised_and_target
from train.evaluation.heldout import square_pixels


def members(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a WebDataset shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def object_weights(latents: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, h, w), mean 1 per image: 1 + weight * each position's distance from the image's
    median latent over the mean distance (the objects of a plain-background scene weigh more)."""
    flat = latents.flatten(2)  # (B, C, h*w)
    distance = (flat - flat.median(dim=2, keepdim=True).values).norm(dim=1, keepdim=True)
    weights = 1.0 + weight * distance / distance.mean(dim=2, keepdim=True).clamp_min(1e-6)
    return (weights / weights.mean(dim=2, keepdim=True)).view(latents.shape[0], 1, *latents.shape[2:])


def latent_noise(args: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    probe = load_probe(Path(args.probe)).eval()
    samples = sorted(members(args.heldout).items())[: args.images]
    pixels = torch.stack([torch.from_numpy(square_pixels(Image.open(io.BytesIO(s["jpg"])), args.size))
                          for _, s in samples]).float() / 127.5 - 1.0
    targets = stack_targets([probe_targets(json.loads(s["json"])) for _, s in samples])
    scale = vae.config.scaling_factor
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode() * scale
        print(f"{len(samples)} held-out scenes at {args.size} px; scaled latents std {latents.std():.3f}")
        for sigma in args.sigmas:
            noisy = latents + sigma * torch.randn(latents.shape, generator=generator)
            images = ((vae.decode(noisy / scale).sample + 1) / 2).clamp(0, 1)
            scores = binding_accuracy(predict(probe, images), targets)
            print(f"sigma {sigma:.2f}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))


def colour_words(args: argparse.Namespace) -> None:
    from models.pipeline import RecapPipeline

    pipe = RecapPipeline.from_pretrained(args.pipeline)
    truth = {key: json.loads(s["json"])["gt_dsc"] for key, s in members(args.scenes).items()}
    latents, captions = [], []
    for key, sample in sorted(members(args.cache).items()):
        z = decode_entry(sample[CACHE_MEMBER]).get(latents_name(args.size))
        if z is not None and z.shape[1] == z.shape[2] and key in truth:
            latents.append(z.float())
            captions.append(truth[key])
        if len(latents) == args.images:
            break
    names = list(COLOURS)
    cycled = {c: names[(i + 3) % len(names)] for i, c in enumerate(names)}
    pattern = re.compile(r"\b(" + "|".join(names) + r")\b")
    prompts = {"own": captions, "colours cycled": [pattern.sub(lambda m: cycled[m.group(1)], c) for c in captions],
               "empty": [""] * len(captions)}
    z = torch.stack(latents)
    weights = object_weights(z, 10.0)
    config = pipe.scheduler.config
    schedule = make_scheduler(prediction_type=config.prediction_type, beta_schedule=config.beta_schedule,
                              num_train_timesteps=config.num_train_timesteps)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    print(f"{len(z)} cached {args.size} px latents; loss (object-weighted loss)")
    with torch.no_grad():
        encoded = {name: pipe.encode_prompts(texts) for name, texts in prompts.items()}
        for t in args.timesteps:
            steps = torch.full((len(z),), t)
            noisy, target = noised_and_target(schedule, z, noise, steps)
            cells = []
            for name, (tokens, mask, pooled) in encoded.items():
                out = pipe.unet(noisy, steps, encoder_hidden_states=tokens, encoder_attention_mask=mask,
                                class_labels=pooled).sample
                error = (out - target).square()
                cells.append(f"{name} {error.mean():.4f} ({(error * weights).mean():.4f})")
            print(f"t={t}: " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    noise = sub.add_parser("latent-noise")
    noise.add_argument("--vae", required=True)
    noise.add_argument("--probe", required=True)
    noise.add_argument("--heldout", required=True, help="a held-out toy shard")
    noise.add_argument("--images", type=int, default=128)
    noise.add_argument("--size", type=int, default=64)
    noise.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    words = sub.add_parser("colour-words")
    words.add_argument("--pipeline", required=True)
    words.add_argument("--cache", required=True, help="a `recap cache` shard")
    words.add_argument("--scenes", required=True, help="the toy shard with the same keys (its gt_dsc)")
    words.add_argument("--images", type=int, default=128)
    words.add_argument("--size", type=int, default=64)
    words.add_argument("--timesteps", type=int, nargs="+", default=[300, 500, 700, 850, 950])
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"latent-noise": latent_noise, "colour-words": colour_words}[args.what](args)


if __name__ == "__main__":
    main()
