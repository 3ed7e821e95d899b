"""Safe by default: weights load without pickle code, no remote code, servers on localhost only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = sorted([*(ROOT / "lmpipe").rglob("*.py"), *(ROOT / "stages").glob("*.py")])


def calls(name: str):
    """(file, call node) for every call of `<anything>.name(...)` or `name(...)` in the library and stages."""
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path.relative_to(ROOT), node


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_refuses_pickled_code():
    loads = list(calls("load"))
    torch_loads = [
        (p, n) for p, n in loads if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch"
    ]
    assert torch_loads, "expected the checkpoint loader to call torch.load"
    for path, node in torch_loads:
        value = keyword(node, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, (
            f"{path}:{node.lineno}: torch.load without weights_only=True"
        )


def test_no_remote_code_is_ever_trusted():
    for path, node in calls("from_pretrained"):
        value = keyword(node, "trust_remote_code")
        assert value is None or (isinstance(value, ast.Constant) and value.value is False), f"{path}:{node.lineno}"
    assert not any("trust_remote_code=True" in p.read_text(encoding="utf-8") for p in CODE)


def test_ui_and_serving_listen_on_localhost_unless_asked():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("ui", "serve", "serve-mlflow"):
        body = re.search(rf"^{target}:.*\n((?:\t.*\n?)+)", makefile, re.M).group(1)
        assert "--host 127.0.0.1" in body, target
