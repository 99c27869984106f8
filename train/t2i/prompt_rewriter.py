"""The prompt rewriter run before encoding: the recipe's caption "upsampling" (DALL-E 3, section 6).

A model trained on 95% descriptive captions follows long, literal prompts best, while users type
short ones; DALL-E 3 has GPT-4 rewrite each prompt into a descriptive caption first. Here that
step is pluggable:

- ``identity``: the prompt as typed (the default; the toy world has no language model).
- ``openai``: any OpenAI-compatible chat-completions endpoint (OpenAI, a local vLLM,
  llama.cpp or TGI server): ``POST {url}/chat/completions`` with the instruction as the system
  message and the prompt as the user message; the answer's first choice is the rewritten prompt.

The client is the standard library's urllib (one JSON POST needs no SDK). The API key comes
from the environment variable the config names and is sent only in the Authorization header;
errors name the endpoint with any credential masked.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from train.config.sampling import RewriterConfig
from train.outputs.redaction import redact_text

Rewriter = Callable[[str], str]
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # worth another try; any other HTTP error is final
_BACKOFF_S = 0.5  # first wait between tries, doubled each time


class RewriteError(RuntimeError):
    """The endpoint could not rewrite a prompt (unreachable, refused, or an unusable answer)."""


def identity(prompt: str) -> str:
    return prompt


class ChatRewriter:
    """Rewrites one prompt per call through an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, options: RewriterConfig) -> None:
        assert options.url and options.model, "RewriterConfig.validate guarantees url and model"
        self.options = options
        self.endpoint = options.url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(options.api_key_env) if options.api_key_env else None

    def request_body(self, prompt: str) -> dict[str, Any]:
        o = self.options
        return {"model": o.model, "temperature": o.temperature, "max_tokens": o.max_tokens,
                "messages": [{"role": "system", "content": o.instruction}, {"role": "user", "content": prompt}]}

    def __call__(self, prompt: str) -> str:
        answer = self._post(self.request_body(prompt))
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewriteError(f"{self._where()} answered without choices[0].message.content: "
                               f"{json.dumps(answer)[:200]}") from None
        if not isinstance(text, str) or not text.strip():
            raise RewriteError(f"{self._where()} returned an empty rewrite for prompt {prompt!r}")
        return " ".join(text.split())

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(_BACKOFF_S * 2 ** (attempt - 1))  # back off before retrying a busy server
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in _RETRY_STATUS:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = str(getattr(exc, "reason", exc))
            except json.JSONDecodeError:
                raise RewriteError(f"{self._where()} did not answer with JSON") from None
        raise RewriteError(f"{self._where()} failed after {self.options.retries + 1} tries: {last}")

    def _where(self) -> str:
        return f"prompt rewriter at {redact_text(self.endpoint)}"


def build_rewriter(options: RewriterConfig) -> Rewriter:
    """The configured rewriter: ``identity`` or a ``ChatRewriter``."""
    return identity if options.kind == "identity" else ChatRewriter(options)
