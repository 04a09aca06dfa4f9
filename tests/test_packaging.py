"""pyproject.toml: every console script names a callable that runs its command, and every
extra the README's commands use exists; constraints.txt pins what the dev install resolves."""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_console_scripts_name_the_entry_points():
    scripts = PROJECT["scripts"]
    assert sorted(scripts) == ["jaxlm-chat", "jaxlm-convert", "jaxlm-eval", "jaxlm-generate", "jaxlm-predict",
                               "jaxlm-train"]
    for name, target in scripts.items():  # read, not imported: entry points define absl flags
        module, function = target.split(":")
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, name


def test_the_readme_installs_with_extras_that_exist_and_the_constraints():
    readme = (ROOT / "README.md").read_text()
    installs = re.findall(r"pip install -e \"?\.(?:\[([\w,]+)\])?\"? -c constraints\.txt", readme)
    assert len(installs) >= 2  # the quickstart and the tests
    extras = {e for group in installs for e in group.split(",") if e}
    assert extras <= set(PROJECT["optional-dependencies"]), extras
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    pinned = {normal(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line}
    for requirement in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]:
        name = normal(re.match(r"[\w.-]+", requirement).group(0))
        assert name in pinned, f"{name} is not in constraints.txt"


# The two tools that keep argparse, and why (each says so in its docstring): launch_local.py passes
# everything after `--` to another program; nanogpt_val_loss.py runs under nanoGPT's PyTorch
# Python, which need not have absl.
ARGPARSE_ALLOWED = {"launch_local.py", "nanogpt_val_loss.py"}


def test_every_tool_and_entry_point_takes_absl_flags():
    sources = [*(ROOT / "tools").glob("*.py"), *(ROOT / "jaxlm").glob("*.py")]
    argparse_users = {p.name for p in sources if re.search(r"^import argparse", p.read_text(), re.M)}
    assert argparse_users == ARGPARSE_ALLOWED
    for name in ARGPARSE_ALLOWED:
        assert "argparse" in ast.get_docstring(ast.parse((ROOT / "tools" / name).read_text()))
