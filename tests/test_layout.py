"""The layout stays readable: stages/ holds exactly the DVC stages, imports point one way (flows -> stage scripts ->
stages.workspace -> ssl_models), no function in stages/ or flows/ runs over MAX_LINES, and the integration tier's
table in conftest.py names tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import INTEGRATION, PROJECT_ROOT

MAX_LINES = 60  # from the `def` line to the function's last line, docstring and comments included
# Functions that may stay longer (none: every stage reads as named steps); an entry may only shrink.
ALLOWED: dict[str, int] = {}


def function_lengths(path: Path) -> dict[str, int]:
    """Every function and method in ``path`` (nested ones too) -> its length in lines, by qualified name."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[prefix + child.name] = child.end_lineno - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return lengths


def test_no_function_in_stages_or_flows_grows_past_the_limit():
    too_long = {}
    for package in ("stages", "flows"):
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            for name, lines in function_lengths(path).items():
                key = f"{path.relative_to(PROJECT_ROOT).as_posix()}:{name}"
                if lines > ALLOWED.get(key, MAX_LINES):
                    too_long[key] = lines
    assert not too_long, (
        f"functions over {MAX_LINES} lines (or longer than their ALLOWED entry); split them into "
        f"named steps: {too_long}"
    )


def test_function_lengths_count_every_line_of_nested_functions_and_methods(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "def a():\n    def b():\n        return 1\n    return b\n\n\n"
        "class C:\n    @property\n    def d(self):\n        '''doc'''\n\n        return 2\n"
    )
    assert function_lengths(source) == {"a": 4, "a.b": 2, "C.d": 4}


def test_the_integration_table_names_existing_tests():
    for module, names in INTEGRATION.items():
        path = PROJECT_ROOT / "tests" / f"{module}.py"
        assert path.exists(), f"conftest.INTEGRATION names {module}, which is not a test module"
        defined = {
            node.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
        }
        assert not set(names or ()) - defined, f"conftest.INTEGRATION names tests {module} does not define"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports (relative imports resolved)."""
    package = path.relative_to(PROJECT_ROOT).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("flows", "stages", "ssl_models")}


def test_stages_holds_exactly_the_modules_dvc_yaml_runs():
    commands = re.findall(r"python -m stages\.(\w+)", (PROJECT_ROOT / "dvc.yaml").read_text())
    modules = {p.stem for p in (PROJECT_ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == set(commands), f"stages/ modules {sorted(modules)} vs dvc.yaml stages {sorted(set(commands))}"


def test_imports_point_one_way():
    stage_scripts = {f"stages.{p.stem}" for p in (PROJECT_ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    problems = []
    for path in sorted(PROJECT_ROOT.glob("*/**/*.py")):
        top = path.relative_to(PROJECT_ROOT).parts[0]
        if top not in ("ssl_models", "stages"):
            continue
        here = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        for name in _imported_modules(path):
            if top == "ssl_models" and not name.startswith("ssl_models"):
                problems.append(f"{here} imports {name}")
            elif name.startswith("flows"):
                problems.append(f"{here} imports {name}")
            elif here.startswith("stages.workspace") and any(
                name == s or name.startswith(s + ".") for s in stage_scripts
            ):
                problems.append(f"{here} imports {name}")
            elif here in stage_scripts and any(
                (name == s or name.startswith(s + ".")) and s != here for s in stage_scripts
            ):
                problems.append(f"{here} imports {name}")
    assert not problems, problems
