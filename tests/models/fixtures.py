"""pytest fixtures for the model zoo: `zoo_model(name, exporter)` -> path of the exported model.

Models are built once into a cache folder shared by every session and checkout:
`$GRAPHOPT_MODEL_CACHE` when set, else `~/.cache/graphopt-models` (pytest's own cache folder,
`.pytest_cache/d/graphopt-models`, when the home folder is not writable). The content key in each
file name (see `zoo.cache_key`) makes stale files unreachable, so the folder never needs clearing
for correctness; delete it to reclaim space.

A model already in the cache is returned without importing torch. Building one needs torch,
transformers (for the transformers models) and onnxscript (for the dynamo exporter); without
them the requesting test is skipped, not failed. Make the fixtures visible to all tests with, in
`tests/conftest.py`,

    from models.fixtures import zoo_cache, zoo_model  # noqa: F401  (found by name)

or, in one test module, `pytest_plugins = ["models.fixtures"]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .specs import get_spec
from .zoo import CACHE_ENV, build, cached_path, default_cache_dir


def zoo_cache_dir(config: pytest.Config | None = None) -> Path:
    """The folder models are built into (created if missing); see the module docstring."""
    path = default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    if os.environ.get(CACHE_ENV) or config is None or config.cache is None:
        raise OSError(f"model cache {path} is not writable: set ${CACHE_ENV} to a writable folder")
    return Path(config.cache.mkdir("graphopt-models"))


@pytest.fixture(scope="session")
def zoo_cache(pytestconfig: pytest.Config) -> Path:
    """The session's model cache folder."""
    return zoo_cache_dir(pytestconfig)


@pytest.fixture(scope="session")
def zoo_model(zoo_cache: Path) -> Callable[..., Path]:
    """A function `get(name, exporter="dynamo", size="tiny", **build_options) -> Path` that
    returns the exported model, building it on first use (skips the test when it cannot)."""

    def get(name: str, exporter: str = "dynamo", size: str = "tiny", **options: Any) -> Path:
        path = cached_path(name, zoo_cache, size, exporter, **options)
        if path.exists():
            return path
        pytest.importorskip("torch", reason="building zoo models needs torch")
        if get_spec(name).builder == "hf":
            pytest.importorskip("transformers", reason=f"building {name} needs transformers")
        if exporter == "dynamo":
            pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
        return build(name, zoo_cache, size, exporter, **options)

    return get
