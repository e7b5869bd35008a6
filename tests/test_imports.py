"""The package's modules import one another one way: no circle, whether the import is at the top or inside a
function (a lazy import hides a circle, it does not remove it)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "destein_pl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that `path` imports anywhere in its body (`from a import b` counts `a.b` when `b` is a
    module, else `a`). Package `__init__` re-exports are not edges of the modules they re-export from."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return {name for name in found if name in modules}


def test_no_module_of_the_package_imports_itself_through_others():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: imports(path, modules) - {name} for name, path in paths.items() if not path.name == "__init__.py"}
    for name in graph:  # a module that imports a package imports what its __init__ imports
        graph[name] = {m for target in graph[name] for m in ({target} if target in graph else
                       imports(paths[target], modules) | {target})} - {name}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
