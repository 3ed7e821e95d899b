"""The package's shape: complete code deps in dvc.yaml, no import cycle, short functions.

- Code deps: every stage's `cmd` names a `stages/*.py` module; the lmpipe modules it imports,
  transitively (function-level imports included: they run too), must all lie inside the stage's
  `deps` in dvc.yaml, and every code path the stage lists must hold a module it imports. Else
  `dvc repro` would miss a code change (or rerun for nothing) and `lmpipe audit` would call a
  stale model current.
- `lmpipe/__init__.py` and `stages/__init__.py` are imported by every stage; instead of listing
  them everywhere, they may hold nothing that can change a result (a docstring, `__version__`).
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOP_INITS = ("lmpipe/__init__.py", "stages/__init__.py")
MAX_FUNCTION_LINES = 80


# --------------------------------------------------------------------------- the import graph
def module_file(module: str) -> str | None:
    """`lmpipe.core.io` -> `lmpipe/core/io.py` (or the package's `__init__.py`); None if absent."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(ROOT).as_posix()
    return None


def _package_inits(module: str) -> list[str]:
    """The `__init__.py` files Python runs before `module`: every parent package's."""
    parts = module.split(".")
    found = [module_file(".".join(parts[:i])) for i in range(1, len(parts))]
    return [f for f in found if f and f.endswith("__init__.py")]


def imported_files(path: str) -> set[str]:
    """Project files (lmpipe/, stages/) that `path` imports directly, anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import name`: name is a submodule or an attribute of pkg
            modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for module in modules:
            if module.split(".")[0] in ("lmpipe", "stages") and (found := module_file(module)):
                out.update([found, *_package_inits(module)])
    return out


def closure(start: str) -> set[str]:
    """`start` and every project file it imports, transitively."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_files(path))
    return seen


# --------------------------------------------------------------------------- dvc.yaml
def stage_code_deps(dvc: dict) -> dict[str, tuple[str, list[str]]]:
    """{stage: (its stages/*.py file, its deps under lmpipe/ or stages/)}; foreach stages once."""
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        match = re.search(r"python -m (stages\.\w+)", body["cmd"])
        assert match, f"dvc.yaml: stage {name!r} does not run `python -m stages.NAME`"
        deps = [d for d in body.get("deps", []) if d.split("/")[0] in ("lmpipe", "stages")]
        out[name] = (module_file(match.group(1)), deps)
    return out


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def dependency_problems(dvc: dict) -> list[str]:
    """One line per missing or unneeded code dep, naming the stage and the module."""
    problems = []
    for name, (entry, deps) in stage_code_deps(dvc).items():
        needed = sorted(closure(entry) - set(TOP_INITS))
        for path in needed:
            if not any(covers(dep, path) for dep in deps):
                problems.append(f"dvc.yaml: stage {name!r} imports {path} but its deps do not cover it")
        for dep in deps:
            if not (ROOT / dep).exists():
                problems.append(f"dvc.yaml: stage {name!r} lists {dep}, which does not exist")
            elif not any(covers(dep, path) for path in needed):
                problems.append(f"dvc.yaml: stage {name!r} lists {dep} but never imports code from it")
    return problems


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def test_every_stage_lists_exactly_the_code_it_imports(dvc_yaml):
    assert dependency_problems(dvc_yaml) == []


def test_a_removed_code_dep_is_named_with_its_stage_and_module(dvc_yaml):
    broken = copy.deepcopy(dvc_yaml)
    broken["stages"]["pretrain"]["deps"].remove("lmpipe/mlm")
    problems = dependency_problems(broken)
    assert problems and all("'pretrain'" in p and "lmpipe/mlm/" in p for p in problems)
    assert any("imports lmpipe/mlm/masking.py" in p for p in problems)


def test_a_code_dep_the_stage_never_imports_is_named(dvc_yaml):
    broken = copy.deepcopy(dvc_yaml)
    broken["stages"]["fetch"]["deps"].append("lmpipe/export")
    assert dependency_problems(broken) == ["dvc.yaml: stage 'fetch' lists lmpipe/export but never imports code from it"]


def test_foreach_stages_are_checked_through_their_template(dvc_yaml):
    broken = copy.deepcopy(dvc_yaml)
    broken["stages"]["finetune"]["do"]["deps"].remove("lmpipe/train")
    assert any(p.startswith("dvc.yaml: stage 'finetune' imports lmpipe/train/") for p in dependency_problems(broken))


def _numerics_pin(node: ast.stmt) -> bool:
    """`import sys` or `if sys.argv[:1] == ["-m"]:` importing and calling lmpipe.core.numerics.pin_from_params:
    the pin's logic lives in lmpipe/core, which every stage lists, so this trigger changes no result itself."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names] == ["sys"]
    if not isinstance(node, ast.If) or node.orelse:
        return False
    imports, calls = node.body[:-1], node.body[-1:]
    imported = all(isinstance(n, ast.ImportFrom) and n.module == "lmpipe.core.numerics" for n in imports)
    called = [ast.unparse(n) for n in calls] == ["pin_from_params()"]
    return ast.unparse(node.test) == "sys.argv[:1] == ['-m']" and imported and called


def test_top_level_inits_hold_nothing_that_can_change_a_result():
    for path in TOP_INITS:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        for node in tree.body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            version = isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["__version__"]
            pin = path == "stages/__init__.py" and _numerics_pin(node)
            assert docstring or version or pin, (
                f"{path} line {node.lineno}: only a docstring, __version__ and the numerics pin belong here"
            )


def test_stages_pin_their_numerics_before_numpy_or_torch_load():
    tree = ast.parse((ROOT / "stages/__init__.py").read_text(encoding="utf-8"))
    assert any(isinstance(node, ast.If) and _numerics_pin(node) for node in tree.body)


# --------------------------------------------------------------------------- the package's shape
def library_files() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lmpipe").rglob("*.py"))


def import_cycle() -> list[str] | None:
    """One cycle of the lmpipe import graph (function-level imports included), or None."""
    graph = {path: sorted(f for f in imported_files(path) if f.startswith("lmpipe/")) for path in library_files()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if nxt.endswith("__init__.py"):
                continue  # a package's docstring-only __init__ imports nothing back
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_library_has_no_import_cycle():
    assert import_cycle() is None


def test_the_library_never_imports_a_stage():
    offenders = [p for p in library_files() if any(f.startswith("stages/") for f in imported_files(p))]
    assert offenders == []


def test_no_function_in_the_library_is_longer_than_80_lines():
    long = []
    for path in library_files():
        for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_every_library_folder_is_a_package():
    folders = {p.parent for p in (ROOT / "lmpipe").rglob("*.py")}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []


def test_subpackage_inits_only_document_their_package():
    for path in library_files():
        if path.endswith("__init__.py") and path != "lmpipe/__init__.py":
            body = ast.parse((ROOT / path).read_text(encoding="utf-8")).body
            assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{path}: a docstring only"
