"""The package's layering (docs/layout.md): each subpackage imports only the ones below it,
lazy imports inside functions included."""

import ast
import pathlib

import pytest

import cnngp

SRC = pathlib.Path(cnngp.__file__).parent

#: unit -> the units it may import (besides itself)
FLOOR = {"errors", "settings", "validation", "provenance", "_lazy"}
ALLOWED = {
    "kernels": FLOOR,
    "engine": FLOOR | {"kernels"},
    "io": FLOOR | {"kernels"},
    "finite": FLOOR | {"kernels", "engine"},
    "inference": FLOOR | {"kernels", "engine", "io"},
    "testing": FLOOR | {"kernels", "engine", "io", "finite"},
    "experiments": FLOOR | {"kernels", "engine", "io", "finite", "inference"},
    "cli": FLOOR | {"kernels", "engine", "io", "finite", "inference", "experiments"},
}


def _unit(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "cnngp":
                continue
            if len(parts) > 1:
                yield parts[1], node.lineno
            else:  # from cnngp import x
                for alias in node.names:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the package uses absolute ones")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "cnngp" and len(parts) > 1:
                    yield parts[1], node.lineno


MODULES = sorted(p for p in SRC.rglob("*.py") if _unit(p) in ALLOWED)


def test_every_module_belongs_to_a_layer():
    units = {_unit(p) for p in SRC.rglob("*.py")} - {"__init__", "__main__"}
    assert units <= set(ALLOWED) | FLOOR, units - set(ALLOWED) - FLOOR


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_downwards(path):
    unit = _unit(path)
    bad = [(u, line) for u, line in _imported_units(path) if u != unit and u not in ALLOWED[unit]]
    assert not bad, f"{path.relative_to(SRC)} ({unit}) imports {bad}; allowed: {sorted(ALLOWED[unit])}"


def test_kernel_maths_imports_no_engine_even_at_run_time():
    import subprocess
    import sys

    code = ("import sys, cnngp.kernels.layers, cnngp.kernels.state, cnngp.kernels.correlations;"
            "print(sorted(m for m in sys.modules if m.startswith('cnngp.') and not "
            f"m.startswith(('cnngp.kernels', {', '.join(repr('cnngp.' + m) for m in sorted(FLOOR))}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _module_map() -> set[tuple[str, str]]:
    """(package, module file) pairs named in docs/layout.md's module map (its first code block):
    ``  pkg/`` lines open a package, indented ``name.py`` entries belong to it, other lines at the
    first indent are top-level modules."""
    import re

    text = (SRC.parents[1] / "docs" / "layout.md").read_text()
    block = text.split("```", 2)[1]
    listed, package = set(), ""
    for line in block.splitlines():
        m = re.match(r"^  (\w+)/", line)
        if m:
            package = m.group(1)
            continue
        if re.match(r"^  \S", line):
            package = ""
        listed |= {(package, name) for name in re.findall(r"\b(\w+\.py)\b", line)}
    return listed


def test_module_map_lists_every_module():
    """docs/layout.md's module map names every module where it lives, and nothing that is gone."""
    actual = {(p.parent.name if p.parent != SRC else "", p.name) for p in SRC.rglob("*.py")
              if p.name not in ("__init__.py", "__main__.py")}
    listed = _module_map()
    assert not actual - listed, f"modules missing from docs/layout.md's map: {sorted(actual - listed)}"
    assert not listed - actual, f"docs/layout.md's map lists modules that do not exist: {sorted(listed - actual)}"


def test_layout_doc_points_only_at_paths_users_have():
    text = (SRC.parents[1] / "docs" / "layout.md").read_text()
    assert "../shared" not in text
