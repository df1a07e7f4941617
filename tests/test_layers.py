"""The house's shape, checked from the source: layers import only downward, no import cycles, no
function a reader cannot hold, and every op reaches its kernels through the one dispatch helper."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first; a module may import its own layer or those below (docs/design.md draws them).
LAYERS = [
    ("fastlm.backends", "fastlm._build", "fastlm.quant", "fastlm.reference", "fastlm.kernels"),
    ("fastlm.ops",),
    ("fastlm.nn",),
    ("fastlm.patch", "fastlm.hf", "fastlm.hf_decode", "fastlm.model", "fastlm.lora"),
    ("fastlm.data", "fastlm.train", "fastlm.metrics", "fastlm.classify"),
    ("fastlm.info", "fastlm.bench", "fastlm.cli"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "fastlm").rglob("*.py"):
        parts = ["fastlm", *path.relative_to(ROOT / "fastlm").with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The fastlm modules `path` imports, anywhere in the file (deferred imports count too)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("fastlm.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastlm":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                deps.add(sub if sub in MODULES else node.module)
    # The package itself (fastlm/__init__.py: __version__, re-exports) is set up before any module.
    deps.discard("fastlm")
    return deps


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/design.md")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "fastlm"))
def test_imports_point_down(module):
    up = sorted(d for d in GRAPH[module] if _layer(d) > _layer(module))
    assert not up, f"{module} (layer {_layer(module)}) imports a higher layer: {up}"


def test_no_import_cycles():
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m):], m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            # A package's __init__ re-exporting its own submodules is not a cycle of theirs.
            if not (d.startswith(m + ".") or m.startswith(d + ".")):
                visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)


def test_no_function_over_80_lines():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


@pytest.mark.parametrize("path", sorted((ROOT / "fastlm" / "ops").glob("*.py")), ids=lambda p: p.name)
def test_ops_reach_kernels_only_through_dispatch(path):
    if path.name == "_dispatch.py":
        return
    text = path.read_text()
    assert "torch.ops.fastlm_C" not in text and "fastlm.kernels" not in text, (
        f"{path.name} names kernels itself; declare them with ops._dispatch.kernel_op")
    assert "torch.library.custom_op" not in text, f"{path.name} registers a custom op outside ops._dispatch"
