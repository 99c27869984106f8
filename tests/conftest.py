"""Fixtures shared by every test folder (helpers to import live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.options import ToyDataOptions
from data_pipeline.toy_shards import write_toy_dataset

# 8 train shards of 16: enough for 2 ranks x 2 workers (4 streams) with two shards each.
SMALL_TOY = ToyDataOptions(train_shards=8, heldout_shards=2, samples_per_shard=16, seed=7, processes=2)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<dir>/train and <dir>/heldout written once per test session."""
    root = tmp_path_factory.mktemp("toy_data")
    write_toy_dataset({"train": root / "train", "heldout": root / "heldout"}, SMALL_TOY, progress=False)
    return root
