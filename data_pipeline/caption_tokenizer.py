"""Small tokenizers for the toy world, trained offline on its captions with `tokenizers`.

Production uses T5-XXL's own SentencePiece tokenizer and open_clip's 49,408-token BPE. The toy
models are tiny and random, so they get small vocabularies fitted to the toy captions instead,
saved in Hugging Face format (``tokenizer.json`` + ``tokenizer_config.json``) so that
``transformers.AutoTokenizer.from_pretrained(folder)`` (and open_clip's ``HFTokenizer``) loads
them like any other. Both use SentencePiece's ``▁`` word boundaries (so decoding restores the spaces).

- The toy T5's (`train_caption_tokenizer`): T5's conventions, ``<pad>`` = 0, ``</s>`` = 1
  (appended to every caption), ``<unk>`` = 2.
- The toy captioner's (`train_captioner_tokenizer`): open_clip CoCa's conventions with small ids,
  ``<pad>`` = 0 (the towers' pad_id and CoCaLoss's ignored label, as with open_clip's BPE),
  ``<start_of_text>`` = 1 and ``<end_of_text>`` = 2 around every caption, ``<unk>`` = 3;
  lowercased like open_clip's BPE. Exactly ``vocab_size`` tokens: the model's vocab_size.

BPE rather than T5's Unigram: `tokenizers`' Unigram trainer leaves most toy words split into
characters on a corpus this small, while BPE learns the whole toy vocabulary. Training is
deterministic: the same texts (in any order) give the same tokenizer, in any process.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 as in T5
SOT, EOT = "<start_of_text>", "<end_of_text>"  # open_clip's names
CAPTIONER_SPECIAL_TOKENS = (PAD, SOT, EOT, UNK)  # ids 0, 1, 2, 3
UNUSED = "<unused{}>"  # fills a captioner vocabulary the corpus cannot (see train_captioner_tokenizer)
# Always in the vocabulary, seen in the corpus or not: a new word in a prompt is spelt out
# in these rather than lost to <unk>.
ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)
LOWERCASE_ALPHABET = list(string.ascii_lowercase + string.digits + string.punctuation)
CAPTIONER_MIN_VOCAB = len(CAPTIONER_SPECIAL_TOKENS) + len(LOWERCASE_ALPHABET) + 1


def train_caption_tokenizer(texts: Iterable[str], vocab_size: int, max_tokens: int) -> Any:
    """A fast tokenizer (transformers) for the toy T5 trained on ``texts``; ``max_tokens`` is its
    model_max_length."""
    from tokenizers import normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = _fit_bpe(texts, vocab_size, SPECIAL_TOKENS, ALPHABET, normalizers.NFKC())
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=max_tokens, padding_side="right")


def train_captioner_tokenizer(texts: Iterable[str], vocab_size: int, max_tokens: int) -> Any:
    """A fast tokenizer (transformers) for an open_clip CoCa, trained on ``texts``: every caption
    becomes ``<start_of_text> ... <end_of_text>``, and it has exactly ``vocab_size`` tokens.

    When the corpus runs out of merges first, the rest are ``<unusedN>`` special tokens that no
    text encodes to (the model learns never to emit them), so the model's vocab_size is the
    configured number whatever the corpus. ``max_tokens`` is its model_max_length (the text context).
    """
    from tokenizers import normalizers, processors
    from transformers import PreTrainedTokenizerFast

    # lowercased like open_clip's BPE, so no vocabulary is spent on capitals
    tok = _fit_bpe(texts, vocab_size, CAPTIONER_SPECIAL_TOKENS, LOWERCASE_ALPHABET,
                   normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]))
    learned = tok.get_vocab_size()
    tok.add_special_tokens([UNUSED.format(i) for i in range(vocab_size - learned)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, tok.token_to_id(SOT)), (EOT, tok.token_to_id(EOT))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=SOT, eos_token=EOT, unk_token=UNK,
                                  model_max_length=max_tokens, padding_side="right")
    assert len(out) == vocab_size and [out.convert_tokens_to_ids(t) for t in CAPTIONER_SPECIAL_TOKENS] == [0, 1, 2, 3]
    return out


def _fit_bpe(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...], alphabet: list[str],
             normalizer: Any) -> Any:
    """A `tokenizers` BPE with Metaspace word boundaries trained on ``texts``; ``special_tokens``
    take the first ids, ``alphabet`` is always in the vocabulary (no <unk> for its characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(special_tokens) + len(alphabet) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: the alphabet and special tokens take "
                         f"{len(special_tokens) + len(alphabet) + 1}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tokenizer: Any, out_dir: Path) -> Path:
    """Write it in Hugging Face format; returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(folder: str | Path) -> Any:
    """Any Hugging Face tokenizer folder (ours, or T5-XXL's), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
