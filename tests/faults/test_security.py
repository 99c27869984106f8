"""Security faults: config that names code to run, a checkpoint that carries code, secrets.

- recap never instantiates ``_target_``: no module calls hydra.utils.instantiate/call and conf/
  has no ``_target_`` (checked below). Every config key must exist in the typed schema
  (train/config/experiment.py), so a ``_target_`` anywhere in the experiment config, given on the
  command line or in a config-group yaml, is an unknown key: exit 2, one line, before any work
  (no run directory, the marker command never runs).
- Hydra's own config (``hydra.*``) is not recap's schema: Hydra instantiates ``hydra.callbacks``,
  ``hydra.launcher`` and ``hydra.sweeper`` itself. recap refuses overrides of those (and any
  ``_target_`` under ``hydra.``) before Hydra sees them (train/config/loading.py): exit 2, one
  line, whatever Hydra's own blocklist would have done.
- A malicious pickle placed in a real checkpoint (manifest re-sealed, so only the loader stands
  in the way) is refused naming the file, and its code never runs.
- A credential in an environment variable, in a URL password or in a signed query parameter
  never reaches a file of the run.
Other coverage: tests/train/test_checkpoint_files.py::test_malicious_pickle_is_refused_and_not_executed,
tests/train/test_redaction.py, tests/train/test_run_outputs.py::test_one_run_writes_metrics_logs_summary_and_no_secrets,
tests/train/test_cli.py::test_multirun_yaml_and_errors_are_redacted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.faults.runs import VAE_STEPS, one_thread, vae_args, vae_dir
from tests.helpers import REPO, run_recap, run_stage
from train.training import checkpoint_files as files
from train.commands.exit_codes import EXIT_USAGE
from train.cli import main

PACKAGES = ("train", "models", "data_pipeline", "launch")


def _touch(marker: Path) -> str:
    return f"'touch {marker}'"


# (override naming a target, where it lands); each comes with _args_ that would create a marker file
TARGETS = [
    pytest.param("+train_vae._target_=os.system", "train_vae._target_: unknown key", id="stage-section-os.system"),
    pytest.param("+_target_=posix.system", "_target_: unknown key", id="top-level-posix.system"),
    pytest.param("+model._target_=builtins.exec", "model: unknown key", id="new-section-builtins.exec"),
    pytest.param("vae._target_=subprocess.call", "vae._target_: unknown config key", id="existing-section-subprocess"),
    pytest.param("+data.reader._target_=hydra.utils.instantiate", "data.reader._target_: unknown key",
                 id="nested-hydra.utils.instantiate"),
]


@pytest.mark.parametrize(("override", "message"), TARGETS)
def test_a_target_on_the_command_line_is_rejected_before_any_work(override: str, message: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    marker, root = tmp_path / "pwned", tmp_path / "runs"
    section = override.lstrip("+").rsplit("._target_", 1)[0] if "._target_" in override else ""
    args_key = f"+{section}._args_" if section else "+_args_"
    code = main(["train-vae", f"run.root={root}", override, f"{args_key}=[{_touch(marker)}]"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.splitlines() == [err.strip()] and err.startswith(f"recap train-vae: error: {message}")
    assert not marker.exists() and not root.exists()


def test_a_target_is_rejected_by_the_recap_process_too(tmp_path: Path) -> None:
    """The same through the console entry point: nothing written anywhere, not even in the cwd."""
    marker, root, cwd = tmp_path / "pwned", tmp_path / "runs", tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run([sys.executable, "-m", "train.cli", "train-vae", f"run.root={root}",
                             "+train_vae._target_=os.system", f"+train_vae._args_=[{_touch(marker)}]"],
                            cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.startswith("recap train-vae: error: train_vae._target_: unknown key") and result.stdout == ""
    assert not marker.exists() and not root.exists() and list(cwd.iterdir()) == []


def test_a_target_in_a_config_group_yaml_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A conf/ (RECAP_CONF_DIR) whose vae option `evil` carries a _target_: rejected like any unknown key."""
    marker, root, conf = tmp_path / "pwned", tmp_path / "runs", tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    tiny = (conf / "vae" / "tiny.yaml").read_text()
    (conf / "vae" / "evil.yaml").write_text(f"{tiny}\n_target_: os.system\n_args_: [{_touch(marker)}]\n")
    monkeypatch.setenv("RECAP_CONF_DIR", str(conf))
    assert main(["train-vae", f"run.root={root}", "vae=evil"]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("recap train-vae: error: vae._")  # _args_ or _target_: unknown key
    assert not marker.exists() and not root.exists()


def test_recap_never_instantiates_a_target() -> None:
    """Why the rejections above are enough: no code path turns config into objects by name."""
    # _target_ used as a key (cfg["_target_"], {"_target_": ...}); train/config/loading.py names it only to refuse it
    calls = re.compile(r"\binstantiate\s*\(|hydra\.utils|\b(get_method|get_class|get_object)\s*\(|"
                       r"[\"']_target_[\"']\s*[:\]]|\._target_\b")
    sources = [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sources
                 for n, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    offenders += [str(path.relative_to(REPO)) for path in sorted((REPO / "conf").rglob("*.yaml"))
                  if "_target_" in path.read_text()]
    assert offenders == []


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["+hydra.callbacks.pwn._target_=os.system", "+hydra.callbacks.pwn._args_=[{touch}]"],
    ["-m", "hydra.launcher._target_=posix.system", "+hydra.launcher._args_=[{touch}]"],
], ids=["callback-os.system", "multirun-launcher-posix.system"])
def test_a_target_in_hydras_own_config_never_runs(args: list[str], tmp_path: Path) -> None:
    marker, root = tmp_path / "pwned", tmp_path / "runs"
    result = run_recap(["make-toy-data", f"run.root={root}", *[a.format(touch=_touch(marker)) for a in args]],
                       timeout=120)
    assert result.returncode == EXIT_USAGE and not marker.exists() and not root.exists(), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "recap does not let the command line choose objects for Hydra to build" in result.stderr


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker's pickle does on load
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(vae_reference: Path, toy_data: Path,
                                                                      tmp_path: Path) -> None:
    root, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(vae_reference, root)
    newest = vae_dir(root) / "checkpoints" / files.step_dir_name(VAE_STEPS)
    state = files.safe_torch_load(newest / "optimizer.pt")
    state["param_groups"][0]["payload"] = _Exploit(marker)
    torch.save(state, newest / "optimizer.pt")
    files.write_manifest(newest, files.hash_files(newest, files.list_files(newest)))  # checksums pass

    with one_thread(), pytest.raises(files.CheckpointError, match=re.escape(f"{newest / 'optimizer.pt'}: refused")):
        run_stage("train_vae", vae_args(root, toy_data))
    assert not marker.exists()


