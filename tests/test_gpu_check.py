"""benchmarks/gpu_check.sh: with --smoke it runs on the CPU with tiny models and prints its three
tables with a number in every measured cell, so the script a GPU run needs never rots; without a
GPU the full check refuses in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.slow
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
SWITCH_ROWS = ["off", "+ allow_tf32", "+ AdamW fused", "+ channels_last", "+ compile_unet (all on) (eager backend)"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def smoke() -> str:
    result = _run("--smoke")
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _table(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _number(cell: str) -> float:
    return float(cell.removesuffix("%"))


def test_smoke_builds_only_tiny_models(smoke: str) -> None:
    assert "## train-t2i: xf + tiny UNet, fp32, cached inputs (8 T5 tokens); MFU against 989 TFLOP/s" in smoke
    assert "## captioner: tiny (random weights), batch 4, 7 tokens per caption" in smoke
    assert "dalle3_0p9b" not in smoke and "coca_ViT-L-14" not in smoke


def test_smoke_times_every_switch_row_and_they_train_alike(smoke: str) -> None:
    rows = _table(smoke, "| px | switches |")
    assert [(r[0], r[1]) for r in rows] == [(px, name) for px in ("64", "128") for name in SWITCH_ROWS]
    for px, name, batch, ms, img_s, tflop, mfu, vs_off, vs_above, loss in rows:
        assert int(batch) == 2
        assert _number(ms) > 0 and _number(img_s) > 0 and _number(tflop) > 0
        assert 0 <= _number(mfu) < 1  # percent of an H100's peak: tiny on a CPU
        assert _number(vs_off) > 0 and _number(vs_above) > 0
        assert _number(loss) < 1e-4, (px, name, loss)  # each switch trains like off (measured <= 1e-7)
        if name == "off":
            assert (vs_off, vs_above, _number(loss)) == ("1.00", "1.00", 0.0)
    # the same model FLOPs in every row of a resolution, about 4x from 64 to 128 px
    flops = {px: {_number(r[5]) for r in rows if r[0] == px} for px in ("64", "128")}
    assert len(flops["64"]) == len(flops["128"]) == 1
    assert 3.5 < flops["128"].pop() / flops["64"].pop() < 4.5


def test_smoke_finds_fused_attention_in_every_layer(smoke: str) -> None:
    rows = _table(smoke, "| px | attention layers |")
    assert rows == [[px, "15", "flash_attention_for_cpu 15", "0"] for px in ("64", "128")]


def test_smoke_measures_both_decoders_and_the_recaption_stage(smoke: str) -> None:
    rows = _table(smoke, "| side | images/s |")
    assert [r[0] for r in rows] == ["open_clip generate", "ours (KV-cached greedy)", "`recap recaption`, 2 captioners"]
    for side, images_s, captions_s, tokens_s, ratio in rows:
        assert _number(images_s) > 0 and _number(ratio) > 0
        assert _number(captions_s) == pytest.approx(_number(images_s) * (2 if "recaption" in side else 1), rel=0.01)
        assert _number(tokens_s) == pytest.approx(_number(captions_s) * 7, rel=0.01)
    assert rows[0][4] == "1.00"
    assert "ours and open_clip gave the same tokens: True" in smoke


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_the_full_check_refuses_without_a_gpu() -> None:
    result = _run()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("gpu_check: error: no GPU visible (torch.cuda.is_available() is False); run --smoke "
                             "on the CPU\n")
