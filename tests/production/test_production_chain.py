"""The production chain end to end on CPU: `experiment=dalle3_256` with library-written substitutes.

tests/production/chain.py runs every stage a production user runs, through the CLI, on the
loaders the preset uses (T5 and its tokenizer from a Hugging Face folder, the VAE from a diffusers
folder, a named open_clip CoCa from a checkpoint file, the ViT-B-32-quickgelu judge from a
safetensors file) with only paths, sizes and steps overridden. Each test below reads what one
stage left behind and checks that it came from the substitutes, not from a toy default.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.production.chain import EXPERIMENT, RESOLUTION, STAGES, StageRun, run_chain
from tests.production.substitutes import DATA, SMALL_COCA, Substitutes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
TRAIN_SAMPLES = DATA.train_shards * DATA.samples_per_shard  # 16
HELDOUT_SAMPLES = DATA.heldout_shards * DATA.samples_per_shard  # 8


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Substitutes, list[StageRun]]:
    root = tmp_path_factory.mktemp("prodchain")
    substitutes, runs = run_chain(root)
    return root, substitutes, runs


def _dir(root: Path, *parts: str) -> Path:
    return root.joinpath("runs", EXPERIMENT, *parts)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _ranks(folder: Path) -> list[dict]:
    """The per-rank summaries of a shard job (recaption, cache)."""
    return [_json(folder / f"summary.rank{r}.json") for r in (0, 1)]


def test_every_stage_exits_0(chain) -> None:
    _, _, runs = chain
    assert [(r.stage, r.returncode) for r in runs] == [(stage, 0) for stage, _ in STAGES], runs[-1].stderr[-3000:]


def test_pretrain_starts_from_the_named_coca_checkpoint(chain) -> None:
    root, s, _ = chain
    summary = _json(_dir(root, "pretrain_captioner", "summary.json"))
    assert (summary["processes"], summary["runtime"], summary["steps"], summary["samples_seen"]) == (2, "zero2", 1, 4)
    assert summary["vocab_size"] == 49408  # open_clip's BPE, as coca_ViT-L-14's
    export = _dir(root, "pretrain_captioner", "captioner")
    registered = _json(s.open_clip_configs / f"{SMALL_COCA}.json")
    assert _json(export / f"{SMALL_COCA}.json") == {**registered, "custom_text": True}
    # one step at the warm-up's first lr (1e-4 * 1/500) moves a weight by ~2e-6: the loader read the file
    start = torch.load(s.coca, weights_only=True)
    after = load_file(export / "open_clip_model.safetensors")
    assert start.keys() == after.keys()
    assert max((after[k] - start[k]).abs().max().item() for k in start if start[k].is_floating_point()) < 1e-4
    assert any(not torch.equal(after[k], start[k]) for k in start)


@pytest.mark.parametrize("style", ["ssc", "dsc"])
def test_finetunes_train_the_text_heads_on_curated_samples(chain, style: str) -> None:
    root, _, _ = chain
    summary = _json(_dir(root, "finetune_captioner", style, "summary.json"))
    assert (summary["processes"], summary["runtime"], summary["steps"], summary["samples_seen"]) == (2, "zero2", 1, 4)
    assert summary["filtered_samples"]["not_curated"] > 0
    tuned = load_file(_dir(root, "finetune_captioner", style, "captioner", "open_clip_model.safetensors"))
    base = load_file(_dir(root, "pretrain_captioner", "captioner", "open_clip_model.safetensors"))
    assert all(torch.equal(tuned[k], base[k]) for k in base if k.startswith("visual."))  # the preset freezes it
    assert any(not torch.equal(tuned[k], base[k]) for k in base if k.startswith("text_decoder."))


@pytest.mark.parametrize(("run", "folder", "samples"), [("recaption", "shards", TRAIN_SAMPLES),
                                                         ("recaption_heldout", "heldout", HELDOUT_SAMPLES)])
def test_recaption_writes_both_captions_into_every_sample(chain, run: str, folder: str, samples: int) -> None:
    root, _, _ = chain
    ranks = _ranks(_dir(root, run))
    assert sum(r["images_captioned"] for r in ranks) == samples and sum(r["failures"] for r in ranks) == 0
    weights = {style: _dir(root, "finetune_captioner", style, "captioner", "open_clip_model.safetensors")
               for style in ("ssc", "dsc")}
    sha = {style: hashlib.sha256(path.read_bytes()).hexdigest() for style, path in weights.items()}
    keys = 0
    for shard in sorted(_dir(root, "recaption", folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = {m.name for m in tar.getmembers()}
            for json_name in sorted(n for n in names if n.endswith(".json")):
                key = json_name[: -len(".json")]
                assert {f"{key}.ssc.txt", f"{key}.dsc.txt", f"{key}.jpg", f"{key}.txt"} <= names
                lineage = json.loads(tar.extractfile(json_name).read())["recaption"]
                assert {k: v["captioner_sha256"] for k, v in lineage.items()} == sha
                keys += 1
    assert keys == samples


def test_cache_holds_sd_shaped_latents_and_t5_states(chain) -> None:
    from data_pipeline import latent_cache

    root, _, _ = chain
    ranks = _ranks(_dir(root, "cache"))
    assert sum(r["samples_cached"] for r in ranks) == TRAIN_SAMPLES and ranks[0]["resolutions"] == [RESOLUTION]
    with tarfile.open(sorted(_dir(root, "cache", "shards").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(latent_cache.CACHE_MEMBER))
        entry = latent_cache.decode_entry(tar.extractfile(member).read())
    latents = entry[latent_cache.latents_name(RESOLUTION)]
    assert latents.dtype == torch.bfloat16 and latents.shape[0] == 4  # the SD VAE's 4 latent channels
    assert tuple(entry[latent_cache.bucket_name(RESOLUTION)].tolist()) == tuple(8 * n for n in latents.shape[1:])[::-1]
    assert entry[latent_cache.states_name("txt")].shape[1] == 32  # the substitute T5's d_model


def test_train_t2i_under_zero2_exports_the_pretrained_encoders(chain) -> None:
    root, s, _ = chain
    summary = _json(_dir(root, "train_t2i", "summary.json"))
    assert (summary["processes"], summary["runtime"], summary["steps"], summary["samples_seen"]) == (2, "zero2", 2, 8)
    pipeline = _dir(root, "train_t2i", "pipeline")
    for exported, source in ((pipeline / "text_encoder" / "model.safetensors", s.t5 / "model.safetensors"),
                             (pipeline / "vae" / "diffusion_pytorch_model.safetensors",
                              s.vae / "diffusion_pytorch_model.safetensors")):
        a, b = load_file(exported), load_file(source)
        assert a.keys() <= b.keys() and all(torch.equal(a[k], b[k]) for k in a), exported  # frozen, as loaded
    assert _json(pipeline / "tokenizer" / "tokenizer_config.json")["tokenizer_class"] == "T5Tokenizer"
    assert _json(pipeline / "vae" / "config.json")["scaling_factor"] == 0.18215


@pytest.mark.parametrize(("stage", "started"), [("sample", "INFO sample: 2 prompt(s) at 64x64"),
                                               ("evaluate", "INFO evaluate: 4 held-out samples")])
def test_sample_and_evaluate_run_once_under_the_presets_torchrun(chain, stage: str, started: str) -> None:
    root, _, runs = chain
    run = next(r for r in runs if r.stage == stage)
    assert f"recap {stage}: runs in one process (launcher=torchrun" in run.stderr
    log = _dir(root, stage, "logs", f"{stage}.rank0.log").read_text()
    assert log.count(started) == 1  # not one per torchrun process, all appending to this log


def test_sample_draws_each_prompt_at_the_asked_size(chain) -> None:
    root, _, _ = chain
    images = sorted(_dir(root, "sample", "images").glob("*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (RESOLUTION, RESOLUTION) for p in images)


def test_evaluate_judges_with_the_vit_b32_checkpoint_and_recaptioned_references(chain) -> None:
    root, s, _ = chain
    evaluation = _json(_dir(root, "evaluate", "evaluation.json"))
    assert evaluation["clip"] == f"ViT-B-32-quickgelu ({s.clip})" and evaluation["probe"] is None
    assert evaluation["samples"] == 4 and evaluation["size"] == RESOLUTION
    refs = evaluation["dsc_references"]  # the held-out shards have no toy ground truth to fall back on
    assert refs["gt_dsc"] == 0 and refs["dsc.txt"] + refs["empty dsc.txt"] == 4
    assert set(evaluation["results"]) == {"generated_from_alt_text", "generated_from_dsc", "real", "vae_round_trip"}
