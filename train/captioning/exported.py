"""Loading an exported captioner (an open_clip folder written by pretrain- or finetune-captioner)
for the stages that run one: caption and evaluate-captioner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.captioner import CONFIG_FILE, load_exported
from train.config.typed import ConfigError


def load_captioner(path: str, key: str) -> Any:
    """An exported captioner, or a ConfigError naming ``key`` and how to produce one."""
    if not (Path(path) / CONFIG_FILE).is_file():
        raise ConfigError(key, f"{path} is not an exported captioner (no {CONFIG_FILE}); run `recap "
                          "finetune-captioner` (or pretrain-captioner) first, or point it at one")
    return load_exported(Path(path))
