"""The example pipeline lives in ``prefect_recovery/examples/`` and the library does not depend on it.

Checked on the source (``ast``), so an import in a rarely run branch counts too, and in a fresh
interpreter, so an import made indirectly counts too. Only the CLI commands that run the example
(``demo``, ``serve`` through ``deploy.build_deployments``) may import it, inside the function.
``recover`` and ``replay-check`` find it through the pipeline registry, like any user's pipeline.

That ``import prefect_recovery.core`` loads neither torch nor Prefect at run time is checked in
``test_core_manifest.py``; here, that no core module names them (or a layer above) in an import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "prefect_recovery"
EXAMPLES = "prefect_recovery.examples"
# Modules that run the example and may import it inside a function (never at module level).
MAY_IMPORT_LAZILY = {"prefect_recovery.cli", "prefect_recovery.deploy", "prefect_recovery.crash_test"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> list[tuple[str, Path]]:
    return sorted((_module_name(path), path) for path in PACKAGE.rglob("*.py"))


def _library_modules() -> list[tuple[str, Path]]:
    return [(name, path) for name, path in _modules() if not _in(name, EXAMPLES)]


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import in the file, relative ones
    resolved; ``from pkg import sub`` yields ``pkg.sub`` too (it may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno, in_function))
            found.extend((f"{module}.{alias.name}", node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _in(node.value, EXAMPLES):
            found.append((node.value, node.lineno, in_function))  # importlib.import_module("..."), a lazy map
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def test_the_example_is_one_package():
    names = [name for name, _path in _modules()]
    assert [name for name in names if "example" in name.rpartition(".")[2] and not _in(name, EXAMPLES)] == []
    assert {f"{EXAMPLES}.workload", f"{EXAMPLES}.steps", f"{EXAMPLES}.pipeline"} <= set(names)


@pytest.mark.parametrize("name,path", _library_modules(), ids=[name for name, _ in _library_modules()])
def test_no_library_module_imports_the_example(name, path):
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for module, line, in_function in _imports(name, path)
        if _in(module, EXAMPLES) and not (in_function and name in MAY_IMPORT_LAZILY)
    ]
    assert offending == [], "the library must not depend on the example: " + "; ".join(offending)


def test_the_lazy_importers_are_only_those_that_run_the_example():
    lazy = {
        name
        for name, path in _library_modules()
        for module, _line, _in_function in _imports(name, path)
        if _in(module, EXAMPLES)
    }
    assert lazy <= MAY_IMPORT_LAZILY
    assert "prefect_recovery.cli" in lazy  # `demo` runs it: the check above sees real imports


@pytest.mark.parametrize(
    "name,path",
    [(name, path) for name, path in _modules() if _in(name, "prefect_recovery.core")],
    ids=[name for name, _ in _modules() if _in(name, "prefect_recovery.core")],
)
def test_core_names_neither_torch_nor_prefect_nor_a_layer_above(name, path):
    # torch, Prefect and the layers above: nowhere, not even inside a function (layers import downward only).
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for module, line, _in_function in _imports(name, path)
        if module.split(".")[0] in ("torch", "prefect")
        or (_in(module, "prefect_recovery") and not _in(module, "prefect_recovery.core"))
    ]
    assert offending == []


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_importing_every_library_module_leaves_the_example_unloaded():
    names = [name for name, _path in _library_modules()]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m == {EXAMPLES!r} or m.startswith({EXAMPLES + '.'!r}))\n"
        "assert not loaded, loaded\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_recovery_finds_the_example_through_the_registry():
    # What `recover` and `replay-check` do: the flow name the journal recorded, looked up in the
    # registry, which imports the `example` entry point (pyproject.toml) and nothing else.
    code = (
        "import sys\n"
        "from prefect_recovery.flows.registry import replay_hook, resolve_pipeline\n"
        "assert 'prefect_recovery.examples.pipeline' not in sys.modules\n"
        "flow = resolve_pipeline('example-pipeline')\n"
        "assert flow.fn.__module__ == 'prefect_recovery.examples.pipeline', flow.fn.__module__\n"
        "assert replay_hook('example-pipeline').__name__ == 'replay_training'\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_example_is_digested_as_pipeline_code_and_the_library_is_not():
    # tasks/code.py knows no example by name: the examples package marks itself `__pipeline_code__`.
    code = (
        "import importlib\n"
        "from prefect_recovery.tasks.code import is_user_module\n"
        "for name in ['prefect_recovery.examples.workload', 'prefect_recovery.examples.steps',\n"
        "             'prefect_recovery.examples.pipeline']:\n"
        "    assert is_user_module(importlib.import_module(name)), name\n"
        "for name in ['prefect_recovery.training.checkpointer', 'prefect_recovery.tasks.step',\n"
        "             'prefect_recovery.flows.registry', 'prefect_recovery.core.store']:\n"
        "    assert not is_user_module(importlib.import_module(name)), name\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
