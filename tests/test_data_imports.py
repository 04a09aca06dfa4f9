"""jaxlm/data sits low in the layers: it imports nothing of jaxlm but itself and jaxlm.tree."""

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "jaxlm" / "data"
ALLOWED = ("jaxlm.data", "jaxlm.tree")


def jaxlm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every jaxlm import in `path`, lazy ones (inside functions) included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from jaxlm import tree` imports jaxlm.tree: judge each name it brings.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name if node.module == "jaxlm" else node.module) for name in names]
    return [(line, module) for line, module in found if module.split(".")[0] == "jaxlm"]


def test_data_imports_only_itself_and_tree():
    bad = [
        f"{path.name}:{line} imports {module}"
        for path in sorted(DATA.glob("*.py"))
        for line, module in jaxlm_imports(path)
        if not any(module == allowed or module.startswith(allowed + ".") for allowed in ALLOWED)
    ]
    assert not bad, "jaxlm/data may import only jaxlm.data and jaxlm.tree: " + "; ".join(bad)


def test_data_uses_no_private_name_of_another_module():
    modules = {path.stem for path in DATA.glob("*.py")}
    bad = []
    for path in sorted(DATA.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in modules and node.value.id != path.stem):
                bad.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "; ".join(bad)
