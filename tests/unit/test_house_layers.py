"""The shape of the house: every module imports alone, and imports only point down.

The layer table is DESIGN.md's: a module may import from its own layer or any layer
below it, never from one above. Imports under ``if TYPE_CHECKING:`` are annotations
only and do not count; imports inside functions do (they run).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "blockrep"

# top to bottom; a module belongs to the first entry whose prefix names it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "cli",
        ("blockrep.cli", "blockrep.ocf", "blockrep.lab", "blockrep.testing", "blockrep.__main__"),
    ),
    ("daemon/ha", ("blockrep.daemon", "blockrep.ha")),
    ("qmp", ("blockrep.qmp",)),
    (
        "services",
        ("blockrep.replication", "blockrep.export", "blockrep.blockdev", "blockrep.objects"),
    ),
    ("jobs", ("blockrep.jobs",)),
    (
        "block",
        (
            "blockrep.block",
            "blockrep.qcow2.driver",
            "blockrep.qcow2.create",
            "blockrep.qcow2.make_empty",
        ),
    ),
    (
        "codecs",
        ("blockrep.nbd", "blockrep.qcow2", "blockrep.address", "blockrep.tls", "blockrep.tls_init"),
    ),
    ("errors", ("blockrep.errors", "blockrep")),
]


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                return i
    raise AssertionError(f"{module} is in no layer of the table")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for every blockrep import that runs, resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` imports the submodule x when there is one
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else mod))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return sorted({(line, m) for line, m in found if m == "blockrep" or m.startswith("blockrep.")})


def test_every_module_is_in_the_layer_table() -> None:
    for m in MODULES:
        layer_of(m)


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for line, target in imported_modules(path):
            if target == "blockrep":  # the package itself: __version__ only
                continue
            if layer_of(target) < layer_of(me):
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: {me} ({LAYERS[layer_of(me)][0]}) imports "
                    f"{target} ({LAYERS[layer_of(target)][0]})"
                )
    assert upward == [], "imports that point up:\n" + "\n".join(upward)


def test_layer_check_catches_an_upward_import(tmp_path: pathlib.Path) -> None:
    # the walker itself must see an upward import (so the test above could fail)
    fake = PACKAGE / "nbd" / "proto.py"
    src = fake.read_text() + "\nfrom ..block.node import Node\n"
    probe = tmp_path / "blockrep" / "nbd"
    probe.mkdir(parents=True)
    copy = probe / "proto.py"
    copy.write_text(src)
    global ROOT
    saved = ROOT
    ROOT = tmp_path
    try:
        targets = [t for _, t in imported_modules(copy)]
    finally:
        ROOT = saved
    assert "blockrep.block.node" in targets
    assert layer_of("blockrep.block.node") < layer_of("blockrep.nbd.proto")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    """A fresh interpreter imports the module with nothing imported before it:
    an import cycle shows up here as an ImportError."""
    r = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_module_outside_ha_over_600_lines() -> None:
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sorted(PACKAGE.rglob("*.py"))
        if "ha" not in p.relative_to(PACKAGE).parts[:1]
        and (n := len(p.read_text().splitlines())) > 600
    ]
    assert long == []


def test_every_package_is_a_regular_package() -> None:
    # a directory without __init__.py is a namespace package: setuptools' find
    # leaves it out of a wheel, so an installed blockrep would lack it
    missing = [
        str(d.relative_to(ROOT))
        for d in sorted(PACKAGE.rglob("*"))
        if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()
    ]
    assert missing == []
