"""docs/config-reference.md: every schema leaf is a row, known rows are right, the file is current."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from train.config import reference as config_reference
from train.config.experiment import ExperimentConfig
from train.config.training import FinetuneCaptionerConfig

ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| `(?P<type>(?:[^`])+)` \| (?P<rest>.*) \|$")


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every non-dataclass field under ``cls``, written apart from the module's walk:
    unwrap ``X | None`` and ``list[X]`` by hand and recurse through ``__dataclass_fields__``."""
    hints = typing.get_type_hints(cls)
    keys = []
    for name in cls.__dataclass_fields__:
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = options[0] if len(options) == 1 else tp
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            keys += _leaf_keys(typing.get_args(tp)[0], key + "[]")
        elif dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, key)
        else:
            keys.append(key)
    return keys


@pytest.fixture(scope="module")
def generated() -> str:
    return config_reference.render(config_reference.composed_configs())


@pytest.fixture(scope="module")
def rows(generated: str) -> dict[str, list[str]]:
    """key -> [type, value columns..., description], unescaped."""
    groups = generated.index("\n## Config groups\n")
    body = generated[generated.index("\n## ", groups + 1):]  # the key sections after the groups table
    out: dict[str, list[str]] = {}
    for line in body.splitlines():
        match = ROW.match(line)
        if match:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", match["rest"])]
            assert match["key"] not in out, f"{match['key']} appears twice"
            out[match["key"]] = [match["type"].replace("\\|", "|"), *(c.replace("\\|", "|") for c in cells)]
    return out


def test_every_leaf_field_is_one_row(rows: dict[str, list[str]]) -> None:
    leaves = _leaf_keys(ExperimentConfig)
    assert len(leaves) == len(set(leaves)) > 150
    assert len(rows) == len(leaves)
    assert set(rows) == set(leaves)
    # the corners of the walk: inherited fields, optional sections, lists of sections, top-level scalars
    for key in ("train_vae.optimizer.betas", "finetune_captioner.steps", "data.toy.seed",
                "text_encoder.architecture.d_model", "train_t2i.stages[].resolution", "seed"):
        assert key in rows, key


def test_known_rows(rows: dict[str, list[str]]) -> None:
    # key: [type, toy value, dalle3_256 value (blank = same as toy), description]
    assert rows["train_t2i.ema_decay"] == ["float | null", "`0.99`", "`0.9999`", "null: no EMA weights"]
    assert rows["caption_mix.dsc"][:3] == ["float", "`0.95`", ""]
    assert rows["sample.sampler.scheduler"][:3] == ["ddim | dpmpp", "`ddim`", ""]
    assert rows["runtime.kind"][:3] == ["single | ddp | deepspeed", "`single`", "`deepspeed`"]
    assert rows["train_t2i.stages[].resolution"][:3] == ["int", "`[64, 128]`", "`[256]`"]
    assert rows["data.toy.seed"][:3] == ["int", "`1234`", "—"]  # data.toy is null in production
    assert rows["train_vae.optimizer.betas"][0] == "list[float]"
    # descriptions: a trailing comment, an inherited field's, and a docstring Attributes: entry
    assert rows["caption.limit"][-1] == "caption at most this many images"
    assert rows["data.reader.num_workers"][-1].startswith("DataLoader worker processes per rank")
    assert config_reference.field_description(FinetuneCaptionerConfig, "grad_clip") == ""
    assert config_reference.field_description(FinetuneCaptionerConfig, "init_from").startswith("an exported")


def test_type_names() -> None:
    name = config_reference.type_name
    assert name(int) == "int" and name(float | None) == "float | null" and name(list[str]) == "list[str]"
    assert name(typing.Literal["ddim", "dpmpp"]) == "ddim | dpmpp"
    assert name(tuple[float, ...]) == "list[float]" and name(dict[str, typing.Any] | None) == "dict[str, any] | null"


def test_groups_are_listed_with_the_experiments_choices(generated: str) -> None:
    assert "| `unet` | `dalle3_0p9b` | A ~0.9B-parameter three-level UNet, the class of the paper's ablation " \
           "models. |  | ✓ |" in generated
    assert "| `runtime` | `single` | One process: CPU or one GPU. | ✓ |  |" in generated


def test_checked_in_reference_is_current(generated: str) -> None:
    path = Path(config_reference.OUTPUT)
    assert path.is_file(), "run: python -m train.config.reference"
    assert path.read_text() == generated, "docs/config-reference.md is stale; run: python -m train.config.reference"


def test_check_flag_reports_staleness(tmp_path: Path, generated: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_reference, "composed_configs", lambda: {"x": None})
    monkeypatch.setattr(config_reference, "render", lambda configs: generated)
    out = tmp_path / "ref.md"
    assert config_reference.main(["--check", "--output", str(out)]) == 1  # missing
    assert config_reference.main(["--output", str(out)]) == 0 and out.read_text() == generated
    assert config_reference.main(["--check", "--output", str(out)]) == 0
    out.write_text(generated + "edited\n")
    assert config_reference.main(["--check", "--output", str(out)]) == 1
