"""conf/: every experiment and every group option composes and validates; experiments are deltas."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from train.config.loading import (GROUP_PACKAGES, compose, conf_dir, config_groups, experiment_from_omegaconf, load_experiment)
from train.config.experiment import ExperimentConfig
from train.config.training import check_batch
from train.config.typed import ConfigError, flatten

REPO = Path(__file__).resolve().parents[2]
GROUPS = config_groups()
EXPERIMENTS = GROUPS["experiment"]
PRODUCTION = ["dalle3_256", "dalle3_1024"]


@functools.lru_cache(maxsize=None)
def _experiment(name: str) -> ExperimentConfig:
    return load_experiment([f"experiment={name}"])


def _experiment_yaml(name: str) -> dict:
    return yaml.safe_load((conf_dir() / "experiment" / f"{name}.yaml").read_text())


def _group_overrides(defaults: list) -> dict[str, str]:
    """`- override /data: img2dataset` entries of an experiment -> {'data': 'img2dataset'}."""
    out = {}
    for entry in defaults:
        assert isinstance(entry, dict) and len(entry) == 1, f"unexpected defaults entry {entry!r}"
        (key, option), = entry.items()
        assert key.startswith("override /"), f"experiments only override groups, got {key!r}"
        out[key.removeprefix("override /")] = option
    return out


def _primary_defaults() -> dict[str, str]:
    primary = yaml.safe_load((conf_dir() / "recap.yaml").read_text())
    out = {}
    for entry in primary["defaults"]:
        if isinstance(entry, dict):
            (key, option), = entry.items()
            if not key.startswith("override "):
                out[key.split("@")[0]] = option
    return out


def test_conf_dir_is_the_repository_conf():
    assert conf_dir() == REPO / "conf"


def test_config_groups_lists_every_yaml():
    assert GROUPS == {
        "captioner": ["coca_tiny", "coca_tiny_small_vocab", "coca_vit_b32", "coca_vit_l14"],
        "data": ["img2dataset", "toy"],
        "diffusion": ["eps_linear", "v_cosine"],
        "experiment": ["dalle3_1024", "dalle3_256", "toy"],
        "launcher": ["deepspeed", "local", "slurm", "torchrun"],
        "logger": ["default"],
        "optimizer": ["adamw"],
        "runtime": ["ddp", "single", "zero1", "zero2", "zero3"],
        "style": ["dsc", "ssc"],
        "text_encoder": ["t5_tiny", "t5_xxl"],
        "unet": ["dalle3_0p9b", "tiny"],
        "vae": ["sd", "tiny"],
    }


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = _experiment(name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.name == name
    assert cfg.run.root == "runs"


def test_default_config_is_the_toy_experiment():
    assert load_experiment([]) == _experiment("toy")


def test_toy_experiment_is_tiny_and_local():
    cfg = _experiment("toy")
    assert cfg.unet.block_out_channels == [32, 64, 64]
    assert max(cfg.unet.block_out_channels) <= 64
    assert cfg.text_encoder.architecture is not None
    assert cfg.text_encoder.architecture.d_model == 64
    assert cfg.text_encoder.pretrained is None
    assert cfg.text_encoder.tokenizer == "runs/toy/tokenizer"
    assert cfg.vae.pretrained is None and cfg.vae.block_out_channels == [16, 32, 32]  # 4x (issue 16)
    assert cfg.captioner.pretrained is None and cfg.captioner.architecture["embed_dim"] <= 128
    assert cfg.captioner.fitted_vocab_size == 768 and cfg.data.toy.world == "shapes"
    assert cfg.data.toy is not None
    assert (cfg.data.train, cfg.data.heldout) == ("runs/toy/toy_data/train", "runs/toy/toy_data/heldout")
    assert (cfg.runtime.kind, cfg.launcher.kind) == ("single", "local")
    assert (cfg.train_vae.steps, cfg.train_vae.global_batch_size, cfg.train_vae.micro_batch_size) == (2200, 4, 4)
    assert (cfg.train_vae.optimizer.lr, cfg.train_vae.optimizer.warmup_steps) == (5e-4, 20)
    assert cfg.train_vae.optimizer.betas == (0.9, 0.999)
    assert cfg.checkpoint.every_steps == 100


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_experiments_use_local_pretrained_weights_and_deepspeed(name):
    cfg = _experiment(name)
    for key, value in [("text_encoder.pretrained", cfg.text_encoder.pretrained),
                       ("vae.pretrained", cfg.vae.pretrained),
                       ("captioner.pretrained", cfg.captioner.pretrained)]:
        assert value is not None, key
        assert Path(value).is_absolute(), f"{key}={value!r} is not an absolute local path"
        assert "http" not in value and "://" not in value, f"{key}={value!r} is not local"
    assert cfg.text_encoder.architecture is None
    assert cfg.captioner.architecture is None
    assert cfg.runtime.kind == "deepspeed"
    assert cfg.launcher.kind == "torchrun"
    assert cfg.data.toy is None
    assert cfg.unet.block_out_channels == [448, 896, 1344]


def test_production_experiment_specifics():
    small, large = _experiment("dalle3_256"), _experiment("dalle3_1024")
    assert (small.runtime.zero_stage, small.launcher.nproc_per_node, small.launcher.nnodes) == (2, 8, 1)
    assert (large.runtime.zero_stage, large.launcher.nproc_per_node, large.launcher.nnodes) == (3, 8, 4)
    assert small.diffusion.prediction_type == "epsilon"
    assert (large.diffusion.prediction_type, large.diffusion.beta_schedule) == ("v_prediction", "squaredcos_cap_v2")
    assert small.text_encoder.pretrained == "/models/t5-v1_1-xxl"
    assert small.vae.pretrained == "/models/sd-vae-ft-mse"
    assert large.captioner.model_name == "coca_ViT-L-14"


HOSTFILE = "/etc/recap/hostfile"


def _option_override(group: str, option: str) -> list[str]:
    if group in GROUP_PACKAGES:  # optimizer@train_vae.optimizer=adamw (each stage's place)
        return [f"{group}@{package}={option}" for package in GROUP_PACKAGES[group]]
    if group == "launcher" and option == "torchrun":  # several processes need a multi-process runtime
        return [f"{group}={option}", "runtime=ddp"]
    if group == "launcher" and option == "deepspeed":  # its hostfile has no default
        return [f"{group}={option}", f"launcher.hostfile={HOSTFILE}"]
    return [f"{group}={option}"]


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, opts in GROUPS.items() if g != "experiment" for o in opts]
)
def test_every_group_option_composes_and_validates(group, option):
    # Without the experiment (it only changes values), so the option's file is seen as written.
    node = compose(["~experiment", "run.name=probe", *_option_override(group, option)])
    section = OmegaConf.to_container(node, resolve=False)
    text = (conf_dir() / group / f"{option}.yaml").read_text()
    header = text.splitlines()[0]  # "# @package finetune_captioner" places a group elsewhere
    packages = [header.split()[2]] if header.startswith("# @package") else list(GROUP_PACKAGES.get(group, (group,)))
    for package in packages:
        placed = section
        for part in package.split("."):
            placed = placed[part]
        expected = yaml.safe_load(text)
        if (group, option) == ("launcher", "deepspeed"):
            expected["hostfile"] = HOSTFILE  # the one value _option_override sets
        if header.startswith("# @package"):
            assert {k: placed[k] for k in expected} == expected
        elif package == packages[0]:
            assert placed == expected
        else:  # recap.yaml sets stage-specific values (lr, schedule) over the group's file
            assert set(placed) == set(expected) and placed["name"] == expected["name"]
    cfg = experiment_from_omegaconf(node)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.name == "probe"


def test_launcher_torchrun_with_single_runtime_is_rejected():
    with pytest.raises(ConfigError) as info:
        load_experiment(["launcher=torchrun", "launcher.nproc_per_node=2"])
    assert info.value.key == "runtime"
    assert "runtime=ddp or zero1/2/3" in info.value.message


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_state_only_deltas(name):
    raw = _experiment_yaml(name)
    groups = _group_overrides(raw.pop("defaults", []))
    primary = _primary_defaults()
    for group, option in groups.items():
        assert option in GROUPS[group], f"{name}: unknown option {group}={option}"
        assert option != primary[group], f"{name}: 'override /{group}: {option}' restates the default"
    base = OmegaConf.to_container(compose(["~experiment", *(f"{g}={o}" for g, o in groups.items())]), resolve=False)
    base_flat = flatten(base)
    exp_flat = flatten(raw)
    assert exp_flat, f"{name} states nothing"
    new_keys = sorted(set(exp_flat) - set(base_flat))
    assert new_keys == [], f"{name} adds keys the base config does not have: {new_keys}"
    same = sorted(k for k in exp_flat if exp_flat[k] == base_flat[k])
    assert same == [], f"{name} restates base values: {same}"


@pytest.mark.parametrize(
    ("global_batch", "micro", "world", "accum"), [(32, 8, 2, 2), (32, 8, 1, 4), (16, 16, 1, 1), (64, 4, 4, 4)]
)
def test_check_batch_accumulation_steps(global_batch, micro, world, accum):
    assert check_batch(global_batch, micro, world) == accum


def test_check_batch_rejects_indivisible_batch():
    with pytest.raises(ConfigError) as info:
        check_batch(33, 8, 1)
    assert info.value.key == "global_batch_size"
    assert info.value.message == (
        "33 is not divisible by world_size (1) x micro_batch_size (8) = 8; "
        "set global_batch_size to a multiple of 8 or change micro_batch_size"
    )
    with pytest.raises(ConfigError) as info:
        check_batch(32, 8, 3)
    assert "multiple of 24" in info.value.message


@pytest.mark.parametrize(("global_batch", "micro"), [(0, 8), (8, 0), (-8, 8)])
def test_check_batch_rejects_non_positive(global_batch, micro):
    with pytest.raises(ConfigError) as info:
        check_batch(global_batch, micro)
    assert info.value.key == "global_batch_size"
    assert info.value.message == "global_batch_size and micro_batch_size must be >= 1"


@pytest.mark.parametrize("name", ["toy", "dalle3_256", "dalle3_1024"])
def test_decoding_lets_a_three_word_caption_end(name):
    """EOT may follow "SOT a red circle" (4 tokens) in every decoding section: with open_clip's
    min_seq_len=5 the toy SSC captioner had to add a fourth word ("a brown cross brown")."""
    cfg = load_experiment([f"experiment={name}"])
    for section in (cfg.caption, cfg.recaption, cfg.evaluate_captioner):
        assert 1 <= section.decoding.min_length <= 4
