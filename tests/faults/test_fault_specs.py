"""train/runtime/failpoints.py: what a RECAP_FAULT value selects (pure; no process is harmed)."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from train.runtime.failpoints import PARTIAL_BYTES, Fault, maybe_fail, maybe_fail_write, parse_faults, poison_loss


def test_parse_actions_points_rank_group_and_several_faults() -> None:
    assert parse_faults("") == []
    assert parse_faults("sigkill@step=7") == [Fault("sigkill", {"step": 7})]
    assert parse_faults("nan@step=3,rank=1; nan@from_step=5,rank=1") == [
        Fault("nan", {"step": 3}, rank=1), Fault("nan", {"from_step": 5}, rank=1)]
    assert parse_faults("sigusr1@step=2,rank=1,group=1") == [Fault("sigusr1", {"step": 2}, rank=1, group=True)]


@pytest.mark.parametrize(("text", "message"), [("boom@step=1", "unknown action 'boom'"),
                                              ("nan@step=x", "is not ACTION@key=N")])
def test_malformed_faults_are_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_faults(text)


def test_matching_exact_and_from_points_per_rank() -> None:
    exact, later = Fault("nan", {"step": 3}, rank=1), Fault("nan", {"from_step": 5})
    assert exact.matches("nan", 1, {"step": 3})
    assert not exact.matches("nan", 0, {"step": 3}) and not exact.matches("nan", 1, {"step": 4})
    assert not exact.matches("sigkill", 1, {"step": 3})
    assert [s for s in range(1, 9) if later.matches("nan", 0, {"step": s})] == [5, 6, 7, 8]
    assert not later.matches("nan", 0, {"save": 6})  # another kind of point
    assert not Fault("sigkill", {}).matches("sigkill", 0, {"step": 1})  # a fault needs a point


def test_poison_loss_makes_the_named_steps_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECAP_FAULT", "nan@step=2,rank=1;nan@from_step=4,rank=1")
    poisoned = [step for step in range(1, 7)
                if math.isnan(poison_loss({"loss": torch.tensor(1.0), "x": 2}, rank=1, step=step)["loss"])]
    assert poisoned == [2, 4, 5, 6]
    assert poison_loss(torch.tensor(1.0), rank=0, step=4).item() == 1.0


def test_maybe_fail_sends_the_signal_to_the_process_or_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr("os.kill", lambda pid, sig: sent.append(("pid", sig)))
    monkeypatch.setattr("os.killpg", lambda pgid, sig: sent.append(("group", sig)))
    monkeypatch.setenv("RECAP_FAULT", "sigterm@save=4;sigusr1@step=2,rank=1,group=1;nan@step=2")
    maybe_fail(rank=0, step=2)
    maybe_fail(rank=1, step=2)
    maybe_fail(rank=0, save=4)
    assert sent == [("group", signal.SIGUSR1), ("pid", signal.SIGTERM)]
    monkeypatch.delenv("RECAP_FAULT")
    maybe_fail(rank=0, step=2)
    assert len(sent) == 2


def test_write_faults_fail_the_named_file_with_their_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_faults("enospc@save=4,rank=1;eio@save=2") == [Fault("enospc", {"save": 4}, rank=1),
                                                               Fault("eio", {"save": 2})]
    monkeypatch.setenv("RECAP_FAULT", "enospc@save=4,rank=1;edquot@save=6;eio@save=8")
    target = tmp_path / "rank_00001.pt"
    maybe_fail_write(target, rank=0, save=4)  # another rank
    maybe_fail_write(target, rank=1, save=3)  # another save
    maybe_fail(rank=1, save=4)  # the signal failpoint ignores write faults
    assert not target.exists()
    for rank, step, errno, text in [(1, 4, 28, "No space left on device"), (0, 6, 122, "Disk quota exceeded"),
                                    (0, 8, 5, "Input/output error")]:
        with pytest.raises(OSError) as caught:
            maybe_fail_write(target, rank=rank, save=step)
        assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (errno, text, str(target))
        assert target.read_bytes() == b"\0" * PARTIAL_BYTES  # the start of the file, as a write cut short leaves
        target.unlink()
