"""Hold the code to the oldest torch ``setup.py`` admits (``torch>=2.4``), API by API.

The GPU machine runs torch 2.11 and users run anything from the floor up, while this machine has
2.14: a call that only newer releases have would pass every test here. So every ``torch.*``
name the code reaches (``torch.nn.functional.interpolate``, through any import alias) and every
keyword it passes to one is listed, and the list is checked once against a real install of the
floor release (:func:`verify`), which records what it found in ``benchmarks/torch_floor.json``.
``tests/test_torch_floor.py`` then fails on any name or keyword that the file does not hold, so a
new API is verified before it lands:

    python -m benchmarks.torch_floor --verify /path/to/venv-with-torch-2.4/bin/python

(a venv with the floor release: ``python3 -m venv v && v/bin/pip install torch==2.4.1 numpy``).
What this cannot see: methods called on tensors or modules (``x.unflatten(...)``), whose owner is
not known without running the code; ``torch.compile`` back-ends' own needs.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("pacl_fast", "kernels", "train", "benchmarks")
RECORD = Path(__file__).with_name("torch_floor.json")


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to torch modules or objects: ``F`` -> ``torch.nn.functional``."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" or alias.name.startswith("torch."):
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def scan(paths: Iterable[Path]) -> tuple[set[str], set[tuple[str, str]]]:
    """Every ``torch.*`` name reached in ``paths``, and every (name, keyword) passed to a call of one."""
    names: set[str] = set()
    keywords: set[tuple[str, str]] = set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _aliases(tree)
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Attribute, ast.Name)) or isinstance(parents.get(node), ast.Attribute):
                continue  # only whole chains: a.b.c, not a.b inside it
            chain = _chain(node)
            if not chain or chain[0] not in aliases:
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                continue
            full = ".".join([aliases[chain[0]], *chain[1:]])
            names.add(full)
            call = parents.get(node)
            if isinstance(call, ast.Call) and call.func is node:
                keywords.update((full, kw.arg) for kw in call.keywords if kw.arg is not None)
    return names, keywords


def code_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


#: Run by the floor release's interpreter: which names resolve, and which keywords their signatures take.
_PROBE = r"""
import importlib, inspect, json, re, sys
import torch
request = json.load(sys.stdin)
def resolve(name):
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj
def accepts(obj, keyword):
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        doc = (getattr(obj, "__doc__", None) or "").strip()
        head = doc[: doc.find(")") + 1] if "(" in doc.split("\n", 1)[0] else ""  # the signature line(s)
        if not head:
            return None  # nothing to read a signature from
        return bool(re.search(r"[(,*\s]" + re.escape(keyword) + r"\s*[=:,)]", head)) or "**kwargs" in head
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
found, missing, kw_ok, kw_missing, kw_unknown = [], [], [], [], []
objects = {}
for name in request["names"]:
    try:
        objects[name] = resolve(name)
        found.append(name)
    except Exception:
        missing.append(name)
for name, keyword in request["keywords"]:
    if name not in objects:
        continue
    verdict = accepts(objects[name], keyword)
    (kw_unknown if verdict is None else kw_ok if verdict else kw_missing).append([name, keyword])
print(json.dumps({"torch": torch.__version__, "found": found, "missing": missing,
                  "keywords": kw_ok, "keywords_missing": kw_missing, "keywords_unverifiable": kw_unknown}))
"""


def verify(python: str) -> dict:
    """Check the scanned names and keywords with ``python`` (an interpreter with the floor release)."""
    names, keywords = scan(code_files())
    request = json.dumps({"names": sorted(names), "keywords": sorted(keywords)})
    result = subprocess.run([python, "-c", _PROBE], input=request, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", metavar="PYTHON", required=True, help="an interpreter with the floor torch")
    args = parser.parse_args()
    report = verify(args.verify)
    RECORD.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"torch {report['torch']}: {len(report['found'])} names found, {len(report['missing'])} missing; "
          f"{len(report['keywords'])} keywords accepted, {len(report['keywords_missing'])} refused, "
          f"{len(report['keywords_unverifiable'])} without a readable signature; wrote {RECORD}")  # fmt: skip
    for name in report["missing"]:
        print(f"  missing in torch {report['torch']}: {name}")
    for name, keyword in report["keywords_missing"]:
        print(f"  refused by torch {report['torch']}: {name}({keyword}=...)")
    sys.exit(1 if report["missing"] or report["keywords_missing"] else 0)


if __name__ == "__main__":
    main()
