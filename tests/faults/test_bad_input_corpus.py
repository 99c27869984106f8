"""Every data-reading stage over the bad-input corpus (tests/faults/corpus.py), through the CLI as
a user runs it: no traceback, the documented exit code, and per-reason counts equal to what the
corpus holds.

The readers run with one stream in shard order (``num_workers=0``, ``open_shards=1``,
``shuffle=false``) so that a training stage whose steps take each good sample once has met every
fault exactly once, and with ``max_fault_fraction=1.0``: the corpus is mostly faults, and the
budget's abort is tested on its own (tests/data_pipeline/test_reader_faults.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.faults.corpus import (CAPTION_FAULTS, CROSS_SHARD_REPEATS, GOOD_IMAGES, GOOD_WITH_CAPTION, NOT_TAR_SHARDS, Corpus,
                                 write_corpus)
from tests.faults.runs import t2i_args
from tests.helpers import TINY_COCA, run_recap, toy_tokenizer

pytestmark = pytest.mark.slow
READER = ["data.reader.num_workers=0", "data.reader.open_shards=1", "data.reader.shuffle=false",
          "data.reader.max_fault_fraction=1.0"]
QUIET = ["logger.wandb.mode=disabled", "logger.progress=false"]
SMALL_COCA = ["captioner=coca_tiny", "captioner.architecture.vision_cfg.layers=1",
              "captioner.architecture.text_cfg.layers=1", "captioner.architecture.multimodal_cfg.layers=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> dict[str, Any]:
    """The corpus, an exported tiny captioner, a tiny VAE and tokenizer, good held-out data."""
    from data_pipeline.caption_tokenizer import save_tokenizer
    from models.captioner import build_captioner, export_captioner
    from models.vae import build_vae

    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    captioner = export_captioner(build_captioner("coca_ViT-B-32", TINY_COCA), TINY_COCA, root / "captioner",
                                 "coca_ViT-B-32")
    build_vae([8, 16, 16, 16], layers_per_block=1, norm_num_groups=8).save_pretrained(root / "vae")
    return {"root": root, "corpus": write_corpus(root), "captioner": captioner, "vae": root / "vae",
            "tokenizer": save_tokenizer(toy_tokenizer(24), root / "tokenizer"), "heldout": toy_data / "heldout"}


def _run(stage: str, args: list[str]) -> tuple[int, str]:
    result = run_recap([stage, *args, *QUIET], timeout=600)
    return result.returncode, result.stderr


def _summary(root: Path, stage: str) -> dict[str, Any]:
    return json.loads((root / "toy" / stage / "summary.json").read_text())


def _shard_job_outcome(code: int, stderr: str, out: Path, stats_suffix: str, corpus: Corpus) -> dict[str, Any]:
    """What a shard job (recaption, cache) did with the corpus, in the form the test expects."""
    stats = {p.name.removesuffix(stats_suffix) + ".tar": json.loads(p.read_text())["failures_by_reason"]
             for p in sorted(out.glob(f"*{stats_suffix}"))}
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return {"code": code, "traceback": "Traceback" in stderr, "per_shard": stats, **({"stderr": stderr[-1500:]} if code != 3 else {}),
            "not_done": sorted(p.name for p in corpus.shards.glob("*.tar") if p.name not in stats),
            "names_bad_shards": all(f"{n} (not_a_tar: " in last for n in NOT_TAR_SHARDS),
            "repeats_warned": f"{CROSS_SHARD_REPEATS} key(s) were written to more than one of the" in stderr}


def test_every_data_reading_stage_over_the_bad_input_corpus(world: dict[str, Any]) -> None:
    root, corpus = world["root"], world["corpus"]
    runs = root / "runs"
    base = [f"run.root={runs}", *READER]
    inputs = {"shards": corpus.shards, "vae": world["vae"], "tokenizer": world["tokenizer"]}
    got: dict[str, Any] = {}
    want: dict[str, Any] = {}

    # Shard jobs: the not-a-tar shards are neither written nor done (exit 3, named in one line);
    # every other shard is done, its stats counting its faults; the repeated key is warned about.
    shard_job = {"code": 3, "traceback": False, "per_shard": corpus.per_shard_faults(), "not_done": list(NOT_TAR_SHARDS),
                 "names_bad_shards": True, "repeats_warned": True}
    out = root / "recaptioned"
    code, err = _run("recaption", [*base, f"recaption.input={corpus.shards}", f"recaption.output={out}",
                                   "recaption.keys=[ssc]", f"recaption.captioners.ssc={world['captioner']}",
                                   "recaption.batch_size=4", "recaption.num_workers=0", "recaption.decoding.max_length=8"])
    got["recaption"], want["recaption"] = _shard_job_outcome(code, err, out, ".recaption.json", corpus), shard_job
    out = root / "cached"
    code, err = _run("cache", [*base, f"cache.input={corpus.shards}", f"cache.output={out}", "cache.keys=[txt]",
                               "cache.batch_size=4", "cache.num_workers=0", *t2i_args(runs, inputs)[1:]])
    got["cache"], want["cache"] = _shard_job_outcome(code, err, out, ".cache.json", corpus), shard_job

    # Readers: every good image (or captioned sample) used once, every fault counted once.
    code, err = _run("caption", [*base, f"caption.input={corpus.shards}", f"caption.captioner={world['captioner']}",
                                 f"caption.output={root / 'captions.jsonl'}", "caption.decoding.max_length=8"])
    got["caption"] = {"code": code, "traceback": "Traceback" in err, **({"stderr": err[-1500:]} if code else {}),
                      **({k: _summary(runs, "caption")[k] for k in ("images", "skipped_by_reason")} if code == 0 else {})}
    want["caption"] = {"code": 0, "traceback": False, "images": GOOD_IMAGES,
                       "skipped_by_reason": corpus.reader_faults(captions=False)}

    training = {
        "train_vae": ["train-vae", f"data.train={corpus.shards}", f"data.heldout={world['heldout']}",
                      "train_vae.steps=3", "train_vae.global_batch_size=4", "train_vae.micro_batch_size=4",
                      "train_vae.resolution=32", "vae.block_out_channels=[8,8,8,8]", "vae.norm_num_groups=8",
                      "train_vae.heldout_images=0"],
        "pretrain_captioner": ["pretrain-captioner", f"data.train={corpus.shards}", f"data.heldout={world['heldout']}",
                               *SMALL_COCA, "pretrain_captioner.steps=2", "pretrain_captioner.global_batch_size=5",
                               "pretrain_captioner.micro_batch_size=5"],
        "train_t2i": [*(a for a in t2i_args(runs, inputs) if not a.startswith("train_t2i.stages=")),
                      "train_t2i.stages=[{resolution: 64, steps: 5, global_batch_size: 2, micro_batch_size: 2}]",
                      "caption_mix.dsc=0.0"],
    }
    samples = {"train_vae": GOOD_IMAGES, "pretrain_captioner": GOOD_WITH_CAPTION, "train_t2i": GOOD_WITH_CAPTION}
    for stage, (name, *args) in training.items():
        code, err = _run(name, [*base, *args])
        summary = _summary(runs, stage) if code == 0 else {}
        got[stage] = {"code": code, "traceback": "Traceback" in err, "samples": summary.get("samples_seen"),
                      "skipped": summary.get("skipped_samples"), **({"stderr": err[-1500:]} if code else {})}
        want[stage] = {"code": 0, "traceback": False, "samples": samples[stage],
                       "skipped": corpus.reader_faults(captions=stage == "pretrain_captioner")}
        if stage == "train_t2i":  # captions come through the caption mix: its count of samples without one
            got[stage]["without_caption"] = summary.get("samples_without_caption")
            want[stage]["without_caption"] = sum(CAPTION_FAULTS.values())
    assert got == want
