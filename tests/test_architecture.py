"""The architecture, enforced: the import rules of pyproject.toml and the installed layout.

The rules are import-linter contracts (`[tool.importlinter]`), explained in the README's
"Architecture" section. They are checked on the installed package (`virtpub`, where
`publisher/` is `virtpub` and `drivers/` is `virtpub.drivers`), so the graph is first
checked to hold the modules a rule talks about: a rule about modules the checker cannot
see would pass without checking anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
SOURCE_ROOTS = {"publisher": "virtpub", "drivers": "virtpub.drivers"}


def lint_imports(config: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--config", str(config)] if config else []
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", *extra],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_rules_hold() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout


def test_the_checker_sees_every_layer_and_driver() -> None:
    graph = grimp.build_graph("virtpub", cache_dir=None)  # the checkout may be read-only
    layers = ("core", "contract", "amqp", "daemon", "tools", "cli")
    for package in (*layers, "drivers.libvirt", "drivers.files"):
        assert graph.find_children(f"virtpub.{package}"), f"virtpub.{package} has no modules"
    assert graph.direct_import_exists(
        importer="virtpub.drivers.libvirt.domain", imported="virtpub.core.event"
    )


def test_a_broken_rule_is_reported(tmp_path: Path) -> None:
    """The checker fails on a real violation: the daemon does import the contract."""
    config = tmp_path / "broken.toml"
    config.write_text(
        "[tool.importlinter]\n"
        'root_package = "virtpub"\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "a rule the code breaks"\n'
        'type = "forbidden"\n'
        'source_modules = ["virtpub.daemon"]\n'
        'forbidden_modules = ["virtpub.contract"]\n'
    )
    result = lint_imports(config)
    assert result.returncode == 1, result.stdout
    assert "a rule the code breaks BROKEN" in result.stdout


def source_packages() -> set[str]:
    """Every package in the source folders, by the name it is installed under."""
    found = set()
    for folder, installed in SOURCE_ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((installed, *relative)))
    return found


def test_every_source_package_is_installed() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert source_packages() <= listed, "add these to [tool.setuptools] packages"
    assert listed - source_packages() == {"virtpub._schemas"}


def python_files() -> list[Path]:
    return [
        path
        for folder in ("publisher", "drivers", "tests", "bench")
        for path in (REPO / folder).rglob("*.py")
    ]


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_the_source_folder_names(path: Path) -> None:
    """`publisher` and `drivers` are folders, not import names: both belong to others on PyPI."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in SOURCE_ROOTS, f"{path}:{node.lineno} imports {name}"


def test_the_wheel_installs_only_virtpub(tmp_path: Path) -> None:
    """Built as a user's pip builds it: from a copy, since setuptools writes beside the sources."""
    source = tmp_path / "src"
    source.mkdir()
    subprocess.run(
        f"tar --exclude=./.venv --exclude=./build --exclude=./.git --exclude='*.egg-info' -cf - ."
        f" | tar -xf - -C {source}",
        shell=True,
        cwd=REPO,
        check=True,
        executable="/bin/bash",
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("virtpub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"virtpub"}
    assert "virtpub/drivers/libvirt/capability_map.json" in names
    assert "virtpub/_schemas/versions.json" in names
    assert "virtpub/py.typed" in names
    schemas = [name for name in names if name.startswith("virtpub/_schemas/")]
    in_checkout = list((REPO / "schemas").rglob("*.json"))
    assert len(schemas) == len(in_checkout)


PIKA_PRIVATE = ("_adapter_emit_data", "_terminate_stream")


def test_only_the_fast_path_touches_pikas_internals() -> None:
    """A pika upgrade has one module to check: publisher/amqp/frames.py."""
    users = {
        str(path.relative_to(REPO))
        for folder in ("publisher", "drivers")
        for path in (REPO / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in PIKA_PRIVATE
    }
    assert users == {"publisher/amqp/frames.py"}
