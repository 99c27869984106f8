"""The layering the docs promise, checked on the source: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("train", "data_pipeline", "models", "launch")
DISTRIBUTED = ("torch.distributed", "deepspeed", "accelerate")
# train/runtime/ is the only place that touches process groups and engines (torchtitan's distributed/).
DISTRIBUTED_ALLOWED = {str(p.relative_to(REPO)) for p in (REPO / "train" / "runtime").rglob("*.py")}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _hits(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_sources_found() -> None:
    assert len(_sources()) >= 20


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_runtime_layer_imports_distributed_libraries(path: Path) -> None:
    rel = str(path.relative_to(REPO))
    hits = _hits(_imports(path), DISTRIBUTED)
    if rel not in DISTRIBUTED_ALLOWED:
        assert hits == [], f"{rel} imports {hits}; distributed code belongs in train/runtime/"


@pytest.mark.parametrize("package", ["models", "data_pipeline", "launch"])
def test_libraries_do_not_depend_on_the_application(package: str) -> None:
    offenders = {str(p.relative_to(REPO)): _hits(_imports(p), ("train", "hydra", "omegaconf"))
                 for p in (REPO / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_are_pure() -> None:
    """No file IO, logging setup or config objects in models/ (diffusers' own save/load excepted)."""
    for path in (REPO / "models").rglob("*.py"):
        source = path.read_text()
        for forbidden in ("open(", "config_schema", "ExperimentConfig", "os.environ"):
            assert forbidden not in source, f"{path.relative_to(REPO)} uses {forbidden}"


# ---- the rooms of train/ (docs/pipeline.md, "Where the code lives") ------------------------------
TRAIN = REPO / "train"
ENV_RANK_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside a function (a lazy import
    still couples the two modules), resolved to module names (``from pkg import submodule`` too)."""
    known = {_module_name(p) for p in _sources()}
    out: set[str] = set()
    for name in _imports(path):
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out - {_module_name(path)}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _all_imports(p) for p in _sources()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) >= 80 and "train.cli" in graph
    assert _cycles(graph) == []


def test_the_cycle_detector_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _train_files(room: str = "") -> list[Path]:
    return sorted((TRAIN / room).rglob("*.py"))


def _reads_rank_env(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return sorted({node.value for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and node.value in ENV_RANK_NAMES})


@pytest.mark.parametrize("path", _train_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_only_train_runtime_reads_the_rank_environment(path: Path) -> None:
    if path.is_relative_to(TRAIN / "runtime"):
        return
    assert _reads_rank_env(path) == [], f"{path.relative_to(REPO)} reads the launcher's rank variables: ask train.runtime"


def test_no_stage_imports_another_stage() -> None:
    offenders = {}
    for path in _train_files("stages"):
        others = {m for m in _all_imports(path) if m.startswith("train.stages.")}
        if others:
            offenders[str(path.relative_to(REPO))] = sorted(others)
    assert offenders == {}


def test_nothing_imports_the_cli() -> None:
    assert sorted(m for m, deps in _graph().items() if "train.cli" in deps) == []


def test_config_is_the_ground_level() -> None:
    offenders = {}
    for path in _train_files("config"):
        up = {m for m in _all_imports(path) if m.startswith("train") and not m.startswith("train.config")}
        if up:
            offenders[str(path.relative_to(REPO))] = sorted(up)
    assert offenders == {}


def test_the_whole_config_stops_at_the_entry_points() -> None:
    """ExperimentConfig is seen only by the stages, the config itself and the command layer."""
    allowed = (TRAIN / "stages", TRAIN / "config", TRAIN / "commands")
    users = [str(p.relative_to(REPO)) for p in _train_files()
             if "ExperimentConfig" in p.read_text() and not any(p.is_relative_to(a) for a in allowed)]
    assert users == []


def test_stages_folder_is_the_stage_table() -> None:
    """`ls train/stages` reads like `recap --help`: one file per stage, named like it."""
    from train.commands.stage_table import STAGES

    assert {name: stage.module for name, stage in STAGES.items()} == {
        name: f"train.stages.{name.replace('-', '_')}" for name in STAGES}
    files = {p.stem for p in (TRAIN / "stages").glob("*.py") if p.stem != "__init__"}
    assert files == {name.replace("-", "_") for name in STAGES}


@pytest.mark.parametrize("package", PACKAGES)
def test_files_and_functions_stay_short(package: str) -> None:
    """House style: files under ~400 lines, functions under ~60."""
    long_files, long_functions = [], []
    for path in sorted((REPO / package).rglob("*.py")):
        text = path.read_text()
        rel = str(path.relative_to(REPO))
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{rel} ({text.count(chr(10))})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name} ({length})")
    assert long_files == [] and long_functions == []
