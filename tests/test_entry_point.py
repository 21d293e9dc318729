"""The package's entry points and its import graph.

``import orthotune``, ``orthotune --help`` and ``--version`` run in a fresh interpreter and must not import
torch (the public names are re-exported lazily, PEP 562). The import graph is read from the source with
:mod:`ast`, counting imports inside functions and leaving out ``if TYPE_CHECKING:`` blocks, and must be
acyclic and run one way (docs/architecture.md): nothing outside ``orthotune.cli`` imports the command line,
and ``orthotune.functional`` imports nothing of orthotune's outside itself.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from references import cli_commands

import orthotune

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(orthotune.__file__).resolve().parent  # the package under test, wherever it is imported from


def run_python(code: str) -> list[dict]:
    """Run ``code`` in a fresh interpreter; the JSON objects it prints, one a line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


HEAVY = ("torch", "transformers", "numpy", "safetensors", "peft")
REPORT = f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules), **out}}))"


# ------------------------------------------------------------------------------------------- entry points
def test_import_orthotune_imports_no_torch_and_names_resolve_lazily() -> None:
    code = f"""
import json, sys
import orthotune
out = {{'version': orthotune.__version__, 'dir': dir(orthotune), 'all': orthotune.__all__,
        'submodules': sorted(m for m in sys.modules if m.startswith('orthotune.'))}}
{REPORT}
config, make = orthotune.OFTConfig, orthotune.get_peft_model
out = {{'module': config.__module__, 'is_config': config is sys.modules['orthotune.config'].OFTConfig,
        'make': make.__module__}}
{REPORT}
"""
    imported, resolved = run_python(code)
    assert imported["heavy"] == [], f"import orthotune imported {imported['heavy']}"
    assert imported["submodules"] == [], "no submodule is imported before a name is asked for"
    assert imported["version"] == orthotune.__version__
    for name in ("OFTConfig", "BOFTConfig", "OrthoModel", "PeftModel", "get_peft_model", "AdapterLayer"):
        assert name in imported["dir"] and name in imported["all"], name
    assert resolved["module"] == "orthotune.config" and resolved["is_config"]
    assert resolved["make"] == "orthotune.model"
    assert "torch" in resolved["heavy"]  # asking for the model API imports torch: the check above can fail


def test_every_public_name_resolves_to_its_defining_module() -> None:
    for name in orthotune.__all__:
        value = getattr(orthotune, name)
        if name == "__version__":
            assert isinstance(value, str)
        elif name == "functional":
            assert value.__name__ == "orthotune.functional"
        else:
            assert value.__module__.startswith("orthotune."), name
    assert sorted(orthotune.__all__) == dir(orthotune)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        orthotune.not_a_name  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *[[command, "--help"] for command in cli_commands()]])
def test_cli_help_and_version_import_no_torch(argv: list[str]) -> None:
    code = f"""
import io, json, sys, contextlib
from orthotune.cli import main
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    try:
        status = main({argv!r})
    except SystemExit as exit_:
        status = exit_.code
out = {{'status': status, 'stdout': stdout.getvalue()}}
{REPORT}
"""
    (result,) = run_python(code)
    assert result["status"] == 0
    assert result["heavy"] == [], f"orthotune {' '.join(argv)} imported {result['heavy']}"
    if argv == ["--version"]:
        assert result["stdout"].strip() == f"orthotune {orthotune.__version__}"
    else:
        assert result["stdout"].startswith("usage: orthotune")


def test_console_script_is_the_cli_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, attribute = scripts["orthotune"].partition(":")
    module = __import__(module_name, fromlist=[attribute])
    from orthotune.cli import main

    assert getattr(module, attribute) is main


# ------------------------------------------------------------------------------------------- import graph
def _module_names() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, classes, try), except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _lazy_exports() -> dict[str, str]:
    """``orthotune/__init__.py``'s ``_EXPORTS``: a name imported from the package loads this module."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(target, ast.Name) and target.id == "_EXPORTS" for target in targets):
            return ast.literal_eval(node.value)
    raise AssertionError("orthotune/__init__.py has no _EXPORTS")


def import_graph() -> dict[str, set[str]]:
    """Module -> the orthotune modules it imports (a package's ``__init__`` only when it is named itself)."""
    modules = _module_names()
    exports = _lazy_exports()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in modules:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    edges.add(submodule)
                elif source == "orthotune" and alias.name in exports:
                    edges.add(exports[alias.name])  # the lazy __getattr__ imports it
                else:
                    edges.add(source)
        edges.discard(name)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_function_level_imports_and_skips_type_checking() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import orthotune.model\n"
        "def f():\n    from orthotune import config\n"
        "class C:\n    def g(self):\n        import orthotune.blocks\n"
    )
    named = [alias.name for node in _imports(tree) for alias in node.names]
    assert named == ["TYPE_CHECKING", "config", "orthotune.blocks"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert {"orthotune.model", "orthotune.cli", "orthotune.functional.cayley"} <= graph.keys()
    assert "orthotune.config" in graph["orthotune.model"]  # the reader finds real edges
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_only_the_cli_imports_the_cli() -> None:
    graph = import_graph()
    outside = {
        name: sorted(target for target in targets if target == "orthotune.cli" or target.startswith("orthotune.cli."))
        for name, targets in graph.items()
        if not (name == "orthotune.cli" or name.startswith("orthotune.cli."))
    }
    assert {name: targets for name, targets in outside.items() if targets} == {}


def test_functional_imports_only_functional() -> None:
    graph = import_graph()
    functional = {name: targets for name, targets in graph.items() if name.startswith("orthotune.functional")}
    assert "orthotune.functional.cayley" in functional
    leaks = {
        name: sorted(target for target in targets if not target.startswith("orthotune.functional"))
        for name, targets in functional.items()
    }
    assert {name: targets for name, targets in leaks.items() if targets} == {}
