"""Fixtures of the data_pipeline tests: one tiny toy dataset per session (helpers: dp_testlib.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.options import ToyDataOptions
from data_pipeline.toy_shards import write_toy_dataset
from dp_testlib import raw_metadata

# 4 train shards of 8: enough for 2 ranks x 2 workers (4 streams); curated_fraction high enough
# that a few of 32 samples are curated.
DP_TOY = ToyDataOptions(train_shards=4, heldout_shards=1, samples_per_shard=8, curated_fraction=0.25,
                        world="full", text_probability=0.4, seed=7, jpeg_quality=80, processes=1)


@dataclass(frozen=True)
class ToyData:
    root: Path
    train: Path
    heldout: Path
    options: ToyDataOptions
    summary: dict[str, Any]
    meta: dict[str, dict[str, Any]]  # train key -> json metadata, read from the tars directly

    @property
    def train_shards(self) -> list[str]:
        return [str(p) for p in sorted(self.train.glob("*.tar"))]

    @property
    def train_keys(self) -> list[str]:
        return sorted(self.meta)


@pytest.fixture(scope="session")
def dp_toy(tmp_path_factory: pytest.TempPathFactory) -> ToyData:
    """A toy dataset (train 4x8, heldout 1x8) written once per session; treat it as read-only."""
    root = tmp_path_factory.mktemp("dp_toy")
    summary = write_toy_dataset({"train": root / "train", "heldout": root / "heldout"}, DP_TOY, progress=False)
    return ToyData(root, root / "train", root / "heldout", DP_TOY, summary, raw_metadata(root / "train"))
