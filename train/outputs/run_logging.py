"""What a run tells its user: logs, progress bars, JSONL metrics, wandb, the closing summary.

Everything written here passes through train/outputs/redaction.py, so secrets in config values,
URLs or the environment never reach a file. Only rank 0 prints, draws progress bars and talks
to wandb; every rank writes its own log file (logs/<stage>.rank<N>.log).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from train.config.execution import LoggerConfig, WandbConfig
from train.outputs.redaction import redact_text, redact_tree
from train.outputs.wandb_preflight import OFFLINE_FIXES
from train.config.typed import ConfigError, to_dict

T = TypeVar("T")
log = logging.getLogger("recap")


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup_logging(run_dir: Path, stage: str, rank: int = 0, console: bool | None = None) -> logging.Logger:
    """Log to ``run_dir/logs/<stage>.rank<rank>.log`` (all ranks) and to stderr (rank 0, or as
    ``console`` says: independent processes such as Slurm array tasks each have their own)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("recap")
    root.setLevel(logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(logs / f"{stage}.rank{rank}.log")
    file_handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(file_handler)
    if rank == 0 if console is None else console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_RedactingFormatter(f"[{stage}] %(message)s"))
        root.addHandler(stream)
    return root


def config_snapshot(cfg: Any) -> dict[str, Any]:
    """A typed config (a stage passes the whole experiment: the snapshot is what the run was asked
    to do) as plain data, secrets masked. It only serializes; nothing here reads a key."""
    return redact_tree(to_dict(cfg))


def write_config_snapshot(run_dir: Path, cfg: Any) -> None:
    """``run_dir/config.yaml``: what this run was asked to do (redacted)."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config_snapshot(cfg))))


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, initial: int = 0) -> Any:
    """A tqdm bar (rate and ETA) when enabled, else a no-op bar with the same interface."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, initial=initial,
                dynamic_ncols=True, smoothing=0.1)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


class MetricsLogger:
    """Per-step metrics to ``run_dir/metrics.jsonl`` (append: a resumed run continues the file)
    and to wandb (offline by default). Rank 0 only; other ranks get a silent instance."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, *, stage: str, run_name: str, config: dict[str, Any],
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.mode != "disabled":
            self._wandb = _start_wandb(run_dir, cfg.wandb, stage=stage, run_name=run_name, config=config)
        self._file = open(self.path, "a")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(redact_text(json.dumps(record)) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def event(self, step: int, name: str, **fields: Any) -> None:
        """A non-metric record (resumed, stage switched, checkpoint saved)."""
        self.log(step, {"event": name, **fields})

    def image(self, step: int, name: str, path: Path, caption: str = "") -> None:
        """An image written to ``path`` (a sample grid): recorded in the JSONL, sent to wandb."""
        if not self.enabled:
            return
        self.event(step, "image", key=name, path=str(path))
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(path), caption=redact_text(caption))}, step=step)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        if summary and self._wandb is not None:
            self._wandb.summary.update(redact_tree(summary))
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, cfg: WandbConfig, *, stage: str, run_name: str, config: dict[str, Any]) -> Any:
    """The wandb run (``cfg.mode``: online or offline). Online was checked before the stage began
    (wandb_preflight.py); should wandb.init still fail (the key refused, the server failing
    meanwhile), that is one line too: ConfigError, or offline with a warning under fallback_offline."""
    import wandb

    try:
        return _init_wandb(run_dir, cfg, cfg.mode, stage=stage, run_name=run_name, config=config)
    except wandb.errors.Error as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if cfg.mode != "online" or not cfg.fallback_offline:
            fix = f"; or run without the server: {OFFLINE_FIXES}" if cfg.mode == "online" else ""
            raise ConfigError("logger.wandb.mode", f"{cfg.mode}, but wandb.init failed: {reason}{fix}") from None
        log.warning("wandb could not start an online run (%s); logging offline instead "
                    "(logger.wandb.fallback_offline=true)", reason)
        return _init_wandb(run_dir, cfg, "offline", stage=stage, run_name=run_name, config=config)


def _init_wandb(run_dir: Path, cfg: WandbConfig, mode: str, *, stage: str, run_name: str,
                config: dict[str, Any]) -> Any:
    import wandb

    # wandb records the command line (sys.argv) in the run's metadata; overrides may carry
    # secrets (a URL with a password), so it sees a redacted copy, and so does every value
    # handed to it (tags went in clear: the offline run file kept the password).
    argv, sys.argv = sys.argv, [redact_text(a) for a in sys.argv]
    try:
        return wandb.init(
            project=redact_text(cfg.project), entity=cfg.entity and redact_text(cfg.entity), mode=mode,
            dir=str(run_dir), name=redact_text(f"{run_name}/{stage}"), group=redact_text(run_name), job_type=stage,
            tags=[redact_text(t) for t in cfg.tags], config=redact_tree(config), resume="allow",
            id=_wandb_id(run_dir), settings=wandb.Settings(silent=True),
        )
    finally:
        sys.argv = argv


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def finish_stage(run_dir: Path, stage: str, summary: dict[str, Any], filename: str = "summary.json") -> None:
    """Print the stage summary and write it to ``run_dir/<filename>`` (redacted)."""
    summary = redact_tree(summary)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / filename).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    lines = [f"== {stage} summary =="] + [f"  {k}: {json.dumps(v)}" for k, v in summary.items()]
    log.info("\n".join(lines))
