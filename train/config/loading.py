"""Compose conf/ with Hydra, check command-line overrides, and build the typed config.

Hydra reports a bad override as a stack of exceptions and exits with 1; users get one line
instead: the key, what is wrong, and the valid choices (exit code 2, see train/cli.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from train.config.experiment import ExperimentConfig
from train.config.typed import ConfigError, build, did_you_mean

PRIMARY_CONFIG = "recap"
# Groups placed under another package in conf/recap.yaml's defaults: chosen as group@package=option.
GROUP_PACKAGES = {"optimizer": ("train_vae.optimizer", "pretrain_captioner.optimizer", "finetune_captioner.optimizer")}
MAX_SWEEP_CHECKS = 64
# Hydra instantiates these from its own config (by `_target_`); recap never lets the command line
# choose them: `recap launch` starts jobs, and no other object is built from a name.
HYDRA_OBJECTS = ("hydra.callbacks", "hydra.launcher", "hydra.sweeper", "hydra/callbacks", "hydra/launcher",
                 "hydra/sweeper")


def conf_dir() -> Path:
    """The conf/ directory: $RECAP_CONF_DIR, else the one beside the installed packages."""
    override = os.environ.get("RECAP_CONF_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "conf"


def config_groups() -> dict[str, list[str]]:
    """Group name -> sorted option names, read from conf/<group>/*.yaml."""
    root = conf_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and any(d.glob("*.yaml"))
    }


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the primary config with Hydra's compose API (no run directory, no logging)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra_compose(PRIMARY_CONFIG, overrides=list(overrides))


def experiment_from_omegaconf(cfg: DictConfig) -> ExperimentConfig:
    """Resolve interpolations and build the typed config (ConfigError on any mistake)."""
    try:
        data: Any = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(str(exc.full_key), "has no value; set it on the command line (key=value)") from None
    except InterpolationResolutionError as exc:
        raise ConfigError(str(exc.full_key), f"cannot resolve interpolation: {exc.msg}") from None
    data.pop("hydra", None)
    return build(ExperimentConfig, data)


def load_experiment(overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Check, compose and build; the way tests and `recap pipeline` get a config."""
    return check_overrides(overrides)


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parsed = []
    for line in overrides:
        try:
            overrides_here = OverridesParser.create().parse_overrides([line])
        except OverrideParseException as exc:
            # Hydra's message is several lines (echo of the line, the grammar error, a doc link).
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = "; ".join(ln for ln in lines[1:] if not ln.startswith("See https://"))
            detail = detail or (lines[0] if lines else type(exc).__name__)
            raise ConfigError("", f"cannot parse override '{line}': {detail}; use key=value, and quote values with "
                              "braces, commas or colons (data.train='/data/{00000..00099}.tar')") from None
        for o in overrides_here:
            if not o.key_or_group:
                raise ConfigError("", f"cannot parse override '{line}': the key is missing; use key=value")
        parsed.extend(overrides_here)
    return parsed


def _values(override: Any) -> list[str]:
    if override.is_sweep_override():
        if not override.is_discrete_sweep():
            raise ConfigError(override.key_or_group, "only list and range sweeps can be checked (a,b,c or range(...))")
        return list(override.sweep_string_iterator())
    value = override.value()
    return [value if isinstance(value, str) else "null" if value is None else str(value)]


def _check_group(override: Any, groups: dict[str, list[str]]) -> None:
    group = override.key_or_group
    packages = GROUP_PACKAGES.get(group)
    if packages is not None and override.package not in packages:
        where = f"'{group}@{override.package}' is not a place for it; " if override.package is not None else ""
        raise ConfigError(group, f"{where}the {group} belongs to a stage: use {group}@<stage>.{group}=<option> with "
                          f"<stage>.{group} one of {', '.join(packages)}; options: {', '.join(groups[group])}; or "
                          f"set fields like {packages[0]}.lr=1e-4")
    if override.is_delete():
        raise ConfigError(group, "a config group cannot be removed; choose one of its options instead")
    for value in _values(override):
        if value not in groups[group]:
            raise ConfigError(
                group,
                f"'{value}' is not an option of group '{group}'{did_you_mean(value, groups[group])}; "
                f"options: {', '.join(groups[group])}",
            )


def _check_key(cfg: DictConfig, override: Any, groups: dict[str, list[str]]) -> None:
    path = override.key_or_group
    parts = path.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        if not isinstance(node, DictConfig):
            raise ConfigError(path, f"'{here}' is a value, not a section; set it directly with {here}=...")
        if part not in node:
            valid = sorted(str(k) for k in node.keys())
            hint = did_you_mean(part, valid)
            if not hint and depth == 0:
                hint = did_you_mean(part, groups)
            where = f" under '{here}'" if here else ""
            raise ConfigError(path, f"unknown config key{hint}; valid keys{where}: {', '.join(valid)}")
        node = node._get_node(part)


def _check_hydra_key(key: str) -> None:
    """Refuse a hydra.* override that would make Hydra build an object by name (`_target_`)."""
    if "_target_" in key.split(".") or any(key == k or key.startswith(k + ".") for k in HYDRA_OBJECTS):
        raise ConfigError(key, "recap does not let the command line choose objects for Hydra to build (callbacks, "
                          "launcher, sweeper, _target_); to start jobs elsewhere use `recap launch` (docs/slurm.md)")


def sweep_keys(overrides: Sequence[str]) -> list[str]:
    """Keys of the overrides that are sweeps (a,b / range(...)): they need -m (multirun)."""
    return [o.key_or_group for o in _parse(overrides) if not o.is_hydra_override() and o.is_sweep_override()]


def check_overrides(overrides: Sequence[str]) -> ExperimentConfig:
    """Validate overrides (including every value of a -m sweep) before any work starts.

    Returns the config of the first point (the only one without a sweep).

    Raises ConfigError naming the key: unknown group options, unknown keys (with the valid keys
    and a close match), malformed overrides, and whatever the schema rejects (types, ranges,
    inconsistent values) for each swept value.
    """
    parsed = _parse(overrides)
    for o in parsed:
        if o.is_hydra_override():
            _check_hydra_key(o.key_or_group)
    groups = config_groups()
    user = [o for o in parsed if not o.is_hydra_override()]
    for o in user:
        if o.key_or_group in groups:
            _check_group(o, groups)
    # One composition per swept value (others at their first value) checks every point cheaply.
    firsts = [(o, _values(o)) for o in user]
    # A single value keeps the user's own spelling: re-rendering the parsed value would turn
    # null into the string 'None' and re-split quoted strings that contain commas.
    base = [f"{o.get_key_element()}={vals[0]}" if o.is_sweep_override() else o.input_line for o, vals in firsts]
    points = [base]
    for i, (o, vals) in enumerate(firsts):
        for v in vals[1:]:
            points.append(base[:i] + [f"{o.get_key_element()}={v}"] + base[i + 1 :])
    first = _compose_checking_keys(base, [(o, line) for (o, _), line in zip(firsts, base)], groups)
    others = itertools.islice(points[1:], MAX_SWEEP_CHECKS - 1)
    configs = [experiment_from_omegaconf(first), *(experiment_from_omegaconf(_compose_or_explain(p)) for p in others)]
    return configs[0]


def _compose_checking_keys(lines: list[str], overrides: list[tuple[Any, str]],
                           groups: dict[str, list[str]]) -> DictConfig:
    """The composition of ``lines``. Hydra refuses an override of a key the config lacks, so only
    when it fails are the keys checked one by one, against the composition of the group choices
    alone, for an error that names the key, the valid ones and a close match. (Composing once
    when all is well: each composition costs ~0.3 s in every process a launch starts.)"""
    from hydra.errors import HydraException

    try:
        return compose(lines)
    except HydraException:
        pass
    cfg = _compose_or_explain([line for o, line in overrides if o.key_or_group in groups])
    for o, _ in overrides:
        if o.key_or_group not in groups and not o.is_add():
            _check_key(cfg, o, groups)
    return _compose_or_explain(lines)  # not a key: Hydra's own error, in one line


def _compose_or_explain(lines: list[str]) -> DictConfig:
    from hydra.errors import HydraException

    try:
        return compose(lines)
    except HydraException as exc:
        # Whatever the pre-checks above did not anticipate: still one line, no traceback.
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ConfigError("", text or type(exc).__name__) from None
