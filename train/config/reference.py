"""docs/config-reference.md, generated from the schema dataclasses and the composed configs.

    python -m train.config.reference           # (re)write docs/config-reference.md
    python -m train.config.reference --check   # exit 1 if the file is out of date (CI)

The walk starts at ``ExperimentConfig`` and follows ``dataclasses.fields`` and
``typing.get_type_hints``: a field whose type is a dataclass (also ``X | None`` and ``list[X]``)
becomes its own table, every other field is a row. Values are those of the composed configs,
built the way `recap` builds them (``train.config_loading.load_experiment``): the default (the
toy experiment) and, for comparison, ``experiment=dalle3_256``.

Descriptions come from the source of the schema only (one method, so conf/ comments cannot
disagree with it): a field's trailing ``# comment`` on its line in the class that declares it
(found with ``inspect.getsource`` + ``ast`` for the field's line and ``tokenize`` for the
comment), else its entry in the class docstring's ``Attributes:`` section. A field with neither
has an empty description: add a trailing comment to the schema and regenerate.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from train.config.loading import conf_dir, config_groups, load_experiment
from train.config.experiment import ExperimentConfig

OUTPUT = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
DEFAULT_LABEL = "toy"  # what `recap STAGE` composes with no experiment override
COMPARED = ("dalle3_256",)  # experiments shown beside the default
MAX_VALUE_CHARS = 60
ABSENT = object()  # the value under a section that is null in that experiment


class _Each(list):
    """Per-item values of a ``list[dataclass]`` node (one entry per list item)."""


@dataclasses.dataclass(frozen=True)
class Row:
    key: str  # full dotted path; items of a list of sections are ``key[]``
    type: str
    values: tuple[Any, ...]  # one per compared config, in column order (ABSENT under a null section)
    description: str


@dataclasses.dataclass(frozen=True)
class Table:
    key: str  # the section's dotted path ('' for the top level)
    type: str  # e.g. 'ToyDataOptions | null'
    doc: str
    rows: list[Row]


# --- types ---------------------------------------------------------------------------------------

def _non_null(tp: Any) -> list[Any]:
    if get_origin(tp) in (Union, types.UnionType):
        return [a for a in get_args(tp) if a is not type(None)]
    return [tp]


def type_name(tp: Any) -> str:
    """A type as a config user writes it: ``int``, ``float | null``, ``ddim | dpmpp``, ``list[str]``."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):  # YAML has lists only; train.config.typed turns them into tuples where asked
        return f"list[{type_name(get_args(tp)[0])}]"
    if origin is dict:
        key, value = get_args(tp)
        return f"dict[{type_name(key)}, {type_name(value)}]"
    return getattr(tp, "__name__", str(tp))


def _section_class(tp: Any) -> tuple[type | None, bool]:
    """(dataclass, is_list) when ``tp`` is a dataclass, ``X | None`` or ``list[X]`` of one."""
    args = _non_null(tp)
    if len(args) != 1:
        return None, False
    inner = args[0]
    if dataclasses.is_dataclass(inner):
        return inner, False
    if get_origin(inner) is list and dataclasses.is_dataclass(get_args(inner)[0]):
        return get_args(inner)[0], True
    return None, False


# --- descriptions from the source ----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> tuple[ast.ClassDef, dict[int, str]]:
    """The class's AST and its trailing comments by line (snippet-relative line numbers)."""
    source = textwrap.dedent(inspect.getsource(cls))
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef), cls
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    return node, {line: text for line, text in comments.items() if line in code_lines}


def _attributes(doc: str) -> tuple[str, dict[str, str]]:
    """A docstring split into (text without the ``Attributes:`` section, {field: description})."""
    lines = doc.splitlines()
    if "Attributes:" not in (ln.strip() for ln in lines):
        return doc, {}
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in lines[start + 1:]:
        match = re.match(r"^\s{4}(\w+(?:\s*/\s*\w+)*):\s*(.*)$", line)
        if match:
            names = [n.strip() for n in match.group(1).split("/")]
            for name in names:
                entries[name] = match.group(2).strip()
        elif line.strip() and names:  # a continuation line
            for name in names:
                entries[name] += " " + line.strip()
    return "\n".join(lines[:start]).strip(), entries


