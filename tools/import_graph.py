"""Which jaxlm packages import which, read from the source with `ast` (lazy imports included).

    python tools/import_graph.py [JAXLM_DIR]

prints one line per package or top-level module of `jaxlm/` that imports others, e.g.
`models -> compress, parallel, peft`, then the pairs that import each other. `jaxlm_imports`
is what tests/test_layering.py checks the layering with.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "jaxlm"
IMPORTERS = ("import_module", "__import__")  # importlib.import_module("jaxlm.x"), __import__("jaxlm.x")


def module_name(path: Path, root: Path = ROOT) -> str:
    """jaxlm/models/layers.py -> 'jaxlm.models.layers'; jaxlm/models/__init__.py -> 'jaxlm.models'."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package(module: str) -> str:
    """The part of jaxlm a module belongs to: 'jaxlm.models.layers' -> 'models', 'jaxlm.tree' -> 'tree'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _dynamic_target(call: ast.Call) -> str | None:
    """The module a call to `import_module`/`__import__` names, as far as its leading literal says."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in IMPORTERS or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return arg.values[0].value.rpartition(".")[0]  # f"jaxlm.tasks.{name}" -> 'jaxlm.tasks'
    return None


def jaxlm_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every jaxlm module that `source` (the module `module`) imports, at any
    depth: `import jaxlm.x`, `from jaxlm.x import y` (-> jaxlm.x), `from jaxlm import x`
    (-> jaxlm.x), relative imports, and `import_module("jaxlm.x...")` calls."""
    found = []
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, `level - 1` packages up
                base = ".".join(here[:len(here) - node.level + 1] + [node.module] * bool(node.module))
            else:
                base = node.module
            if node.module is None or base == "jaxlm":  # `from . import x`, `from jaxlm import x`
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node)):
            found.append((node.lineno, target))
    return sorted((line, name) for line, name in found if name == "jaxlm" or name.startswith("jaxlm."))


def sources(root: Path = ROOT):
    """(path, module name, is_package) of every Python file under `root`."""
    for path in sorted(root.rglob("*.py")):
        yield path, module_name(path, root), path.name == "__init__.py"


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{package: the other packages it imports} over every module under `root`."""
    graph = {}
    for path, module, is_package in sources(root):
        imported = {package(name) for _, name in jaxlm_imports(path.read_text(), module, is_package)}
        graph.setdefault(package(module), set()).update(imported - {package(module), "jaxlm"})
    return graph


def main() -> None:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    graph = package_graph(root)
    for name in sorted(graph, key=lambda n: (not (root / n).is_dir(), n)):  # packages first
        if graph[name]:
            print(f"{name} -> {', '.join(sorted(graph[name]))}")
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    print(f"cycles: {', '.join(cycles) or 'none'}")


if __name__ == "__main__":
    main()
