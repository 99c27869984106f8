"""A captioner with a small fitted tokenizer: the model's vocabulary is the tokenizer's, training and
our decoder use its ids, and the exported folder carries it so that plain open_clip loads model
and tokenizer (in another process, from another directory, after the folder moved). open_clip's
49k BPE path stays as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from data_pipeline.caption_tokenizer import save_tokenizer, train_captioner_tokenizer
from models.caption_decoding import DecodingOptions, content_tokens, decode_text, generate_tokens
from models.captioner import (CONFIG_FILE, WEIGHTS_FILE, CaptionerTraining, build_captioner, caption_loss,
                              export_captioner, load_exported, load_exported_tokenizer, tokenizer, with_vocab_size)
from models.captioner_tokenizer import OPEN_CLIP_IDS, SpecialIds, fitted_tokenizer
from tests.helpers import TINY_COCA, run_without_recap
from train.captioning.exported import load_captioner

VOCAB = 160
ARCH = {**TINY_COCA, **{tower: {k: v for k, v in TINY_COCA[tower].items() if k != "vocab_size"}
                        for tower in ("text_cfg", "multimodal_cfg")}}  # vocab_size filled in by with_vocab_size
CORPUS = [f"a {size} {colour} {shape} in the {place} on a {bg} background."
          for size in ("small", "large") for colour in ("red", "blue", "green") for shape in ("circle", "star")
          for place in ("top left", "centre") for bg in ("beige", "dark gray")]
CAPTIONS = ["a large red circle in the top left on a beige background.", "A small Blue star.", "IMG_4821.jpg",
            'the word "apple" is written in green']
# Plain open_clip, in a fresh interpreter where this repository cannot be imported (tests/helpers.py).
OPEN_CLIP_SCRIPT = r"""
import sys
import transformers
transformers.BeamSearchScorer = None  # else open_clip 3.3 turns generate off under transformers 5 (docs/captioner.md)
import torch, open_clip
folder, captions, out = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tok = open_clip.get_tokenizer("local-dir:" + folder)
hf = tok.tokenizer
ids = tok(captions)
images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    generated = model.eval().generate(images, generation_type="top_k", top_k=1, seq_len=16, min_seq_len=3,
                                      sot_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                                      pad_token_id=hf.pad_token_id)
    features = model.encode_text(ids)
decoded = [hf.decode(row, skip_special_tokens=True) for row in ids]
torch.save({"tokenizer": type(tok).__name__, "ids": ids, "decoded": decoded,
            "special": (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id), "generated": generated,
            "images": images, "features": features, "vocab": model.text.vocab_size}, out)
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    folder = save_tokenizer(train_captioner_tokenizer(CORPUS, vocab_size=VOCAB, max_tokens=76),
                            tmp_path_factory.mktemp("fitted") / "tokenizer")
    return fitted_tokenizer(folder, context_length=76)


@pytest.fixture(scope="module")
def coca(fitted) -> open_clip.CoCa:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_captioner("coca_small_vocab", with_vocab_size(ARCH, fitted.vocab_size))
        with torch.no_grad():  # longer captions from a random model: EOT and pad columns pushed down
            model.text_decoder.text_projection[:, [fitted.ids.eot, fitted.ids.pad]] -= 0.5
    return model.eval()


def test_model_vocabulary_is_the_tokenizers(coca: open_clip.CoCa, fitted) -> None:
    assert fitted.fitted and fitted.ids == SpecialIds(sot=1, eot=2, pad=0) and fitted.vocab_size == VOCAB
    assert coca.text.token_embedding.num_embeddings == coca.text_decoder.text_projection.shape[1] == VOCAB
    fitted.check_model(coca)
    big = build_captioner("coca_big_vocab", with_vocab_size(ARCH, 49408))
    with pytest.raises(ValueError, match="differs from its tokenizer's"):
        fitted.check_model(big)
    with pytest.raises(ValueError, match="text_cfg.vocab_size=49408 but the tokenizer has 160 tokens"):
        with_vocab_size(TINY_COCA, VOCAB)
    with pytest.raises(ValueError, match="its tokenizer is the fitted one"):
        tokenizer(coca)


def test_captions_encode_with_the_small_ids(fitted) -> None:
    ids = fitted(CAPTIONS)
    assert ids.shape == (4, 76) and ids.dtype == torch.long and int(ids.max()) < VOCAB
    ends = (ids == 2).int().argmax(dim=1)
    for row, end in zip(ids, ends.tolist()):
        assert row[0] == 1 and (row == 2).sum() == 1 and (row[end + 1:] == 0).all() and (row[1:end] > 3).all()
    assert [fitted.decode(row.tolist()) for row in ids] == [c.lower() for c in CAPTIONS]


def test_training_forward_equals_open_clip_with_the_small_ids(coca: open_clip.CoCa, fitted) -> None:
    """Our shortened forward finds the fitted EOT (id 2): same loss as open_clip's full forward."""
    texts = fitted(CAPTIONS)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = CaptionerTraining(coca, caption_loss(contrastive_weight=1.0, caption_weight=2.0, pad_id=fitted.ids.pad),
                             eot_id=fitted.ids.eot)(images, texts)
    full = coca(images, texts)
    contrastive, caption = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)(
        full["image_features"], full["text_features"], full["logits"], full["labels"], full["logit_scale"])
    assert ours["caption"].item() == pytest.approx(caption.item(), rel=1e-5)
    assert ours["loss"].item() == pytest.approx((contrastive + caption).item(), rel=1e-5)


