"""`recap make-toy-data`: write the synthetic-scenes shards (train and held-out splits).

Reads: data.train, data.heldout (output directories), data.toy (generation settings), logger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.toy_shards import write_toy_dataset
from train.config.experiment import ExperimentConfig
from train.outputs.run_logging import (MetricsLogger, config_snapshot, finish_stage, setup_logging, write_config_snapshot)
from train.config.typed import ConfigError


def _output_dir(spec: str, key: str) -> Path:
    if "{" in spec or "://" in spec or spec.startswith("pipe:") or "::" in spec:
        raise ConfigError(key, f"make-toy-data writes into a local directory, got {spec!r}")
    return Path(spec)


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Generate every missing toy shard; print and return the summary."""
    if cfg.data.toy is None:
        raise ConfigError("data", "make-toy-data generates the synthetic scenes; choose data=toy (your own shards "
                          "need no generation)")
    log = setup_logging(run_dir, "make_toy_data")
    write_config_snapshot(run_dir, cfg)
    dirs = {"train": _output_dir(cfg.data.train, "data.train"), "heldout": _output_dir(cfg.data.heldout, "data.heldout")}
    log.info("writing toy shards to %s and %s", dirs["train"], dirs["heldout"])
    metrics = MetricsLogger(run_dir, cfg.logger, stage="make_toy_data", run_name=cfg.run.name,
                            config=config_snapshot(cfg))
    done = []

    def on_shard(split: str, shard_id: int, counts: dict[str, Any]) -> None:
        done.append(shard_id)
        metrics.log(len(done), {"split": split, "shard": shard_id, "samples": counts["samples"],
                                "curated": counts.get("curated", 0), "with_text": counts.get("with_text", 0)})

    try:
        summary = write_toy_dataset(dirs, cfg.data.toy, progress=cfg.logger.progress, on_shard=on_shard)
    except ValueError as exc:
        raise ConfigError("data.toy", str(exc)) from None
    summary["train_dir"], summary["heldout_dir"] = str(dirs["train"]), str(dirs["heldout"])
    metrics.close({k: v for k, v in summary.items() if k != "splits"})
    finish_stage(run_dir, "make-toy-data", summary)
    log.info(describe(summary, dirs))
    return summary


def describe(summary: dict[str, Any], dirs: dict[str, Path]) -> str:
    """A human-readable account of what was written (counts per split, in this run)."""
    lines = [f"wrote {summary['samples_written']} samples in {summary['shards_written']} shards "
             f"({summary['shards_skipped']} already complete) at {summary['samples_per_s']} samples/s"]
    for split, c in summary["splits"].items():
        n = c.get("samples", 0)
        if not n:
            continue
        pct = lambda k: f"{c.get(k, 0)} ({100 * c.get(k, 0) / n:.1f}%)"  # noqa: E731
        objects = "/".join(str(c.get(f"objects_{k}", 0)) for k in range(1, 5))
        aspects = ", ".join(f"{k.removeprefix('aspect_')} {v}" for k, v in sorted(c.items()) if k.startswith("aspect_"))
        lines.append(f"  {split} -> {dirs[split]}: {n} samples; curated {pct('curated')}; written word "
                     f"{pct('with_text')}; empty alt-text {pct('empty_alt_text')}; 1/2/3/4 objects {objects}; "
                     f"aspect {aspects}")
    return "\n".join(lines)
