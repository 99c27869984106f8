"""RecapPipeline runs the same sampling computation as diffusers' StableDiffusionPipeline.

The peer (a StableDiffusionPipeline over our UNet, fed our xf tokens, with the pooled captions and
masks its loop does not pass) is built by benchmarks/sampler_vs_diffusers.py, which also times both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tests.helpers import assert_close_to_scale

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "sampler_vs_diffusers.py"
PROMPTS = ["a large red circle on a white background", "the word cat written in purple"]
SIZE, STEPS, GUIDANCE = 32, 3, 5.0


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sampler_vs_diffusers", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def components(bench) -> dict:
    return bench.toy_components(seed=0)


def _noise(pipe) -> torch.Tensor:
    f = pipe.vae_scale_factor
    return torch.randn(len(PROMPTS), pipe.unet.config.in_channels, SIZE // f, SIZE // f,
                       generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_latents_match_diffusers_pipeline(bench, components, scheduler: str) -> None:
    ours = bench.our_pipeline(components, scheduler)
    peer, embeds = bench.peer_pipeline(ours, PROMPTS, scheduler)
    noise = _noise(ours)
    mine, theirs = bench.sample_both(ours, peer, embeds, PROMPTS, noise, resolution=SIZE, steps=STEPS,
                                     guidance=GUIDANCE, output_type="latent")
    assert mine.shape == theirs.shape == noise.shape
    assert (mine - noise).abs().max() > 1e-2  # the loop did move the latents
    assert_close_to_scale(mine, theirs)
    assert torch.equal(ours.scheduler.timesteps, peer.scheduler.timesteps)


def test_decoded_images_match(bench, components) -> None:
    ours = bench.our_pipeline(components, "ddim")
    peer, embeds = bench.peer_pipeline(ours, PROMPTS, "ddim")
    images, peer_images = bench.sample_both(ours, peer, embeds, PROMPTS, _noise(ours), resolution=SIZE, steps=STEPS,
                                            guidance=GUIDANCE, output_type="pt")
    assert images.shape == (len(PROMPTS), 3, SIZE, SIZE)
    assert_close_to_scale(images, peer_images)


def test_diffusers_rewrites_the_steps_offset_it_is_given(bench, components) -> None:
    """The discrepancy the benchmark reports: StableDiffusionPipeline's constructor turns our
    scheduler's steps_offset 0 into 1, shifting every timestep by one (docs/real-run.md)."""
    ours = bench.our_pipeline(components, "ddim")
    as_built, _ = bench.peer_pipeline(ours, PROMPTS, "ddim", same_scheduler=False)
    assert ours.scheduler.config.steps_offset == 0
    assert as_built.scheduler.config.steps_offset == 1, "diffusers no longer rewrites steps_offset; update the docs"
    for s in (ours.scheduler, as_built.scheduler):
        s.set_timesteps(STEPS)
    assert (as_built.scheduler.timesteps - ours.scheduler.timesteps).tolist() == [1] * STEPS
