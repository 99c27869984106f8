"""Fixtures shared by every test folder (helpers to import live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one compute thread each (and in every
    # `recap` subprocess they start), or OpenMP's spinning threads oversubscribe the cores and the
    # in-process tests run several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from data_pipeline.options import ToyDataOptions
from data_pipeline.toy_shards import write_toy_dataset

# 8 train shards of 16: enough for 2 ranks x 2 workers (4 streams) with two shards each.
SMALL_TOY = ToyDataOptions(train_shards=8, heldout_shards=2, samples_per_shard=16, seed=7, processes=2,
                           world="full", text_probability=0.4)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<dir>/train and <dir>/heldout written once per test session."""
    root = tmp_path_factory.mktemp("toy_data")
    write_toy_dataset({"train": root / "train", "heldout": root / "heldout"}, SMALL_TOY, progress=False)
    return root
