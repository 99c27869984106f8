"""train/outputs/redaction.py: secrets never reach what a run writes."""

from __future__ import annotations

import os

import pytest

from train.outputs.redaction import MASK, is_secret_key, redact_text, redact_tree


@pytest.fixture(autouse=True)
def _no_ambient_secrets(monkeypatch):
    """Credential variables of the machine running the tests must not change the expected text."""
    for name in list(os.environ):
        if is_secret_key(name):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:hunter2pass@example.com/x.tar", "https://user:***@example.com/x.tar"),
        ("pipe:curl -s https://bob:s3cr3t@host/{0..9}.tar", "pipe:curl -s https://bob:***@host/{0..9}.tar"),
        ("s3://:onlypw@bucket/k", "s3://:***@bucket/k"),
        ("ftp://user@host/x and https://host/y", "ftp://user@host/x and https://host/y"),  # no password: unchanged
        ("s3://b/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=deadbeef00&X-Amz-Date=20240101",
         "s3://b/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=***&X-Amz-Date=20240101"),
        ("https://h/x.tar?token=abc123&page=2", "https://h/x.tar?token=***&page=2"),
        ("https://h/x.tar?page=2&api_key=k3y", "https://h/x.tar?page=2&api_key=***"),
        ("https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=AbC%2Bd",
         "https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=***"),
        ("got 'https://u:p4ss@h/a?access_token=zzz'", "got 'https://u:***@h/a?access_token=***'"),
        ("tokenizer: /models/tok max_tokens: 64 passes: 3", "tokenizer: /models/tok max_tokens: 64 passes: 3"),
    ],
)
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def test_env_var_values_of_credential_names_are_masked(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandbkey0123456789")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "awssecretvalue")
    monkeypatch.setenv("MY_TOKEN", "abc")  # too short to mask safely
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsefalse")  # not a credential name
    text = "key=wandbkey0123456789 hf=hf_abcdefgh aws=awssecretvalue short=abc tp=falsefalse"
    assert redact_text(text) == f"key={MASK} hf={MASK} aws={MASK} short=abc tp=falsefalse"


def test_longer_env_secret_is_masked_before_its_prefix(monkeypatch):
    monkeypatch.setenv("SERVICE_TOKEN", "abcdef")
    monkeypatch.setenv("OTHER_PASSWORD", "abcdefghij")
    assert redact_text("x abcdefghij y abcdef") == f"x {MASK} y {MASK}"


@pytest.mark.parametrize(
    "key",
    ["password", "api_key", "apikey", "WANDB_API_KEY", "hf_token", "token", "secret", "aws_secret_access_key",
     "db.password", "private-key", "credentials", "auth", "X-Amz-Signature"],
)
def test_secret_key_names(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["tokenizer", "max_tokens", "num_tokens", "passes", "keep_last", "key", "monkey", "authors", "secretary",
     "TOKENIZERS_PARALLELISM", "pretrained"],
)
def test_non_secret_key_names(key):
    assert not is_secret_key(key)


def test_redact_tree_masks_secret_keys_and_redacts_strings(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandbkey0123456789")
    tree = {
        "text_encoder": {"tokenizer": "/models/tok", "max_tokens": 64},
        "logger": {"wandb": {"api_key": "plain-secret", "token": None, "entity": "me"}},
        "data": {"train": "https://u:pw1234@h/{0..3}.tar", "heldout": ["a", "https://h/x?token=t0k"]},
        "run": {"password": 1234, "note": "key wandbkey0123456789"},
        "pair": (1, "x"),
    }
    assert redact_tree(tree) == {
        "text_encoder": {"tokenizer": "/models/tok", "max_tokens": 64},
        "logger": {"wandb": {"api_key": MASK, "token": None, "entity": "me"}},  # null stays null
        "data": {"train": "https://u:***@h/{0..3}.tar", "heldout": ["a", "https://h/x?token=***"]},
        "run": {"password": MASK, "note": f"key {MASK}"},
        "pair": [1, "x"],
    }
    assert tree["logger"]["wandb"]["api_key"] == "plain-secret"  # a copy; the input is untouched


def test_redact_tree_leaves_scalars():
    assert redact_tree(3) == 3
    assert redact_tree(None) is None
    assert redact_tree("https://a:b12@h") == "https://a:***@h"