def class_doc(cls: type) -> str:
    """The class docstring without its ``Attributes:`` section ('' when it has none)."""
    node, _ = _class_source(cls)
    return _attributes(ast.get_docstring(node) or "")[0]


def field_description(cls: type, name: str) -> str:
    """The trailing comment of field ``name`` where it is declared (searching the MRO), else its
    ``Attributes:`` docstring entry, else ''."""
    for owner in cls.__mro__:
        if not dataclasses.is_dataclass(owner) or owner is object:
            continue
        node, comments = _class_source(owner)
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                comment = comments.get(stmt.end_lineno or stmt.lineno, "")
                return comment or _attributes(ast.get_docstring(node) or "")[1].get(name, "")
    return ""


# --- the walk ------------------------------------------------------------------------------------

def _child(value: Any, name: str) -> Any:
    if value is ABSENT or value is None:
        return ABSENT
    if isinstance(value, _Each):
        return _Each(_child(item, name) for item in value)
    return getattr(value, name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def walk(cls: type, values: Sequence[Any], prefix: str = "", type_label: str = "") -> list[Table]:
    """Tables of ``cls`` (rows for its leaf fields) followed by its sections' tables, depth first.

    ``values`` holds one instance of ``cls`` per compared config (or ABSENT / None / an ``_Each``).
    """
    hints = get_type_hints(cls)
    rows: list[Row] = []
    nested: list[Table] = []
    for f in dataclasses.fields(cls):
        key, tp = _join(prefix, f.name), hints[f.name]
        children = [_child(v, f.name) for v in values]
        section, is_list = _section_class(tp)
        if section is None:
            rows.append(Row(key, type_name(tp), tuple(children), field_description(cls, f.name)))
        elif is_list:
            items = [c if c is ABSENT or c is None else _Each(c) for c in children]
            nested += walk(section, items, key + "[]", type_name(tp))
        else:
            nested += walk(section, children, key, type_name(tp))
    own = [Table(prefix, type_label or cls.__name__, class_doc(cls), rows)] if rows else []
    return own + nested


def reference_tables(configs: Mapping[str, ExperimentConfig]) -> dict[str, list[Table]]:
    """Top-level key -> its tables, for the configs in column order."""
    values = list(configs.values())
    hints = get_type_hints(ExperimentConfig)
    sections: dict[str, list[Table]] = {}
    for f in dataclasses.fields(ExperimentConfig):
        section, is_list = _section_class(hints[f.name])
        children = [getattr(v, f.name) for v in values]
        if section is None:
            row = Row(f.name, type_name(hints[f.name]), tuple(children), field_description(ExperimentConfig, f.name))
            sections[f.name] = [Table("", "ExperimentConfig", "", [row])]
        else:
            assert not is_list, f"top-level list of sections {f.name} is not supported"
            sections[f.name] = walk(section, children, f.name, type_name(hints[f.name]))
    return sections


# --- groups --------------------------------------------------------------------------------------

def _defaults(path: Path) -> dict[str, str]:
    """Group -> option chosen in a defaults list (``group``, ``group@package``, ``override /group``)."""
    out: dict[str, str] = {}
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
        if isinstance(entry, dict):
            for key, option in entry.items():
                group = key.removeprefix("override ").lstrip("/").split("@")[0]
                out[group] = option
    return out


def group_choices(experiments: Sequence[str]) -> dict[str, dict[str, str]]:
    """Experiment -> {group: option} as recap.yaml's defaults and the experiment's overrides pick them."""
    base = _defaults(conf_dir() / "recap.yaml")
    return {name: {**base, **_defaults(conf_dir() / "experiment" / f"{name}.yaml"), "experiment": name}
            for name in experiments}


def _option_doc(group: str, option: str) -> str:
    """The first sentence of conf/<group>/<option>.yaml's leading comment block (``@package``
    directives skipped)."""
    words: list[str] = []
    for line in (conf_dir() / group / f"{option}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            words += line.lstrip("#").split()
    text = " ".join(words)
    end = re.search(r"\. (?=[A-Z])", text)
    return text[: end.start() + 1] if end else text


# --- markdown ------------------------------------------------------------------------------------

def _plain(value: Any) -> str:
    if value is ABSENT:
        return "—"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return str(value)


def format_value(value: Any) -> str:
    """A value as a markdown table cell: YAML-like, shortened to MAX_VALUE_CHARS, in a code span."""
    if value is ABSENT:
        return "—"
    text = _plain(value).replace("`", "'").replace("\n", " ")
    if len(text) > MAX_VALUE_CHARS:
        text = text[: MAX_VALUE_CHARS - 1] + "…"
    return f"`{_cell(text)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """Docstring/comment text as one markdown line: ``x`` -> `x`, < and > escaped outside code."""
    text = " ".join(text.replace("``", "`").split())
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return _cell("`".join(parts))


def render_table(table: Table, labels: Sequence[str]) -> list[str]:
    """A table's heading, its class docstring and one row per leaf field; values after the first
    column are left blank where they equal the first."""
    lines = []
    if table.key:  # top-level scalars (``seed``) have no section of their own
        doc = f": {_prose(table.doc)}" if table.doc else ""
        lines += [f"### `{table.key}`", "", f"`{_cell(table.type)}`{doc}", ""]
    lines += ["| key | type | " + " | ".join(labels) + " | description |",
              "|---|---|" + "---|" * len(labels) + "---|"]
    for row in table.rows:
        default = row.values[0]
        cells = [format_value(default)] + ["" if v == default else format_value(v) for v in row.values[1:]]
        lines.append(f"| `{row.key}` | `{_cell(row.type)}` | " + " | ".join(cells) + f" | {_prose(row.description)} |")
    return lines + [""]


def render_groups(experiments: Sequence[str]) -> list[str]:
    choices = group_choices(experiments)
    lines = ["## Config groups", "",
             "`conf/<group>/<option>.yaml`; choose one with `group=option` on the command line. The last "
             "columns mark the option each experiment composes.", "",
             "| group | option | description | " + " | ".join(experiments) + " |",
             "|---|---|---|" + "---|" * len(experiments)]
    for group, options in config_groups().items():
        for option in options:
            marks = ["✓" if choices[e].get(group) == option else "" for e in experiments]
            doc = _prose(_option_doc(group, option))
            lines.append(f"| `{group}` | `{option}` | {doc} | " + " | ".join(marks) + " |")
    return lines + [""]


def render(configs: Mapping[str, ExperimentConfig]) -> str:
    """The whole reference as markdown; ``configs`` maps column label -> composed config, the
    default first."""
    labels = list(configs)
    sections = reference_tables(configs)
    default, others = labels[0], labels[1:]
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m train.config.reference` from train/config/ and conf/; do not "
        "edit. CI (tests/train/test_config_reference.py) fails when it is stale. -->",
        "",
        "Every key of the composed config (`conf/recap.yaml` + groups + experiment), one section per "
        "top-level key and one table per schema dataclass. Columns:",
        "",
        "- **key**: the full path, as written on the command line (`recap STAGE key=value`); `[]` marks the "
        "fields of each item of a list (`train_t2i.stages[].lr`), whose values are listed per item.",
        "- **type**: what the schema accepts; `a | b` lists the choices or alternatives, `null` means the key "
        "may be null.",
        f"- **{default}**: the value `recap` composes with no overrides (the default experiment, "
        f"interpolations resolved); " + ", ".join(f"**{o}**: the value with `experiment={o}`" for o in others)
        + ", left blank where it equals the default. `—`: the enclosing section is null there.",
        "- **description**: the field's trailing `# comment` in the schema source, else its entry in the "
        "dataclass docstring's `Attributes:` section. The text under each heading is the dataclass docstring.",
        "",
        "Sections: " + ", ".join(f"[`{k}`](#{k})" for k in sections) + ".",
        "",
    ]
    lines += render_groups([default, *others])
    for key, tables in sections.items():
        lines += [f"## {key}", ""]
        for table in tables:
            lines += render_table(table, labels)
    return "\n".join(lines).rstrip("\n") + "\n"


def composed_configs() -> dict[str, ExperimentConfig]:
    """The default config (as `recap STAGE` composes it) and each compared experiment's."""
    return {DEFAULT_LABEL: load_experiment([]), **{name: load_experiment([f"experiment={name}"]) for name in COMPARED}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.config.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config-reference.md is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where the reference is written")
    args = parser.parse_args(argv)
    text = render(composed_configs())
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is out of date; run: python -m train.config.reference", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
