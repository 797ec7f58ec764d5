"""The package layout's promises: one folder per stage, arrows only downwards (compress: test_import_boundaries)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each stage folder of sana_sr and what it may import from sana_sr ("" = the shared top-level modules).
ALLOWED = {
    "": {""},
    "model": {""},
    "data": {"", "model"},
    "train": {"", "data", "model"},
    "evaluation": {"", "data", "model"},
    "pruning": {"", "data", "model", "train"},
    "quantization": {"", "data", "model", "train", "pruning"},
    "publish": {"", "model", "quantization"},
    "main_job": {"", "data", "model", "train", "pruning", "quantization", "evaluation", "publish"},
}


def stage_of(module: str) -> str:
    """"model" for sana_sr.model.pipeline, "" for sana_sr.images or sana_sr itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (REPO / "sana_sr" / parts[1]).is_dir() else ""


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from sana_sr import bundled`
    return found


def test_stages_import_only_downwards():
    wrong = []
    for path in sorted((REPO / "sana_sr").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module in ("sana_sr.cli", "sana_sr.__init__", "sana_sr.__main__"):
            continue  # the dispatcher names every command
        stage = stage_of(module)
        for target in imports(path):
            if target.startswith("sana_sr.") and target.count(".") >= 1:
                other = stage_of(target)
                if (REPO / "sana_sr" / target.split(".")[1]).is_dir() and other not in ALLOWED[stage] \
                        and other != stage:
                    wrong.append(f"{module} -> {target}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_top_level_holds_only_the_dispatcher_and_shared_helpers():
    modules = sorted(p.name for p in (REPO / "sana_sr").glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "atomic.py", "bundled.py", "cli.py", "distributed.py",
                       "dtypes.py", "images.py", "run_folder.py"]
