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


# sample grids after steps 3 and 5 of the toy experiment's 4 prompts, 2 DDIM steps each
GRIDS = ("train_t2i.sampling.every_steps=3", "train_t2i.sampling.steps=2")


@pytest.fixture(scope="module")
def float32_cache(inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`recap cache` in float32 (the dtype that trains bit-identically): its output folder."""
    root = tmp_path_factory.mktemp("float32")
    summary = _run("cache", _overrides(root, inputs, "cache.dtype=float32"))
    assert (summary["shards_written"], summary["samples_cached"], summary["failures"]) == (2, 24, 0)
    return root / "cache"


@pytest.fixture(scope="module")
def cached_run(inputs, float32_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """train-t2i from the float32 cache with sample grids: its run folder, and in order what it
    loaded of the frozen encoders and when it trained (``train``: one resolution stage)."""
    import train.stages.train_t2i as stage
    import train.t2i.cached_conditioning as cached
    import train.t2i.parts as parts

    events: list[str] = []
    build_t5, load_vae, load_decoder, train_steps = (parts.build_t5_encoder, parts.load_vae, cached.load_vae_decoder,
                                                     stage.train_steps)

    def decoder(folder: str):
        vae = load_decoder(folder)
        events.append("encoder dropped" if vae.encoder is None and vae.quant_conv is None else "encoder kept")
        return vae

    root = tmp_path_factory.mktemp("cached")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parts, "build_t5_encoder", lambda **kw: (events.append("T5"), build_t5(**kw))[1])
        patch.setattr(parts, "load_vae", lambda folder: (events.append("VAE"), load_vae(folder))[1])
        patch.setattr(cached, "load_vae_decoder", decoder)
        patch.setattr(stage, "train_steps", lambda *a, **kw: (events.append("train"), train_steps(*a, **kw))[1])
        _run("train_t2i", _overrides(root, inputs, f"train_t2i.cache={float32_cache}", *GRIDS))
    return root / "toy" / "train_t2i", events


def _last_losses(run_dir: Path) -> dict[int, float]:
    return {s: v[-1] for s, v in logged_losses(run_dir).items()}


def _files(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(pattern)) if p.is_file()}


def test_cache_holds_every_stage_and_caption_and_trains_like_raw_images(inputs, float32_cache: Path,
                                                                       tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _run("train_t2i", _overrides(raw, inputs))
    expected = _last_losses(raw / "toy" / "train_t2i")
    assert len(expected) == 5
    for dtype, tolerance in (("float32", 0.0), ("bfloat16", 1e-4)):
        root = tmp_path / dtype
        if dtype == "float32":
            cache = float32_cache
        else:
            summary = _run("cache", _overrides(root, inputs, f"cache.dtype={dtype}"))
            assert (summary["shards_written"], summary["samples_cached"], summary["failures"]) == (2, 24, 0)
            assert summary["duplicate_keys_across_shards"] == 0
            cache = root / "cache"
        _run("train_t2i", _overrides(root, inputs, f"train_t2i.cache={cache}"))
        got = _last_losses(root / "toy" / "train_t2i")
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
    assert sorted(p.name for p in (broken / "cache").iterdir()) == ["00000.cache.json", "00000.tar",
                                                                    latent_cache.CONDITIONING_FILE]
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


def test_training_from_the_cache_loads_neither_t5_nor_the_vae_encoder_and_trains_as_with_them(
        inputs, cached_run: tuple[Path, list[str]], float32_cache: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """T5 is built and the whole VAE read only for the export, after the last step; before it,
    only the VAE's decoder (for the sample grids). The peer: the same run with the frozen side
    built as before (tokenizer, T5 and VAE at the start): the same losses, grids, weights and export."""
    import train.stages.train_t2i as stage
    from train.t2i.parts import load_frozen

    run_dir, events = cached_run
    assert events == ["VAE", "encoder dropped", "train", "train", "T5", "VAE"]  # two resolution stages, then export

    monkeypatch.setattr(stage, "_frozen", lambda cfg, rt: load_frozen(cfg.text_encoder, cfg.train_t2i.vae,
                                                                      cfg.seed).to(rt.device))
    _run("train_t2i", _overrides(tmp_path, inputs, f"train_t2i.cache={float32_cache}", *GRIDS))
    peer = tmp_path / "toy" / "train_t2i"
    assert _last_losses(run_dir) == _last_losses(peer) and len(_last_losses(peer)) == 5
    assert sorted(_files(run_dir / "samples")) == ["step_0000003.png", "step_0000005.png"]
    assert _files(run_dir / "samples") == _files(peer / "samples")
    assert _files(run_dir / "checkpoints", "*.safetensors") == _files(peer / "checkpoints", "*.safetensors")
    assert _files(run_dir / "raw_weights") == _files(peer / "raw_weights")
    tokenizer = "tokenizer/tokenizer.json"
    export, peer_export = _files(run_dir / "pipeline"), _files(peer / "pipeline")
    export_tokenizer, peer_tokenizer = export.pop(tokenizer), peer_export.pop(tokenizer)
    assert export == peer_export
    # the one difference: the peer's tokenizer kept the truncation and padding of the grid's last call
    ours, theirs = json.loads(export_tokenizer), json.loads(peer_tokenizer)
    assert (ours["truncation"], ours["padding"]) == (None, None) and theirs["padding"]["strategy"] == "BatchLongest"
    assert {**theirs, "truncation": None, "padding": None} == ours


def test_a_killed_run_from_the_cache_resumes_to_the_uninterrupted_runs_losses_and_export(
        inputs, cached_run: tuple[Path, list[str]], float32_cache: Path, tmp_path: Path) -> None:
    """Killed after step 4: the rerun resumes from the checkpoint at the end of the first
    resolution stage (step 3) and replays step 4."""
    args = ["train-t2i", *_overrides(tmp_path, inputs, f"train_t2i.cache={float32_cache}", *GRIDS)]
    killed = run_recap(args, env={"RECAP_FAULT": "sigkill@step=4"})
    run_dir = tmp_path / "toy" / "train_t2i"
    assert killed.returncode != 0 and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000003"]
    rerun = run_recap(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed"] is True
    assert len(logged_losses(run_dir)[4]) == 2 and logged_losses(run_dir)[4][0] == logged_losses(run_dir)[4][1]
    uninterrupted = cached_run[0]
    assert _last_losses(run_dir) == _last_losses(uninterrupted)
    assert _files(run_dir / "samples") == _files(uninterrupted / "samples")
    assert _files(run_dir / "pipeline") == _files(uninterrupted / "pipeline")


def test_a_cache_without_the_conditioning_file_or_with_other_prompts_is_refused_until_cache_reruns(
        inputs, tmp_path: Path) -> None:
    """The refusal (exit 2, one line) names the fix; rerunning `recap cache` skips the done shards
    and writes only the file; another text encoder into the same output is refused."""
    from train.config.loading import load_experiment
    from train.commands.prechecks import PRECHECKS

    _run("cache", _overrides(tmp_path, inputs))
    conditioning = tmp_path / "cache" / latent_cache.CONDITIONING_FILE
    conditioning.unlink()  # a cache written before the file existed
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    train = ["train-t2i", *_overrides(tmp_path, inputs, f"train_t2i.cache={tmp_path}/cache")]
    old = run_recap(train)
    assert old.returncode == 2 and "Traceback" not in old.stderr
    assert old.stderr.strip().splitlines()[-1] == (
        f"recap train-t2i: error: train_t2i.cache: no readable {conditioning} (FileNotFoundError): a cache written "
        "before `recap cache` stored the empty caption's and the sampling prompts' T5 states; rerun `recap cache` "
        "with this config (done shards are skipped; it writes only that file)")

    rerun = _run("cache", _overrides(tmp_path, inputs))
    assert (rerun["shards_already_done"], rerun["shards_written"]) == (2, 0) and conditioning.is_file()
    assert {p: (tmp_path / "cache" / p).stat().st_mtime_ns for p in shards} == shards
    PRECHECKS["train-t2i"](load_experiment(train[1:]))  # accepted now

    other = run_recap([*train, "train_t2i.sampling.prompts=[a green cross]"])
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"recap train-t2i: error: train_t2i.cache: {conditioning} holds the T5 states of sampling prompts ['")
    assert other.stderr.strip().endswith("not of train_t2i.sampling.prompts ['a green cross']; rerun `recap cache` "
                                         "with this config (done shards are skipped; it writes only that file)")
    _run("cache", _overrides(tmp_path, inputs, "train_t2i.sampling.prompts=[a green cross]"))
    PRECHECKS["train-t2i"](load_experiment([*train[1:], "train_t2i.sampling.prompts=[a green cross]"]))
    PRECHECKS["train-t2i"](load_experiment([*train[1:], "train_t2i.sampling.prompts=[]"]))  # no grids: any prompts

    seed = run_recap(["cache", *_overrides(tmp_path, inputs, "train_t2i.sampling.prompts=[a green cross]", "seed=5")])
    assert seed.returncode == 2 and "Traceback" not in seed.stderr
    line = seed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"recap cache: error: cache.output: {tmp_path / 'cache'} holds T5 states of text_encoder "
                           "architecture, architecture {") and ", seed 0, tokenizer" in line and ", seed 5, " in line
    assert line.endswith(": write the cache to a new cache.output")
