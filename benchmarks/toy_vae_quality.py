"""Toy VAE quality: held-out reconstruction PSNR of `recap train-vae` variants for the same wall time.

Each variant (a VAE architecture with its learning rate and batch) is trained by the real stage
(train/stages/train_vae.py, the toy experiment's config plus the variant's overrides) on toy
shards at 64 px. Equal budget: a short calibration run of the stage measures the variant's
training images/s, which sets its step count for ``--seconds`` of training. The stage's own
held-out measure (train_vae.heldout_images crops of data.heldout, summary.json's
``heldout_psnr_db``) gives the median and min PSNR; the table also shows each variant's median
against the first variant's (the f=8 toy VAE of conf/vae/tiny.yaml), measured in the same run.

    python benchmarks/toy_vae_quality.py                       # toy shards written to a temp dir
    python benchmarks/toy_vae_quality.py --data runs/toy/toy_data --seconds 180 --grid /tmp/vae_grid
    python benchmarks/toy_vae_quality.py --only 0 6                # the peer and the recommended toy VAE
    python benchmarks/toy_vae_quality.py --variant "mine:vae.block_out_channels=[32,64] train_vae.optimizer.lr=1e-3"

``--grid DIR`` writes DIR/<variant>.png: held-out crops (top row) over their reconstructions.
``--probe DIR`` (train-eval-clip's probe/, e.g. runs/toy/train_eval_clip/probe) also has that judge
read the main object's attributes on ``--probe-images`` whole held-out scenes at ``--probe-size``
px and on their round trips through each variant (what `recap evaluate`'s "real through the VAE"
row measures): PSNR says little about a small object's colour.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.toy_shards import write_toy_dataset
from models.vae import psnr_db, reconstruct
from train.config.loading import load_experiment
from train.stages import train_vae

# name -> overrides of the toy experiment. The first is the peer the others are compared with:
# the toy VAE as it was (conf/vae/tiny.yaml with conf/experiment/toy.yaml's train_vae: L1 on
# posterior samples, lr 2e-3, batch 16). The recipe: MSE on the posterior mean, GroupNorm over
# all channels (norm_num_groups=1), lr 5e-4 with a cosine decay, batch 4.
_PINNED = ["vae.latent_channels=4", "vae.layers_per_block=1", "train_vae.resolution=64", "train_vae.kl_weight=1e-6",
           "train_vae.object_weight=0",
           "train_vae.optimizer.warmup_steps=20"]
_TOY_WAS = [*_PINNED, "vae.norm_num_groups=16", "train_vae.reconstruction_loss=l1", "train_vae.sample_posterior=true",
            "train_vae.optimizer.lr=2e-3", "train_vae.optimizer.schedule=constant", "train_vae.global_batch_size=16",
            "train_vae.micro_batch_size=16"]
_RECIPE = [*_PINNED, "vae.norm_num_groups=1", "train_vae.reconstruction_loss=mse", "train_vae.sample_posterior=false",
           "train_vae.optimizer.lr=5e-4", "train_vae.optimizer.schedule=cosine", "train_vae.global_batch_size=4",
           "train_vae.micro_batch_size=4"]
VARIANTS = {
    "f8 [32,64,64,64] c4, toy as it was": ["vae.block_out_channels=[32,64,64,64]", *_TOY_WAS],
    "f4 [32,64,64] c4, toy as it was": ["vae.block_out_channels=[32,64,64]", *_TOY_WAS],
    "f8 [32,64,64,64] c4, recipe": ["vae.block_out_channels=[32,64,64,64]", *_RECIPE],
    "f4 [32,64,64] c4, recipe": ["vae.block_out_channels=[32,64,64]", *_RECIPE],
    "f4 [64,64,64] c4, recipe": ["vae.block_out_channels=[64,64,64]", *_RECIPE],
    "f8 [16,32,32,32] c4, recipe": ["vae.block_out_channels=[16,32,32,32]", *_RECIPE],
    "f4 [16,32,32] c4, recipe": ["vae.block_out_channels=[16,32,32]", *_RECIPE],
    # objects weigh more than their share of pixels (train_vae.object_weight; the toy's choice)
    "f4 [16,32,32] c4, recipe + object weight 4": ["vae.block_out_channels=[16,32,32]",
                                                   *[o for o in _RECIPE if "object_weight" not in o],
                                                   "train_vae.object_weight=4"],
}
CALIBRATION_STEPS = 16
GRID_IMAGES = 8


@dataclass(frozen=True)
class Measured:
    name: str
    overrides: list[str]
    factor: int
    steps: int
    batch: int
    lr: float
    train_s: float  # the training loop's own time: steps x batch / its img/s
    stage_s: float  # the whole stage: start-up, held-out read, training, export, measure
    psnr: dict
    probe: dict | None = None  # attribute -> accuracy on the round trips (with --probe)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _overrides(root: Path, data: Path, name: str, extra: list[str]) -> list[str]:
    return [f"run.root={root}", f"run.name={_slug(name)}", f"data.train={data}/train",
            f"data.heldout={data}/heldout", "logger.wandb.mode=disabled", "logger.progress=false",
            "checkpoint.every_steps=1000000", *extra]


def measure(root: Path, data: Path, name: str, extra: list[str], seconds: float) -> Measured:
    """Calibrate the variant's training speed, then train it for about ``seconds``."""
    base = _overrides(root / "calibration", data, name, extra)
    cfg = load_experiment([*base, f"train_vae.steps={CALIBRATION_STEPS}", "train_vae.heldout_images=0",
                           "train_vae.optimizer.warmup_steps=0"])
    rate = train_vae.run(cfg, cfg.run.dir / "train_vae")["img_per_s"]
    batch = cfg.train_vae.global_batch_size
    steps = max(1, round(seconds * rate / batch))
    cfg = load_experiment([*_overrides(root, data, name, extra), f"train_vae.steps={steps}"])
    start = time.perf_counter()
    summary = train_vae.run(cfg, cfg.run.dir / "train_vae")
    stage_s = time.perf_counter() - start
    return Measured(name, extra, cfg.vae.downsampling_factor, steps, batch, cfg.train_vae.optimizer.lr,
                    steps * batch / summary["img_per_s"], stage_s, summary["heldout_psnr_db"])