@pytest.mark.slow
def test_secrets_in_the_environment_and_in_urls_are_never_written(toy_data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A token from a credential-named environment variable inside a shard URL's path (masked only
    because the variable is set), a URL password and a signed query parameter: none of them in any
    file of the run (config snapshot, checkpoint config and fingerprint, logs, metrics, summary)."""
    token, password, signature = "tok0e7c4a1b9d2f", "pw0c8e1d7f3a", "sig0a4b9c2d6e"
    monkeypatch.setenv("RECAP_SHARDS_TOKEN", token)
    monkeypatch.delenv("RECAP_FAULT", raising=False)
    heldout = f"https://alice:{password}@data.example.com/{token}/{{00000..00001}}.tar?sig={signature}"
    root = tmp_path / "runs"
    with one_thread():
        run_stage("train_vae", [*vae_args(root, toy_data, "train_vae.steps=2", "train_vae.heldout_images=0"),
                                f"data.heldout='{heldout}'"])  # in the config only: no held-out measure reads it

    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) > 10 and any(p.name == "fingerprint.json" for p in written)
    for secret in (token, password, signature):
        assert [str(p) for p in written if secret.encode() in p.read_bytes()] == [], secret
    out, err = capfd.readouterr()
    assert all(secret not in out + err for secret in (token, password, signature))
    config = (vae_dir(root) / "config.yaml").read_text()
    assert "https://alice:***@data.example.com/***/{00000..00001}.tar?sig=***" in config
