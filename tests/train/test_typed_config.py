"""train/config/typed.py: building validated dataclasses from plain mappings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from train.config.typed import ConfigError, build, did_you_mean, flatten, to_dict


@dataclass(frozen=True)
class Leaf:
    c: str
    n: int = 0


@dataclass(frozen=True)
class Middle:
    b: list[Leaf] = field(default_factory=list)


@dataclass(frozen=True)
class Top:
    a: Middle = field(default_factory=Middle)


@dataclass(frozen=True)
class Scalars:
    count: int = 1
    flag: bool = False
    ratio: float = 0.5
    name: str = "x"
    maybe: int | None = None
    mode: Literal["fast", "slow"] = "fast"
    sizes: list[int] = field(default_factory=list)
    pair: tuple[float, ...] = (0.0, 1.0)
    table: dict[str, int] = field(default_factory=dict)
    leaves: dict[str, Leaf] = field(default_factory=dict)


@dataclass(frozen=True)
class Required:
    steps: int
    label: str = "a"


@dataclass(frozen=True)
class Ranged:
    low: int = 0
    high: int = 1

    def validate(self) -> None:
        if self.low > self.high:
            raise ConfigError("low", f"must be <= high={self.high}, got {self.low}")


@dataclass(frozen=True)
class LibraryOptions:  # like data_pipeline.options: plain ValueError naming the field
    workers: int = 0

    def validate(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class Holder:
    ranged: Ranged = field(default_factory=Ranged)
    items: list[Ranged] = field(default_factory=list)
    lib: LibraryOptions = field(default_factory=LibraryOptions)


def _err(cls, data) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(cls, data)
    return info.value


def test_unknown_key_suggests_close_match_and_lists_sorted_valid_keys():
    err = _err(Required, {"stpes": 3})
    assert err.key == "stpes"
    assert err.message == "unknown key (did you mean 'steps'?); valid keys here: label, steps"
    assert str(err) == "stpes: unknown key (did you mean 'steps'?); valid keys here: label, steps"


def test_unknown_key_without_close_match_has_no_hint():
    err = _err(Required, {"steps": 1, "zzz": 1})
    assert err.key == "zzz"
    assert err.message == "unknown key; valid keys here: label, steps"


def test_did_you_mean():
    assert did_you_mean("tarin", ["train", "heldout"]) == " (did you mean 'train'?)"
    assert did_you_mean("qqqq", ["train", "heldout"]) == ""


def test_nested_path_names_list_index():
    err = _err(Top, {"a": {"b": [{"c": "x"}, {"c": "y"}, {"c": 5}]}})
    assert err.key == "a.b[2].c"
    assert err.message == "expected a string, got 5"
    err = _err(Top, {"a": {"b": [{"c": "x", "m": 1}]}})
    assert (err.key, err.message) == ("a.b[0].m", "unknown key; valid keys here: c, n")


def test_nested_build_values():
    top = build(Top, {"a": {"b": [{"c": "x"}, {"c": "y", "n": 3}]}})
    assert top == Top(Middle([Leaf("x", 0), Leaf("y", 3)]))


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        ({"count": True}, "count", "expected an integer, got True"),
        ({"count": 2.0}, "count", "expected an integer, got 2.0"),
        ({"count": "3"}, "count", "expected an integer, got '3'"),
        ({"flag": 1}, "flag", "expected true or false, got 1"),
        ({"flag": "true"}, "flag", "expected true or false, got 'true'"),
        ({"ratio": True}, "ratio", "expected a number, got True"),
        ({"ratio": "0.5"}, "ratio", "expected a number, got '0.5'"),
        ({"name": 3}, "name", "expected a string, got 3"),
        ({"count": None}, "count", "must not be null; expected int"),
        ({"maybe": "abc"}, "maybe", "expected an integer, got 'abc'"),
        ({"maybe": False}, "maybe", "expected an integer, got False"),
        ({"sizes": "1,2"}, "sizes", "expected a list of int, got '1,2'"),
        ({"sizes": [1, "2"]}, "sizes[1]", "expected an integer, got '2'"),
        ({"table": [1]}, "table", "expected a mapping, got [1]"),
        ({"table": {"a": 1, "b": True}}, "table.b", "expected an integer, got True"),
        ({"leaves": {"k": {"c": "x", "q": 1}}}, "leaves.k.q", "unknown key; valid keys here: c, n"),
        ({"leaves": {"k": 3}}, "leaves.k", "expected a mapping with keys ['c', 'n'], got 3"),
    ],
)
def test_type_errors_name_the_key(data, key, message):
    err = _err(Scalars, data)
    assert (err.key, err.message) == (key, message)


def test_bool_and_int_are_kept_apart_but_float_accepts_int():
    s = build(Scalars, {"count": 3, "flag": True, "ratio": 2})
    assert s.count == 3 and type(s.count) is int
    assert s.flag is True
    assert s.ratio == 2.0 and type(s.ratio) is float


def test_optional_accepts_null_and_value():
    assert build(Scalars, {"maybe": None}).maybe is None
    assert build(Scalars, {"maybe": 7}).maybe == 7


def test_literal_choice_message():
    err = _err(Scalars, {"mode": "fsat"})
    assert err.key == "mode"
    assert err.message == "'fsat' is not a valid choice (did you mean 'fast'?); choose one of: 'fast', 'slow'"
    err = _err(Scalars, {"mode": "zzz"})
    assert err.message == "'zzz' is not a valid choice; choose one of: 'fast', 'slow'"
    assert build(Scalars, {"mode": "slow"}).mode == "slow"


def test_list_and_tuple_conversion():
    s = build(Scalars, {"sizes": (1, 2, 3), "pair": [0.9, 1]})
    assert s.sizes == [1, 2, 3] and isinstance(s.sizes, list)
    assert s.pair == (0.9, 1.0) and isinstance(s.pair, tuple)
    assert all(type(v) is float for v in s.pair)


def test_dict_of_scalars_and_dataclasses():
    s = build(Scalars, {"table": {"a": 1, "b": 2}, "leaves": {"x": {"c": "u"}, "y": {"c": "v", "n": 4}}})
    assert s.table == {"a": 1, "b": 2}
    assert s.leaves == {"x": Leaf("u", 0), "y": Leaf("v", 4)}


def test_missing_required_key():
    err = _err(Required, {"label": "b"})
    assert (err.key, err.message) == ("steps", "required key is missing (expected int)")
    err = _err(Top, {"a": {"b": [{"n": 1}]}})
    assert (err.key, err.message) == ("a.b[0].c", "required key is missing (expected str)")


def test_non_mapping_for_dataclass():
    err = _err(Required, [1, 2])
    assert err.key == ""
    assert str(err) == "expected a mapping with keys ['label', 'steps'], got [1, 2]"


def test_validate_config_error_is_rerooted_under_node_path():
    err = _err(Holder, {"ranged": {"low": 5, "high": 2}})
    assert (err.key, err.message) == ("ranged.low", "must be <= high=2, got 5")
    err = _err(Holder, {"items": [{"low": 0}, {"low": 3, "high": 1}]})
    assert (err.key, err.message) == ("items[1].low", "must be <= high=1, got 3")
    # At the root the key stays as the node named it.
    err = _err(Ranged, {"low": 9})
    assert (err.key, err.message) == ("low", "must be <= high=1, got 9")


def test_plain_value_error_from_validate_becomes_config_error_at_node_path():
    err = _err(Holder, {"lib": {"workers": -1}})
    assert isinstance(err, ConfigError)
    assert (err.key, err.message) == ("lib", "workers must be >= 0, got -1")
    assert err.__cause__ is None and err.__suppress_context__


def test_config_error_under():
    err = ConfigError("lr", "must be > 0")
    moved = err.under("train_vae.optimizer")
    assert (moved.key, moved.message) == ("train_vae.optimizer.lr", "must be > 0")
    assert str(moved) == "train_vae.optimizer.lr: must be > 0"
    assert err.under("") is err
    assert ConfigError("", "bad").under("data").key == "data"
    assert isinstance(err, ValueError)


def test_to_dict_and_build_round_trip():
    s = build(Scalars, {"count": 4, "pair": [0.1, 0.2], "sizes": [5], "leaves": {"k": {"c": "z", "n": 2}}, "maybe": 1})
    plain = to_dict(s)
    assert plain == {
        "count": 4, "flag": False, "ratio": 0.5, "name": "x", "maybe": 1, "mode": "fast", "sizes": [5],
        "pair": [0.1, 0.2], "table": {}, "leaves": {"k": {"c": "z", "n": 2}},
    }
    assert build(Scalars, plain) == s
    assert [f.name for f in dataclasses.fields(Scalars)] == list(plain)


def test_flatten():
    plain = to_dict(build(Scalars, {"leaves": {"k": {"c": "z"}}, "sizes": [1, 2]}))
    flat = flatten(plain)
    assert flat["leaves.k.c"] == "z"
    assert flat["leaves.k.n"] == 0
    assert flat["sizes"] == [1, 2]  # lists stay leaves
    assert flat["table"] == {}  # empty mappings are kept as leaves
    assert flatten({"a": {"b": 1, "c": {"d": None}}}) == {"a.b": 1, "a.c.d": None}
    assert flatten({}) == {}
