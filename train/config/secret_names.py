"""Which names say they hold a credential. Config validation refuses such keys where a value would
be stored in plain text (the sbatch script); train/outputs/redaction.py masks their values in
everything a run writes. Here, at the config's level, so that the config imports nothing above it."""

from __future__ import annotations

import re

# Whole words of a snake/kebab/env-style name: "tokenizer" and "max_tokens" are not secrets.
SECRET_NAME = re.compile(
    r"(^|[_.-])(password|passwd|pass|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
    r"signature|credentials?|auth)($|[_.-])",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """Whether a config key's (or environment variable's) name says it holds a credential."""
    return bool(SECRET_NAME.search(key))
