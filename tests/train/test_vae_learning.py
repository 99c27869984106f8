"""train-vae learns: a small 4x VAE trained by the stage for a short time reconstructs held-out toy
scenes above a PSNR floor that the same VAE untrained stays below (the negative control)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from models.vae import build_vae, psnr_db
from tests.faults.runs import one_thread
from tests.helpers import run_stage
from train.config.loading import load_experiment
from train.stages import train_vae

pytestmark = pytest.mark.slow
# Measured on the toy shards of tests/conftest.py (32 held-out scenes at 32 px, the shapes world):
# trained 22.3 dB median (~30 s on one thread), untrained 5.8 dB, and 18.1 dB for painting each
# scene its own mean colour: the floor asks for more than that.
FLOOR_DB = 19.0
RESOLUTION = 32


def _args(root: Path, toy_data: Path) -> list[str]:
    return [f"run.root={root}", f"data.train={toy_data}/train", f"data.heldout={toy_data}/heldout",
            "vae.block_out_channels=[16,32,32]", "vae.norm_num_groups=1", "vae.latent_channels=4",
            f"train_vae.resolution={RESOLUTION}", "train_vae.steps=600", "train_vae.global_batch_size=4",
            "train_vae.micro_batch_size=4", "train_vae.reconstruction_loss=mse", "train_vae.sample_posterior=false",
            "train_vae.optimizer.lr=2e-3",
            "train_vae.optimizer.warmup_steps=20", "train_vae.optimizer.schedule=cosine", "checkpoint.every_steps=1000",
            "data.reader.num_workers=1", "logger.wandb.mode=disabled", "logger.progress=false"]


def test_a_short_run_reconstructs_held_out_scenes_and_the_untrained_vae_does_not(toy_data: Path,
                                                                                 tmp_path: Path) -> None:
    args = _args(tmp_path, toy_data)
    with one_thread():
        summary = run_stage("train_vae", args)
    trained = summary["heldout_psnr_db"]
    assert trained["images"] == 32 and trained["resolution"] == RESOLUTION  # every held-out scene of the fixture
    assert trained["median"] > FLOOR_DB, trained

    cfg = load_experiment(args)
    crops = train_vae.heldout_crops(cfg.data.heldout, RESOLUTION, cfg.train_vae.heldout_images, cfg.data.reader,
                                    cfg.seed)
    torch.manual_seed(cfg.seed)  # the stage's initial weights: seed_everything(cfg.seed) before building
    v = cfg.vae
    untrained = build_vae(v.block_out_channels, layers_per_block=v.layers_per_block,
                          latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups).eval()
    control = train_vae.heldout_psnr(untrained, crops, torch.device("cpu"))
    assert control["images"] == 32 and control["median"] < FLOOR_DB, control
    mean_colour = psnr_db(crops, crops.mean(dim=(2, 3), keepdim=True).expand_as(crops)).median().item()
    assert mean_colour < FLOOR_DB - 0.5, mean_colour  # the floor means more than each scene's mean colour

    exported = AutoencoderKL.from_pretrained(tmp_path / "toy" / "train_vae" / "vae").eval()  # what train-t2i loads
    again = train_vae.heldout_psnr(exported, crops, torch.device("cpu"))
    assert again["median"] == pytest.approx(trained["median"], abs=1e-3) and again["min"] == pytest.approx(
        trained["min"], abs=1e-3)
