"""What a stage checks before a launch (ConfigError: exit 2), from the config's sections.

`recap STAGE` runs these in the launching process, before torchrun or DeepSpeed's launcher starts
the workers (train/commands/hydra_run.py), so the functions they call live in modules that import
no model library: a usage error comes back in about 2 s instead of after every worker loaded
diffusers or open_clip, and a good launch does not pay that import twice.
"""

from __future__ import annotations

from collections.abc import Callable

from train.config.experiment import ExperimentConfig


def _recaption(cfg: ExperimentConfig) -> None:
    from train.stages.recaption import check  # the stage module imports no model library

    check(cfg)


def _cache(cfg: ExperimentConfig) -> None:
    from train.t2i.checks import check_cache_job

    check_cache_job(cfg.cache)


def _train_t2i(cfg: ExperimentConfig) -> None:
    from train.t2i.checks import check_train_t2i

    launcher = cfg.launcher  # launcher=local: 1 process (LauncherConfig.validate)
    check_train_t2i(cfg.train_t2i, cfg.caption_mix.weights, launcher.nproc_per_node * launcher.nnodes)


PRECHECKS: dict[str, Callable[[ExperimentConfig], None]] = {
    "recaption": _recaption, "cache": _cache, "train-t2i": _train_t2i,
}
