"""Stage 1 end to end through the CLI: pretrain -> finetune ssc/dsc -> caption -> evaluate.

Tiny step counts: this checks the stages' contracts (outputs, formats, guards, resume), not
caption quality (that is the toy experiment's job; see docs/captioner.md for measured numbers).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer

from data_pipeline.caption_tokenizer import train_captioner_tokenizer
from tests.data_pipeline.dp_testlib import huge_png
from tests.helpers import logged_losses, run_recap, run_stage
from train.config.loading import load_experiment
from train.config.typed import ConfigError
from train.training import checkpoint_files as files

pytestmark = pytest.mark.slow
SMALL = ["captioner.architecture.vision_cfg.layers=1", "captioner.architecture.text_cfg.layers=1",
         "captioner.architecture.multimodal_cfg.layers=1", "logger.wandb.mode=disabled", "logger.progress=false",
         "data.reader.num_workers=1"]


def _common(root: Path, toy_data: Path) -> list[str]:
    return [f"run.root={root}", f"data.train={toy_data}/train", f"data.heldout={toy_data}/heldout", *SMALL]


def _ok(args: list[str], **kwargs) -> str:
    result = run_recap(args, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_captioner_stages_end_to_end(toy_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    common = [*_common(root, toy_data), "captioner=coca_tiny"]  # open_clip's BPE (the fitted one: below)
    # the training stages run in this process (the CLI path is what the caption calls below and the
    # DDP/ZeRO tests exercise); each saves an interpreter start-up
    run_stage("pretrain_captioner", [*common, "pretrain_captioner.steps=2", "pretrain_captioner.global_batch_size=8",
                                     "pretrain_captioner.micro_batch_size=4"])
    pretrain = root / "toy" / "pretrain_captioner"
    records = [json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] == pytest.approx(r["contrastive"] + r["caption"], rel=1e-5) for r in records)
    assert sorted(p.name for p in (pretrain / "captioner").iterdir()) == [
        "coca_toy.json", "open_clip_config.json", "open_clip_model.safetensors"]

    for style, contrastive in (("ssc", 0.0), ("dsc", 0.5)):  # DSC also with CoCa's contrastive loss
        run_stage("finetune_captioner", [f"style={style}", *common, "finetune_captioner.steps=2",
                                         "finetune_captioner.freeze_image_tower=true",
                                         f"finetune_captioner.contrastive_weight={contrastive}",
                                         "finetune_captioner.global_batch_size=4", "finetune_captioner.micro_batch_size=4"])
        out = root / "toy" / "finetune_captioner" / style
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["filtered_samples"]["not_curated"] > 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all((r["contrastive"] > 0) == (contrastive > 0) for r in records)
        assert all(r["loss"] == pytest.approx(r["contrastive"] + r["caption"], rel=1e-5) for r in records)
        # the image tower was frozen: SSC and DSC share it bit for bit with the pretrained model
        tuned = load_file(out / "captioner" / "open_clip_model.safetensors")
        base = load_file(pretrain / "captioner" / "open_clip_model.safetensors")
        assert all(torch.equal(tuned[k], base[k]) for k in base if k.startswith("visual."))
        assert any(not torch.equal(tuned[k], base[k]) for k in base if k.startswith("text_decoder."))
        # the logit scale only feeds the contrastive loss: trained with it, frozen without it
        assert torch.equal(tuned["logit_scale"], base["logit_scale"]) == (contrastive == 0)

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(64, 64), (128, 64), (48, 96)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(images / f"img{i}.png")
    (images / "bomb.png").write_bytes(huge_png())  # a 20000 x 20000 header: skipped before decoding
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = _ok(["caption", *common, f"caption.input={images}", "caption.decoding.max_length=12"])
    lines = [line for line in out.splitlines() if line.startswith(str(images)) and "\t" in line]
    assert [line.split("\t")[0] for line in lines] == [str(images / f"img{i}.png") for i in range(3)]
    summary = json.loads((root / "toy" / "caption" / "summary.json").read_text())
    assert summary["images"] == 3 and summary["skipped_by_reason"] == {"image_too_large": 1, "undecodable_image": 1}
    assert "skipped 2 images: image_too_large=1, undecodable_image=1" in out and "Traceback" not in out
    readme = run_recap(["caption", *common, "caption.input=README.md"])  # neither images nor shards
    assert readme.returncode == 2 and readme.stderr.strip().splitlines()[-1] == (
        "recap caption: error: caption.input: README.md is neither an image (.jpg, .jpeg, .png, .webp), a folder of "
        "images nor shards (.tar)")
    (tmp_path / "page.tar").write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    page = run_recap(["caption", *common, f"caption.input={tmp_path / 'page.tar'}"])
    assert page.returncode == 3 and page.stderr.strip().splitlines()[-1] == (
        f"recap caption: error: no image of {tmp_path / 'page.tar'} could be captioned; skipped: not_a_tar=1")
    jsonl = tmp_path / "captions.jsonl"
    _ok(["caption", *common, f"caption.input={toy_data}/heldout", f"caption.output={jsonl}", "caption.limit=5",
         "caption.decoding.strategy=beam", "caption.decoding.num_beams=2", "caption.decoding.max_length=12"])
    captions = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(captions) == 5 and all(0 <= c["tokens"] <= 10 for c in captions)

    out = _ok(["evaluate-captioner", *common, "evaluate_captioner.samples=16", "evaluate_captioner.batch_size=8",
               "evaluate_captioner.decoding.max_length=20"])
    report = json.loads((root / "toy" / "evaluate_captioner" / "caption_eval.json").read_text())
    assert report["samples"] == 16
    assert list(report["results"]) == ["alt-text", "ssc", "dsc", "gt_ssc", "gt_dsc"]
    assert report["results"]["gt_dsc"]["overall"]["recall"] == 1.0  # the scorer reads everything a DSC says
    # the control: a true DSC scored against another scene's ground truth is mostly wrong
    assert report["results"]["gt_dsc"]["other_image"]["recall"] < 0.5
    assert report["results"]["gt_dsc"]["captions"] == 16 and len(report["examples"]["dsc"]) == 8
    assert "colour_shape" in out and "gt_dsc" in out and "vs other image" in out  # the table was printed


def test_pretrain_resumes_bit_identically(toy_data: Path, tmp_path: Path) -> None:
    args = ["pretrain-captioner", "pretrain_captioner.steps=4", "pretrain_captioner.global_batch_size=8",
            "pretrain_captioner.micro_batch_size=4", "checkpoint.every_steps=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_stage("pretrain_captioner", [*args[1:], *_common(straight, toy_data)])
    assert run_recap([*args, *_common(killed, toy_data)], env={"RECAP_FAULT": "sigkill@step=3"}).returncode != 0
    assert files.committed_steps(killed / "toy" / "pretrain_captioner" / "checkpoints") == [2]
    run_stage("pretrain_captioner", [*args[1:], *_common(killed, toy_data)])
    a, b = logged_losses(straight / "toy" / "pretrain_captioner"), logged_losses(killed / "toy" / "pretrain_captioner")
    assert {s: v[-1] for s, v in b.items()} == {s: v[0] for s, v in a.items()} and b[3] == [a[3][0]] * 2
    weights = "toy/pretrain_captioner/captioner/open_clip_model.safetensors"
    wa, wb = load_file(straight / weights), load_file(killed / weights)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_captioner_stages_under_ddp(toy_data: Path, tmp_path: Path) -> None:
    """2 processes: the contrastive loss gathers features across ranks; caption-only fine-tuning
    with an unfrozen image tower leaves no parameter without a gradient (DDP would refuse)."""
    ddp = ["launcher=torchrun", "launcher.nproc_per_node=2", "runtime=ddp", *_common(tmp_path, toy_data)]
    _ok(["pretrain-captioner", *ddp, "pretrain_captioner.steps=2", "pretrain_captioner.global_batch_size=8",
         "pretrain_captioner.micro_batch_size=2"])
    records = [json.loads(line) for line in (tmp_path / "toy" / "pretrain_captioner" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["contrastive"] > 0 for r in records)
    _ok(["finetune-captioner", "style=dsc", *ddp, "finetune_captioner.steps=2", "finetune_captioner.freeze_image_tower=false",
         "finetune_captioner.global_batch_size=4", "finetune_captioner.micro_batch_size=2"])
    summary = json.loads((tmp_path / "toy" / "finetune_captioner" / "dsc" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["samples_seen"] == 8


def test_captioner_under_deepspeed_zero(toy_data: Path, tmp_path: Path) -> None:
    """Pretraining under ZeRO-2 (CoCa's 0-dim logit_scale through DeepSpeed's broadcast), then
    fine-tuning under ZeRO-3 (parameters partitioned): the frozen tower stays bit-identical."""
    common = _common(tmp_path, toy_data)
    torchrun = ["launcher=torchrun", "launcher.nproc_per_node=2", *common]
    _ok(["pretrain-captioner", *torchrun, "runtime=zero2", "pretrain_captioner.steps=1",
         "pretrain_captioner.global_batch_size=4", "pretrain_captioner.micro_batch_size=2"])
    pretrain = json.loads((tmp_path / "toy" / "pretrain_captioner" / "summary.json").read_text())
    assert (pretrain["processes"], pretrain["runtime"], pretrain["samples_seen"]) == (2, "zero2", 4)
    zero3 = [*torchrun, "runtime=zero3"]
    _ok(["finetune-captioner", "style=ssc", *zero3, "finetune_captioner.steps=2", "finetune_captioner.freeze_image_tower=true",
         "finetune_captioner.global_batch_size=4", "finetune_captioner.micro_batch_size=2"])
    summary = json.loads((tmp_path / "toy" / "finetune_captioner" / "ssc" / "summary.json").read_text())
    assert (summary["processes"], summary["runtime"], summary["samples_seen"]) == (2, "zero3", 8)
    tuned = load_file(tmp_path / "toy" / "finetune_captioner" / "ssc" / "captioner" / "open_clip_model.safetensors")
    base = load_file(tmp_path / "toy" / "pretrain_captioner" / "captioner" / "open_clip_model.safetensors")
    assert tuned.keys() == base.keys() and base["logit_scale"].shape == tuned["logit_scale"].shape == ()
    assert all(torch.equal(tuned[k], base[k]) for k in base if k.startswith("visual."))
    assert any(not torch.equal(tuned[k], base[k]) for k in base if k.startswith("text_decoder."))


def _fit_corpus(shards: Path) -> list[str]:
    """What pretrain-captioner may fit its tokenizer on: every alt-text, and the ground-truth
    captions of curated samples only (read straight from the tars)."""
    texts = []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    texts.append(tar.extractfile(member).read().decode())
                elif member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    texts += [meta["gt_ssc"], meta["gt_dsc"]] if meta.get("curated") is True else []
    return [t for t in texts if t.strip()]


def test_captioner_stages_with_a_fitted_tokenizer(toy_data: Path, tmp_path: Path) -> None:
    """captioner.fitted_vocab_size: pretrain fits the tokenizer on alt-text + curated ground truth
    (not the rest of the ground truth), the towers get its size, and fine-tuning, caption,
    evaluate-captioner and recaption read it from the exported folders."""
    root = tmp_path / "runs"
    common = [*_common(root, toy_data), "captioner=coca_tiny_small_vocab", "captioner.fitted_vocab_size=300"]
    summary = run_stage("pretrain_captioner", [*common, "pretrain_captioner.steps=2",
                                               "pretrain_captioner.global_batch_size=8",
                                               "pretrain_captioner.micro_batch_size=4"])
    pretrain = root / "toy" / "pretrain_captioner"
    assert summary["vocab_size"] == 300 and summary["steps"] == 2
    assert sorted(p.name for p in (pretrain / "captioner").iterdir()) == [
        "coca_toy.json", "open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    expected = train_captioner_tokenizer(_fit_corpus(toy_data / "train"), vocab_size=300, max_tokens=76)
    fitted = Tokenizer.from_file(str(pretrain / "captioner" / "tokenizer.json")).to_str()
    assert fitted == expected.backend_tokenizer.to_str()
    assert Tokenizer.from_file(str(pretrain / "tokenizer" / "tokenizer.json")).to_str() == fitted
    weights = load_file(pretrain / "captioner" / "open_clip_model.safetensors")
    assert weights["text.token_embedding.weight"].shape[0] == weights["text_decoder.text_projection"].shape[1] == 300
    records = [json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(0 < r["caption"] < 2 * 7.0 for r in records)  # ~2 ln(300)

    run_stage("finetune_captioner", ["style=dsc", *common, "finetune_captioner.steps=2",
                                     "finetune_captioner.global_batch_size=4", "finetune_captioner.micro_batch_size=4"])
    dsc = root / "toy" / "finetune_captioner" / "dsc" / "captioner"
    model_cfg = json.loads((dsc / "open_clip_config.json").read_text())["model_cfg"]
    assert model_cfg["text_cfg"]["hf_tokenizer_name"] == str(dsc.resolve())
    assert Tokenizer.from_file(str(dsc / "tokenizer.json")).to_str() == fitted

    jsonl = tmp_path / "captions.jsonl"
    _ok(["caption", *common, f"caption.captioner={dsc}", f"caption.input={toy_data}/heldout",
         f"caption.output={jsonl}", "caption.limit=4", "caption.decoding.max_length=12"])
    captions = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(captions) == 4 and all(0 <= c["tokens"] <= 10 and isinstance(c["caption"], str) for c in captions)

    report = run_stage("evaluate_captioner", [*common, "~evaluate_captioner.captioners.ssc",
                                              f"evaluate_captioner.captioners.dsc={dsc}",
                                              "evaluate_captioner.samples=8", "evaluate_captioner.batch_size=4",
                                              "evaluate_captioner.decoding.max_length=12"])
    assert report["samples"] == 8 and 0.0 <= report["dsc_recall"] <= 1.0
    assert 1 <= report["dsc_distinct"] <= 8 and 0 <= report["dsc_stutters"] <= 8
    assert 0.0 <= report["dsc_colour_shape_recall"] <= 1.0
    out = tmp_path / "recaptioned"
    recaption = run_stage("recaption", [*common, f"recaption.input={toy_data}/train", f"recaption.output={out}",
                                        f"recaption.captioners.dsc={dsc}", "recaption.keys=[dsc]",
                                        "recaption.batch_size=16", "recaption.decoding.max_length=10"])
    assert recaption["images_captioned"] == 128 and recaption["failures"] == 0


def test_fitted_vocabulary_config_is_checked(toy_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(["captioner=coca_tiny_small_vocab", "captioner.pretrained=/models/coca.safetensors"])
    assert info.value.key == "captioner.fitted_vocab_size" and "without pretrained weights" in info.value.message
    with pytest.raises(ConfigError) as info:  # coca_tiny keeps open_clip's 49408 in its architecture
        load_experiment(["captioner=coca_tiny", "captioner.fitted_vocab_size=512"])
    assert info.value.key == "captioner.architecture.text_cfg.vocab_size"
    assert "is 49408 but the tokenizer has 512 tokens" in info.value.message
    with pytest.raises(ConfigError) as info:
        load_experiment(["captioner=coca_tiny_small_vocab", "captioner.fitted_vocab_size=64"])
    assert "must be >= 73" in info.value.message
    small = load_experiment(["captioner=coca_tiny_small_vocab", "captioner.fitted_vocab_size=1024"]).captioner
    assert small.architecture["text_cfg"]["vocab_size"] == small.architecture["multimodal_cfg"]["vocab_size"] == 1024
    tiny = load_experiment(["captioner=coca_tiny"]).captioner  # the same toy CoCa but for the vocabulary
    for tower in ("text_cfg", "multimodal_cfg"):
        small.architecture[tower]["vocab_size"] = tiny.architecture[tower]["vocab_size"]
    assert small.architecture == tiny.architecture and small.pretrained == tiny.pretrained is None
    checkpoint = tmp_path / "coca.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        run_stage("finetune_captioner", [*_common(tmp_path, toy_data), "captioner=coca_tiny_small_vocab",
                                         f"finetune_captioner.init_from={checkpoint}"])
    assert info.value.key == "finetune_captioner.init_from" and "exported folder" in info.value.message
