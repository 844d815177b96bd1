"""The installed house: one top-level package, imports that run one way, no cycles."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS_OUTSIDE_RUNTIME = ("rtagger.train", "rtagger.deploy")


def installed_modules() -> dict[str, Path]:
    """Every module of the installed ``rtagger`` package, found through each ``__path__``.

    rtagger.train and rtagger.deploy are named too: the installer maps them from the repo's
    train/ and deploy/ folders, so they need not sit inside rtagger/'s folder.
    """
    out: dict[str, Path] = {}
    todo, seen = ["rtagger", *ROOMS_OUTSIDE_RUNTIME], set()
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        for folder in importlib.import_module(pkg).__path__:
            for f in sorted(Path(folder).iterdir()):
                if f.suffix == ".py":
                    out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
                elif (f / "__init__.py").is_file():
                    todo.append(f"{pkg}.{f.name}")
    return out


def import_graph(modules: dict[str, Path], module_level_only: bool) -> dict[str, set[str]]:
    """module -> the rtagger modules it imports (at import time, or anywhere in it)."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        deps: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = name.split(".")[: None if path.stem == "__init__" else -1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str:
    return next((r for r in ROOMS_OUTSIDE_RUNTIME if module.startswith(r)), "rtagger")


def test_installed_import_graph_has_no_cycles_and_runs_one_way():
    modules = installed_modules()
    assert {"rtagger.cli.main", "rtagger.train.fit.loop", "rtagger.deploy.export"} <= set(modules)
    assert cycles(import_graph(modules, module_level_only=True)) == []
    everywhere = import_graph(modules, module_level_only=False)
    # the runtime imports nothing from training or deployment, not even lazily
    leaks = sorted((a, b) for a, deps in everywhere.items() for b in deps
                   if room(a) == "rtagger" and room(b) != "rtagger")
    assert leaks == []
    # and across rooms, lazy imports included, nothing goes round in a circle
    rooms = {r: set() for r in ("rtagger", *ROOMS_OUTSIDE_RUNTIME)}
    for a, deps in everywhere.items():
        rooms[room(a)].update(room(b) for b in deps if room(b) != room(a))
    assert cycles(rooms) == []


def test_the_wheel_installs_one_top_level_package(tmp_path):
    pytest.importorskip("setuptools")
    # Built from a copy: setuptools' build/ folder would otherwise land in the repository,
    # and files it kept from an earlier build could slip into the wheel.
    src = tmp_path / "src"
    local = {".git", "build", "dist", "data", "runs", "cache", "logs"}  # top level only

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {n for n in names if (top and (n in local or n.startswith(".venv")))
                or n in {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
                or n.endswith(".egg-info")}

    shutil.copytree(REPO, src, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("rtagger-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top).decode().split() == ["rtagger"]
        entry_points = z.read(top.replace("top_level.txt", "entry_points.txt")).decode()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"rtagger"}
    assert "rtagger/train/recipes/pipeline-debug.toml" in names
    assert "rtagger/deploy/export.py" in names
    assert "rtagger.train.cli:register" in entry_points


def test_rtagger_works_beside_a_train_py_and_a_deploy_py(tmp_path):
    """A user's own train.py/deploy.py in the working directory must never be imported."""
    for name in ("train", "deploy"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user\\'s {name}.py "
                                             f"was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in (["--help"], ["data", "--help"], ["train", "--help"], ["export", "--help"]):
        run = subprocess.run([sys.executable, "-m", "rtagger", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "was imported" not in run.stdout + run.stderr
        assert "unavailable" not in run.stderr, run.stderr
    # package data is found by package name, not through the working directory
    code = ("from rtagger.train.synth import grooves; "
            "from rtagger.model.vocab import tags_v1; "
            "print(len(grooves.groove_files('train')) > 0, len(tags_v1()))")
    run = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["True", "36"], run.stderr


# The runtime's rooms in data-path order: a room imports only rooms before it (or itself).
RUNTIME_ORDER = ("rtagger.errors", "rtagger.atomic", "rtagger.jsonl", "rtagger.machine",
                 "rtagger.audio",
                 "rtagger.model", "rtagger.engines", "rtagger.pipeline", "rtagger.catalog",
                 "rtagger.live", "rtagger.bench", "rtagger.cli", "rtagger")


def runtime_room(module: str) -> str:
    return next(r for r in RUNTIME_ORDER if module == r or module.startswith(r + "."))


def test_runtime_rooms_follow_the_data_path():
    """audio -> model -> engines -> pipeline -> live -> bench -> cli, never backwards.

    ``rtagger`` itself (its ``__init__``, the public API) and ``__main__`` come last; taking
    ``__version__`` from it is fine (Python has run it before any ``rtagger.*`` module, and
    it imports its API lazily).
    """
    modules = {m: p for m, p in installed_modules().items() if room(m) == "rtagger"}
    rank = {r: i for i, r in enumerate(RUNTIME_ORDER)}
    backwards = sorted(
        (a, b) for a, deps in import_graph(modules, module_level_only=False).items()
        for b in deps if b != "rtagger" and rank[runtime_room(b)] > rank[runtime_room(a)])
    assert backwards == []
    assert {runtime_room(m) for m in modules} == set(RUNTIME_ORDER)
