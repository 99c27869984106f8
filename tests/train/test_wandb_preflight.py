"""logger.wandb.mode=online is checked before any work: no API key or an unreachable server is
exit 2 with one line (or offline after a warning under fallback_offline), never a traceback.
No test touches the network: "unreachable" is a closed or silent port on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import run_recap
from train.config.execution import LoggerConfig, WandbConfig
from train.config.typed import ConfigError
from train.outputs import wandb_preflight
from train.outputs.run_logging import MetricsLogger

KEY = "k" * 40  # a well-formed wandb API key (40+ word characters) that no server knows
TINY_TOY = ["data.toy.train_shards=1", "data.toy.heldout_shards=1", "data.toy.samples_per_shard=4",
            "data.toy.processes=1", "logger.progress=false", "logger.wandb.mode=online"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_wandb_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key in the environment, an empty home (no ~/.netrc, no wandb settings file)."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    return home


def test_offline_and_disabled_are_not_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def must_not_run(timeout_s: float) -> str:
        raise AssertionError("checked")

    monkeypatch.setattr(wandb_preflight, "online_problem", must_not_run)
    for mode in ("offline", "disabled"):
        assert wandb_preflight.checked_mode(WandbConfig(mode=mode), tmp_path) == (mode, None)


def test_online_problem_or_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    problem = "no wandb API key for X: run `wandb login`"
    monkeypatch.setattr(wandb_preflight, "online_problem", lambda timeout_s: problem)
    with pytest.raises(ConfigError) as caught:
        wandb_preflight.checked_mode(WandbConfig(mode="online"), tmp_path)
    assert str(caught.value) == ("logger.wandb.mode: online, but no wandb API key for X: run `wandb login`; or run "
                                 "without the server: logger.wandb.mode=offline, or logger.wandb.fallback_offline=true "
                                 "to log offline when this happens")
    mode, warning = wandb_preflight.checked_mode(WandbConfig(mode="online", fallback_offline=True), tmp_path)
    assert mode == "offline"
    assert warning == ("logger.wandb.mode=online, but no wandb API key for X: run `wandb login`; logging offline "
                       f"instead (logger.wandb.fallback_offline=true); `wandb sync {tmp_path}/wandb/offline-run-*` "
                       "uploads it later")
    monkeypatch.setattr(wandb_preflight, "online_problem", lambda timeout_s: None)
    assert wandb_preflight.checked_mode(WandbConfig(mode="online"), tmp_path) == ("online", None)


def test_credentials_are_found_as_wandb_finds_them(no_wandb_credentials: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    assert wandb_preflight._credentials_problem(url) == (
        f"no wandb API key for {url}: run `wandb login` or export WANDB_API_KEY")
    (no_wandb_credentials / "netrc").write_text(f"machine 127.0.0.1:{url.rsplit(':', 1)[1]}\n  login user\n"
                                                f"  password {KEY}\n")
    assert wandb_preflight._credentials_problem(url) is None  # the netrc entry wandb login writes
    (no_wandb_credentials / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_preflight._credentials_problem(url) is None
    monkeypatch.setenv("WANDB_API_KEY", "short")
    assert wandb_preflight._credentials_problem(url) == (
        f"wandb cannot use its credentials for {url} (WANDB_API_KEY invalid: API key must have 40+ characters, "
        "has 5.): fix WANDB_API_KEY or run `wandb login`")


def test_a_wandb_without_its_key_lookup_is_left_to_wandb_init(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import wandb.sdk.lib

    monkeypatch.delattr(wandb.sdk.lib, "wbauth", raising=False)
    monkeypatch.setitem(sys.modules, "wandb.sdk.lib.wbauth", None)  # importing it raises ImportError
    assert wandb_preflight.online_problem(1.0) is None


class _Answers(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(404)  # any HTTP answer means the server is reachable
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_reachability_is_bounded_and_any_http_answer_counts() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert wandb_preflight._unreachable(f"http://127.0.0.1:{httpd.server_address[1]}", 5.0) is None
    finally:
        httpd.shutdown()
        httpd.server_close()
    port = _closed_port()
    assert wandb_preflight._unreachable(f"http://127.0.0.1:{port}", 5.0) == (
        f"the wandb server http://127.0.0.1:{port} cannot be reached ([Errno 111] Connection refused): check the "
        "network, the proxy (HTTPS_PROXY) or WANDB_BASE_URL")
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.monotonic()
        problem = wandb_preflight._unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5)
        assert time.monotonic() - start < 3
    assert problem is not None and "cannot be reached" in problem


class _FailingOnline:
    """wandb.init that fails online (the check passed, then the server refused) and works offline."""

    def __init__(self) -> None:
        self.modes: list[str] = []

    def __call__(self, **kwargs):
        import wandb.errors

        self.modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying: Post \"http://x/graphql\": refused\nConsider "
                                         "increasing the init_timeout setting")
        return None


def test_wandb_init_failing_is_one_line_or_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wandb

    fake = _FailingOnline()
    monkeypatch.setattr(wandb, "init", fake)
    with pytest.raises(ConfigError) as caught:
        MetricsLogger(tmp_path / "a", LoggerConfig(wandb=WandbConfig(mode="online")), stage="s", run_name="r",
                      config={})
    assert str(caught.value) == ("logger.wandb.mode: online, but wandb.init failed: Timed out while retrying: Post "
                                 "\"http://x/graphql\": refused; or run without the server: logger.wandb.mode=offline, "
                                 "or logger.wandb.fallback_offline=true to log offline when this happens")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    logger = MetricsLogger(tmp_path / "b", LoggerConfig(wandb=WandbConfig(mode="online", fallback_offline=True)),
                           stage="s", run_name="r", config={})
    logger.close()
    assert fake.modes == ["online", "online", "offline"]


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("recap make-toy-data: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("key", [None, KEY], ids=["no-key", "server-unreachable"])
def test_online_that_cannot_start_stops_before_any_work(key: str | None, no_wandb_credentials: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    base_url = os.environ["WANDB_BASE_URL"]
    start = time.monotonic()
    result = run_recap(["make-toy-data", f"run.root={tmp_path / 'runs'}", *TINY_TOY], timeout=120)
    assert time.monotonic() - start < 30
    assert result.returncode == 2, result.stderr[-2000:]
    problem = (f"no wandb API key for {base_url}: run `wandb login` or export WANDB_API_KEY" if key is None else
               f"the wandb server {base_url} cannot be reached ([Errno 111] Connection refused): check the network, "
               "the proxy (HTTPS_PROXY) or WANDB_BASE_URL")
    assert _one_error_line(result.stderr) == (
        f"recap make-toy-data: error: logger.wandb.mode: online, but {problem}; or run without the server: "
        "logger.wandb.mode=offline, or logger.wandb.fallback_offline=true to log offline when this happens")
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()] if (tmp_path / "runs").exists() else []
    assert written == []  # no shard, no metrics, no config snapshot


def test_a_launch_that_cannot_go_online_stops_before_starting_the_launcher(no_wandb_credentials: Path,
                                                                          tmp_path: Path) -> None:
    """Checked in the launching process too: one line, not rank 0's line amid torchrun's report."""
    result = run_recap(["train-vae", f"run.root={tmp_path / 'runs'}", "launcher=torchrun", "runtime=ddp",
                        "launcher.nproc_per_node=2", "train_vae.global_batch_size=4", "train_vae.micro_batch_size=2",
                        "logger.wandb.mode=online"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"recap train-vae: error: logger.wandb.mode: online, but no wandb API key for {os.environ['WANDB_BASE_URL']}: "
        "run `wandb login` or export WANDB_API_KEY; or run without the server: logger.wandb.mode=offline, or "
        "logger.wandb.fallback_offline=true to log offline when this happens"]
    assert not (tmp_path / "runs").exists()


def test_fallback_offline_warns_and_runs_offline(no_wandb_credentials: Path, tmp_path: Path) -> None:
    result = run_recap(["make-toy-data", f"run.root={tmp_path / 'runs'}", *TINY_TOY,
                        "logger.wandb.fallback_offline=true"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    run_dir = tmp_path / "runs" / "toy" / "make_toy_data"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("recap make-toy-data: warning:")]
    assert warnings == [
        "recap make-toy-data: warning: logger.wandb.mode=online, but no wandb API key for "
        f"{os.environ['WANDB_BASE_URL']}: run `wandb login` or export WANDB_API_KEY; logging offline "
        f"instead (logger.wandb.fallback_offline=true); `wandb sync {run_dir / 'wandb'}/offline-run-*` uploads it "
        "later"]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    assert "mode: offline" in (run_dir / "config.yaml").read_text()  # what the run did, not what it was asked
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # one record per shard


def _creates_a_metrics_logger(module: str) -> bool:
    """Whether the module, or a train.* module it imports, creates a MetricsLogger (directly or
    through open_session)."""
    import ast
    import importlib.util

    def source(name: str) -> str:
        spec = importlib.util.find_spec(name)
        return Path(spec.origin).read_text() if spec and spec.origin else ""

    text = source(module)
    imported = {node.module for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("train.")}
    return any(call in source(name) for name in {module, *imported} for call in ("MetricsLogger(", "open_session("))


def test_every_stage_that_logs_to_wandb_is_checked_before_it_runs() -> None:
    from train.commands.stage_table import STAGES

    assert {name for name, stage in STAGES.items() if stage.wandb} == {
        name for name, stage in STAGES.items() if _creates_a_metrics_logger(stage.module)}
    assert sum(stage.wandb for stage in STAGES.values()) == 6
