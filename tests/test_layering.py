"""The house's layering (issue 14): ``pacl_fast/head.py`` is the only door into ``kernels/``, and
``kernels/`` imports nothing from ``pacl_fast``. Read from the source (every import, also inside
functions), so a lazy import cannot slip past."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Top-level package of every module ``path`` imports (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_imported_modules_reads_imports_anywhere(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\ndef f():\n    from kernels.tiled import x\n    import pacl_fast.head as h\n")
    assert imported_modules(module) == {"os", "kernels", "pacl_fast"}


@pytest.mark.parametrize("path", sources("pacl_fast"), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_head_imports_kernels(path):
    if path == ROOT / "pacl_fast" / "head.py":
        assert "kernels" in imported_modules(path)
    else:
        assert "kernels" not in imported_modules(path), f"{path.relative_to(ROOT)}: import from pacl_fast.head instead"


@pytest.mark.parametrize("path", sources("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_nothing_from_pacl_fast(path):
    assert "pacl_fast" not in imported_modules(path)


#: Issue 22: no function in ``pacl_fast/`` longer than this many lines (a longer one is split into named steps).
MAX_FUNCTION_LINES = 110


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name (N lines, line L)`` of every function or method in ``path`` over ``limit`` lines, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{node.name} ({length} lines, line {node.lineno})")
    return found


def test_long_functions_counts_every_line_of_nested_and_async_functions(tmp_path):
    module = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(4))
    method_body = body.replace("    ", "        ")
    module.write_text(f"def short():\n{body}\nclass C:\n    async def method(self):\n{method_body}")
    assert long_functions(module, limit=5) == []
    assert long_functions(module, limit=4) == ["short (5 lines, line 1)", "method (5 lines, line 8)"]


def test_no_function_in_pacl_fast_is_longer_than_the_limit():
    offenders = {str(p.relative_to(ROOT)): long_functions(p) for p in sources("pacl_fast")}
    offenders = {path: found for path, found in offenders.items() if found}
    assert offenders == {}, f"functions over {MAX_FUNCTION_LINES} lines: split them into named steps: {offenders}"


def test_public_names_resolve_and_type_checkers_see_the_same():
    """``pacl_fast``'s lazy exports (PEP 562): each resolves to its module's object, and the eager
    ``TYPE_CHECKING`` imports name the same objects from the same modules, so IDEs and runtime agree."""
    import importlib

    import pacl_fast

    exports = pacl_fast._EXPORTS
    for name, module in exports.items():
        assert getattr(pacl_fast, name) is getattr(importlib.import_module(module), name), name
    tree = ast.parse((ROOT / "pacl_fast" / "__init__.py").read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    eager = {alias.name: node.module for node in guarded.body for alias in node.names}
    assert eager == exports
    assert {"WeightsUnavailableError", "EncoderUnavailableError"} <= set(pacl_fast.__all__)  # what callers catch


def test_the_readme_layout_names_every_module():
    """The README's Layout section is how a newcomer finds a room: every module of the engine, the
    kernels, training and the benchmarks is named there (a new one added without a line fails here)."""
    import re

    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Tests and CI")]
    modules = [*sources("pacl_fast"), *sources("kernels"), *sources("train"), *sorted((ROOT / "benchmarks").glob("*"))]
    unnamed = [
        str(path.relative_to(ROOT))
        for path in modules
        if path.suffix in (".py", ".sh")
        and path.stem not in ("__init__", "__main__", "conftest")
        and not path.stem.startswith("test_")
        and not re.search(rf"(?<![\w.]){re.escape(path.stem)}(?![\w])", layout)
    ]
    assert not unnamed, f"README's Layout does not name: {unnamed}"
