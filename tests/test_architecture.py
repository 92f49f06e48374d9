"""The layout's rules, checked on the source: no import cycle among labctl's modules (lazy and TYPE_CHECKING
imports count too), and no module reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "labctl"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The labctl module an imported dotted name belongs to (`labctl.a.b.func` -> `labctl.a.b`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[ast.AST, str, list[str]]]:
    """(node, imported module, names taken from it) for every import statement, at any depth."""
    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                b = base
                for _ in range(node.level - 1):
                    b = b.rpartition(".")[0]
                mod = f"{b}.{mod}" if mod else b
            found.append((node, mod, [a.name for a in node.names]))
    return [f for f in found if f[1] == "labctl" or f[1].startswith("labctl.")]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _node, mod, names in _imports(module, path):
            for name in [mod, *(f"{mod}.{n}" for n in names)]:
                target = _owner(name)
                # A package's modules may use their own package's __init__ (its public face) without a cycle.
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_labctl() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _private_uses() -> list[str]:
    """`from labctl.x import _name` and `x._name` on an imported labctl module, outside module x."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node, mod, _names in _imports(module, path):
            target = _owner(mod)
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    sub = _owner(f"{mod}.{alias.name}")
                    if sub and sub != target:  # `from labctl import service` binds a module
                        aliases[alias.asname or alias.name] = sub
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and target != module:
                        bad.append(f"{module}: from {mod} import {alias.name}")
            else:
                for alias in node.names:
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != module):
                bad.append(f"{module}: {aliases[node.value.id]}.{node.attr}")
    return sorted(set(bad))


def test_no_module_reaches_into_another_modules_private_names() -> None:
    assert _private_uses() == []


@pytest.mark.parametrize("kind", ["from", "attribute"])
def test_the_private_name_check_catches_both_forms(tmp_path: Path, kind: str) -> None:
    pkg = tmp_path / "labctl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _secret():\n    return 1\n")
    body = ("from labctl.a import _secret\n" if kind == "from"
            else "from labctl import a\n\ndef f():\n    return a._secret()\n")
    (pkg / "b.py").write_text(body)
    global MODULES
    saved = MODULES
    try:
        MODULES = {"labctl": pkg / "__init__.py", "labctl.a": pkg / "a.py", "labctl.b": pkg / "b.py"}
        expected = "from labctl.a import _secret" if kind == "from" else "labctl.a._secret"
        assert _private_uses() == [f"labctl.b: {expected}"]
    finally:
        MODULES = saved


def test_plan_specs_are_typed_per_kind() -> None:
    """Every resource kind's spec is a TypedDict built by its constructor in `build_plan`, and mypy agrees that
    each construction matches its type (a misspelt or missing field fails here, not at a cloud)."""
    import subprocess
    import sys

    mypy = pytest.importorskip("mypy", reason="mypy is in the test extra")
    assert mypy
    plan_py = SRC / "plan.py"
    done = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                           "--no-incremental", str(plan_py)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    from labctl import plan

    for kind in plan.KIND_ORDER:
        if kind == "port":  # made by the adapter while launching a server, not a plan resource
            continue
        spec = "".join(part.title() for part in kind.split("_")) + "Spec"
        assert hasattr(plan, spec), f"no TypedDict {spec} for kind {kind!r}"
