"""The generic top-level packages (train, data_pipeline, models, launch) are this repository's."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["train", "data_pipeline", "models", "launch"]
DIST = "recap-diffusion"


def _package_dirs() -> list[str]:
    """Every package of the repository's top-level packages, dotted (train, train.stages, ...)."""
    return sorted(".".join(init.parent.relative_to(REPO).parts) for top in PACKAGES
                  for init in (REPO / top).rglob("__init__.py") if "__pycache__" not in init.parts)


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_repo_root_has_pyproject():
    assert (REPO / "pyproject.toml").is_file()
    assert _pyproject()["project"]["name"] == DIST


def test_pyproject_declares_exactly_these_packages():
    packages = _pyproject()["tool"]["setuptools"]["packages"]
    assert isinstance(packages, list), "packages must be an explicit list, not a find directive"
    assert sorted({p.split(".")[0] for p in packages}) == sorted(PACKAGES)
    assert len(packages) == len(set(packages))
    # an explicit list leaves subpackages out of a wheel unless each is named
    assert sorted(packages) == _package_dirs()
    for name in PACKAGES:
        assert (REPO / name / "__init__.py").is_file(), name
    for name in _package_dirs():  # no folder of modules without an __init__.py (a wheel would drop it)
        folder = REPO / name.replace(".", "/")
        assert not [d.name for d in folder.iterdir() if d.is_dir() and d.name != "__pycache__"
                    and any(d.glob("*.py")) and not (d / "__init__.py").exists()], name


def test_console_script_declared_and_installed():
    assert _pyproject()["project"]["scripts"] == {"recap": "train.cli:console"}
    scripts = [ep for ep in metadata.entry_points(group="console_scripts", name="recap")]
    assert [(ep.value, ep.dist.name if ep.dist else None) for ep in scripts] == [("train.cli:console", DIST)]
    assert callable(scripts[0].load())


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_to_this_repository(name):
    module = importlib.import_module(name)
    path = Path(module.__file__).resolve()
    assert path == REPO / name / "__init__.py"


def test_installed_distribution_provides_the_packages():
    # A name may be listed once per metadata directory found on sys.path (the installed dist-info,
    # and the source tree's recap_diffusion.egg-info when the repository root is on sys.path):
    # every one of them must be this distribution.
    owners = metadata.packages_distributions()
    assert {name: sorted(set(owners.get(name, []))) for name in PACKAGES} == {name: [DIST] for name in PACKAGES}
    top_level = metadata.distribution(DIST).read_text("top_level.txt")
    if top_level is not None:  # setuptools writes it; other backends may not
        assert sorted(top_level.split()) == sorted(PACKAGES)


@pytest.mark.slow
def test_wheel_holds_every_stage(tmp_path):
    """A non-editable install (a wheel) contains every subpackage: each stage of `recap --help`
    and the CLI import from the wheel alone, in a process where the repository is not on sys.path."""
    import shutil

    wheel_dir, site, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
    # a clean copy: setuptools builds in <source>/build, and a stale build/ would leak old files into the wheel
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "runs", "__pycache__",
                                                                 "*.egg-info", "multirun", "wandb"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheel_dir), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("recap_diffusion-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # a wheel is a zip of the installed tree
    from train.commands.stage_table import STAGES

    modules = ["train.cli", *(stage.module for stage in STAGES.values())]
    code = ("import importlib, json, sys; "
            f"mods = {modules!r}; "
            "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout)
    assert sorted(files) == sorted(modules)
    assert all(Path(f).resolve().is_relative_to(site.resolve()) for f in files.values()), files


def test_packages_resolve_here_from_another_directory(tmp_path):
    """Not an accident of the current directory or pytest's sys.path: a fresh interpreter
    started elsewhere (no PYTHONPATH) imports the same files."""
    code = ("import importlib, importlib.metadata as m, json; d = m.packages_distributions(); "
            f"print(json.dumps([{{n: importlib.import_module(n).__file__ for n in {PACKAGES!r}}}, "
            f"{{n: d.get(n) for n in {PACKAGES!r}}}]))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    files, owners = json.loads(proc.stdout)
    assert owners == {n: [DIST] for n in PACKAGES}
    assert {n: str(Path(f).resolve()) for n, f in files.items()} == {
        n: str(REPO / n / "__init__.py") for n in PACKAGES
    }
