"""The captioner's tokenizer: open_clip's BPE (49,408 tokens) or a small one fitted to the captions.

open_clip's CoCa only sees token ids, and three of them have a role:
- SOT starts every caption: the decoder's first input, where generation starts;
- EOT ends it: training cuts the decoder at the longest caption's EOT, generation stops on it;
- pad fills the context: the text tower masks pad keys (``text_cfg.pad_id``), CoCaLoss ignores
  pad labels, and a generated pad ends a caption like EOT (in open_clip's loop and ours).
open_clip's BPE has SOT 49406, EOT 49407 and pad 0 (also the token "!"): the defaults of
``CoCa.generate`` and of models/caption_decoding.py. A fitted tokenizer
(data_pipeline/caption_tokenizer.py ``train_captioner_tokenizer``) has pad 0, SOT 1, EOT 2: pad
stays 0, so the towers' pad_id and CoCaLoss need nothing new, but SOT and EOT must be passed to
every generate call (``generate_tokens(..., **tok.generation_ids())``; open_clip's
``CoCa.generate(..., sot_token_id=1, eos_token_id=2)``).

A fitted tokenizer lives in a Hugging Face folder (tokenizer.json + tokenizer_config.json) and is
read with open_clip's own ``HFTokenizer``, which is what ``open_clip.get_tokenizer("local-dir:D")``
returns for a model config with ``text_cfg.hf_tokenizer_name``: training, our decoders and plain
open_clip encode a caption identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

OPEN_CLIP_VOCAB_SIZE = 49408
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class SpecialIds:
    """The ids a CoCa gives a role to (module docstring)."""

    sot: int
    eot: int
    pad: int


OPEN_CLIP_IDS = SpecialIds(sot=49406, eot=49407, pad=0)
FITTED_IDS = SpecialIds(sot=1, eot=2, pad=0)  # data_pipeline/caption_tokenizer.py CAPTIONER_SPECIAL_TOKENS


class CaptionerTokenizer:
    """Captions -> (n, context) int64 ids, and ids -> caption text, with the special ids and the
    vocabulary size the model must have. Picklable: it runs in the reader's workers.

    Build it with `open_clip_tokenizer` or `fitted_tokenizer`; ``folder`` is the fitted
    tokenizer's folder (None for open_clip's BPE, which ships with open_clip).
    """

    def __init__(self, encoder: Any, ids: SpecialIds, vocab_size: int, special: list[int],
                 folder: Path | None) -> None:
        self.encoder, self.ids, self.vocab_size, self.folder = encoder, ids, vocab_size, folder
        self.all_special_ids = special

    @property
    def fitted(self) -> bool:
        return self.folder is not None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), context) int64: SOT, the caption's tokens, EOT, pad; truncated keeping EOT."""
        return self.encoder(texts)

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (content tokens, e.g. from `generate_tokens`); special tokens dropped,
        edge spaces stripped."""
        special = set(self.all_special_ids)
        backend = self.encoder.tokenizer if self.fitted else self.encoder  # HFTokenizer wraps a transformers one
        return backend.decode([token for token in ids if token not in special]).strip()

    def generation_ids(self) -> dict[str, int]:
        """Keyword arguments of models/caption_decoding.py ``generate_tokens``."""
        return {"sot_id": self.ids.sot, "eot_id": self.ids.eot, "pad_id": self.ids.pad}

    def check_model(self, model: open_clip.CoCa) -> None:
        """ValueError unless both of ``model``'s text towers have this tokenizer's vocabulary."""
        sizes = {"text_cfg": model.text.vocab_size, "multimodal_cfg": model.text_decoder.text_projection.shape[1]}
        wrong = {k: v for k, v in sizes.items() if v != self.vocab_size}
        if wrong:
            raise ValueError(f"the captioner's vocab_size {wrong} differs from its tokenizer's ({self.vocab_size} "
                             f"tokens{', ' + str(self.folder) if self.folder else ''})")

    def save(self, out_dir: Path) -> None:
        """Write a fitted tokenizer's files (TOKENIZER_FILES) into ``out_dir``."""
        assert self.fitted, "open_clip's BPE ships with open_clip; there is nothing to save"
        self.encoder.save_pretrained(str(out_dir))


def open_clip_tokenizer(context_length: int) -> CaptionerTokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships with open_clip)."""
    encoder = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return CaptionerTokenizer(encoder, OPEN_CLIP_IDS, OPEN_CLIP_VOCAB_SIZE, list(encoder.all_special_ids), None)


def fitted_tokenizer(folder: Path, context_length: int) -> CaptionerTokenizer:
    """A fitted tokenizer from its Hugging Face folder, offline, read as open_clip reads it."""
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no fitted captioner tokenizer (missing {', '.join(missing)})")
    encoder = open_clip.tokenizer.HFTokenizer(str(folder), context_length=context_length, local_files_only=True)
    hf = encoder.tokenizer
    ids = SpecialIds(sot=hf.bos_token_id, eot=hf.eos_token_id, pad=hf.pad_token_id)
    if None in (ids.sot, ids.eot, ids.pad):
        raise ValueError(f"the tokenizer in {folder} lacks a bos, eos or pad token ({ids}); a captioner needs "
                         "all three")
    special = sorted({*hf.all_special_ids, *(i for i, t in hf.added_tokens_decoder.items() if t.special)})
    return CaptionerTokenizer(encoder, ids, len(hf), special, folder)


def context_length(model_cfg: dict[str, Any]) -> int:
    """The text context of an open_clip model config (open_clip's default when it names none)."""
    return model_cfg.get("text_cfg", {}).get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)


def model_tokenizer(model_cfg: dict[str, Any], folder: Path | None) -> CaptionerTokenizer:
    """The tokenizer an open_clip CoCa config names: a fitted one (``text_cfg.hf_tokenizer_name``
    set) read from ``folder``, else open_clip's BPE; at the config's text context."""
    if not model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        return open_clip_tokenizer(context_length(model_cfg))
    if folder is None:
        raise ValueError("this captioner config uses a fitted tokenizer (text_cfg.hf_tokenizer_name); "
                         "give the folder holding it")
    return fitted_tokenizer(folder, context_length(model_cfg))
