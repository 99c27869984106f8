"""Loading an exported captioner (an open_clip folder written by pretrain- or finetune-captioner)
with its tokenizer, for the stages that run one: caption and evaluate-captioner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.captioner import CONFIG_FILE, load_exported, load_exported_tokenizer
from models.captioner_tokenizer import CaptionerTokenizer
from train.config.typed import ConfigError


def load_captioner(path: str, key: str) -> tuple[Any, CaptionerTokenizer]:
    """An exported captioner (eval mode) and its tokenizer (open_clip's BPE, or the fitted one it
    carries), or a ConfigError naming ``key`` and how to produce one."""
    if not (Path(path) / CONFIG_FILE).is_file():
        raise ConfigError(key, f"{path} is not an exported captioner (no {CONFIG_FILE}); run `recap "
                          "finetune-captioner` (or pretrain-captioner) first, or point it at one")
    try:
        tokenizer = load_exported_tokenizer(Path(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(key, f"{exc}; export the captioner again") from None
    return load_exported(Path(path)), tokenizer
