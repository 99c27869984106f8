"""A T5-style tokenizer for the toy world, trained offline on its captions with `tokenizers`.

Production uses T5-XXL's own SentencePiece tokenizer from its local folder. The toy T5 is tiny
and random, so it gets a small vocabulary fitted to the toy captions instead, saved in Hugging
Face format (``tokenizer.json`` + ``tokenizer_config.json``) so that
``transformers.AutoTokenizer.from_pretrained(folder)`` loads it like any other. T5's
conventions hold: ``<pad>`` = 0, ``</s>`` = 1 (appended to every caption), ``<unk>`` = 2, and
SentencePiece's ``▁`` word boundaries (so decoding restores the spaces).

BPE rather than T5's Unigram: `tokenizers`' Unigram trainer leaves most toy words split into
characters on a corpus this small, while BPE learns the whole toy vocabulary.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 as in T5
# Always in the vocabulary, seen in the corpus or not: a new word in a prompt is spelt out
# in these rather than lost to <unk>.
ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)


def train_caption_tokenizer(texts: Iterable[str], vocab_size: int, max_tokens: int) -> Any:
    """A fast tokenizer (transformers) trained on ``texts``; ``max_tokens`` is its model_max_length."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + len(ALPHABET) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: the alphabet and special tokens take "
                         f"{len(SPECIAL_TOKENS) + len(ALPHABET) + 1}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=ALPHABET, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=max_tokens, padding_side="right")


def save_tokenizer(tokenizer: Any, out_dir: Path) -> Path:
    """Write it in Hugging Face format; returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(folder: str | Path) -> Any:
    """Any Hugging Face tokenizer folder (ours, or T5-XXL's), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
