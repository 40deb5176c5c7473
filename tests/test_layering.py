"""The layout's rules, read from the source: who may import whom, and file sizes.

The pipeline's layers, bottom up: ``ir`` (the graphs and their semantics) ->
``convert`` (capture, fold, quantize) -> ``run`` / ``report`` -> ``cli``. Back ends
(``simulators``) and file formats (``exporters``) sit beside the core and are reached
from the CLI (or, for back ends, through the registry's module names, never an import).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "csqcfs_deploy"

#: Physical folder -> the importable package it is installed as (pyproject package-dir).
FOLDERS = {ROOT / PKG: PKG, ROOT / "exporters": f"{PKG}.exporters",
           ROOT / "simulators": f"{PKG}.simulators"}

#: package -> packages it must never import (prefix match on the absolute module name).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    f"{PKG}.ir": (f"{PKG}.simulators", f"{PKG}.exporters", f"{PKG}.convert", f"{PKG}.run",
                  f"{PKG}.report", f"{PKG}.cli", f"{PKG}.train"),
    f"{PKG}.convert": (f"{PKG}.simulators", f"{PKG}.exporters", f"{PKG}.run",
                       f"{PKG}.report", f"{PKG}.cli"),
    f"{PKG}.train": (f"{PKG}.simulators", f"{PKG}.exporters", f"{PKG}.convert",
                     f"{PKG}.run", f"{PKG}.report", f"{PKG}.cli"),
    f"{PKG}.run": (f"{PKG}.simulators", f"{PKG}.exporters", f"{PKG}.cli"),
    f"{PKG}.report": (f"{PKG}.simulators", f"{PKG}.exporters", f"{PKG}.cli"),
    f"{PKG}.exporters": (f"{PKG}.cli",),
    f"{PKG}.simulators": (f"{PKG}.cli",),
}
MAX_LINES = 500


def _modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found.append((".".join([package, *parts]), path))
    return found


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, also inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from csqcfs_deploy import simulators`` imports the sub-package
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


MODULES = _modules()


def test_every_source_folder_has_modules() -> None:
    names = {m for m, _ in MODULES}
    for package in (f"{PKG}.ir", f"{PKG}.convert", f"{PKG}.run", f"{PKG}.report",
                    f"{PKG}.cli", f"{PKG}.train", f"{PKG}.simulators", f"{PKG}.exporters"):
        assert package in names, f"{package} is missing"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package: str) -> None:
    """ir/ and convert/ never import a back end or a file format, nor anything above them."""
    bad = []
    for module, path in MODULES:
        if module != package and not module.startswith(package + "."):
            continue
        for line, target in _imports(module, path):
            for banned in FORBIDDEN[package]:
                if target == banned or target.startswith(banned + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_layering_check_sees_a_violation(tmp_path: Path) -> None:
    """The import reader resolves relative and absolute imports (so the test above can fail)."""
    src = tmp_path / "mod.py"
    src.write_text("from ..simulators import integer\n"
                   "def f():\n    from csqcfs_deploy.exporters.nir import x\n")
    found = {t for _, t in _imports(f"{PKG}.ir.mod", src)}
    assert f"{PKG}.simulators.integer" in found
    assert f"{PKG}.exporters.nir" in found


def test_no_source_file_is_over_500_lines() -> None:
    long = [f"{path.relative_to(ROOT)}: {n} lines" for _, path in MODULES
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)