def test_decoder_needs_the_tokenizers_ids(coca: open_clip.CoCa, fitted) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="outside the model's 160-token vocabulary"):
        generate_tokens(coca, images, DecodingOptions(max_length=8))  # open_clip's BPE ids by default
    for options in (DecodingOptions(max_length=12, min_length=3), DecodingOptions(strategy="beam", max_length=12)):
        ids = generate_tokens(coca, images, options, **fitted.generation_ids())
        assert len(ids) == 2 and all(0 < len(row) <= 10 and 3 < min(row) and max(row) < VOCAB for row in ids)


def test_export_with_the_fitted_tokenizer_loads_in_plain_open_clip_elsewhere(coca: open_clip.CoCa, fitted,
                                                                             tmp_path: Path) -> None:
    exported = export_captioner(coca, with_vocab_size(ARCH, VOCAB), tmp_path / "run" / "captioner",
                                "coca_small_vocab", fitted)
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, "coca_small_vocab.json", "tokenizer.json", "tokenizer_config.json"])
    model_cfg = json.loads((exported / CONFIG_FILE).read_text())["model_cfg"]
    assert model_cfg["text_cfg"]["hf_tokenizer_name"] == str(exported.resolve())
    assert model_cfg["text_cfg"]["vocab_size"] == model_cfg["multimodal_cfg"]["vocab_size"] == VOCAB

    # the folder moves; open_clip runs in another directory and gets a relative path
    moved = tmp_path / "moved" / "captioner"
    shutil.copytree(exported, moved)
    shutil.rmtree(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_without_recap(OPEN_CLIP_SCRIPT, ["../moved/captioner", "|".join(CAPTIONS), str(tmp_path / "out.pt")],
                               elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["tokenizer"] == "HFTokenizer" and theirs["vocab"] == VOCAB and theirs["special"] == (1, 2, 0)
    assert torch.equal(theirs["ids"], fitted(CAPTIONS)) and theirs["decoded"] == [c.lower() for c in CAPTIONS]
    with torch.no_grad():
        assert torch.equal(theirs["features"], coca.encode_text(theirs["ids"]))
    generated = theirs["generated"]
    assert generated[:, 0].eq(1).all() and int(generated.max()) < VOCAB

    # our loaders read the same folder: same tokenizer, and greedy decoding gives open_clip's tokens
    model, tok = load_captioner(str(moved), "caption.captioner")
    assert tok.fitted and tok.folder == moved and torch.equal(tok(CAPTIONS), theirs["ids"])
    options = DecodingOptions(max_length=16, min_length=3)
    ours = generate_tokens(model, theirs["images"], options, **tok.generation_ids())
    assert ours == [content_tokens(row, eot_id=2, pad_id=0) for row in generated.tolist()]
    assert all(len(row) > 0 and max(row) < VOCAB for row in ours)
    assert all(decode_text(row, tok) for row in ours)  # text, no special tokens
    assert load_exported_tokenizer(moved).ids == tok.ids


def test_export_by_name_reads_the_tokenizer_from_the_exported_path(coca: open_clip.CoCa, fitted,
                                                                  tmp_path: Path) -> None:
    """open_clip's other route: add_model_config + get_tokenizer(name) follows hf_tokenizer_name."""
    exported = export_captioner(coca, with_vocab_size(ARCH, VOCAB), tmp_path / "captioner", "coca_small_named", fitted)
    open_clip.add_model_config(exported / "coca_small_named.json")
    by_name = open_clip.get_tokenizer("coca_small_named")
    assert isinstance(by_name, open_clip.tokenizer.HFTokenizer) and torch.equal(by_name(CAPTIONS), fitted(CAPTIONS))
    model = open_clip.create_model("coca_small_named", pretrained=str(exported / WEIGHTS_FILE))
    assert model.text.vocab_size == VOCAB


def test_open_clip_bpe_path_is_unchanged(tmp_path: Path) -> None:
    """No fitted tokenizer: the toy architecture without vocab_size is the old explicit one, the
    export has no tokenizer files, and everyone reads open_clip's BPE."""
    assert with_vocab_size(ARCH, 49408) == TINY_COCA
    torch.manual_seed(0)
    model = build_captioner("coca_test_bpe", with_vocab_size(ARCH, 49408))
    exported = export_captioner(model, TINY_COCA, tmp_path / "captioner", "coca_test_bpe")
    assert sorted(p.name for p in exported.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "coca_test_bpe.json"])
    assert "hf_tokenizer_name" not in json.loads((exported / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    assert isinstance(open_clip.get_tokenizer(f"local-dir:{exported}"), open_clip.tokenizer.SimpleTokenizer)
    ours = load_exported_tokenizer(exported)
    assert not ours.fitted and ours.ids == OPEN_CLIP_IDS and ours.vocab_size == 49408
    ids = ours(CAPTIONS[:2])
    assert torch.equal(ids, open_clip.tokenizer.SimpleTokenizer(context_length=76)(CAPTIONS[:2]))
    assert torch.equal(ids, tokenizer(load_exported(exported))(CAPTIONS[:2]))
    assert ours.generation_ids() == {"sot_id": 49406, "eot_id": 49407, "pad_id": 0}
    content = content_tokens(ids[0].tolist())
    assert ours.decode(content) == decode_text(content, open_clip.tokenizer.SimpleTokenizer()) == (
        "a large red circle in the top left on a beige background .")  # open_clip's BPE spaces punctuation


def test_export_refuses_a_config_naming_a_tokenizer_it_does_not_get(coca: open_clip.CoCa, tmp_path: Path) -> None:
    config = with_vocab_size(ARCH, VOCAB)
    config["text_cfg"]["hf_tokenizer_name"] = "/somewhere/else"
    with pytest.raises(ValueError, match="export it with the captioner"):
        export_captioner(coca, config, tmp_path / "captioner", "coca_small_vocab")
    assert not (tmp_path / "captioner").exists()
