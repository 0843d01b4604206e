"""The shape of the code, checked: imports only go downwards (no cycles), the entry
points stand side by side on the engine (none imports another), modules stay under
400 lines and functions under 80 outside data literals."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("agent", "export")
# The entry points; `agent.cli` dispatches to them, so it may import them all.
ENTRY_POINTS = ("agent.daemon", "agent.http", "agent.predict", "agent.evaluate")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MIN_LITERAL_LINES = 4     # a dict/list literal this long is data, not logic


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            parts = p.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports, anywhere in the file (function-level included)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        if isinstance(node, ast.ImportFrom) and _type_checking_only(tree, node):
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _type_checking_only(tree: ast.AST, node: ast.AST) -> bool:
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING":
            if any(node is c for c in ast.walk(n)):
                return True
    return False


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def test_no_import_cycles():
    g = graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):       # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
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
            # a package importing its own plug-in modules is its registry, not a cycle
            if len(comp) > 1 and not _registry(comp):
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def _registry(comp: list[str]) -> bool:
    pkgs = [m for m in comp if any(o.startswith(m + ".") for o in comp)]
    return len(pkgs) == 1 and all(m == pkgs[0] or m.startswith(pkgs[0] + ".") for m in comp)


def _entry(mod: str) -> str | None:
    return next((e for e in ENTRY_POINTS if mod == e or mod.startswith(e + ".")), None)


def test_entry_points_do_not_import_each_other():
    g = graph()
    bad = []
    for mod, deps in g.items():
        me = _entry(mod)
        for d in deps:
            other = _entry(d)
            if d == "agent.cli" and mod != "agent.cli":
                bad.append((mod, d))
            elif me is not None and other is not None and other != me:
                bad.append((mod, d))
            elif me is None and other is not None and mod != "agent.cli":
                bad.append((mod, d))      # the layers below never reach up
    assert bad == [], f"entry points importing each other (or reached from below): {bad}"


def test_export_touches_the_runtime_only_through_its_contract():
    allowed = {"agent.model_meta", "agent.contract", "agent"}
    g = graph()
    bad = sorted((m, d) for m, deps in g.items() if m.startswith("export")
                 for d in deps if d.startswith("agent") and d not in allowed)
    assert bad == [], bad


def test_modules_are_under_400_lines():
    long = {m: n for m, p in modules().items()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def _literal_lines(fn: ast.AST) -> set[int]:
    lines: set[int] = set()
    for n in ast.walk(fn):
        if isinstance(n, (ast.Dict, ast.List, ast.Tuple, ast.Set)) and \
                n.end_lineno - n.lineno + 1 >= MIN_LITERAL_LINES:
            lines |= set(range(n.lineno, n.end_lineno + 1))
    return lines


def test_functions_are_under_80_lines_outside_data_literals():
    long = []
    for m, p in modules().items():
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = set(range(fn.lineno, fn.end_lineno + 1)) - _literal_lines(fn)
                if len(span) > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{fn.name}: {len(span)}")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"