def references(data: Path) -> dict[str, tuple[int | None, dict]]:
    """Untrained yardsticks on the same held-out crops as the stage's measure: each crop painted
    its own mean colour, and 3 channels per f x f pixels (area downsample, bicubic upsample): what
    a latent of 3 channels holds without learning anything."""
    cfg = load_experiment([f"data.heldout={data}/heldout"])
    tv = cfg.train_vae
    crops = train_vae.heldout_crops(cfg.data.heldout, tv.resolution, tv.heldout_images, cfg.data.reader, cfg.seed)

    def summary(recon: torch.Tensor) -> dict:
        values = psnr_db(crops, recon.clamp(-1, 1)).tolist()
        return {"median": statistics.median(values), "min": min(values), "images": len(values)}

    out: dict[str, tuple[int | None, dict]] = {
        "no training: each crop's mean colour": (None, summary(crops.mean(dim=(2, 3), keepdim=True).expand_as(crops)))}
    for f in (4, 8):
        small = F.interpolate(crops, scale_factor=1 / f, mode="area")  # (N, 3, res/f, res/f)
        out[f"no training: 3 channels per {f}x{f} px (area down, bicubic up)"] = (
            f, summary(F.interpolate(small, scale_factor=f, mode="bicubic")))
    return out


def probe_accuracy(probe_dir: Path, root: Path, data: Path, name: str, extra: list[str], images: int,
                   size: int) -> tuple[dict, dict]:
    """The probe's accuracy per attribute on the first ``images`` held-out scenes (data/heldout,
    the reader's seeded order, squashed to ``size``) and on their round trips through the variant's
    exported VAE: (on the originals, on the round trips)."""
    from diffusers import AutoencoderKL

    from models.attribute_probe import binding_accuracy, load_probe, predict
    from train.evaluation.heldout import read_prompted
    from train.stages.evaluate import round_trip

    cfg = load_experiment([*_overrides(root, data, name, extra), f"evaluate.input={data}/heldout",
                           f"evaluate.samples={images}", f"evaluate.size={size}"])
    held = read_prompted(cfg.evaluate, cfg.data.reader, cfg.seed, with_targets=True)
    probe = load_probe(probe_dir)
    vae = AutoencoderKL.from_pretrained(cfg.run.dir / "train_vae" / "vae").eval()
    targets = {k: held.targets[k] for k in probe.spec.attributes}

    def accuracy(pixels: torch.Tensor) -> dict:  # (N, 3, size, size) in [0, 1]
        return {k: round(v, 3) for k, v in binding_accuracy(predict(probe, pixels), targets).items()}

    return accuracy(held.pixels.float() / 255), accuracy(round_trip(vae, held.pixels, 32))


