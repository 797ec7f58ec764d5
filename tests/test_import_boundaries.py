"""Import boundaries: `compress/` is model-agnostic (it imports nothing from `sana_sr`, directly or through another
module), and a pruned DiT folder loads without the optional torch-pruning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_compress_imports_nothing_from_sana_sr():
    files = sorted((ROOT / "compress").rglob("*.py"))
    assert len(files) > 10
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in files
           for line, name in _imported_modules(ast.parse(path.read_text(), str(path)))
           if name == "sana_sr" or name.startswith("sana_sr.")]
    assert not bad, bad


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_importing_every_compress_module_loads_no_sana_sr_module():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "compress").rglob("*.py"))
    _run(f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
         "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'sana_sr')\nassert not bad, bad")


@pytest.mark.slow
def test_the_pruned_dit_class_loads_without_torch_pruning():
    # torch-pruning is the optional `compress` extra: loading (not making) a pruned folder must not need it.
    _run("import sys\nsys.modules['torch_pruning'] = None\n"
         "from sana_sr.pruning.model import PrunedSanaTransformer2DModel, load_pruned_transformer, skeleton")
