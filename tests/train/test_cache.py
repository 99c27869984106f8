"""`recap cache`: the cache format, exactly-once writing, and train-t2i from the cache giving the
losses of training from raw images (float32 cache: bit-identical; bfloat16: within 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline import latent_cache
from data_pipeline.shard_io import iter_raw_samples
from tests.data_pipeline.dp_testlib import good_members, read_members, write_tar
from tests.helpers import logged_losses, run_recap, run_stage, toy_tokenizer, write_captioned_shards

pytestmark = pytest.mark.slow
STAGES = "[{resolution: 64, steps: 3, global_batch_size: 4, micro_batch_size: 4}, " \
         "{resolution: 128, steps: 2, global_batch_size: 4, micro_batch_size: 2}]"


@pytest.fixture(scope="module")
def inputs(dp_toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from data_pipeline.caption_tokenizer import save_tokenizer
    from models.vae import build_vae

    root = tmp_path_factory.mktemp("cache_inputs")
    shards = write_captioned_shards(dp_toy_dir, root / "captioned")
    tokenizer = save_tokenizer(toy_tokenizer(24), root / "tokenizer")
    torch.manual_seed(0)
    build_vae([8, 16, 16, 16], layers_per_block=1, norm_num_groups=8).save_pretrained(root / "vae")
    return {"shards": shards, "tokenizer": tokenizer, "vae": root / "vae"}


@pytest.fixture(scope="module")
def dp_toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.options import ToyDataOptions
    from data_pipeline.toy_shards import write_toy_dataset

    root = tmp_path_factory.mktemp("cache_toy")
    options = ToyDataOptions(train_shards=2, heldout_shards=1, samples_per_shard=12, seed=3, processes=1,
                             world="full", text_probability=0.4)
    write_toy_dataset({"train": root / "train", "heldout": root / "heldout"}, options, progress=False)
    return root / "train"


def _overrides(root: Path, inputs: dict[str, Path], *extra: str) -> list[str]:
    from_images = [] if any(e.startswith("train_t2i.cache=") for e in extra) else ["train_t2i.cache=null"]
    return [*from_images, f"run.root={root}", f"train_t2i.input={inputs['shards']}", f"train_t2i.vae={inputs['vae']}",
            f"text_encoder.tokenizer={inputs['tokenizer']}", "text_encoder.max_tokens=24",
            "text_encoder.architecture={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4}",
            "unet.block_out_channels=[32,32,64]", "unet.attention_head_dim=8", "unet.xf_width=32", "unet.xf_heads=4",
            f"train_t2i.stages={STAGES}", "train_t2i.sampling.every_steps=null", "train_t2i.buckets.random_crop=false",
            "logger.wandb.mode=disabled", "logger.progress=false", "data.reader.num_workers=0", "cache.num_workers=1",
            "cache.batch_size=5", "checkpoint.every_steps=100", f"cache.output={root}/cache", *extra]


_run = run_stage


def test_cache_holds_every_stage_and_caption_and_trains_like_raw_images(inputs, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _run("train_t2i", _overrides(raw, inputs))
    expected = {s: v[-1] for s, v in logged_losses(raw / "toy" / "train_t2i").items()}
    assert len(expected) == 5
    for dtype, tolerance in (("float32", 0.0), ("bfloat16", 1e-4)):
        root = tmp_path / dtype
        summary = _run("cache", _overrides(root, inputs, f"cache.dtype={dtype}"))
        assert (summary["shards_written"], summary["samples_cached"], summary["failures"]) == (2, 24, 0)
        assert summary["duplicate_keys_across_shards"] == 0
        _run("train_t2i", _overrides(root, inputs, f"train_t2i.cache={root}/cache"))
        got = {s: v[-1] for s, v in logged_losses(root / "toy" / "train_t2i").items()}
        assert got.keys() == expected.keys()
        for step in expected:
            assert abs(got[step] - expected[step]) <= tolerance * expected[step], (dtype, step)

    # the format: text and json kept, image dropped, latents and bucket per stage, unpadded T5 states
    with open(tmp_path / "bfloat16" / "cache" / "00000.tar", "rb") as f:
        samples = list(iter_raw_samples(f))
    with open(inputs["shards"] / "00000.tar", "rb") as f:
        originals = {s.key: s.members for s in iter_raw_samples(f)}
    assert len(samples) == 12
    for sample in samples:
        original = originals[sample.key]
        assert set(sample.members) == (set(original) - {"jpg"}) | {latent_cache.CACHE_MEMBER}
        assert all(sample.members[m] == original[m] for m in original if m != "jpg")
        entry = latent_cache.decode_entry(sample.members[latent_cache.CACHE_MEMBER])
        for res in (64, 128):
            width, height = entry[f"bucket@{res}"].tolist()
            assert entry[f"latents@{res}"].shape == (4, height // 8, width // 8) and width * height <= res * res
            assert entry[f"latents@{res}"].dtype == torch.bfloat16 and entry[f"crop@{res}"].shape == (2,)
        for key, member in (("dsc", "dsc.txt"), ("ssc", "ssc.txt"), ("txt", "txt")):
            if original.get(member, b"").strip():
                states = entry[f"t5@{key}"]
                assert states.shape[1] == 32 and 1 <= states.shape[0] <= 24 and states.abs().sum(1).min() > 0
            else:
                assert f"t5@{key}" not in entry


def test_a_killed_cache_job_reruns_to_the_same_bytes(inputs, tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run("cache", _overrides(whole, inputs))
    killed = run_recap(["cache", *_overrides(broken, inputs)], env={"RECAP_FAULT": "sigkill@cache_shard=1"})
    # killed between the first shard's rename and its stats file: nothing is marked done
    assert killed.returncode != 0 and not list((broken / "cache").glob("*.cache.json"))
    assert _run("cache", _overrides(broken, inputs))["shards_written"] == 2
    for shard in sorted((whole / "cache").glob("*.tar")):
        assert (broken / "cache" / shard.name).read_bytes() == shard.read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in (broken / "cache").iterdir()}
    third = _run("cache", _overrides(broken, inputs))
    assert (third["shards_already_done"], third["shards_written"]) == (2, 0)
    assert {p: p.stat().st_mtime_ns for p in (broken / "cache").iterdir()} == mtimes


def test_a_cache_without_a_stage_resolution_is_refused_before_training(inputs, tmp_path: Path) -> None:
    one_stage = "[{resolution: 64, steps: 2, global_batch_size: 4, micro_batch_size: 4}]"
    _run("cache", _overrides(tmp_path, inputs, f"train_t2i.stages={one_stage}"))
    stats = json.loads((tmp_path / "cache" / "00000.cache.json").read_text())
    assert stats["resolutions"] == [64] and stats["keys"] == ["dsc", "ssc", "txt"]
    result = run_recap(["train-t2i", *_overrides(tmp_path, inputs, f"train_t2i.cache={tmp_path}/cache")])
    assert result.returncode == 2
    assert "the cache holds resolutions [64]" in result.stderr and "[128]" in result.stderr


def test_a_preempted_cache_job_exits_75_with_only_done_shards_and_reruns_to_the_same_bytes(inputs,
                                                                                           tmp_path: Path) -> None:
    """SIGTERM to the process group after the 4th batch (3 batches of 5 make a 12-sample shard:
    the first shard is done, the second in progress): exit 75 naming both, the second's partial
    file removed, and the rerun writes only it, to the bytes of an uninterrupted run."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run("cache", _overrides(whole, inputs))
    preempted = run_recap(["cache", *_overrides(broken, inputs)], env={"RECAP_FAULT": "sigterm@cache_batch=4,group=1"})
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    assert "Traceback" not in preempted.stderr
    assert preempted.stderr.strip().splitlines()[-1] == (
        "recap cache: preempted by SIGTERM: 1 shard(s) written and marked done in this run; abandoned 1 shard(s) in "
        "progress (00001.tar), their partial files removed; rerun the same command to write the rest")
    assert sorted(p.name for p in (broken / "cache").iterdir()) == ["00000.cache.json", "00000.tar"]
    rerun = _run("cache", _overrides(broken, inputs))
    assert (rerun["shards_already_done"], rerun["shards_written"]) == (1, 1)
    assert {p.name: p.read_bytes() for p in (broken / "cache").glob("*.tar")} == \
        {p.name: p.read_bytes() for p in (whole / "cache").glob("*.tar")}


def test_keys_repeated_across_shards_are_counted_and_every_copy_is_cached(inputs, tmp_path: Path) -> None:
    """Shard 2 repeats a1 and a2 of shard 1, shard 3 repeats a2 again: 3 counted, none dropped."""
    shards = {"00000.tar": ["a1", "a2", "a3"], "00001.tar": ["b1", "a1", "a2"], "00002.tar": ["a2", "c1"]}
    for name, keys in shards.items():
        write_tar(tmp_path / "given" / name, [m for k in keys for m in good_members(k)])
    summary = _run("cache", _overrides(tmp_path, inputs, f"cache.input={tmp_path / 'given'}"))
    assert (summary["duplicate_keys_across_shards"], summary["samples_cached"], summary["failures"]) == (3, 8, 0)
    for name, keys in shards.items():
        assert [n for n, _ in read_members(tmp_path / "cache" / name) if n.endswith(".cache.safetensors")] == \
            [f"{k}.{latent_cache.CACHE_MEMBER}" for k in keys]
