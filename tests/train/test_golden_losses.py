"""Golden losses: a few steps of toy train-vae, pretrain-captioner and train-t2i must give the
per-step losses recorded in tests/assets/golden_losses.json (tests/golden_losses.py says how to
re-record them; do that only in a commit that says why the numbers moved).

Tolerance: measured spread of these 4-step runs on one Intel Xeon between 1 and 2 threads and
between torch's CPU kernel paths (ATEN_CPU_CAPABILITY=avx512/avx2/default, MKL AVX2, the path
an AMD EPYC takes) is at most 5.6e-6 relative; 1e-4 leaves 18x headroom while a real numeric change
(another seed, init, learning rate or loss term) moves the losses by >1e-2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.golden_losses import ASSET, STEPS
from tests.helpers import REPO

pytestmark = pytest.mark.slow
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    out = tmp_path_factory.mktemp("golden") / "losses.json"
    proc = subprocess.run([sys.executable, "-m", "tests.golden_losses", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", ["train_vae", "pretrain_captioner", "train_t2i"])
def test_losses_match_the_recorded_golden_values(fresh, stage: str) -> None:
    recorded = json.loads(ASSET.read_text())[stage]
    assert len(recorded) == STEPS and len(fresh[stage]) == STEPS
    assert fresh[stage] == pytest.approx(recorded, rel=RELATIVE_TOLERANCE, abs=0)


def test_the_tolerance_would_catch_a_real_change() -> None:
    """The recorded curves are not flat: step-to-step moves are far above the tolerance."""
    for stage, losses in json.loads(ASSET.read_text()).items():
        moves = [abs(a - b) / abs(b) for a, b in zip(losses[1:], losses)]
        assert min(moves) > 10 * RELATIVE_TOLERANCE, (stage, moves)
