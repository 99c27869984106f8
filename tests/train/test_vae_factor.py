"""VAEs of 2 to 4 levels (f = 2, 4, 8): the config accepts them, refuses other level counts and
image sizes the latents cannot divide, and train-t2i's cached latents follow the VAE's own factor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline import latent_cache
from data_pipeline.aspect_buckets import Bucket, bucket_table
from data_pipeline.caption_mix import CaptionMix
from data_pipeline.shard_io import iter_raw_samples
from train.config.loading import load_experiment
from train.config.t2i import BucketConfig
from train.config.typed import ConfigError
from train.t2i.batches import check_latent_grid
from tests.helpers import logged_losses, run_stage, toy_tokenizer, write_captioned_shards

F4 = "vae.block_out_channels=[32,64,64]"
F8 = "vae.block_out_channels=[32,64,64,64]"  # conf/vae/tiny.yaml; the toy experiment uses 4x


def _refused(*overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_experiment(list(overrides))
    return info.value


def test_a_three_level_vae_downsamples_4x_and_allows_finer_buckets() -> None:
    cfg = load_experiment([F4, "train_t2i.buckets.step=16", "train_vae.resolution=36"])
    assert cfg.vae.downsampling_factor == 4 and cfg.unet.downsampling_factor == 4
    assert cfg.train_vae.resolution == 36 and cfg.train_t2i.buckets.step == 16
    assert load_experiment(["vae.block_out_channels=[32,64]", "train_vae.resolution=34"]).vae.downsampling_factor == 2
    assert load_experiment([F8]).vae.downsampling_factor == 8
    assert load_experiment([]).vae.downsampling_factor == 4  # the toy experiment's (conf/experiment/toy.yaml)


@pytest.mark.parametrize("blocks", ["[32,64,64,64,64]", "[32]"])
def test_other_level_counts_are_refused_with_the_fix(blocks: str) -> None:
    error = _refused(f"vae.block_out_channels={blocks}")
    levels = blocks.count(",") + 1
    assert error.key == "vae.block_out_channels"
    assert f"needs 2 to 4 levels (downsampling factor f = 2**(levels - 1): 2x, 4x or 8x), got {levels}" in str(error)
    assert "e.g. [32, 64, 64] for 4x" in str(error)


def test_bucket_step_must_be_a_multiple_of_the_vae_and_unet_factors() -> None:
    # an 8x VAE and the toy's 3-level (4x) UNet need bucket sides in multiples of 32 pixels
    error = _refused(F8, "train_t2i.buckets.step=16")
    assert error.key == "train_t2i.buckets.step"
    assert str(error) == ("train_t2i.buckets.step: 16 is not a multiple of 32 (the VAE's 8x times the UNet's 4x "
                          "downsampling: every bucket side must give whole latents at the UNet's lowest level); use "
                          "e.g. 32")
    error = _refused(F4, "train_t2i.buckets.step=8")  # 4x VAE: 16
    assert error.key == "train_t2i.buckets.step" and "not a multiple of 16" in str(error)
    deep_unet = ["unet.block_out_channels=[32,64,64,64]", "unet.attention_levels=[false,true,true,true]"]
    load_experiment([F4, *deep_unet])  # 4x times 8x: the toy step 32 fits
    error = _refused(F4, *deep_unet, "train_t2i.buckets.step=16")
    assert "16 is not a multiple of 32 (the VAE's 4x times the UNet's 8x" in str(error)


def test_train_vae_resolution_must_be_a_multiple_of_the_vae_factor() -> None:
    error = _refused(F8, "train_vae.resolution=36")
    assert error.key == "train_vae.resolution"
    assert "36 is not a multiple of the VAE's downsampling factor 8" in str(error) and "use e.g. 32" in str(error)


def test_train_t2i_checks_the_factor_of_the_vae_folder_it_loaded() -> None:
    check_latent_grid(BucketConfig(step=32), vae_factor=8, unet_factor=4)
    check_latent_grid(BucketConfig(step=16), vae_factor=4, unet_factor=4)
    with pytest.raises(ConfigError) as info:
        check_latent_grid(BucketConfig(step=16), vae_factor=8, unet_factor=4)
    message = str(info.value)
    assert info.value.key == "train_t2i.vae" and "downsamples 8x" in message and "multiple of 32" in message


def _cached_sample(latent_hw: tuple[int, int], bucket: Bucket) -> dict:
    entry = {latent_cache.latents_name(64): torch.randn(4, *latent_hw),
             latent_cache.bucket_name(64): torch.tensor([bucket.width, bucket.height]),
             latent_cache.states_name("dsc"): torch.randn(3, 8)}
    return {"__key__": "k0", "seed": 7, latent_cache.CACHE_MEMBER: latent_cache.encode_entry(entry)}


def test_cached_latents_follow_the_vae_factor_and_a_stale_cache_is_refused() -> None:
    table = bucket_table(64, step=16)
    square = Bucket(64, 64)
    mix = CaptionMix({"dsc": 1.0}, fallback=("dsc",))
    item = latent_cache.FromCache(table, 64, mix, downsample=4)(_cached_sample((16, 16), square))
    assert item["latents"].shape == (4, 16, 16) and table[item["bucket"]] == square
    wide = next(b for b in table if b.width > b.height)
    batch = latent_cache.collate_cached([item, item], wide, downsample=4)  # refitted to a neighbouring bucket
    assert batch["latents"].shape == (2, 4, wide.height // 4, wide.width // 4)
    assert batch["states"].shape == (2, 3, 8) and batch["mask"].all()
    with pytest.raises(ValueError, match=r"cached latents of 64x64 pixels are 16x16, not the 8x8 of this run's 8x VAE"):
        latent_cache.FromCache(table, 64, mix, downsample=8)(_cached_sample((16, 16), square))


@pytest.mark.slow
def test_a_4x_vae_caches_trains_and_samples_end_to_end(toy_data: Path, tmp_path: Path) -> None:
    """cache -> train-t2i from the cache -> its sample grid, with a 3-level VAE and 16 px buckets."""
    from data_pipeline.caption_tokenizer import save_tokenizer
    from models.vae import build_vae

    shards = write_captioned_shards(toy_data / "train", tmp_path / "captioned")
    tokenizer = save_tokenizer(toy_tokenizer(24), tmp_path / "tokenizer")
    torch.manual_seed(0)
    build_vae([8, 16, 16], layers_per_block=1, norm_num_groups=8).save_pretrained(tmp_path / "vae")
    stages = "[{resolution: 32, steps: 2, global_batch_size: 4, micro_batch_size: 4}]"
    args = [f"run.root={tmp_path}", f"train_t2i.input={shards}", f"train_t2i.vae={tmp_path / 'vae'}",
            f"train_t2i.cache={tmp_path / 'cache'}", f"cache.output={tmp_path / 'cache'}",
            f"text_encoder.tokenizer={tokenizer}", "text_encoder.max_tokens=24",
            "text_encoder.architecture={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4}",
            "vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=8", "train_t2i.buckets.step=16",
            "unet.block_out_channels=[32,32,64]", "unet.attention_head_dim=8", "unet.xf_width=32", "unet.xf_heads=4",
            f"train_t2i.stages={stages}", "train_t2i.sampling.prompts=[a red circle]", "train_t2i.sampling.steps=2",
            "train_t2i.sampling.every_steps=null", "train_t2i.ema_decay=null", "data.reader.num_workers=0",
            "cache.num_workers=0", "logger.wandb.mode=disabled", "logger.progress=false"]
    assert run_stage("cache", args)["failures"] == 0
    with open(tmp_path / "cache" / "00000.tar", "rb") as f:
        entries = [latent_cache.decode_entry(s.members[latent_cache.CACHE_MEMBER]) for s in iter_raw_samples(f)]
    for entry in entries:  # latents are the bucket over 4, and buckets are multiples of 16 px
        width, height = entry["bucket@32"].tolist()
        assert entry["latents@32"].shape == (4, height // 4, width // 4) and width % 16 == height % 16 == 0
    assert any(tuple(e["latents@32"].shape[1:]) != (8, 8) for e in entries)  # not only the square bucket

    summary = run_stage("train_t2i", args)
    losses = logged_losses(tmp_path / "toy" / "train_t2i")
    assert sorted(losses) == [1, 2] and all(0 < v[-1] < 10 for v in losses.values())
    from PIL import Image

    grid = Image.open(summary["samples"])  # one 32 px sample decoded by the 4x VAE, in a labelled grid
    assert grid.width >= 32 and grid.height >= 32
    index = json.loads((tmp_path / "toy" / "train_t2i" / "pipeline" / "vae" / "config.json").read_text())
    assert len(index["block_out_channels"]) == 3
