#!/usr/bin/env python
"""Import layering of ``src/reformer``: no import circles and no upward imports, lazy ones included.

Every ``import`` / ``from ... import`` statement of every module is read from the source (those inside
functions too), resolved to a module of the package, and checked against the layers below, top first:
a module may import its own layer and the layers under it. ``reformer/__init__.py`` (the public API),
``__main__`` and the command line sit on top. Circles are found between modules (package ``__init__``
files count as the modules they are).

    .venv/bin/python scripts/check_imports.py            # exit 1 and a list when something is wrong
    .venv/bin/python scripts/check_imports.py --graph    # also print every module's imports
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "reformer"

# Top first. A module's layer is that of the longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("reformer", "reformer.__main__", "reformer.cli"),
    ("reformer.train", "reformer.bench"),
    ("reformer.tasks",),
    ("reformer.parallel",),
    ("reformer.model", "reformer.models", "reformer.hf"),
    ("reformer.generation",),
    (
        "reformer.reversible",
        "reformer.reversible_decoder",
        "reformer.recompute",
        "reformer.feedforward",
        "reformer.embeddings",
    ),
    ("reformer.attention",),
    ("reformer.hashing",),
    ("reformer.data",),
    ("reformer.config", "reformer.files", "reformer.vjp", "reformer.jsonl", "reformer.devices"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    best, rank = -1, len(LAYERS)
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    return rank


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from x import y": the submodule x.y where there is one, else the module x.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def problems(edges: dict[str, set[str]]) -> list[str]:
    out = [f"circle: {' <-> '.join(c)}" for c in circles(edges)]
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer(target) < layer(source):
                out.append(f"upward: {source} imports {target}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", action="store_true", help="print every module's imports")
    args = p.parse_args()
    edges = graph()
    if args.graph:
        for source, targets in sorted(edges.items()):
            print(f"{source}: {', '.join(sorted(targets))}")
    found = problems(edges)
    print("\n".join(found) if found else f"{len(edges)} modules: no circles, no upward imports")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
