"""The README's layout section is true to the tree: it names every module of jaxlm/ (in its
package's entry) and every tool, and no file it names is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_entries() -> dict[str, str]:
    """{'jaxlm/models/': text of its entry, 'tools/': ..., 'jaxlm/main.py': ...} from the
    README's Layout block (an entry starts at column 0 and runs until the next one)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    entries, current = {}, None
    for line in block.splitlines():
        if re.match(r"^[\w.]+/", line):
            current, _, text = line.partition(" ")
            entries[current] = text
        elif current and line.startswith(" "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def named_files(text: str) -> set[str]:
    """File names in an entry's text (not those given with another folder, e.g. tools/x.py)."""
    return set(re.findall(r"(?<![/\w])(\w+\.(?:py|sh|ipynb|png))\b", text))


def test_every_jaxlm_module_and_tool_is_named_in_the_layout():
    entries = layout_entries()
    missing = []
    for path in sorted((ROOT / "jaxlm").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if path.name == "__init__.py":
            continue
        if f"{relative}" in entries:  # a top-level module with its own entry (jaxlm/main.py)
            continue
        package = f"{relative.parent}/"
        text = entries.get(package, "")
        if not re.search(rf"\b{re.escape(path.stem)}\b", text):
            missing.append(str(relative))
    for path in sorted((ROOT / "tools").iterdir()):
        if path.suffix in (".py", ".sh") and path.name not in named_files(entries.get("tools/", "")):
            missing.append(f"tools/{path.name}")
    assert not missing, f"the README's layout does not name {missing}"


def test_no_file_the_layout_names_is_gone():
    gone = []
    for entry, text in layout_entries().items():
        if not entry.endswith("/"):
            if not (ROOT / entry).exists():
                gone.append(entry)
            continue
        for name in named_files(text):
            if not (ROOT / entry / name).exists():
                gone.append(entry + name)
    assert not gone, f"the README's layout names files that are gone: {gone}"