def write_grid(path: Path, root: Path, data: Path, name: str, extra: list[str]) -> None:
    """Held-out crops over their reconstructions by the variant's exported VAE, 2x upscaled."""
    from diffusers import AutoencoderKL

    cfg = load_experiment(_overrides(root, data, name, extra))
    crops = train_vae.heldout_crops(cfg.data.heldout, cfg.train_vae.resolution, GRID_IMAGES, cfg.data.reader, cfg.seed)
    vae = AutoencoderKL.from_pretrained(cfg.run.dir / "train_vae" / "vae").eval()
    rows = torch.cat([crops, reconstruct(vae, crops)])  # (2N, 3, res, res) in [-1, 1]
    pixels = ((rows + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    size = cfg.train_vae.resolution
    grid = Image.new("RGB", (GRID_IMAGES * (size + 2), 2 * (size + 2)), "white")
    for i, p in enumerate(pixels):
        grid.paste(Image.fromarray(p), ((i % GRID_IMAGES) * (size + 2), (i // GRID_IMAGES) * (size + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(path)


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not overrides.strip():
        raise argparse.ArgumentTypeError(f"--variant 'NAME:override override ...', got {text!r}")
    return name.strip(), overrides.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="training wall time per variant")
    parser.add_argument("--data", type=Path, default=None,
                        help="toy shards (DIR/train, DIR/heldout); default: the toy world of conf/ in a temp dir")
    parser.add_argument("--variant", type=_parse_variant, action="append", default=None,
                        help="'NAME:override ...' (repeatable); replaces the built-in variants")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="indices of the built-in variants to run (0: the peer), e.g. --only 0 6")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch compute threads")
    parser.add_argument("--grid", type=Path, default=None, help="write reconstruction grids here")
    parser.add_argument("--probe", type=Path, default=None,
                        help="train-eval-clip's probe folder: judge the attributes of round trips too")
    parser.add_argument("--probe-images", type=int, default=192, help="held-out scenes the probe judges")
    parser.add_argument("--probe-size", type=int, default=128, help="side in px of the scenes the probe judges")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = dict(args.variant) if args.variant else VARIANTS
    if args.only is not None:
        variants = {name: extra for i, (name, extra) in enumerate(variants.items()) if i in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = args.data
        if data is None:
            data = root / "toy_data"
            write_toy_dataset({"train": data / "train", "heldout": data / "heldout"}, load_experiment([]).data.toy,
                              progress=False)
        yardsticks = references(data)
        results, originals = [], None
        for name, extra in variants.items():
            result = measure(root, data, name, extra, args.seconds)
            if args.probe is not None:
                originals, probed = probe_accuracy(args.probe, root, data, name, extra, args.probe_images,
                                                   args.probe_size)
                result = replace(result, probe=probed)
            results.append(result)
            if args.grid is not None:
                write_grid(args.grid / f"{_slug(name)}.png", root, data, name, extra)
    _print_table(results, yardsticks, args)
    if originals is not None:
        _print_probe_table(results, originals, args)


def _print_table(results: list[Measured], yardsticks: dict[str, tuple[int | None, dict]],
                 args: argparse.Namespace) -> None:
    peer = results[0].psnr["median"]
    print(f"\ntrain-vae on the toy world at 64 px, ~{args.seconds:.0f} s of training per variant, "
          f"{args.threads} thread(s); held-out PSNR over {results[0].psnr['images']} crops")
    print("| variant | f | steps x batch | lr | train s | stage s | PSNR median dB | PSNR min dB | median vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.name} | {r.factor} | {r.steps} x {r.batch} | {r.lr:g} | {r.train_s:.0f} | {r.stage_s:.0f} | "
              f"{r.psnr['median']:.2f} | {r.psnr['min']:.2f} | {r.psnr['median'] - peer:+.2f} |")
    for name, (factor, psnr) in yardsticks.items():
        print(f"| {name} | {factor or '—'} | — | — | — | — | {psnr['median']:.2f} | {psnr['min']:.2f} | "
              f"{psnr['median'] - peer:+.2f} |")
    print(json.dumps({r.name: r.overrides for r in results}, indent=1))


def _print_probe_table(results: list[Measured], originals: dict, args: argparse.Namespace) -> None:
    names = list(originals)
    print(f"\nthe probe ({args.probe}) on {args.probe_images} held-out scenes at {args.probe_size} px: "
          "accuracy on the originals and on their round trips through each variant")
    print("| images | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    print("| originals | " + " | ".join(f"{originals[k]:.3f}" for k in names) + " |")
    for r in results:
        print(f"| through {r.name} | " + " | ".join(f"{r.probe[k]:.3f}" for k in names) + " |")


if __name__ == "__main__":
    main()
