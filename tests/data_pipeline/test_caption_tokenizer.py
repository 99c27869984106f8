"""The toy T5 tokenizer: trained offline, saved in HF format, T5's special-token conventions."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.caption_tokenizer import load_tokenizer, save_tokenizer, train_caption_tokenizer


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
