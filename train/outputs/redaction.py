"""Keep secrets out of everything a run writes: config snapshots, logs, metrics, checkpoints.

Three kinds of secret are recognised: passwords in URLs (``scheme://user:PASSWORD@host``),
credential-looking query parameters and config keys (token, api_key, password, secret,
signature, ...), and the values of credential environment variables (WANDB_API_KEY, ...).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from train.config.secret_names import SECRET_NAME as _SECRET_NAME
from train.config.secret_names import is_secret_key  # re-exported: the names redact_tree masks

MASK = "***"
# Also matches Hydra's escaped spelling of overrides (https\://user\:pw@host).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*\\?://)(?P<user>[^:/@\s\\]*)(?P<sep>\\?:)(?P<pw>[^@/\s]+)@")
_QUERY_SECRET = re.compile(r"(?P<name>[?&;][^=&\s]*(?:token|key|secret|signature|password|sig)[^=&\s]*=)(?P<value>[^&\s'\"]+)",
                           re.IGNORECASE)
_MIN_ENV_SECRET = 6  # shorter values would mask ordinary words


def _env_secrets() -> list[str]:
    values = [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_ENV_SECRET]
    return sorted(set(values), key=len, reverse=True)


def redact_text(text: str) -> str:
    """Mask URL passwords, credential query parameters and credential env-var values."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}{m['sep']}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", text)
    for secret in _env_secrets():
        text = text.replace(secret, MASK)
    return text


def redact_tree(tree: Any) -> Any:
    """A copy of a JSON-like tree with secret-named keys masked and every string redacted."""
    if isinstance(tree, Mapping):
        return {k: (MASK if is_secret_key(str(k)) and v is not None else redact_tree(v)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_tree(v) for v in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in the formatted message (used for Hydra's logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        return True
