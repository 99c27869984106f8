"""The toy tokenizers: trained offline, saved in HF format; the T5's with T5's special-token
conventions, the captioner's with open_clip CoCa's (SOT/EOT around a caption, pad 0) at small ids."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest

from data_pipeline.caption_tokenizer import (load_tokenizer, save_tokenizer, train_caption_tokenizer,
                                             train_captioner_tokenizer)


def _corpus() -> list[str]:
    colours, shapes = ["red", "blue", "green", "orange", "purple"], ["circle", "square", "cross", "star", "heart"]
    out = []
    for i in range(600):
        c, s = colours[i % 5], shapes[(i // 5) % 5]
        out += [f"{c} {s}", f"a large striped {c} {s} in the top left", f'A {c} {s} on a beige background. The word "cat" is written in {c}.']
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_caption_tokenizer(_corpus(), vocab_size=300, max_tokens=32)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer")


def test_saved_in_hf_format_with_t5_special_ids(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(saved)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 32 and 100 < len(tok) <= 300


def test_words_of_the_corpus_are_single_tokens_and_text_round_trips(saved: Path) -> None:
    tok = load_tokenizer(saved)
    text = 'a large striped red cross in the top left. The word "cat" is written in red.'
    ids = tok(text)["input_ids"]
    assert ids[-1] == 1 and ids.count(1) == 1  # one </s>, at the end
    pieces = tok.convert_ids_to_tokens(ids)
    assert {"▁large", "▁striped", "▁red", "▁cross", "▁top", "▁left"} <= set(pieces)
    assert tok.decode(ids, skip_special_tokens=True) == text
    unseen = tok("zebra quokka")["input_ids"]
    assert 2 not in unseen and tok.decode(unseen, skip_special_tokens=True) == "zebra quokka"  # spelt, not <unk>


def test_batches_pad_right_with_masks_and_truncate_keeping_eos(saved: Path) -> None:
    tok = load_tokenizer(saved)
    enc = tok(["red circle", "a large striped red cross in the top left " * 8], padding="max_length",
              truncation=True, max_length=16, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (2, 16)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()
    assert mask[1].all() and ids[1, -1] == 1  # truncated inside the context, </s> kept


def test_too_small_a_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size 50 is too small"):
        train_caption_tokenizer(["a b"], vocab_size=50, max_tokens=8)


def _toy_texts(folder: Path) -> list[str]:
    """Every non-empty alt-text and ground-truth caption of the toy shards under ``folder``."""
    texts = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    texts.append(tar.extractfile(member).read().decode())
                elif member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    texts += [meta["gt_ssc"], meta["gt_dsc"]]
    return [t for t in texts if t.strip()]


@pytest.fixture(scope="module")
def captioner_saved(dp_toy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_captioner_tokenizer(_toy_texts(dp_toy.train), vocab_size=400, max_tokens=76)
    return save_tokenizer(tok, tmp_path_factory.mktemp("captioner_tok") / "tokenizer")


def test_captioner_tokenizer_has_coca_special_ids_and_exactly_its_vocab_size(captioner_saved: Path) -> None:
    assert sorted(p.name for p in captioner_saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(captioner_saved)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 400 and tok.model_max_length == 76
    assert tok("A red circle")["input_ids"] == [1, *tok("a red circle", add_special_tokens=False)["input_ids"], 2]


def test_toy_captions_round_trip_without_unk(dp_toy, captioner_saved: Path) -> None:
    """Held-out toy captions (alt-text, SSC, DSC; written words and file names included): no <unk>,
    SOT first and EOT last, and decoding gives the caption back (lowercased, as open_clip's BPE)."""
    tok = load_tokenizer(captioner_saved)
    heldout = _toy_texts(dp_toy.heldout)
    assert len(heldout) >= 16 and any('"' in t for t in heldout)  # some written words
    for text in heldout:
        ids = tok(text)["input_ids"]
        assert 3 not in ids and ids[0] == 1 and ids[-1] == 2 and max(ids) < 400, text
        assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    pieces = set(tok.convert_ids_to_tokens(tok(" ".join(heldout))["input_ids"]))
    assert {"▁background", "▁large", "▁small", "▁the", "▁shapes"} <= pieces  # toy words are single tokens


def test_small_corpus_fills_the_vocabulary_with_unused_tokens() -> None:
    tok = train_captioner_tokenizer(["a red circle", "a blue square"] * 3, vocab_size=120, max_tokens=16)
    unused = [t for t in tok.get_vocab() if t.startswith("<unused")]
    assert len(tok) == 120 and unused
    assert sorted(tok.convert_tokens_to_ids(unused)) == list(range(120 - len(unused), 120))  # the last ids
    ids = tok("Zebra: 42% of it!")["input_ids"]  # unseen words are spelt out, never <unk> or <unusedN>
    assert 3 not in ids and max(ids) < 120 - len(unused)
    assert tok.decode(ids, skip_special_tokens=True) == "zebra: 42% of it!"


def test_captioner_fit_is_deterministic_and_order_free(dp_toy) -> None:
    texts = _toy_texts(dp_toy.train)
    shuffled = random.Random(0).sample(texts, len(texts))
    first, second = (train_captioner_tokenizer(t, vocab_size=300, max_tokens=76) for t in (texts, shuffled))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_too_small_a_captioner_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size 72 is too small: the alphabet and special tokens take 73"):
        train_captioner_tokenizer(["a b"], vocab_size=72, max_tokens=8)
