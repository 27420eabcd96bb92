"""The package's shape: layers import downwards, no import cycles, a public API of callables."""

from __future__ import annotations

import subprocess
import sys

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter not installed: pip install .[dev]")


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    imported = sorted(graph.find_modules_directly_imported_by(child))
                    work.append((child, iter(imported)))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_files() -> None:
    graph = grimp.build_graph("fetalplanes", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_layers_contract_holds() -> None:
    """import-linter's layers contract (pyproject.toml): cli > serving, tools > engine >
    inference > models > data > errors/console."""
    res = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports;"
         "sys.exit(lint_imports())"],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert "broken" in res.stdout and "0 broken" in res.stdout


def test_public_api_names_are_callables_every_time() -> None:
    """`fp.train` stays the function even after its module was imported (0.1's bug)."""
    code = (
        "import fetalplanes as fp\n"
        "for _ in range(2):\n"
        "    assert callable(fp.train) and callable(fp.evaluate), (fp.train, fp.evaluate)\n"
        "    assert callable(fp.load_dataset) and callable(fp.sort_images)\n"
        "    assert callable(fp.export) and isinstance(fp.Predictor, type)\n"
        "import fetalplanes.engine.train\n"
        "assert callable(fp.train) and callable(fp.TrainConfig)\n"
        "print(fp.__version__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_modules_are_named_by_what_they_hold() -> None:
    graph = grimp.build_graph("fetalplanes")
    phase_words = ("speed", "trust", "issue", "phase", "stage", "misc", "utils", "helpers")
    named = [m for m in graph.modules if any(w in m.rsplit(".", 1)[-1] for w in phase_words)]
    assert named == []
