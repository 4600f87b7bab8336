"""The package's shape stays as ARCHITECTURE.md draws it: imports point one way (no cycle, imports inside
functions counted), no module reaches for another package's private ``_name``, and no file grows past
450 lines. Static (``ast``), so it runs in well under a second and never imports the package.

Run ``python tests/test_architecture.py`` to print the cycles and violations found."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "llmopt"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(node: ast.ImportFrom, name: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(name, path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(edges module -> llmopt modules it imports, private names taken from another package)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        edges[name].add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, name, path)
                if target not in mods:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:  # `from llmopt.stages import base`: the submodule is the target
                        edges[name].add(sub)
                        continue
                    edges[name].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        own = _package_of(name, path)
                        theirs = _package_of(target, mods[target])
                        if own != theirs:
                            private.append(f"{name} imports {alias.name} from {target}")
        # importing llmopt.a.b runs llmopt/a/__init__.py first: the parent packages are imported too
        for target in list(edges[name]):
            while "." in target:
                target = target.rpartition(".")[0]
                if target in mods:
                    edges[name].add(target)
        edges[name].discard(name)
        edges[name].difference_update(p for p in _parents(name) if p in mods)  # a package's own __init__ runs first
    return edges, private


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def long_files(mods: dict[str, Path]) -> list[str]:
    out = []
    for path in mods.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            out.append(f"{path.relative_to(ROOT.parent)}: {n} lines")
    return out


def layer_table(path: Path = ROOT.parent / "ARCHITECTURE.md") -> dict[int, list[str]]:
    """ARCHITECTURE.md's layer table: layer number → module patterns (```llmopt.x``` the module or package
    itself, ```llmopt.x.*``` everything inside it)."""
    table: dict[int, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|", line)
        if m:
            table[int(m.group(1))] = re.findall(r"`(llmopt[\w.*]*)`", line.split("|")[-2])
    return table


def layer_of(module: str, table: dict[int, list[str]]) -> int | None:
    """The layer whose most specific pattern matches ``module``."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for layer, patterns in table.items():
        for p in patterns:
            hit = module.startswith(p[:-1]) if p.endswith(".*") else module == p
            if hit and (best is None or len(p) > best[0]):
                best = (len(p), layer)
    return None if best is None else best[1]


def test_imports_match_the_layer_table():
    """Every module sits in one layer of ARCHITECTURE.md and imports only from its own layer or below."""
    table = layer_table()
    edges, _ = imports(modules())
    unplaced = [m for m in edges if layer_of(m, table) is None]
    assert unplaced == []
    upward = [
        f"{m} (layer {layer_of(m, table)}) imports {d} (layer {layer_of(d, table)})"
        for m, deps in sorted(edges.items())
        for d in sorted(deps)
        if layer_of(d, table) > layer_of(m, table)
    ]
    assert upward == []


def test_no_import_cycle():
    edges, _ = imports(modules())
    assert cycles(edges) == []


def test_no_private_names_across_packages():
    _, private = imports(modules())
    assert private == []


def test_no_file_over_limit():
    assert long_files(modules()) == []


def test_scanner_sees_cycles_and_function_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "llmopt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from llmopt.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom llmopt.a import _hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    edges, private = imports(modules())
    assert cycles(edges) == [["llmopt.a", "llmopt.sub.b"]]
    assert private == ["llmopt.sub.b imports _hidden from llmopt.a"]


if __name__ == "__main__":
    e, p = imports(modules())
    for c in cycles(e):
        print(f"cycle of {len(c)}: {' '.join(c)}")
    print("\n".join(p))
    print("\n".join(long_files(modules())))
    t = layer_table()
    for m, deps in sorted(e.items()):
        if layer_of(m, t) is None:
            print(f"{m}: in no layer of ARCHITECTURE.md")
        for d in sorted(deps):
            if layer_of(m, t) is not None and layer_of(d, t) is not None and layer_of(d, t) > layer_of(m, t):
                print(f"{m} (layer {layer_of(m, t)}) imports {d} (layer {layer_of(d, t)})")
