"""Packaging: a built wheel holds every package of the source tree. `pyproject.toml` maps the
repository root to `graphopt` and lists its packages by hand (package-dir mapping); an editable
install finds an unlisted subpackage anyway, a wheel silently drops it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGES = {"tests", "examples", "bench", "tools", "docs", ".venv"}


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"graphopt"}
    for init in ROOT.rglob("__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts and parts[0] not in NOT_PACKAGES and not parts[0].startswith("."):
            found.add(".".join(("graphopt", *parts)))
    assert found == listed
