"""Before a stage logs to wandb online, and before it does any work: is there an API key, and
does the wandb server answer?

Unchecked, `logger.wandb.mode=online` failed late and loudly: without an API key wandb.init
raised a traceback; with a key and no network it retried for ~90 s (wandb's init_timeout) and
then raised one, after the model had been built. The process that talks to wandb (rank 0) now
asks first, in bounded time (``check_timeout_s``), and the run either stops with one line
naming the fix (exit 2) or, with ``fallback_offline``, logs offline after a warning
(`wandb sync` uploads the offline run later).

The key is looked up by wandb's own code (wandb.sdk.lib.wbauth, what wandb.init uses: the
WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE variables, the netrc entry for the server, wandb's
settings file) for the server wandb would use (WANDB_BASE_URL or its settings, else wandb's
default), so the check and wandb.init cannot disagree about either.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from train.config.execution import WandbConfig
from train.config.typed import ConfigError

WandbMode = Literal["offline", "online", "disabled"]
OFFLINE_FIXES = "logger.wandb.mode=offline, or logger.wandb.fallback_offline=true to log offline when this happens"


def checked_mode(cfg: WandbConfig, run_dir: Path | None = None) -> tuple[WandbMode, str | None]:
    """(the mode to run wandb in, a warning to show or None) for a stage writing to ``run_dir``.
    Only mode=online is checked (offline and disabled cost nothing). Raises ConfigError when
    online cannot start and ``cfg.fallback_offline`` is false."""
    if cfg.mode != "online":
        return cfg.mode, None
    problem = online_problem(cfg.check_timeout_s)
    if problem is None:
        return "online", None
    if cfg.fallback_offline:
        runs = f"{run_dir or '<run dir>'}/wandb/offline-run-*"
        return "offline", (f"logger.wandb.mode=online, but {problem}; logging offline instead "
                           f"(logger.wandb.fallback_offline=true); `wandb sync {runs}` uploads it later")
    raise ConfigError("logger.wandb.mode", f"online, but {problem}; or run without the server: {OFFLINE_FIXES}")


def online_problem(timeout_s: float) -> str | None:
    """Why an online wandb run cannot start from this process (no usable API key, or the server
    does not answer within ``timeout_s`` seconds) with its fix, or None.

    wandb's key lookup is internal (wandb.sdk.lib.wbauth, in the wandb the tests run against,
    0.31); an older wandb without it is not checked here, and its wandb.init error is still one
    line (run_logging catches it)."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth  # noqa: F401 (what _credentials_problem uses)
    except ImportError:
        return None
    base_url = wandb_setup.singleton().settings.base_url  # does not start wandb's service
    return _credentials_problem(base_url) or _unreachable(base_url, timeout_s)


def _credentials_problem(base_url: str) -> str | None:
    import wandb.errors
    from wandb.sdk.lib import wbauth

    try:  # what wandb.init's login does, without prompting and without changing the session
        auth = wbauth.authenticate_session(host=base_url, source="recap", prompt=False, update_session=False)
    except (wandb.errors.Error, ValueError) as exc:  # a key in a bad format; a server URL wandb refuses
        return (f"wandb cannot use its credentials for {base_url} ({_first_line(exc)}): fix WANDB_API_KEY or run "
                "`wandb login`")
    if auth is None:
        return f"no wandb API key for {base_url}: run `wandb login` or export WANDB_API_KEY"
    return None


def _unreachable(base_url: str, timeout_s: float) -> str | None:
    """Why ``base_url`` gives no HTTP answer within ``timeout_s`` seconds, or None.

    Any HTTP status is an answer (the check is for the network, wandb.init judges the rest), and
    so is a TLS certificate error (wandb may trust other CAs than Python does). The request goes
    through the proxies of the environment (HTTPS_PROXY, NO_PROXY), as wandb's does. It runs in a
    thread so that name resolution, which no socket timeout bounds, cannot stall the run either.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(base_url, method="HEAD"), timeout=timeout_s):
                outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except urllib.error.URLError as exc:
            outcome.append(None if isinstance(exc.reason, ssl.SSLError) else str(exc.reason))
        except (OSError, ValueError, http.client.HTTPException) as exc:  # a timeout or reset while reading,
            outcome.append(str(exc) or type(exc).__name__)  # a URL urllib cannot use, no HTTP spoken

    thread = threading.Thread(target=probe, name="wandb-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        reason = f"no answer within {timeout_s:g} s"
    elif outcome[0] is None:
        return None
    else:
        reason = outcome[0]
    return (f"the wandb server {base_url} cannot be reached ({reason}): check the network, the proxy "
            "(HTTPS_PROXY) or WANDB_BASE_URL")


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
