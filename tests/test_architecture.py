"""The layering the docs promise, checked on the source: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("train", "data_pipeline", "models", "launch")
DISTRIBUTED = ("torch.distributed", "deepspeed", "accelerate")
# The runtime layer and checkpointing are the only places that touch process groups and engines.
DISTRIBUTED_ALLOWED = {"train/runtime.py", "train/checkpointing.py", "train/checkpoint_files.py"}


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
        assert hits == [], f"{rel} imports {hits}; distributed code belongs in train/runtime.py"


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
