"""The layer table of docs/internals.md, enforced: no dissect module imports one above it.

Imports inside functions count too (a function-level import of a higher layer is how the old
import cycles hid).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dissect"

#: Layer of each top-level part of the package, bottom (0) to top (docs/internals.md).
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0,
    "config": 1, "rundir": 1,
    "data": 2, "stats": 2, "toy": 2,
    "record": 3, "parallel": 3,
    "tally": 4, "dissection": 4, "compose": 4, "significance": 4, "segment": 4,
    "ablation": 5, "explain": 5,
    "report": 6,
    "run": 7,
    "cli": 8, "demo": 8, "__main__": 8,
}


def _part(module: str) -> str:
    """Top-level part of a dotted module name inside dissect ('dissect' itself: __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported dissect module) for every import in the file, at any depth."""
    module = "dissect." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from dissect import run` imports the module dissect.run
            if name == "dissect":
                found += [(node.lineno, f"dissect.{alias.name}") for alias in node.names
                          if alias.name in LAYERS]
    return [(line, name) for line, name in found
            if name == "dissect" or name.startswith("dissect.")]


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part("dissect." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if own not in LAYERS:
            problems.append(f"{path}: part {own!r} is missing from the layer table")
            continue
        for line, name in _imports(path):
            target = _part(name)
            if target not in LAYERS:
                problems.append(f"{path}:{line}: imports {name}, not in the layer table")
            elif LAYERS[target] > LAYERS[own]:
                problems.append(f"{path}:{line}: {own} (layer {LAYERS[own]}) imports {name} "
                                f"(layer {LAYERS[target]})")
    return problems


def test_no_module_imports_a_layer_above_it():
    assert _violations() == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "dissect"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "bad.py").write_text(
        "def f():\n    from dissect.run import read_run\n    from ..report import render\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = _violations()
    assert any("imports dissect.run" in p for p in found)
    assert any("imports dissect.report" in p for p in found)


@pytest.mark.parametrize("code", [
    "import dissect.config, dissect.rundir",
    "from dissect.cli import main; main(['dataset', 'check', {dataset!r}])",
    "from dissect.cli import build_parser; build_parser()",
])
def test_light_entry_points_do_not_import_torch_dask_or_h5py(code, broden_tiny):
    program = (code.format(dataset=str(broden_tiny.root)) + "\nimport sys\n"
               "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'dask', "
               "'h5py', 'distributed'})\nprint('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
