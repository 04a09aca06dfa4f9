"""The layering of DESIGN.md, read from the imports of every module under jaxlm/ (lazy ones too).

models/ imports no feature or trainer above it; parallel/ and data/ are leaves (they may use the
generic `jaxlm.tree`); tasks/ never import the trainer.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import import_graph  # tools/ is not a package

FORBIDDEN = {  # package: the jaxlm packages it may not import
    "models": {"peft", "compress", "train", "tasks", "data"},
    "tasks": {"train"},
}
ONLY = {  # package: the only jaxlm packages it may import
    "parallel": {"parallel", "tree"},
    "data": {"data", "tree"},
}


def violations(source: str, module: str, is_package: bool = False, where: str = "") -> list[str]:
    """'FILE:LINE: PACKAGE imports MODULE' for each import of `source` that the layering forbids."""
    own = import_graph.package(module)
    found = []
    for line, name in import_graph.jaxlm_imports(source, module, is_package):
        imported = import_graph.package(name)
        if imported in FORBIDDEN.get(own, ()) or (own in ONLY and imported not in ONLY[own]):
            found.append(f"{where or module}:{line}: {own} imports {name}")
    return found


def test_checker_finds_lazy_relative_and_dynamic_imports():
    source = """\
import importlib
import jaxlm.tree  # allowed everywhere
from jaxlm.models import layers  # models: its own package
def build(name):
    from jaxlm.peft import lora  # lazy, inside a function
    if name:
        from jaxlm import compress  # deeper still
    return importlib.import_module(f"jaxlm.tasks.{name}")  # dynamic
from .. import train  # relative, from jaxlm.models.gpt: jaxlm.train
from ..data.pipeline import batches  # jaxlm.data.pipeline
from . import heads  # models: jaxlm.models.heads, its own package
import jaxlm.parallel.pipeline  # allowed in models
"""
    assert violations(source, "jaxlm.models.gpt") == [
        "jaxlm.models.gpt:5: models imports jaxlm.peft",
        "jaxlm.models.gpt:7: models imports jaxlm.compress",
        "jaxlm.models.gpt:8: models imports jaxlm.tasks",
        "jaxlm.models.gpt:9: models imports jaxlm.train",
        "jaxlm.models.gpt:10: models imports jaxlm.data.pipeline",
    ]
    assert violations(source, "jaxlm.parallel.mesh") == [
        "jaxlm.parallel.mesh:3: parallel imports jaxlm.models",
        "jaxlm.parallel.mesh:5: parallel imports jaxlm.peft",
        "jaxlm.parallel.mesh:7: parallel imports jaxlm.compress",
        "jaxlm.parallel.mesh:8: parallel imports jaxlm.tasks",
        "jaxlm.parallel.mesh:9: parallel imports jaxlm.train",
        "jaxlm.parallel.mesh:10: parallel imports jaxlm.data.pipeline",
    ]
    # in a package's __init__.py `.` is the package itself
    assert violations("from . import base\nfrom .. import train\n", "jaxlm.tasks", is_package=True) == [
        "jaxlm.tasks:2: tasks imports jaxlm.train"]


def test_packages_import_only_those_below_them():
    found = []
    for path, module, is_package in import_graph.sources():
        where = os.path.relpath(path, import_graph.ROOT.parent)
        found += violations(path.read_text(), module, is_package, where)
    assert not found, "imports that break the layering:\n" + "\n".join(found)
