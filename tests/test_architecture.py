"""The house rules that keep the code easy to change, checked on the source (README, "Reading the
code"): no import cycles between moejax modules or packages, router / backend names turned into
objects in one factory only, a docstring on every module."""

import ast
import os

import pytest

from moejax.moe.options import Backend, Router, values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
    """``{dotted module name: path}`` for moejax and the tasks package (installed as moejax.tasks)."""
    out = {}
    for base, pkg in (("moejax", "moejax"), ("tasks", "moejax.tasks")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, base))[:-3]
                    parts = [p for p in rel.split(os.sep) if p != "__init__"]
                    out[".".join([pkg] + parts)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    name = "moejax." + name if name == "tasks" or name.startswith("tasks.") else name
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str) -> set[str]:
    """Every moejax module ``mod`` imports, at any depth of the file (function-level included)."""
    path = MODULES[mod]
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import name` imports the package (and the submodule, if name is one)
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            r = _resolve(n)
            if r and r != mod:
                found.add(r)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or os.path.isdir(os.path.join(ROOT, *parts)) or parts[1:] == [
        "tasks"] else mod


def test_no_import_cycles_between_modules():
    graph = {m: _imports(m) for m in MODULES}
    # a package's __init__ re-exporting its own modules is not a cycle with them
    for m in graph:
        graph[m] = {d for d in graph[m] if not (MODULES[d].endswith("__init__.py") and m.startswith(d + "."))}
    assert _cycles(graph) == []


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for m in MODULES:
        for d in _imports(m):
            a, b = _package(m), _package(d)
            if a != b and b != "moejax":
                graph.setdefault(a, set()).add(b)
    assert _cycles(graph) == [], graph


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


NAMES = set(values(Router)) | set(values(Backend))


def _compared_names(path: str) -> list[str]:
    """Router / backend name literals used in a comparison (==, !=, in) or as a dict key."""
    hits = []
    for node in ast.walk(ast.parse(open(path).read())):
        consts = []
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts += [side] if isinstance(side, ast.Constant) else list(getattr(side, "elts", []))
        elif isinstance(node, ast.Dict):
            consts = [k for k in node.keys if k is not None]
        hits += [f"{os.path.basename(path)}:{c.lineno} {c.value!r}" for c in consts
                 if isinstance(c, ast.Constant) and c.value in NAMES]
    return hits


def test_router_and_backend_names_only_in_the_factory():
    moe_dir = os.path.join(ROOT, "moejax", "moe")
    hits = []
    for f in sorted(os.listdir(moe_dir)):
        if f.endswith(".py") and f not in ("factory.py", "options.py"):
            hits += _compared_names(os.path.join(moe_dir, f))
    assert hits == []
    # and nothing in the MoE layer branches on a plan's layout by name any more
    for f in os.listdir(moe_dir):
        if f.endswith(".py"):
            assert ".layout ==" not in open(os.path.join(moe_dir, f)).read(), f


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_every_module_has_a_docstring(mod):
    assert ast.get_docstring(ast.parse(open(MODULES[mod]).read())), MODULES[mod]
